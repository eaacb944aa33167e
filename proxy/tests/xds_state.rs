//! The state fed by a real delta-ADS stream: good resources applied in one update, bad ones
//! NACKed without touching what was there (a malformed update never withdraws a DENY).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use proxy::state::{State, StateStore};
use tokio::net::TcpListener;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;
use xds_client::client::ClientConfig;
use xds_client::resources::{
    ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL, Address, Workload, WorkloadType, encode_address,
};
use xds_client::server::{AdsServer, InsecureAcceptAny};

fn workload(uid: &str, ip: [u8; 4], policies: &[&str]) -> Workload {
    Workload {
        uid: uid.into(),
        name: uid.into(),
        namespace: "default".into(),
        addresses: vec![ip.into()],
        network: String::new(),
        tunnel: xds_client::resources::Tunnel::Hbone,
        identity: format!("spiffe://cluster.local/ns/default/sa/{uid}")
            .parse()
            .unwrap(),
        node: "node-a".into(),
        canonical_name: uid.into(),
        canonical_revision: "latest".into(),
        workload_type: WorkloadType::Pod,
        workload_name: uid.into(),
        authorization_policies: policies.iter().map(|p| p.to_string()).collect(),
        healthy: true,
        cluster_id: "Kubernetes".into(),
        hostname: String::new(),
        services: BTreeMap::new(),
        waypoint: None,
        network_gateway: None,
        network_mode: xds_client::resources::NetworkMode::Standard,
        locality: Default::default(),
        capacity: 1,
        native_tunnel: false,
        application_tunnel: None,
    }
}

fn deny_from(namespace: &str) -> Vec<u8> {
    let yaml = format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: deny-evil, namespace: default}}\nspec: {{action: DENY, rules: [{{from: [{{source: {{namespaces: [{namespace}]}}}}]}}]}}\n"
    );
    let policy = authz::parse_policies(&yaml, "test", "istio-system")
        .unwrap()
        .policies
        .remove(0);
    prost::Message::encode_to_vec(&authz::proto::to_proto(&policy))
}

async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !check() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xds_updates_the_state_and_bad_resources_change_nothing() {
    let server = AdsServer::new(InsecureAcceptAny);
    let web = workload("web", [10, 0, 0, 2], &["default/deny-evil"]);
    server.set(
        ADDRESS_TYPE_URL,
        "web",
        encode_address(&Address::Workload(web.clone())),
    );
    server.set(ADDRESS_TYPE_URL, "garbage", vec![0x0a, 0x05, 0x0a]);
    // A resource whose name is not what it describes.
    server.set(
        ADDRESS_TYPE_URL,
        "impostor",
        encode_address(&Address::Workload(workload("sleep", [10, 0, 0, 1], &[]))),
    );
    server.set(
        AUTHORIZATION_TYPE_URL,
        "default/deny-evil",
        deny_from("evil"),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let service = server.service();
    tokio::spawn(async move {
        let _ = Server::builder()
            .serve_with_incoming(service, TcpIncoming::from(listener))
            .await;
    });

    let store = Arc::new(StateStore::new(State::new("istio-system")));
    // The proxy's own wiring: both types, wildcard, synced once both have answered.
    assert!(!store.snapshot().is_synced());
    proxy::state::follow(
        store.clone(),
        ClientConfig::new(format!("http://{addr}"), "node"),
    )
    .unwrap();
    eventually("the first sync", || store.snapshot().is_synced()).await;
    let state = store.snapshot();
    assert_eq!(state.counts(), (1, 0), "only the good workload");
    assert!(state.workload("web").is_some());
    eventually("the NACKs", || {
        server.acks().iter().filter(|a| a.error.is_some()).count() >= 1
    })
    .await;
    let nack = server.acks().into_iter().find_map(|a| a.error).unwrap();
    assert!(
        nack.contains("garbage") && nack.contains("impostor"),
        "{nack}"
    );

    let evil = authz::Connection {
        source: "10.9.0.1:1234".parse().unwrap(),
        destination: "10.0.0.2:8080".parse().unwrap(),
        peer: Some(authz::Principal::parse(
            "spiffe://cluster.local/ns/evil/sa/x",
        )),
    };
    let target = authz::Workload {
        namespace: "default".into(),
        labels: Default::default(),
        policies: web.authorization_policies.clone(),
    };
    assert!(!store.snapshot().policies().decide(&evil, &target).allowed);

    // A malformed update of the DENY is NACKed and the old DENY stays in force.
    server.set(
        AUTHORIZATION_TYPE_URL,
        "default/deny-evil",
        vec![0xff, 0xff],
    );
    eventually("the policy NACK", || {
        server
            .acks()
            .iter()
            .any(|a| a.error.as_deref().is_some_and(|e| e.contains("deny-evil")))
    })
    .await;
    assert!(!store.snapshot().policies().decide(&evil, &target).allowed);
    // A real update applies.
    server.set(
        AUTHORIZATION_TYPE_URL,
        "default/deny-evil",
        deny_from("other"),
    );
    eventually("the new policy", || {
        store.snapshot().policies().decide(&evil, &target).allowed
    })
    .await;
    // Removing the policy the workload names: denied (missing), never "no policy applies".
    server.remove(AUTHORIZATION_TYPE_URL, "default/deny-evil");
    eventually("the removal", || {
        !store.snapshot().policies().decide(&evil, &target).allowed
    })
    .await;
    let d = store.snapshot().policies().decide(&evil, &target);
    assert!(d.to_string().contains("default/deny-evil"), "{d}");
}
