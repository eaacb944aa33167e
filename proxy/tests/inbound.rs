//! The inbound HBONE path in process over real TLS and HTTP/2 on loopback: the right client gets
//! through, every kind of wrong one is refused with a reason, and a policy change closes a live
//! connection.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hbone::{Authority, Config, Pool, Server, StaticTls};
use http::HeaderMap;
use identity::{DevCa, SpiffeId};
use proxy::connections::Connections;
use proxy::inbound::{DirectConnector, Inbound, InboundOutcome};
use proxy::state::{State, StateStore};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use xds_client::resources::{Address, Workload, WorkloadType};

const HOUR: Duration = Duration::from_secs(3600);

fn id(sa: &str) -> SpiffeId {
    format!("spiffe://cluster.local/ns/default/sa/{sa}")
        .parse()
        .unwrap()
}

fn web(policies: &[&str]) -> Workload {
    Workload {
        uid: "web".into(),
        name: "web".into(),
        namespace: "default".into(),
        addresses: vec!["127.0.0.1".parse().unwrap()],
        network: String::new(),
        hbone: true,
        identity: id("web"),
        node: "node-a".into(),
        canonical_name: "web".into(),
        canonical_revision: "latest".into(),
        workload_type: WorkloadType::Pod,
        workload_name: "web".into(),
        authorization_policies: policies.iter().map(|p| p.to_string()).collect(),
        healthy: true,
        cluster_id: "Kubernetes".into(),
        hostname: String::new(),
        services: BTreeMap::new(),
    }
}

fn allow(name: &str, sa: &str) -> authz::Policy {
    let yaml = format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: default}}\nspec: {{selector: {{matchLabels: {{app: web}}}}, rules: [{{from: [{{source: {{principals: [cluster.local/ns/default/sa/{sa}]}}}}]}}]}}\n"
    );
    let mut p = authz::parse_policies(&yaml, "test", "istio-system")
        .unwrap()
        .policies
        .remove(0);
    // As xDS sends it: selected by name from the workload.
    p.selector.clear();
    p
}

/// An app that echoes, on a fresh loopback port.
async fn echo_app() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut tcp, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let (mut rd, mut wr) = tcp.split();
                let _ = tokio::io::copy(&mut rd, &mut wr).await;
                let _ = wr.shutdown().await;
            });
        }
    });
    addr
}

struct Node {
    ca: DevCa,
    store: Arc<StateStore>,
    connections: Arc<Connections>,
    outcomes: Arc<Mutex<Vec<InboundOutcome>>>,
    addr: SocketAddr,
}

async fn node(policies: &[&str]) -> Node {
    let ca = DevCa::generate("cluster.local").unwrap();
    let store = Arc::new(StateStore::new(State::new("istio-system")));
    store.update(|s| {
        s.insert_address(Address::Workload(web(policies)));
        s.insert_policy(allow("allow-sleep", "sleep"));
        s.set_synced(true);
    });
    let connections = Connections::new();
    let outcomes: Arc<Mutex<Vec<InboundOutcome>>> = Arc::default();
    let sink = outcomes.clone();
    let inbound = Inbound::new(
        store.clone(),
        connections.clone(),
        "web",
        DirectConnector,
        move |o| sink.lock().unwrap().push(o),
    );
    let creds = ca.issue(&id("web"), HOUR).unwrap();
    let tls =
        identity::tls::server_config(creds.chain, creds.key, ca.roots(), "cluster.local").unwrap();
    let server = Server::new(Config::default(), Arc::new(tls), inbound);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { server.serve(listener).await });
    Node {
        ca,
        store,
        connections,
        outcomes,
        addr,
    }
}

fn client(ca: &DevCa, sa: &str) -> Pool<(), StaticTls> {
    let creds = ca.issue(&id(sa), HOUR).unwrap();
    let tls =
        identity::tls::client_config(creds.chain, creds.key, ca.roots(), vec![id("web")]).unwrap();
    Pool::new(Config::default(), StaticTls(Arc::new(tls)))
}

async fn last_outcome(node: &Node) -> InboundOutcome {
    for _ in 0..200 {
        if let Some(o) = node.outcomes.lock().unwrap().last().cloned() {
            return o;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("no outcome recorded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_allowed_client_gets_through_and_the_outcome_is_recorded() {
    let app = echo_app().await;
    let node = node(&["default/allow-sleep"]).await;
    let authority: Authority = app.to_string().parse().unwrap();
    let mut t = client(&node.ca, "sleep")
        .connect((), node.addr, &authority, HeaderMap::new())
        .await
        .unwrap();
    t.write_all(b"hello web").await.unwrap();
    t.shutdown().await.unwrap();
    let mut got = Vec::new();
    t.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, b"hello web");
    drop(t);
    let o = last_outcome(&node).await;
    assert_eq!(o.status, 200);
    assert_eq!(o.source_identity.as_deref(), Some(id("sleep").as_str()));
    assert_eq!(o.bytes, (9, 9));
    assert!(o.error.is_none(), "{o:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_clients_and_wrong_destinations_are_refused_with_reasons() {
    let app = echo_app().await;
    let node = node(&["default/allow-sleep"]).await;
    let authority: Authority = app.to_string().parse().unwrap();
    // Policy: only sleep.
    let err = client(&node.ca, "notsleep")
        .connect((), node.addr, &authority, HeaderMap::new())
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(http::StatusCode::UNAUTHORIZED), "{err}");
    let o = last_outcome(&node).await;
    assert_eq!(o.source_identity.as_deref(), Some(id("notsleep").as_str()));
    let why = o.error.unwrap();
    assert!(
        why.contains("denied") && why.contains("default/allow-sleep"),
        "{why}"
    );
    // Not an address of the workload served here.
    let elsewhere: Authority = format!("127.0.0.2:{}", app.port()).parse().unwrap();
    let err = client(&node.ca, "sleep")
        .connect((), node.addr, &elsewhere, HeaderMap::new())
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(http::StatusCode::BAD_REQUEST), "{err}");
    assert!(
        last_outcome(&node)
            .await
            .error
            .unwrap()
            .contains("not an address")
    );
    // The proxy's own ports are never a destination.
    for port in [15001u16, 15006, 15008] {
        let own: Authority = format!("127.0.0.1:{port}").parse().unwrap();
        let err = client(&node.ca, "sleep")
            .connect((), node.addr, &own, HeaderMap::new())
            .await
            .unwrap_err();
        assert_eq!(err.status(), Some(http::StatusCode::BAD_REQUEST), "{err}");
        assert!(
            last_outcome(&node)
                .await
                .error
                .unwrap()
                .contains("own port")
        );
    }
    // The app is down.
    let dead = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let err = client(&node.ca, "sleep")
        .connect(
            (),
            node.addr,
            &dead.to_string().parse().unwrap(),
            HeaderMap::new(),
        )
        .await
        .unwrap_err();
    assert_eq!(
        err.status(),
        Some(http::StatusCode::SERVICE_UNAVAILABLE),
        "{err}"
    );
    // A certificate from another root never gets to CONNECT.
    let rogue = DevCa::generate("cluster.local").unwrap();
    let creds = rogue.issue(&id("sleep"), HOUR).unwrap();
    let tls =
        identity::tls::client_config(creds.chain, creds.key, node.ca.roots(), vec![id("web")])
            .unwrap();
    let before = node.outcomes.lock().unwrap().len();
    assert!(
        Pool::new(Config::default(), StaticTls(Arc::new(tls)))
            .connect((), node.addr, &authority, HeaderMap::new())
            .await
            .is_err()
    );
    assert_eq!(node.outcomes.lock().unwrap().len(), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workload_naming_an_unknown_policy_is_denied() {
    let app = echo_app().await;
    let node = node(&["default/allow-sleep", "default/not-received"]).await;
    let err = client(&node.ca, "sleep")
        .connect(
            (),
            node.addr,
            &app.to_string().parse().unwrap(),
            HeaderMap::new(),
        )
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(http::StatusCode::UNAUTHORIZED), "{err}");
    let why = last_outcome(&node).await.error.unwrap();
    assert!(why.contains("default/not-received"), "{why}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_change_closes_a_connection_it_now_denies() {
    let app = echo_app().await;
    let node = node(&["default/allow-sleep"]).await;
    let mut t = client(&node.ca, "sleep")
        .connect(
            (),
            node.addr,
            &app.to_string().parse().unwrap(),
            HeaderMap::new(),
        )
        .await
        .unwrap();
    t.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    t.read_exact(&mut buf).await.unwrap();
    assert_eq!(node.connections.len(), 1);
    // Re-checking with an unchanged state keeps it open.
    assert_eq!(node.connections.reauthorize(&node.store.snapshot()), 0);
    // Now only notsleep is allowed.
    node.store
        .update(|s| s.insert_policy(allow("allow-sleep", "notsleep")));
    assert_eq!(node.connections.reauthorize(&node.store.snapshot()), 1);
    let read = tokio::time::timeout(Duration::from_secs(5), t.read(&mut buf))
        .await
        .expect("the connection stayed open after the policy change");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    let o = last_outcome(&node).await;
    assert!(o.error.unwrap().contains("policy change"));
    assert!(node.connections.is_empty());
}
