//! The local control plane served over real gRPC: a delta-ADS client and the Istio CA client
//! against it, and manifest edits pushed to the client.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use controlplane::{ComputeConfig, LocalControlPlane, NodeTokens, TwoServices};
use identity::ca::{CaClientConfig, IstioCaClient};
use tokio::net::TcpListener;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;
use xds_client::client::{ClientConfig, Handler, RawResource, Subscription, XdsClient};
use xds_client::resources::{ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL};

#[derive(Default)]
struct Names(Mutex<BTreeSet<String>>);

impl Handler for Names {
    fn apply(&self, added: Vec<RawResource>, removed: Vec<String>) -> Vec<(String, String)> {
        let mut names = self.0.lock().unwrap();
        for r in added {
            names.insert(r.name);
        }
        for r in removed {
            names.remove(&r);
        }
        Vec::new()
    }
}

impl Names {
    fn get(&self) -> BTreeSet<String> {
        self.0.lock().unwrap().clone()
    }
}

struct TempDir(std::path::PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

async fn eventually(what: &str, within: Duration, mut check: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !check() {
        assert!(start.elapsed() < within, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    start.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_the_manifests_and_follows_edits() {
    let dir = TempDir(std::env::temp_dir().join(format!("cp-serve-{}", std::process::id())));
    let _ = std::fs::remove_dir_all(&dir.0);
    std::fs::create_dir_all(&dir.0).unwrap();
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    std::fs::copy(
        root.join("examples/mesh/tutorial.yaml"),
        dir.0.join("mesh.yaml"),
    )
    .unwrap();
    std::fs::copy(
        root.join("examples/policies/tutorial.yaml"),
        dir.0.join("policies.yaml"),
    )
    .unwrap();

    let tokens = Arc::new(NodeTokens::open(&dir.0.join(".node-tokens")).unwrap());
    let cp = LocalControlPlane::new(&dir.0, ComputeConfig::default(), tokens.clone());
    let report = cp.reload();
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(report.counts, (5, 2, 3));
    let ca = Arc::new(identity::DevCa::generate("cluster.local").unwrap());
    let service = TwoServices::new(
        cp.ads().service(),
        cp.ca_service(ca.clone(), Duration::from_secs(3600)),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = Server::builder()
            .serve_with_incoming(service, TcpIncoming::from(listener))
            .await;
    });
    tokio::spawn(cp.clone().watch(Duration::from_millis(100)));

    let addresses = Arc::new(Names::default());
    let policies = Arc::new(Names::default());
    // Node proxies authenticate with their node's token, created by the reload.
    let mut xds_config = ClientConfig::new(
        format!("http://{addr}"),
        "ztunnel~10.0.0.1~ztunnel.istio-system~istio-system.svc.cluster.local",
    );
    xds_config.token_file = Some(tokens.path("node-a"));
    let client = XdsClient::new(xds_config)
        .unwrap()
        .watch(ADDRESS_TYPE_URL, Subscription::Wildcard, addresses.clone())
        .watch(
            AUTHORIZATION_TYPE_URL,
            Subscription::Wildcard,
            policies.clone(),
        );
    let handle = client.handle();
    tokio::spawn(client.run());
    tokio::time::timeout(Duration::from_secs(5), handle.synced().wait_for(|s| *s))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(addresses.get().len(), 7, "{:?}", addresses.get());
    assert!(
        addresses
            .get()
            .contains("default/web-api.default.svc.cluster.local")
    );
    assert_eq!(
        policies.get(),
        [
            "default/allow-nothing",
            "default/recommendation-rbac",
            "default/web-api-rbac"
        ]
        .map(String::from)
        .into()
    );

    // `cp policy.yaml DIR/` behaves like `kubectl apply`: pushed within a second.
    std::fs::write(
        dir.0.join("extra.yaml"),
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: deny-evil, namespace: istio-system}\nspec: {action: DENY, rules: [{from: [{source: {namespaces: [evil]}}]}]}\n",
    )
    .unwrap();
    let took = eventually("the new policy", Duration::from_secs(3), || {
        policies.get().contains("istio-system/deny-evil")
    })
    .await;
    assert!(took < Duration::from_secs(1), "took {took:?}");

    // A bad file is reported and skipped; everything else stays served.
    std::fs::write(
        dir.0.join("broken.yaml"),
        "kind: Pod\nmetadata: {name: x}\nstatus: {podIP: not-an-ip}\n",
    )
    .unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(addresses.get().len(), 7);
    assert_eq!(policies.get().len(), 4);
    let report = cp.reload();
    assert_eq!(report.errors.len(), 1, "{:?}", report.errors);
    assert!(
        report.errors[0].contains("broken.yaml"),
        "{:?}",
        report.errors
    );
    // Removing a file removes its resources.
    std::fs::remove_file(dir.0.join("extra.yaml")).unwrap();
    eventually("the removal", Duration::from_secs(3), || {
        !policies.get().contains("istio-system/deny-evil")
    })
    .await;

    // The CA on the same listener signs identities of pods in the manifests, and only those.
    let mut config = CaClientConfig::new(format!("http://{addr}"), Arc::new(ca.trust_roots()));
    config.cert_lifetime = Duration::from_secs(600);
    config.token_file = Some(tokens.path("node-a"));
    let ca_client = IstioCaClient::new(config).unwrap();
    let sleep: identity::SpiffeId = "spiffe://cluster.local/ns/default/sa/sleep"
        .parse()
        .unwrap();
    assert_eq!(ca_client.sign(&sleep).await.unwrap().id(), &sleep);
    let stranger: identity::SpiffeId = "spiffe://cluster.local/ns/default/sa/stranger"
        .parse()
        .unwrap();
    let err = ca_client.sign(&stranger).await.unwrap_err().to_string();
    assert!(
        err.contains("PermissionDenied") && err.contains("no pod"),
        "{err}"
    );
}
