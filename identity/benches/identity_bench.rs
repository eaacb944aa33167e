//! identity benchmarks: full TLS 1.3 mTLS handshakes per second with our SPIFFE configs against
//! plain rustls configs (WebPKI hostname verification), and the cost of `SecretManager::get` on a
//! hit. Run with `cargo bench -p identity` (`-- --secs N` per measurement, default 3).
//!
//! Handshakes run in memory on one thread (no sockets), so the numbers are CPU cost: P-256 keys,
//! ECDSA signatures and the chain/identity checks on both sides.

use std::sync::Arc;
use std::time::{Duration, Instant};

use identity::ca::{CertificateSource, FetchFuture};
use identity::{DevCa, SecretManager, SecretManagerConfig, SpiffeId, WorkloadCert};
use rustls::pki_types::ServerName;

fn handshake(client: &Arc<rustls::ClientConfig>, server: &Arc<rustls::ServerConfig>) {
    let name = ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into());
    let mut c = rustls::ClientConnection::new(client.clone(), name).unwrap();
    let mut s = rustls::ServerConnection::new(server.clone()).unwrap();
    let mut buf = Vec::with_capacity(8192);
    loop {
        buf.clear();
        c.write_tls(&mut buf).unwrap();
        s.read_tls(&mut &buf[..]).unwrap();
        s.process_new_packets().unwrap();
        buf.clear();
        s.write_tls(&mut buf).unwrap();
        c.read_tls(&mut &buf[..]).unwrap();
        c.process_new_packets().unwrap();
        if !c.is_handshaking() && !s.is_handshaking() {
            buf.clear();
            c.write_tls(&mut buf).unwrap();
            s.read_tls(&mut &buf[..]).unwrap();
            s.process_new_packets().unwrap();
            return;
        }
    }
}

fn rate(secs: f64, mut f: impl FnMut()) -> f64 {
    // Warm up, then count.
    for _ in 0..20 {
        f();
    }
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed().as_secs_f64() < secs {
        for _ in 0..20 {
            f();
        }
        n += 20;
    }
    n as f64 / start.elapsed().as_secs_f64()
}

struct Fixed(DevCa);

impl CertificateSource for Fixed {
    fn fetch(&self, id: &SpiffeId) -> FetchFuture<'_> {
        let id = id.clone();
        Box::pin(async move {
            let creds = self.0.issue(&id, Duration::from_secs(3600))?;
            WorkloadCert::new(id, creds)
        })
    }
}

fn main() {
    let mut secs = 3.0;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        if arg == "--secs" {
            secs = args
                .next()
                .and_then(|s| s.parse().ok())
                .expect("--secs takes a number");
        }
    }
    let hour = Duration::from_secs(3600);
    let ca = DevCa::generate("cluster.local").unwrap();
    let web: SpiffeId = "spiffe://cluster.local/ns/default/sa/web".parse().unwrap();
    let sleep: SpiffeId = "spiffe://cluster.local/ns/default/sa/sleep"
        .parse()
        .unwrap();
    let web_creds = ca.issue(&web, hour).unwrap();
    let sleep_creds = ca.issue(&sleep, hour).unwrap();

    // Ours: SPIFFE id checks on both sides.
    let ours_client = Arc::new(
        identity::tls::client_config(
            sleep_creds.chain.clone(),
            sleep_creds.key.clone_key(),
            ca.roots(),
            vec![web.clone()],
        )
        .unwrap(),
    );
    let ours_server = Arc::new(
        identity::tls::server_config(
            web_creds.chain.clone(),
            web_creds.key.clone_key(),
            ca.roots(),
            "cluster.local",
        )
        .unwrap(),
    );

    // Plain rustls: WebPKI verifiers, the server proves 127.0.0.1; same keys, curves, TLS 1.3.
    let provider = identity::tls::provider();
    let plain_server_creds = ca.issue_server(&["127.0.0.1"], hour).unwrap();
    let mut plain_server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_client_cert_verifier(
            rustls::server::WebPkiClientVerifier::builder_with_provider(
                ca.roots(),
                provider.clone(),
            )
            .build()
            .unwrap(),
        )
        .with_single_cert(plain_server_creds.chain, plain_server_creds.key)
        .unwrap();
    plain_server.alpn_protocols = vec![b"h2".to_vec()];
    let mut plain_client = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(ca.roots())
        .with_client_auth_cert(sleep_creds.chain.clone(), sleep_creds.key.clone_key())
        .unwrap();
    plain_client.alpn_protocols = vec![b"h2".to_vec()];
    let (plain_client, plain_server) = (Arc::new(plain_client), Arc::new(plain_server));

    let plain = rate(secs, || handshake(&plain_client, &plain_server));
    let ours = rate(secs, || handshake(&ours_client, &ours_server));

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let get_ns = rt.block_on(async {
        let manager = SecretManager::new(
            Arc::new(Fixed(DevCa::generate("cluster.local").unwrap())),
            SecretManagerConfig::default(),
        );
        manager.get(&sleep).await.unwrap();
        let n = 1_000_000u32;
        let start = Instant::now();
        for _ in 0..n {
            std::hint::black_box(manager.get(&sleep).await.unwrap());
        }
        start.elapsed().as_nanos() as f64 / f64::from(n)
    });

    println!(
        "identity benchmark: in-memory TLS 1.3 mTLS, P-256, one thread, {secs} s per measurement\n"
    );
    println!("| measurement | plain rustls (WebPKI names) | ours (SPIFFE ids) | ratio |");
    println!("|---|---|---|---|");
    println!(
        "| full mTLS handshakes/s (client + server work) | {plain:.0} | {ours:.0} | {:.2}x |",
        ours / plain
    );
    println!("| `SecretManager::get` on a hit | | {get_ns:.0} ns | |");
}
