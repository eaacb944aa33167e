//! `ztunnel controlplane` as a user runs it: TLS with the development CA, a delta-ADS client
//! that verifies `istiod.istio-system.svc` against the CA root, and a live edit.

mod common;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Running, TempDir, free_port, wait_for_listener, ztunnel};
use xds_client::client::{ClientConfig, Handler, RawResource, Subscription, XdsClient};
use xds_client::resources::{ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL};

#[derive(Default)]
struct Names(Mutex<BTreeSet<String>>, Mutex<usize>);

impl Handler for Names {
    fn apply(&self, added: Vec<RawResource>, removed: Vec<String>) -> Vec<(String, String)> {
        let mut names = self.0.lock().unwrap();
        *self.1.lock().unwrap() += added.len();
        names.extend(added.into_iter().map(|r| r.name));
        for r in removed {
            names.remove(&r);
        }
        Vec::new()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controlplane_serves_over_tls_and_follows_the_directory() {
    let dir = TempDir::new("controlplane");
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
    let listen = free_port();
    let _cp = Running(
        ztunnel()
            .args([
                "controlplane",
                "--manifests",
                dir.0.to_str().unwrap(),
                "--listen",
                &listen.to_string(),
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_for_listener(listen);
    let ca_root = std::fs::read_to_string(dir.0.join(".ca/root-cert.pem")).unwrap();
    let mut config = ClientConfig::new(
        format!("https://127.0.0.1:{}", listen.port()),
        "ztunnel~10.0.0.1~ztunnel.istio-system~istio-system.svc.cluster.local",
    );
    config.server_root = Some(identity::grpc::TrustRoot::Pem(ca_root));
    config.tls_server_name = Some("istiod.istio-system.svc".into());
    // The control plane made a token for each node with pods; a node proxy presents its own.
    config.token_file = Some(dir.0.join(".node-tokens/node-a.token"));
    let addresses = Arc::new(Names::default());
    let policies = Arc::new(Names::default());
    let client = XdsClient::new(config)
        .unwrap()
        .watch(ADDRESS_TYPE_URL, Subscription::Wildcard, addresses.clone())
        .watch(
            AUTHORIZATION_TYPE_URL,
            Subscription::Wildcard,
            policies.clone(),
        );
    let handle = client.handle();
    tokio::spawn(client.run());
    tokio::time::timeout(Duration::from_secs(10), handle.synced().wait_for(|s| *s))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(addresses.0.lock().unwrap().len(), 7);
    assert_eq!(policies.0.lock().unwrap().len(), 3);

    // Taking the label off the namespace changes every workload (their tunnel protocol).
    let mesh = std::fs::read_to_string(dir.0.join("mesh.yaml")).unwrap();
    std::fs::write(dir.0.join("policies.yaml"), "").unwrap();
    std::fs::write(
        dir.0.join("mesh.yaml"),
        mesh.replace("labels: {istio.io/dataplane-mode: ambient}", "labels: {}"),
    )
    .unwrap();
    let start = Instant::now();
    while !policies.0.lock().unwrap().is_empty() {
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "policies were not removed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
