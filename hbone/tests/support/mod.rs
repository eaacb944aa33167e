//! Shared test fixtures: a throwaway CA, TLS configurations, and servers to talk to.
#![allow(dead_code, unreachable_pub, missing_docs)]

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use hbone::{Authority, Config, InboundConnect, Pool, Server, StaticTls};
use http::HeaderMap;
use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, SanType};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::AsyncReadExt;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

pub struct Pki {
    pub roots: Arc<rustls::RootCertStore>,
    ca_cert: rcgen::Certificate,
    ca_key: KeyPair,
}

pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

impl Pki {
    pub fn new() -> Self {
        let ca_key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_cert = params.self_signed(&ca_key).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca_cert.der().clone()).unwrap();
        Pki {
            roots: Arc::new(roots),
            ca_cert,
            ca_key,
        }
    }

    /// A leaf for `spiffe://cluster.local/ns/default/sa/<sa>`, also valid for 127.0.0.1.
    pub fn leaf(&self, sa: &str) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        let uri = format!("spiffe://cluster.local/ns/default/sa/{sa}");
        params.subject_alt_names = vec![
            SanType::URI(uri.try_into().unwrap()),
            SanType::IpAddress([127, 0, 0, 1].into()),
        ];
        let cert = params.signed_by(&key, &self.ca_cert, &self.ca_key).unwrap();
        (
            vec![cert.der().clone()],
            PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
    }

    pub fn server_config(&self) -> Arc<rustls::ServerConfig> {
        self.server_config_for(&[&rustls::version::TLS13])
    }

    /// A server that would accept TLS 1.2 too (to check that HBONE refuses it anyway).
    pub fn server_config_any_version(&self) -> Arc<rustls::ServerConfig> {
        self.server_config_for(&[&rustls::version::TLS12, &rustls::version::TLS13])
    }

    fn server_config_for(
        &self,
        versions: &[&'static rustls::SupportedProtocolVersion],
    ) -> Arc<rustls::ServerConfig> {
        let (chain, key) = self.leaf("server");
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            self.roots.clone(),
            provider(),
        )
        .build()
        .unwrap();
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(versions)
            .unwrap()
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .unwrap();
        config.alpn_protocols = vec![b"h2".to_vec()];
        Arc::new(config)
    }

    pub fn client_config_tls12(&self) -> Arc<rustls::ClientConfig> {
        let (chain, key) = self.leaf("client");
        let mut config = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS12])
            .unwrap()
            .with_root_certificates(self.roots.clone())
            .with_client_auth_cert(chain, key)
            .unwrap();
        config.alpn_protocols = vec![b"h2".to_vec()];
        Arc::new(config)
    }

    fn client_builder(
        &self,
    ) -> rustls::ConfigBuilder<rustls::ClientConfig, rustls::client::WantsClientCert> {
        rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(self.roots.clone())
    }

    pub fn client_config(&self) -> Arc<rustls::ClientConfig> {
        let (chain, key) = self.leaf("client");
        let mut config = self
            .client_builder()
            .with_client_auth_cert(chain, key)
            .unwrap();
        config.alpn_protocols = vec![b"h2".to_vec()];
        Arc::new(config)
    }

    pub fn client_config_without_cert(&self) -> Arc<rustls::ClientConfig> {
        let mut config = self.client_builder().with_no_client_auth();
        config.alpn_protocols = vec![b"h2".to_vec()];
        Arc::new(config)
    }

    pub fn client_config_with_alpn(&self, alpn: Vec<Vec<u8>>) -> Arc<rustls::ClientConfig> {
        let (chain, key) = self.leaf("client");
        let mut config = self
            .client_builder()
            .with_client_auth_cert(chain, key)
            .unwrap();
        config.alpn_protocols = alpn;
        Arc::new(config)
    }
}

/// A running HBONE echo server that counts handler calls and accepted TCP connections.
pub struct EchoServer {
    pub addr: SocketAddr,
    pub handled: Arc<AtomicUsize>,
    pub accepted: Arc<AtomicUsize>,
    pub task: JoinHandle<()>,
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl EchoServer {
    pub async fn start(pki: &Pki, config: Config) -> Self {
        Self::start_with(pki.server_config(), config).await
    }

    pub async fn start_with(tls: Arc<rustls::ServerConfig>, config: Config) -> Self {
        let handled = Arc::new(AtomicUsize::new(0));
        let accepted = Arc::new(AtomicUsize::new(0));
        let counter = handled.clone();
        let server = Server::new(config, tls, move |req: InboundConnect| {
            counter.fetch_add(1, Ordering::SeqCst);
            async move { echo(req).await }
        });
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted2 = accepted.clone();
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                accepted2.fetch_add(1, Ordering::SeqCst);
                let server = server.clone();
                conns.spawn(async move {
                    let _ = server.serve_connection(tcp).await;
                });
            }
        });
        EchoServer {
            addr,
            handled,
            accepted,
            task,
        }
    }
}

/// Echo handler: 401 for port 401, 503 by dropping for port 503, otherwise echo until EOF.
pub async fn echo(req: InboundConnect) {
    match req.authority().port() {
        401 => req.reject(http::StatusCode::UNAUTHORIZED),
        503 => drop(req),
        _ => {
            let mut tunnel = req.accept().unwrap();
            let (mut rd, mut wr) = tokio::io::split(&mut tunnel);
            if tokio::io::copy(&mut rd, &mut wr).await.is_ok() {
                let _ = wr.shutdown().await;
            }
        }
    }
}

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// A plain TLS server (the test PKI's server certificate, ALPN h2) that runs `serve` on each
/// accepted connection whose TLS handshake succeeded; for scripted or third-party peers.
pub async fn serve_tls<F, Fut>(pki: &Pki, serve: F) -> SocketAddr
where
    F: Fn(tokio_rustls::server::TlsStream<tokio::net::TcpStream>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(pki.server_config());
    let serve = Arc::new(serve);
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let acceptor = acceptor.clone();
            let serve = serve.clone();
            tokio::spawn(async move {
                if let Ok(tls) = acceptor.accept(tcp).await {
                    serve(tls).await;
                }
            });
        }
    });
    addr
}

pub fn authority() -> Authority {
    "10.0.0.1:8080".parse().unwrap()
}

pub fn pool(pki: &Pki, config: Config) -> Pool<&'static str, StaticTls> {
    Pool::new(config, StaticTls(pki.client_config()))
}

pub async fn echo_round_trip(
    pool: &Pool<&'static str, StaticTls>,
    server: &EchoServer,
    data: &[u8],
) -> Vec<u8> {
    let tunnel = pool
        .connect("k", server.addr, &authority(), HeaderMap::new())
        .await
        .unwrap();
    let (mut rd, mut wr) = tokio::io::split(tunnel);
    let writer = async {
        wr.write_all(data).await.unwrap();
        wr.shutdown().await.unwrap();
    };
    let reader = async {
        let mut out = Vec::new();
        rd.read_to_end(&mut out).await.unwrap();
        out
    };
    let ((), out) = tokio::join!(writer, reader);
    out
}

pub async fn round_trip(pool: &Pool<&'static str, StaticTls>, target: SocketAddr) -> Vec<u8> {
    let mut t = pool
        .connect("k", target, &authority(), HeaderMap::new())
        .await
        .unwrap();
    t.write_all(b"hi").await.unwrap();
    t.shutdown().await.unwrap();
    let mut out = Vec::new();
    t.read_to_end(&mut out).await.unwrap();
    out
}
