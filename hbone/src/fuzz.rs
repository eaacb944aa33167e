//! The body of the `server_frames` fuzz target: whatever a hostile client can send after the TLS
//! layer (HTTP/2 frames, valid or not) goes to a real [`Server`], which must neither panic nor
//! hang. It lives in the library so that an ordinary test runs it over the seed corpus on stable.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::CertificateDer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::{Config, InboundConnect, Server};

/// The HTTP/2 client connection preface, sent before `data` so the fuzzer starts past it.
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Serves one HTTP/2 connection whose client sends the preface then `data`, lets the server act
/// on it, and closes its write side. The handler answers odd ports with 401 and echoes a little on even ones. Panics if the
/// server panics or has not finished 5 s after the client's end of input. Returns how many
/// CONNECT requests reached the handler.
pub fn fuzz_server_frames(data: &[u8]) -> usize {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a Tokio runtime");
    runtime.block_on(async {
        let handled = Arc::new(AtomicUsize::new(0));
        let counter = handled.clone();
        let config = Config {
            keepalive_interval: None,
            ..Config::default()
        };
        let server = Server::new(config, no_certificate_tls(), move |req: InboundConnect| {
            counter.fetch_add(1, Ordering::Relaxed);
            async move {
                if req.authority().port() % 2 == 1 {
                    req.reject(http::StatusCode::UNAUTHORIZED);
                } else if let Ok(mut tunnel) = req.accept() {
                    let mut buf = [0u8; 1024];
                    let _ = tunnel.read(&mut buf).await;
                    let _ = tunnel.write_all(b"ok").await;
                    let _ = tunnel.shutdown().await;
                }
            }
        });
        let server_io = scripted_peer([PREFACE, data].concat());
        let addr = SocketAddr::from(([127, 0, 0, 1], 15008));
        let certs: Arc<[CertificateDer<'static>]> =
            Arc::from(vec![CertificateDer::from(vec![0u8])]);
        let served = server.serve_h2(server_io, addr, addr, certs);
        let _ = tokio::time::timeout(Duration::from_secs(5), served)
            .await
            .expect("the HBONE server did not finish after the client closed");
        // Let the stream tasks the connection spawned run to their end.
        for _ in 0..16 {
            tokio::task::yield_now().await;
        }
        handled.load(Ordering::Relaxed)
    })
}

/// The body of the `client_frames` fuzz target: whatever a hostile server can send after the TLS
/// layer goes to a real client connection that has sent one CONNECT with its first bytes right
/// behind it (as the proxy sends what its client spoke first) and, if answered 200, writes and
/// reads on the tunnel. The server side first sends an empty SETTINGS frame, then `data`,
/// then closes. Panics if the client panics or has not finished 5 s after the server closed.
/// Returns whether the CONNECT was answered 200.
pub fn fuzz_client_frames(data: &[u8]) -> bool {
    use crate::wire::conn::Connection;
    use crate::wire::session::{Limits, Role};
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a Tokio runtime");
    runtime.block_on(async {
        // An empty SETTINGS frame first, as every server starts.
        let client_io = scripted_peer([&[0u8, 0, 0, 4, 0, 0, 0, 0, 0][..], data].concat());
        let connection = Connection::new(
            Role::Client,
            Limits::from_config(&Config::default()),
            client_io,
        );
        let driver = connection.clone();
        tokio::spawn(async move { driver.drive().await });
        let exchange = async {
            let (head, stream, _) = connection
                .connect("10.0.0.1:80", &http::HeaderMap::new(), b"spoke first")
                .await
                .ok()?;
            if head.status != http::StatusCode::OK {
                return Some(false);
            }
            let mut tunnel = crate::Tunnel::new(stream, None);
            let _ = tunnel.write_all(b"hello").await;
            let mut received = Vec::new();
            let _ = tunnel.read_to_end(&mut received).await;
            Some(true)
        };
        tokio::time::timeout(Duration::from_secs(5), exchange)
            .await
            .expect("the HBONE client did not finish after the server closed")
            .unwrap_or(false)
    })
}

/// One end of an in-memory connection whose other end sends `input`, gives the side under test
/// turns to act on every frame (all in memory, on this one thread) as a peer that keeps its
/// connection open would, then closes its write side; it reads and drops whatever it receives.
fn scripted_peer(input: Vec<u8>) -> tokio::io::DuplexStream {
    let (ours, peer) = tokio::io::duplex(64 * 1024);
    let (mut peer_rd, mut peer_wr) = tokio::io::split(peer);
    tokio::spawn(async move {
        let _ = peer_wr.write_all(&input).await;
        for _ in 0..64 {
            tokio::task::yield_now().await;
        }
        let _ = peer_wr.shutdown().await;
        // Keep the read half's peer alive until the side under test is done.
        std::future::pending::<()>().await;
    });
    tokio::spawn(async move {
        let mut sink = vec![0u8; 16 * 1024];
        while matches!(peer_rd.read(&mut sink).await, Ok(n) if n > 0) {}
    });
    ours
}

/// A TLS configuration that is never used for a handshake (the fuzzer starts after TLS).
fn no_certificate_tls() -> Arc<rustls::ServerConfig> {
    #[derive(Debug)]
    struct NoCertificate;
    impl ResolvesServerCert for NoCertificate {
        fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
            None
        }
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3 is supported")
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(NoCertificate));
    Arc::new(config)
}
