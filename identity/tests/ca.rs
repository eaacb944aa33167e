//! The Istio CA client against the CA server over real gRPC + TLS on loopback, misbehaving CAs,
//! and the secret manager (single fetch, backoff, rotation, fail-closed expiry).

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use identity::ca::proto::istio_certificate_service_server::{
    IstioCertificateService, IstioCertificateServiceServer,
};
use identity::ca::proto::{IstioCertificateRequest, IstioCertificateResponse};
use identity::ca::{
    CaClientConfig, CaServer, CertificateSource, FetchFuture, IstioCaClient, Refusal, SignRequest,
};
use identity::roots::TrustRoots;
use identity::{DevCa, Error, SecretManager, SecretManagerConfig, SpiffeId, WorkloadCert};
use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Identity, Server, ServerTlsConfig};

const HOUR: Duration = Duration::from_secs(3600);
const CA_NAME: &str = "istiod.istio-system.svc";

fn id(text: &str) -> SpiffeId {
    text.parse().unwrap()
}

fn sleep_id() -> SpiffeId {
    id("spiffe://cluster.local/ns/default/sa/sleep")
}

/// Serves `service` over TLS (a certificate for `CA_NAME` from `ca`) on a fresh loopback port.
async fn serve<S>(
    ca: &DevCa,
    service: IstioCertificateServiceServer<S>,
) -> (String, tokio::task::JoinHandle<()>)
where
    S: IstioCertificateService,
{
    let creds = ca.issue_server(&[CA_NAME], HOUR).unwrap();
    let cert_pem = identity::pem::certs_to_pem(&creds.chain);
    let key_pem = identity::pem::key_to_pem(&creds.key);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        Server::builder()
            .tls_config(ServerTlsConfig::new().identity(Identity::from_pem(cert_pem, key_pem)))
            .unwrap()
            .serve_with_incoming(service, TcpIncoming::from(listener))
            .await
            .unwrap();
    });
    (format!("https://{addr}"), task)
}

fn client_config(ca: &DevCa, address: &str) -> CaClientConfig {
    let mut config = CaClientConfig::new(address, Arc::new(ca.trust_roots()));
    config.server_root = Some(identity::grpc::TrustRoot::Pem(ca.root_pem().to_owned()));
    config.tls_server_name = Some(CA_NAME.to_owned());
    config.cert_lifetime = HOUR;
    config.request_timeout = Duration::from_secs(5);
    config
}

/// What the authorizer saw, for assertions.
#[derive(Default)]
struct Seen {
    tokens: Vec<Option<String>>,
    clusters: Vec<Option<String>>,
    impersonated: Vec<bool>,
}

struct TempFile(std::path::PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_and_server_agree_over_grpc_and_tls() {
    let ca = Arc::new(DevCa::generate("cluster.local").unwrap());
    let seen = Arc::new(Mutex::new(Seen::default()));
    let seen2 = seen.clone();
    let authorizer = move |req: &SignRequest<'_>| {
        let mut seen = seen2.lock().unwrap();
        seen.tokens.push(req.bearer_token.map(str::to_owned));
        seen.clusters.push(req.cluster_id.map(str::to_owned));
        seen.impersonated.push(req.impersonated);
        match req.requested.namespace() {
            Some("default") => Ok(()),
            other => Err(Refusal::Denied(format!(
                "namespace {other:?} is not on this node"
            ))),
        }
    };
    let (address, _server) = serve(
        &ca,
        CaServer::new(ca.clone(), authorizer, HOUR).into_service(),
    )
    .await;

    let token = TempFile(std::env::temp_dir().join(format!("ca-token-{}", std::process::id())));
    std::fs::write(&token.0, "first-token\n").unwrap();
    let mut config = client_config(&ca, &address);
    config.token_file = Some(token.0.clone());
    config.cluster_id = Some("Kubernetes".into());
    let client = IstioCaClient::new(config).unwrap();

    let cert = client.sign(&sleep_id()).await.unwrap();
    assert_eq!(cert.id(), &sleep_id());
    assert!(cert.is_valid_at(SystemTime::now()));
    assert!(cert.not_after() <= SystemTime::now() + HOUR + Duration::from_secs(5));
    assert_eq!(
        cert.credentials().chain.len(),
        1,
        "the root is not kept in the chain"
    );

    // The token file is read again for every request.
    std::fs::write(&token.0, "second-token").unwrap();
    client.sign(&sleep_id()).await.unwrap();
    // The authorizer's refusal reaches the caller as PERMISSION_DENIED, naming the identity.
    let err = client
        .sign(&id("spiffe://cluster.local/ns/kube-system/sa/x"))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::CaRpc { code, .. } if code == "PermissionDenied"),
        "{err}"
    );
    assert!(err.to_string().contains("ns/kube-system/sa/x"), "{err}");

    let seen = seen.lock().unwrap();
    assert_eq!(seen.tokens[0].as_deref(), Some("first-token"));
    assert_eq!(seen.tokens[1].as_deref(), Some("second-token"));
    assert_eq!(seen.clusters[0].as_deref(), Some("Kubernetes"));
    assert!(seen.impersonated.iter().all(|i| *i));
}

/// A CA that misbehaves in a chosen way.
#[derive(Clone, Copy)]
enum Misbehaviour {
    WrongIdentity,
    Expired,
    OtherKey,
    Empty,
}

struct BadCa {
    ca: Arc<DevCa>,
    how: Misbehaviour,
}

#[tonic::async_trait]
impl IstioCertificateService for BadCa {
    async fn create_certificate(
        &self,
        request: tonic::Request<IstioCertificateRequest>,
    ) -> Result<tonic::Response<IstioCertificateResponse>, tonic::Status> {
        let csr = request.into_inner().csr;
        let chain = match self.how {
            Misbehaviour::WrongIdentity => self
                .ca
                .sign_csr(
                    &csr,
                    &id("spiffe://cluster.local/ns/default/sa/admin"),
                    HOUR,
                )
                .unwrap(),
            Misbehaviour::Expired => {
                let past = SystemTime::now() - 2 * HOUR;
                self.ca
                    .sign_csr_valid_between(&csr, &sleep_id(), past, past + HOUR)
                    .unwrap()
            }
            Misbehaviour::OtherKey => {
                let other = identity::KeyAndCsr::generate(&sleep_id()).unwrap();
                self.ca.sign_csr(&other.csr_pem, &sleep_id(), HOUR).unwrap()
            }
            Misbehaviour::Empty => Vec::new(),
        };
        Ok(tonic::Response::new(IstioCertificateResponse {
            cert_chain: chain
                .iter()
                .map(|c| identity::pem::certs_to_pem(std::slice::from_ref(c)))
                .collect(),
        }))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misbehaving_ca_answers_are_rejected() {
    let ca = Arc::new(DevCa::generate("cluster.local").unwrap());
    for (how, expect) in [
        (
            Misbehaviour::WrongIdentity,
            "is for spiffe://cluster.local/ns/default/sa/admin",
        ),
        (Misbehaviour::Expired, "not valid now"),
        (Misbehaviour::OtherKey, "not for the key of our CSR"),
        (Misbehaviour::Empty, "no certificate"),
    ] {
        let (address, server) = serve(
            &ca,
            IstioCertificateServiceServer::new(BadCa {
                ca: ca.clone(),
                how,
            }),
        )
        .await;
        let client = IstioCaClient::new(client_config(&ca, &address)).unwrap();
        let err = client.sign(&sleep_id()).await.unwrap_err();
        assert!(matches!(err, Error::CaAnswer { .. }), "{err}");
        assert!(
            err.to_string().contains(expect),
            "expected {expect:?} in: {err}"
        );
        server.abort();
    }
}

/// A CA that signs with an intermediate under its root, answering `[leaf, intermediate]` or
/// `[leaf, intermediate, root]`.
struct TwoLevelCa {
    root: rcgen::Certificate,
    intermediate: rcgen::Certificate,
    intermediate_key: rcgen::KeyPair,
    send_root: bool,
}

impl TwoLevelCa {
    fn new(send_root: bool) -> Self {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
        let ca_params = |cn: &str| {
            let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
            p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            p.distinguished_name
                .push(rcgen::DnType::CommonName, cn.to_owned());
            p
        };
        let root_key = KeyPair::generate().unwrap();
        let root = ca_params("two-level root").self_signed(&root_key).unwrap();
        let intermediate_key = KeyPair::generate().unwrap();
        let intermediate = ca_params("two-level intermediate")
            .signed_by(&intermediate_key, &root, &root_key)
            .unwrap();
        TwoLevelCa {
            root,
            intermediate,
            intermediate_key,
            send_root,
        }
    }

    fn roots(&self) -> Arc<TrustRoots> {
        let root = self.root.der().clone();
        Arc::new(TrustRoots::fixed(vec![root], std::path::Path::new("two-level root")).unwrap())
    }
}

#[tonic::async_trait]
impl IstioCertificateService for TwoLevelCa {
    async fn create_certificate(
        &self,
        request: tonic::Request<IstioCertificateRequest>,
    ) -> Result<tonic::Response<IstioCertificateResponse>, tonic::Status> {
        let csr = request.into_inner().csr;
        let mut csr = rcgen::CertificateSigningRequestParams::from_pem(&csr).unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.subject_alt_names =
            vec![rcgen::SanType::URI(sleep_id().as_str().try_into().unwrap())];
        params.not_before = (SystemTime::now() - Duration::from_secs(60)).into();
        params.not_after = (SystemTime::now() + HOUR).into();
        csr.params = params;
        let leaf = csr
            .signed_by(&self.intermediate, &self.intermediate_key)
            .unwrap();
        let mut chain = vec![leaf.pem(), self.intermediate.pem()];
        if self.send_root {
            chain.push(self.root.pem());
        }
        Ok(tonic::Response::new(IstioCertificateResponse {
            cert_chain: chain,
        }))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn intermediates_are_kept_and_only_a_trailing_self_signed_root_is_dropped() {
    let tls_ca = DevCa::generate("cluster.local").unwrap();
    for send_root in [true, false] {
        let two_level = TwoLevelCa::new(send_root);
        let roots = two_level.roots();
        let intermediate = two_level.intermediate.der().clone();
        let (address, server) = serve(&tls_ca, IstioCertificateServiceServer::new(two_level)).await;
        let mut config = client_config(&tls_ca, &address);
        config.trust_roots = roots.clone();
        let client = IstioCaClient::new(config).unwrap();
        let cert = client.sign(&sleep_id()).await.unwrap();
        let chain = &cert.credentials().chain;
        assert_eq!(chain.len(), 2, "send_root={send_root}: chain {chain:?}");
        assert_eq!(chain[1], intermediate, "send_root={send_root}");
        // A peer that trusts only the root accepts the chain we present.
        let web = DevCa::generate("cluster.local").unwrap();
        let server_tls = identity::tls::server_config(
            chain.clone(),
            cert.credentials().key.clone_key(),
            roots.store(),
            "cluster.local",
        )
        .unwrap();
        let peer_creds = web
            .issue(&id("spiffe://cluster.local/ns/default/sa/web"), HOUR)
            .unwrap();
        let peer = identity::tls::client_config(
            peer_creds.chain,
            peer_creds.key,
            roots.store(),
            vec![sleep_id()],
        )
        .unwrap();
        match common::handshake(peer, server_tls) {
            // The client passes our chain; the server side then refuses the peer's foreign cert.
            Ok(()) | Err(common::Failure::Server(_)) => {}
            Err(common::Failure::Client(e)) => {
                panic!("send_root={send_root}: our chain did not verify: {e}")
            }
        }
        server.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chain_from_another_root_is_rejected() {
    let mesh = DevCa::generate("cluster.local").unwrap();
    let rogue = Arc::new(DevCa::generate("cluster.local").unwrap());
    let (address, _server) = serve(
        &rogue,
        CaServer::new(rogue.clone(), |_: &SignRequest<'_>| Ok(()), HOUR).into_service(),
    )
    .await;
    // TLS to the rogue CA is trusted, but issued chains must verify against the mesh roots.
    let mut config = client_config(&rogue, &address);
    config.trust_roots = Arc::new(mesh.trust_roots());
    let err = IstioCaClient::new(config)
        .unwrap()
        .sign(&sleep_id())
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("does not verify against our trust roots"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_system_trust_store_does_not_vouch_for_the_meshs_own_root() {
    // Istio's `SYSTEM`: the CA's certificate is checked against the system's roots, which do
    // not hold a mesh's private root; nothing is signed.
    let ca = Arc::new(DevCa::generate("cluster.local").unwrap());
    let (address, _server) = serve(
        &ca,
        CaServer::new(ca.clone(), |_: &SignRequest<'_>| Ok(()), HOUR).into_service(),
    )
    .await;
    let mut config = client_config(&ca, &address);
    config.server_root = Some(identity::grpc::TrustRoot::System);
    let err = IstioCaClient::new(config)
        .unwrap()
        .sign(&sleep_id())
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("UnknownIssuer"), "{err}");
    // The same server, checked against its own root, signs.
    let signed = IstioCaClient::new(client_config(&ca, &address))
        .unwrap()
        .sign(&sleep_id())
        .await;
    assert!(signed.is_ok(), "{:?}", signed.err());
}

/// Serves `service` over TLS with a certificate from `ca` on `listener` until `stop` resolves;
/// then its connections close.
fn serve_until<S>(
    ca: &DevCa,
    service: IstioCertificateServiceServer<S>,
    listener: TcpListener,
    stop: impl Future<Output = ()> + Send + 'static,
) -> tokio::task::JoinHandle<()>
where
    S: IstioCertificateService,
{
    let creds = ca.issue_server(&[CA_NAME], HOUR).unwrap();
    let cert_pem = identity::pem::certs_to_pem(&creds.chain);
    let key_pem = identity::pem::key_to_pem(&creds.key);
    tokio::spawn(async move {
        Server::builder()
            .tls_config(ServerTlsConfig::new().identity(Identity::from_pem(cert_pem, key_pem)))
            .unwrap()
            .serve_with_incoming_shutdown(service, TcpIncoming::from(listener), stop)
            .await
            .unwrap();
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_root_rotated_in_its_file_is_used_without_a_restart() {
    // The CA's root file is rewritten in place (the kubelet updating the mounted
    // istio-ca-root-cert ConfigMap) when the CA's certificate moves to a new root: the same
    // client checks the next connection against the new root.
    let (old_root, new_root) = (
        Arc::new(DevCa::generate("cluster.local").unwrap()),
        Arc::new(DevCa::generate("cluster.local").unwrap()),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let address = format!("https://{addr}");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let old_server = serve_until(
        &old_root,
        CaServer::new(old_root.clone(), |_: &SignRequest<'_>| Ok(()), HOUR).into_service(),
        listener,
        async move {
            let _ = stopped.await;
        },
    );
    let root_file = TempFile(std::env::temp_dir().join(format!("ca-root-{}", std::process::id())));
    std::fs::write(&root_file.0, old_root.root_pem()).unwrap();
    let mut config = client_config(&old_root, &address);
    config.server_root = Some(identity::grpc::TrustRoot::File(root_file.0.clone()));
    // Issued chains of either root are trusted by the mesh during the rotation.
    let both = vec![old_root.root(), new_root.root()];
    config.trust_roots =
        Arc::new(TrustRoots::fixed(both, std::path::Path::new("both roots")).unwrap());
    let client = IstioCaClient::new(config).unwrap();
    assert!(client.sign(&sleep_id()).await.is_ok());

    // The CA comes back with a certificate from the new root, on the same address; the client
    // still checks against the old root until the file changes.
    stop.send(()).unwrap();
    old_server.await.unwrap();
    let _new_server = serve_until(
        &new_root,
        CaServer::new(new_root.clone(), |_: &SignRequest<'_>| Ok(()), HOUR).into_service(),
        TcpListener::bind(addr).await.unwrap(),
        std::future::pending(),
    );
    let err = client.sign(&sleep_id()).await.unwrap_err().to_string();
    assert!(err.contains("UnknownIssuer"), "{err}");
    std::fs::write(&root_file.0, new_root.root_pem()).unwrap();
    let signed = client.sign(&sleep_id()).await;
    assert!(signed.is_ok(), "{:?}", signed.err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_ca_is_an_error_not_a_hang() {
    let ca = DevCa::generate("cluster.local").unwrap();
    let closed = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let client = IstioCaClient::new(client_config(&ca, &format!("https://{closed}"))).unwrap();
    let started = Instant::now();
    let err = client.sign(&sleep_id()).await.unwrap_err();
    assert!(
        matches!(&err, Error::CaRpc { code, .. } if code == "Unavailable"),
        "{err}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    // Misconfiguration is caught before any request.
    assert!(
        IstioCaClient::new(CaClientConfig::new(
            "https://x:1",
            Arc::new(ca.trust_roots())
        ))
        .is_err()
    );
    assert!(
        IstioCaClient::new(CaClientConfig::new("not a url", Arc::new(ca.trust_roots()))).is_err()
    );
}

/// A certificate source backed by a DevCa that counts calls and can be told to fail.
struct TestSource {
    ca: DevCa,
    lifetime: Duration,
    calls: AtomicUsize,
    fail_first: usize,
    fail_after: Option<usize>,
    call_times: Mutex<Vec<Instant>>,
}

impl TestSource {
    fn new(lifetime: Duration) -> Self {
        TestSource {
            ca: DevCa::generate("cluster.local").unwrap(),
            lifetime,
            calls: AtomicUsize::new(0),
            fail_first: 0,
            fail_after: None,
            call_times: Mutex::new(Vec::new()),
        }
    }
}

impl CertificateSource for TestSource {
    fn fetch(&self, id: &SpiffeId) -> FetchFuture<'_> {
        let id = id.clone();
        Box::pin(async move {
            let n = self.calls.fetch_add(1, Ordering::SeqCst);
            self.call_times.lock().unwrap().push(Instant::now());
            // A little latency, so concurrent callers really overlap.
            tokio::time::sleep(Duration::from_millis(20)).await;
            if n < self.fail_first || self.fail_after.is_some_and(|k| n >= k) {
                return Err(Error::CaRpc {
                    address: "test".into(),
                    id,
                    code: "Unavailable".into(),
                    message: format!("failure #{n}"),
                });
            }
            let creds = self.ca.issue(&id, self.lifetime).unwrap();
            WorkloadCert::new(id, creds)
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_gets_fetch_once() {
    let source = Arc::new(TestSource::new(HOUR));
    let manager = SecretManager::new(source.clone(), SecretManagerConfig::default());
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..50 {
        let manager = manager.clone();
        tasks.spawn(async move { manager.get(&sleep_id()).await.unwrap() });
    }
    let mut certs = Vec::new();
    while let Some(cert) = tasks.join_next().await {
        certs.push(cert.unwrap());
    }
    assert_eq!(source.calls.load(Ordering::SeqCst), 1);
    assert!(certs.iter().all(|c| Arc::ptr_eq(c, &certs[0])));
    assert_eq!(manager.identities(), vec![sleep_id()]);
    manager.forget(&sleep_id());
    assert!(manager.identities().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_fetches_fail_fast_then_retry_with_growing_backoff() {
    let mut source = TestSource::new(HOUR);
    source.fail_first = 4;
    let source = Arc::new(source);
    let mut config = SecretManagerConfig::default();
    config.initial_backoff = Duration::from_millis(50);
    config.jitter = 0.0;
    let manager = SecretManager::new(source.clone(), config);
    // The first fetch fails: `get` reports it instead of hanging.
    let err = manager.get(&sleep_id()).await.unwrap_err();
    assert!(matches!(err, Error::NoCertificate { .. }), "{err}");
    assert!(err.to_string().contains("failure #0"), "{err}");
    // Retries continue in the background until one succeeds.
    let deadline = Instant::now() + Duration::from_secs(10);
    let cert = loop {
        match manager.get(&sleep_id()).await {
            Ok(cert) => break cert,
            Err(_) => {
                assert!(Instant::now() < deadline, "never recovered");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    assert_eq!(cert.id(), &sleep_id());
    assert_eq!(source.calls.load(Ordering::SeqCst), 5);
    // Gaps between attempts double: ~50, 100, 200, 400 ms (plus the fetch's 20 ms).
    let times = source.call_times.lock().unwrap().clone();
    let gaps: Vec<Duration> = times.windows(2).map(|w| w[1] - w[0]).collect();
    for (gap, expected_ms) in gaps.iter().zip([50u64, 100, 200, 400]) {
        assert!(
            *gap >= Duration::from_millis(expected_ms)
                && *gap < Duration::from_millis(expected_ms * 3 + 200),
            "gaps {gaps:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_get_after_sleeping_past_expiry_fetches_at_once() {
    // One-second certificates whose renewal timer lies far beyond their expiry: what a machine
    // sees after a suspend (monotonic timers stood still while the wall clock moved on).
    let source = Arc::new(TestSource::new(Duration::from_secs(1)));
    let mut config = SecretManagerConfig::default();
    config.refresh_fraction = 1000.0;
    config.jitter = 0.0;
    let manager = SecretManager::new(source.clone(), config);
    let first = manager.get(&sleep_id()).await.unwrap();
    let wait =
        first.not_after().duration_since(SystemTime::now()).unwrap() + Duration::from_millis(200);
    tokio::time::sleep(wait).await;
    assert_eq!(
        source.calls.load(Ordering::SeqCst),
        1,
        "the old timer fired"
    );
    // The next connection's `get` gets a fresh certificate, fetched there and then.
    let started = Instant::now();
    let fresh = manager.get(&sleep_id()).await.unwrap();
    assert!(fresh.is_valid_at(SystemTime::now()));
    assert!(fresh.not_after() > first.not_after());
    assert_eq!(source.calls.load(Ordering::SeqCst), 2);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_certificates_are_never_handed_out() {
    let mut source = TestSource::new(Duration::from_secs(2));
    source.fail_after = Some(1); // the first fetch works, every renewal fails
    let source = Arc::new(source);
    let manager = SecretManager::new(source.clone(), SecretManagerConfig::default());
    let cert = manager.get(&sleep_id()).await.unwrap();
    let resolver = identity::tls::WatchResolver::new(manager.subscribe(&sleep_id()));
    let wait =
        cert.not_after().duration_since(SystemTime::now()).unwrap() + Duration::from_millis(200);
    tokio::time::sleep(wait).await;
    let err = manager.get(&sleep_id()).await.unwrap_err();
    assert!(err.to_string().contains("expired"), "{err}");
    assert!(err.to_string().contains("last CA error"), "{err}");
    // A server resolving through the manager refuses to handshake with the expired certificate.
    let config = identity::tls::server_config_with_resolver(
        Arc::new(resolver),
        source.ca.roots(),
        "cluster.local",
    )
    .unwrap();
    let client_creds = source
        .ca
        .issue(&id("spiffe://cluster.local/ns/default/sa/client"), HOUR)
        .unwrap();
    let client = identity::tls::insecure_client_config_accepting_any_identity(
        client_creds.chain,
        client_creds.key,
        source.ca.roots(),
    )
    .unwrap();
    assert!(common::handshake(client, config).is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshakes_keep_working_across_rotations() {
    // Three-second certificates, renewed at about half their life, through the real CA protocol.
    let ca = Arc::new(DevCa::generate("cluster.local").unwrap());
    let (address, _server) = serve(
        &ca,
        CaServer::new(
            ca.clone(),
            |_: &SignRequest<'_>| Ok(()),
            Duration::from_secs(3),
        )
        .into_service(),
    )
    .await;
    let mut config = client_config(&ca, &address);
    config.cert_lifetime = Duration::from_secs(3);
    let manager = SecretManager::new(
        Arc::new(IstioCaClient::new(config).unwrap()),
        SecretManagerConfig::default(),
    );
    let web = id("spiffe://cluster.local/ns/default/sa/web");
    let mut rotations = manager.subscribe(&web);
    let server = identity::tls::server_config_with_resolver(
        Arc::new(identity::tls::WatchResolver::new(manager.subscribe(&web))),
        ca.roots(),
        "cluster.local",
    )
    .unwrap();
    manager.get(&web).await.unwrap();

    let mut seen = std::collections::HashSet::new();
    let mut handshakes = 0;
    let end = Instant::now() + Duration::from_secs(8);
    while Instant::now() < end {
        let client_cert = manager.get(&sleep_id()).await.unwrap();
        let server_cert = manager.get(&web).await.unwrap();
        assert!(
            client_cert.is_valid_at(SystemTime::now())
                && server_cert.is_valid_at(SystemTime::now())
        );
        seen.insert(server_cert.not_after());
        let client =
            identity::tls::client_config_for(&client_cert, ca.roots(), vec![web.clone()]).unwrap();
        common::handshake(client, server.clone())
            .unwrap_or_else(|e| panic!("handshake {handshakes} failed: {e:?}"));
        handshakes += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(handshakes > 50, "{handshakes}");
    // 8 s of 3 s certificates renewed every ~1.5 s: at least three rotations were exercised.
    assert!(
        seen.len() >= 4,
        "only {} distinct server certificates",
        seen.len()
    );
    assert!(rotations.has_changed().unwrap());
    rotations.borrow_and_update();
}
