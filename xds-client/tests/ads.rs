//! The delta-ADS client against the delta-ADS server over real gRPC on loopback.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpListener;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;
use xds_client::client::{ClientConfig, Handler, RawResource, Subscription, XdsClient, XdsHandle};
use xds_client::server::{ACK_LOG, AdsServer, Change, InsecureAcceptAny, StreamCredentials};

const T: &str = "type.googleapis.com/istio.workload.Address";
const P: &str = "type.googleapis.com/istio.security.Authorization";

/// Keeps what it was given; rejects resources whose body is "bad"; records every removal.
#[derive(Default)]
struct Store {
    held: Mutex<BTreeMap<String, Vec<u8>>>,
    removals: Mutex<Vec<String>>,
    sizes: Mutex<Vec<usize>>,
    additions: Mutex<Vec<String>>,
}

impl Handler for Store {
    fn apply(&self, added: Vec<RawResource>, removed: Vec<String>) -> Vec<(String, String)> {
        let mut held = self.held.lock().unwrap();
        let mut rejected = Vec::new();
        for r in added {
            if r.body == b"bad" {
                rejected.push((r.name, "body is bad".to_owned()));
            } else {
                self.additions.lock().unwrap().push(r.name.clone());
                held.insert(r.name, r.body);
            }
        }
        for name in removed {
            held.remove(&name);
            self.removals.lock().unwrap().push(name);
        }
        self.sizes.lock().unwrap().push(held.len());
        rejected
    }
}

impl Store {
    fn names(&self) -> Vec<String> {
        self.held.lock().unwrap().keys().cloned().collect()
    }
}

async fn serve(server: &AdsServer, listener: TcpListener) -> tokio::task::JoinHandle<()> {
    // (The task serves until the test ends; connections outlive an abort, so restarts are
    // simulated with `relay`.)
    let service = server.service();
    tokio::spawn(async move {
        let _ = Server::builder()
            .serve_with_incoming(service, TcpIncoming::from(listener))
            .await;
    })
}

async fn start(server: &AdsServer) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    (addr, serve(server, listener).await)
}

fn client(addr: SocketAddr, stores: &[(&str, Subscription, Arc<Store>)]) -> XdsHandle {
    let mut client = XdsClient::new(ClientConfig::new(
        format!("http://{addr}"),
        "ztunnel~10.0.0.1~ztunnel-x.istio-system~istio-system.svc.cluster.local",
    ))
    .unwrap();
    for (url, sub, store) in stores {
        client = client.watch(url, sub.clone(), store.clone());
    }
    let handle = client.handle();
    tokio::spawn(client.run());
    handle
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
async fn initial_sync_then_add_update_remove() {
    let server = AdsServer::new(InsecureAcceptAny);
    server.set(T, "w1", b"one".to_vec());
    server.set(T, "w2", b"two".to_vec());
    let (addr, _task) = start(&server).await;
    let workloads = Arc::new(Store::default());
    let policies = Arc::new(Store::default());
    let handle = client(
        addr,
        &[
            (T, Subscription::Wildcard, workloads.clone()),
            (P, Subscription::Wildcard, policies.clone()),
        ],
    );
    // Synced needs a first response for both types, even the empty policy type.
    let mut synced = handle.synced();
    tokio::time::timeout(Duration::from_secs(5), synced.wait_for(|s| *s))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(workloads.names(), vec!["w1", "w2"]);
    assert!(policies.names().is_empty());

    server.set(T, "w3", b"three".to_vec());
    server.set(T, "w1", b"one-v2".to_vec());
    server.remove(T, "w2");
    eventually("the delta", || {
        workloads.names() == vec!["w1", "w3"] && workloads.held.lock().unwrap()["w1"] == b"one-v2"
    })
    .await;
    // Every response was ACKed (no NACK).
    eventually("ACKs", || server.acks().len() >= 3).await;
    assert!(
        server.acks().iter().all(|a| a.error.is_none()),
        "{:?}",
        server.acks()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_resources_are_nacked_and_the_rest_applied() {
    let server = AdsServer::new(InsecureAcceptAny);
    server.set(T, "good", b"fine".to_vec());
    server.set(T, "broken", b"bad".to_vec());
    let (addr, _task) = start(&server).await;
    let store = Arc::new(Store::default());
    let handle = client(addr, &[(T, Subscription::Wildcard, store.clone())]);
    tokio::time::timeout(Duration::from_secs(5), handle.synced().wait_for(|s| *s))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(store.names(), vec!["good"]);
    eventually("the NACK", || {
        server.acks().iter().any(|a| a.error.is_some())
    })
    .await;
    let nack = server
        .acks()
        .into_iter()
        .find(|a| a.error.is_some())
        .unwrap();
    assert_eq!(nack.type_url, T);
    assert_eq!(nack.error.as_deref(), Some("broken: body is bad"));
}

/// A TCP relay to a server; aborting its task closes every connection it carries, as a dying
/// control plane would.
async fn relay(listener: TcpListener, to: SocketAddr) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut connections = tokio::task::JoinSet::new();
        while let Ok((mut inbound, _)) = listener.accept().await {
            connections.spawn(async move {
                if let Ok(mut outbound) = tokio::net::TcpStream::connect(to).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_restart_resyncs_without_dropping_state() {
    let server = AdsServer::new(InsecureAcceptAny);
    for name in ["a", "b", "c"] {
        server.set(T, name, name.as_bytes().to_vec());
    }
    let (backend, _first) = start(&server).await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let front = relay(listener, backend).await;
    let store = Arc::new(Store::default());
    let handle = client(addr, &[(T, Subscription::Wildcard, store.clone())]);
    tokio::time::timeout(Duration::from_secs(5), handle.synced().wait_for(|s| *s))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(store.names(), vec!["a", "b", "c"]);

    // The control plane goes away; a new one (same address) has lost "b" and gained "d".
    front.abort();
    let _ = front.await;
    let restarted = AdsServer::new(InsecureAcceptAny);
    for name in ["a", "c", "d"] {
        restarted.set(T, name, name.as_bytes().to_vec());
    }
    let (new_backend, _second) = start(&restarted).await;
    let listener = loop {
        match TcpListener::bind(addr).await {
            Ok(l) => break l,
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    };
    let _front = relay(listener, new_backend).await;
    eventually("the resync", || store.names() == vec!["a", "c", "d"]).await;
    // Only "b" was ever removed, and the store never went empty in between.
    assert_eq!(*store.removals.lock().unwrap(), vec!["b"]);
    assert!(
        store.sizes.lock().unwrap().iter().all(|n| *n >= 2),
        "{:?}",
        store.sizes.lock().unwrap()
    );
    // The new server was told what the client held (versions are content hashes): it sent only
    // what differed, "d", and not the unchanged "a" and "c" again.
    assert_eq!(*store.additions.lock().unwrap(), vec!["a", "b", "c", "d"]);
    assert!(restarted.acks().iter().all(|a| a.error.is_none()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_demand_subscription() {
    let server = AdsServer::new(InsecureAcceptAny);
    for name in ["x", "y", "z"] {
        server.set(T, name, name.as_bytes().to_vec());
    }
    let (addr, _task) = start(&server).await;
    let store = Arc::new(Store::default());
    let handle = client(
        addr,
        &[(T, Subscription::Names(vec!["x".into()]), store.clone())],
    );
    tokio::time::timeout(Duration::from_secs(5), handle.synced().wait_for(|s| *s))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(store.names(), vec!["x"]);
    handle.subscribe(T, vec!["z".into()]);
    eventually("the on-demand resource", || store.names() == vec!["x", "z"]).await;
    // Resources outside the subscription never arrive.
    server.set(T, "y", b"y2".to_vec());
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(store.names(), vec!["x", "z"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typed_handler_and_bearer_token() {
    use xds_client::client::Decoding;
    use xds_client::resources::{Address, decode_address, encode_address};

    // Only streams that present the token, from the expected cluster, are served (istiod
    // checks the `clusterid` header against the cluster it serves).
    let server = AdsServer::new(
        |c: &StreamCredentials<'_>| match (c.bearer_token, c.cluster_id) {
            (Some("secret-token"), Some("east")) => Ok("node-a".to_owned()),
            (Some("secret-token"), other) => Err(format!("cluster {other:?}")),
            (Some(_), _) => Err("unknown token".to_owned()),
            (None, _) => Err("no bearer token".to_owned()),
        },
    );
    let w = xds_client::resources::Workload {
        uid: "u1".into(),
        name: "p".into(),
        namespace: "default".into(),
        addresses: vec!["10.0.0.9".parse().unwrap()],
        network: String::new(),
        tunnel: xds_client::resources::Tunnel::Hbone,
        identity: "spiffe://cluster.local/ns/default/sa/p".parse().unwrap(),
        node: String::new(),
        canonical_name: String::new(),
        canonical_revision: String::new(),
        workload_type: xds_client::resources::WorkloadType::Pod,
        workload_name: String::new(),
        authorization_policies: vec![],
        healthy: true,
        cluster_id: String::new(),
        hostname: String::new(),
        services: Default::default(),
        waypoint: None,
        network_gateway: None,
        network_mode: xds_client::resources::NetworkMode::Standard,
        locality: Default::default(),
        capacity: 1,
        native_tunnel: false,
        application_tunnel: None,
    };
    server.set(T, "u1", encode_address(&Address::Workload(w.clone())));
    server.set(T, "garbage", vec![0x0a, 0x05, 0x0a]);
    let (addr, _task) = start(&server).await;
    let token = std::env::temp_dir().join(format!("xds-token-{}", std::process::id()));
    std::fs::write(&token, "secret-token\n").unwrap();
    let seen: Arc<Mutex<Vec<(String, Address)>>> = Arc::default();
    let seen2 = seen.clone();
    let handler = Decoding::new(
        |bytes: &[u8]| decode_address(bytes).map_err(|e| e.to_string()),
        move |added: Vec<(String, Address)>, _removed: Vec<String>| {
            seen2.lock().unwrap().extend(added)
        },
    );
    let mut config = ClientConfig::new(format!("http://{addr}"), "node");
    config.token_file = Some(token.clone());
    config.cluster_id = Some("east".into());
    let client =
        XdsClient::new(config)
            .unwrap()
            .watch(T, Subscription::Wildcard, Arc::new(handler));
    let handle = client.handle();
    tokio::spawn(client.run());
    tokio::time::timeout(Duration::from_secs(5), handle.synced().wait_for(|s| *s))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        *seen.lock().unwrap(),
        vec![("u1".to_owned(), Address::Workload(w))]
    );
    eventually("the NACK", || {
        server.acks().iter().any(|a| a.error.is_some())
    })
    .await;
    let nack = server.acks().into_iter().find_map(|a| a.error).unwrap();
    assert!(
        nack.starts_with("garbage: Address: not a valid protobuf"),
        "{nack}"
    );
    // Without the token, with another one, or without the cluster id, nothing is served.
    let acks_before = server.ack_counts();
    let mut written = Vec::new();
    for (case, (token_text, cluster)) in [
        (None, Some("east")),
        (Some("wrong-token"), Some("east")),
        (Some("secret-token"), None),
        (Some("secret-token"), Some("west")),
    ]
    .into_iter()
    .enumerate()
    {
        let mut config = ClientConfig::new(format!("http://{addr}"), "node");
        config.cluster_id = cluster.map(str::to_owned);
        if let Some(text) = token_text {
            // A file of its own: the refused clients keep retrying, reading their file again.
            let path =
                std::env::temp_dir().join(format!("xds-wrong-{}-{case}", std::process::id()));
            std::fs::write(&path, text).unwrap();
            config.token_file = Some(path.clone());
            written.push(path);
        }
        let store = Arc::new(Store::default());
        let client =
            XdsClient::new(config)
                .unwrap()
                .watch(T, Subscription::Wildcard, store.clone());
        let handle = client.handle();
        tokio::spawn(client.run());
        let mut synced_rx = handle.synced();
        let synced =
            tokio::time::timeout(Duration::from_millis(500), synced_rx.wait_for(|s| *s)).await;
        assert!(synced.is_err(), "an unauthenticated client was served");
        assert!(store.names().is_empty());
    }
    assert_eq!(server.ack_counts(), acks_before);
    for path in written.into_iter().chain([token]) {
        let _ = std::fs::remove_file(path);
    }
}

/// Records the order in which resources of both types reach the client.
#[derive(Default)]
struct Arrivals(Mutex<Vec<String>>);

struct Tagged(&'static str, Arc<Arrivals>);

impl Handler for Tagged {
    fn apply(&self, added: Vec<RawResource>, _removed: Vec<String>) -> Vec<(String, String)> {
        let mut log = self.1.0.lock().unwrap();
        log.extend(added.into_iter().map(|r| format!("{}:{}", self.0, r.name)));
        Vec::new()
    }
}

fn position(log: &[String], item: &str) -> usize {
    log.iter()
        .position(|x| x == item)
        .unwrap_or_else(|| panic!("{item} never arrived: {log:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policies_reach_the_client_before_the_workloads_that_name_them() {
    let server = AdsServer::new(InsecureAcceptAny);
    server.set(P, "default/p0", b"policy".to_vec());
    server.set(T, "w0", b"names p0".to_vec());
    let (addr, _task) = start(&server).await;
    // Several streams (each orders its types its own way unless the server sorts them), each
    // registering Address first: the order of registration must not matter.
    let mut logs = Vec::new();
    for _ in 0..8 {
        let arrivals = Arc::new(Arrivals::default());
        let client = XdsClient::new(ClientConfig::new(format!("http://{addr}"), "node"))
            .unwrap()
            .watch(
                T,
                Subscription::Wildcard,
                Arc::new(Tagged("A", arrivals.clone())),
            )
            .watch(
                P,
                Subscription::Wildcard,
                Arc::new(Tagged("P", arrivals.clone())),
            );
        let handle = client.handle();
        tokio::spawn(client.run());
        tokio::time::timeout(Duration::from_secs(5), handle.synced().wait_for(|s| *s))
            .await
            .unwrap()
            .unwrap();
        logs.push(arrivals);
    }
    for i in 1..=10 {
        // One change set, the workload listed first: the server must still send the policy
        // first.
        server.apply([
            Change::Set {
                type_url: T.into(),
                name: format!("w{i}"),
                body: format!("names p{i}").into_bytes(),
            },
            Change::Set {
                type_url: P.into(),
                name: format!("default/p{i}"),
                body: b"policy".to_vec(),
            },
        ]);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for arrivals in &logs {
        eventually("the last workload", || {
            arrivals.0.lock().unwrap().contains(&"A:w10".to_owned())
        })
        .await;
        let log = arrivals.0.lock().unwrap().clone();
        for i in 0..=10 {
            assert!(
                position(&log, &format!("P:default/p{i}")) < position(&log, &format!("A:w{i}")),
                "workload w{i} arrived before its policy: {log:?}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ten_mib_response_is_accepted() {
    let server = AdsServer::new(InsecureAcceptAny);
    let big: Vec<u8> = (0..10 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    server.set(T, "big", big.clone());
    let (addr, _task) = start(&server).await;
    let store = Arc::new(Store::default());
    let handle = client(addr, &[(T, Subscription::Wildcard, store.clone())]);
    tokio::time::timeout(Duration::from_secs(10), handle.synced().wait_for(|s| *s))
        .await
        .expect("a 10 MiB response was not accepted")
        .unwrap();
    assert_eq!(store.held.lock().unwrap().get("big"), Some(&big));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_remembers_a_bounded_number_of_acks() {
    let server = AdsServer::new(InsecureAcceptAny);
    let (addr, _task) = start(&server).await;
    let store = Arc::new(Store::default());
    let _handle = client(addr, &[(T, Subscription::Wildcard, store.clone())]);
    let pushes = ACK_LOG + 200;
    for i in 0..pushes {
        server.set(T, "w", format!("v{i}").into_bytes());
        // One push per change: wait until it was acknowledged.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while server.ack_counts().0 as usize <= i {
            assert!(
                tokio::time::Instant::now() < deadline,
                "no ACK for push {i}"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    assert!(server.ack_counts().0 as usize >= pushes);
    assert_eq!(server.acks().len(), ACK_LOG);
}
