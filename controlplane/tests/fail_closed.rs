//! The local control plane fails closed: a broken edit keeps the last good version of its file,
//! and only authenticated node proxies get workloads, policies and certificates (their own
//! node's pods only).

use std::sync::Arc;
use std::time::Duration;

use controlplane::{ComputeConfig, LocalControlPlane, NodeTokens, TwoServices};
use identity::SpiffeId;
use identity::ca::{CaClientConfig, IstioCaClient};
use tokio::net::TcpListener;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;
use xds_client::client::{ClientConfig, Handler, RawResource, Subscription, XdsClient};
use xds_client::resources::{ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL};

struct TempDir(std::path::PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let path = std::env::temp_dir().join(format!("cp-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

const MESH: &str = "apiVersion: v1
kind: Namespace
metadata: {name: default, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: sleep, namespace: default}
spec: {serviceAccountName: sleep, nodeName: node-a}
status: {podIP: 10.244.1.7}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: default}
spec: {serviceAccountName: web, nodeName: node-b}
status: {podIP: 10.244.2.7}
";

const DENY: &str = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-evil, namespace: default}
spec: {action: DENY, rules: [{from: [{source: {namespaces: [evil]}}]}]}
";

fn control_plane(dir: &TempDir) -> LocalControlPlane {
    let tokens = Arc::new(NodeTokens::open(&dir.0.join(".node-tokens")).unwrap());
    LocalControlPlane::new(&dir.0, ComputeConfig::default(), tokens)
}

#[test]
fn a_broken_edit_keeps_serving_the_last_good_version() {
    let dir = TempDir::new("last-good");
    std::fs::write(dir.0.join("mesh.yaml"), MESH).unwrap();
    std::fs::write(dir.0.join("deny.yaml"), DENY).unwrap();
    let cp = control_plane(&dir);
    let report = cp.reload();
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(report.counts, (2, 0, 1));
    let served = |cp: &LocalControlPlane| {
        (
            cp.ads().resource_names(ADDRESS_TYPE_URL).len(),
            cp.ads().resource_names(AUTHORIZATION_TYPE_URL),
        )
    };
    let before = served(&cp);
    assert_eq!(before.1, vec!["default/deny-evil"]);

    // A typo in the policy file and a half-written (unreadable: not UTF-8) mesh file.
    std::fs::write(
        dir.0.join("deny.yaml"),
        "kind: AuthorizationPolicy\nspec: [\n",
    )
    .unwrap();
    std::fs::write(
        dir.0.join("mesh.yaml"),
        b"apiVersion: v1\nkind: Pod\n\xff\xfe",
    )
    .unwrap();
    let report = cp.reload();
    assert_eq!(report.errors.len(), 2, "{:?}", report.errors);
    for (file, error) in ["deny.yaml", "mesh.yaml"].iter().zip(&report.errors) {
        assert!(error.contains(file), "{error}");
        assert!(error.contains("last good version"), "{error}");
    }
    assert_eq!(served(&cp), before, "a broken edit withdrew resources");
    assert_eq!(report.counts, (2, 0, 1));
    assert_eq!(cp.errors(), report.errors);

    // A policy the translation rejects (not just bad YAML) is kept at its last good version too.
    std::fs::write(
        dir.0.join("deny.yaml"),
        DENY.replace("namespaces: [evil]", "ipBlocks: [10.0.0.300/8]"),
    )
    .unwrap();
    let report = cp.reload();
    assert!(
        report
            .errors
            .iter()
            .any(|e| e.contains("deny.yaml") && e.contains("10.0.0.300/8"))
    );
    assert_eq!(served(&cp), before);

    // A new file that is broken from the start serves nothing, and says so.
    std::fs::write(
        dir.0.join("new.yaml"),
        "kind: Pod\nmetadata: {name: x}\nstatus: {podIP: no}\n",
    )
    .unwrap();
    let report = cp.reload();
    assert!(
        report
            .errors
            .iter()
            .any(|e| e.contains("new.yaml") && e.contains("nothing from it"))
    );

    // Fixing the files clears the errors; removing a file withdraws what it held.
    std::fs::write(dir.0.join("mesh.yaml"), MESH).unwrap();
    std::fs::write(dir.0.join("deny.yaml"), DENY).unwrap();
    std::fs::remove_file(dir.0.join("new.yaml")).unwrap();
    assert!(cp.reload().errors.is_empty());
    assert!(cp.errors().is_empty());
    std::fs::remove_file(dir.0.join("deny.yaml")).unwrap();
    cp.reload();
    assert!(served(&cp).1.is_empty());
}

async fn serve(cp: &LocalControlPlane, ca: Arc<identity::DevCa>) -> std::net::SocketAddr {
    let service = TwoServices::new(
        cp.ads().service(),
        cp.ca_service(ca, Duration::from_secs(3600)),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = Server::builder()
            .serve_with_incoming(service, TcpIncoming::from(listener))
            .await;
    });
    addr
}

fn id(text: &str) -> SpiffeId {
    text.parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ca_signs_only_for_a_node_and_only_its_own_pods() {
    let dir = TempDir::new("ca-auth");
    std::fs::write(dir.0.join("mesh.yaml"), MESH).unwrap();
    let cp = control_plane(&dir);
    assert!(cp.reload().errors.is_empty());
    let ca = Arc::new(identity::DevCa::generate("cluster.local").unwrap());
    let addr = serve(&cp, ca.clone()).await;
    let client = |token: Option<std::path::PathBuf>, impersonate: bool| {
        let mut config = CaClientConfig::new(format!("http://{addr}"), Arc::new(ca.trust_roots()));
        config.token_file = token;
        config.impersonate = impersonate;
        config.cert_lifetime = Duration::from_secs(600);
        IstioCaClient::new(config).unwrap()
    };
    let sleep = id("spiffe://cluster.local/ns/default/sa/sleep");
    let web = id("spiffe://cluster.local/ns/default/sa/web");
    let node_a = Some(cp.tokens().path("node-a"));
    let node_b = Some(cp.tokens().path("node-b"));
    // Each node's token files exist (mode 0600) once a pod is scheduled there.
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(node_a.as_ref().unwrap())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    // node-a's proxy gets its own pod's identity.
    assert_eq!(
        client(node_a.clone(), true)
            .sign(&sleep)
            .await
            .unwrap()
            .id(),
        &sleep
    );
    assert_eq!(
        client(node_b.clone(), true).sign(&web).await.unwrap().id(),
        &web
    );
    // ...and nothing else.
    let refused = |e: identity::Error| e.to_string();
    let e = refused(client(node_a.clone(), true).sign(&web).await.unwrap_err());
    assert!(
        e.contains("PermissionDenied") && e.contains("node node-a") && e.contains("node-b"),
        "{e}"
    );
    let e = refused(client(node_b.clone(), true).sign(&sleep).await.unwrap_err());
    assert!(
        e.contains("PermissionDenied") && e.contains("node node-b"),
        "{e}"
    );
    let e = refused(client(None, true).sign(&sleep).await.unwrap_err());
    assert!(
        e.contains("Unauthenticated") && e.contains("no bearer token"),
        "{e}"
    );
    let forged = dir.0.join("forged.token");
    std::fs::write(&forged, "0".repeat(64)).unwrap();
    let e = refused(client(Some(forged), true).sign(&sleep).await.unwrap_err());
    assert!(
        e.contains("Unauthenticated") && e.contains("unknown bearer token"),
        "{e}"
    );
    let e = refused(
        client(node_a.clone(), false)
            .sign(&sleep)
            .await
            .unwrap_err(),
    );
    assert!(
        e.contains("PermissionDenied") && e.contains("ImpersonatedIdentity"),
        "{e}"
    );
    let stranger = id("spiffe://cluster.local/ns/default/sa/stranger");
    let e = refused(client(node_a, true).sign(&stranger).await.unwrap_err());
    assert!(e.contains("no pod"), "{e}");
}

#[derive(Default)]
struct Count(std::sync::Mutex<usize>);

impl Handler for Count {
    fn apply(&self, added: Vec<RawResource>, _removed: Vec<String>) -> Vec<(String, String)> {
        *self.0.lock().unwrap() += added.len();
        Vec::new()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xds_serves_only_streams_with_a_node_token() {
    let dir = TempDir::new("xds-auth");
    std::fs::write(dir.0.join("mesh.yaml"), MESH).unwrap();
    let cp = control_plane(&dir);
    assert!(cp.reload().errors.is_empty());
    let ca = Arc::new(identity::DevCa::generate("cluster.local").unwrap());
    let addr = serve(&cp, ca).await;
    let forged = dir.0.join("forged.token");
    std::fs::write(&forged, "f".repeat(64)).unwrap();
    for (token, served) in [
        (Some(cp.tokens().path("node-b")), true),
        (None, false),
        (Some(forged), false),
    ] {
        let mut config = ClientConfig::new(
            format!("http://{addr}"),
            "ztunnel~10.0.0.2~z.istio-system~istio-system.svc.cluster.local",
        );
        config.token_file = token.clone();
        let count = Arc::new(Count::default());
        let client = XdsClient::new(config).unwrap().watch(
            ADDRESS_TYPE_URL,
            Subscription::Wildcard,
            count.clone(),
        );
        let handle = client.handle();
        let task = tokio::spawn(client.run());
        let mut synced = handle.synced();
        let result =
            tokio::time::timeout(Duration::from_millis(800), synced.wait_for(|s| *s)).await;
        assert_eq!(result.is_ok(), served, "token {token:?}");
        assert_eq!(*count.0.lock().unwrap() > 0, served, "token {token:?}");
        task.abort();
    }
}
