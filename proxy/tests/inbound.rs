//! The inbound HBONE path in process over real TLS and HTTP/2 on loopback: the right client gets
//! through, every kind of wrong one is refused with a reason, and a policy change closes a live
//! connection.

use std::net::{IpAddr, SocketAddr};

mod common;

use common::{HOUR, allow, echo_app, failed_lines, id, workload};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hbone::{Authority, Config, Pool, Server, StaticTls};
use http::{HeaderMap, StatusCode};
use identity::DevCa;
use proxy::addr::{ClientAddr, OrigDst};
use proxy::connections::Connections;
use proxy::inbound::{DirectConnector, Inbound, InboundOutcome};
use proxy::state::{State, StateStore};
use proxy::telemetry::metrics::Metrics;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use xds_client::resources::{Address, Workload};

fn web(policies: &[&str]) -> Workload {
    workload("web", LOOPBACK, true, policies)
}

const LOOPBACK: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

struct Node {
    ca: DevCa,
    store: Arc<StateStore>,
    connections: Arc<Connections>,
    outcomes: Arc<Mutex<Vec<InboundOutcome>>>,
    metrics: Arc<Metrics>,
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
    let metrics = Metrics::new(HOUR);
    let inbound = Inbound::new(
        store.clone(),
        connections.clone(),
        "web",
        DirectConnector::default(),
        move |o| sink.lock().unwrap().push(o),
    )
    .with_metrics(metrics.clone());
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
        metrics,
        addr,
    }
}

fn client(ca: &DevCa, sa: &str) -> Pool<(), StaticTls> {
    let creds = ca.issue(&id(sa), HOUR).unwrap();
    let tls =
        identity::tls::client_config(creds.chain, creds.key, ca.roots(), vec![id("web")]).unwrap();
    Pool::new(Config::default(), StaticTls(Arc::new(tls)))
}

/// A CONNECT from `sa` to `authority` that must be refused with `status`; returns the reason the
/// inbound side recorded.
async fn refused(node: &Node, sa: &str, authority: &str, status: StatusCode) -> String {
    let authority: Authority = authority.parse().unwrap();
    let before = node.outcomes.lock().unwrap().len();
    let err = client(&node.ca, sa)
        .connect((), node.addr, &authority, HeaderMap::new())
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(status), "{err}");
    outcome_after(node, before).await.error.unwrap_or_default()
}

/// The first outcome recorded after the first `before` ones. The handler records it when it
/// finishes, which may be just after the client has seen the answer (the refusal is on the wire
/// first), so this waits for it rather than taking whatever was recorded last.
async fn outcome_after(node: &Node, before: usize) -> InboundOutcome {
    for _ in 0..500 {
        if let Some(o) = node.outcomes.lock().unwrap().get(before).cloned() {
            return o;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("no outcome recorded after the first {before} within 5 s");
}

/// The first outcome a node records.
async fn first_outcome(node: &Node) -> InboundOutcome {
    outcome_after(node, 0).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_allowed_client_gets_through_and_the_outcome_is_recorded() {
    let app = echo_app(LOOPBACK).await;
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
    let o = first_outcome(&node).await;
    assert_eq!(o.status, 200);
    assert_eq!(o.source_identity.as_deref(), Some(id("sleep").as_str()));
    assert_eq!(o.bytes, (9, 9));
    assert!(o.error.is_none(), "{o:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_clients_and_wrong_destinations_are_refused_with_reasons() {
    let app = echo_app(LOOPBACK).await;
    let node = node(&["default/allow-sleep"]).await;
    let authority: Authority = app.to_string().parse().unwrap();
    // Policy: only sleep.
    let why = refused(
        &node,
        "notsleep",
        &app.to_string(),
        StatusCode::UNAUTHORIZED,
    )
    .await;
    assert!(
        why.contains("denied") && why.contains("default/allow-sleep"),
        "{why}"
    );
    let o = first_outcome(&node).await;
    assert_eq!(o.source_identity.as_deref(), Some(id("notsleep").as_str()));
    // Not an address of the workload served here.
    let elsewhere = format!("127.0.0.2:{}", app.port());
    let why = refused(&node, "sleep", &elsewhere, StatusCode::BAD_REQUEST).await;
    assert!(why.contains("not an address"), "{why}");
    // The proxy's own ports are never a destination.
    for port in [15001u16, 15006, 15008] {
        let own = format!("127.0.0.1:{port}");
        let why = refused(&node, "sleep", &own, StatusCode::BAD_REQUEST).await;
        assert!(why.contains("own port"), "{why}");
    }
    // The app is down.
    let dead = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    refused(
        &node,
        "sleep",
        &dead.to_string(),
        StatusCode::SERVICE_UNAVAILABLE,
    )
    .await;
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
async fn every_refusal_is_counted_as_failed_with_the_ends_its_outcome_names() {
    let app = echo_app(LOOPBACK).await;
    let node = node(&["default/allow-sleep"]).await;
    // Refused before admission (the authority names no address): counted all the same, with the
    // client's identity from its certificate, as the access log has it.
    refused(
        &node,
        "sleep",
        "web.default.svc:80",
        StatusCode::BAD_REQUEST,
    )
    .await;
    let o = first_outcome(&node).await;
    assert_eq!(o.source_identity.as_deref(), Some(id("sleep").as_str()));
    let lines = failed_lines(&node.metrics, "CONNECT");
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(lines[0].ends_with(" 1"), "{}", lines[0]);
    assert!(
        lines[0].contains(r#"source_principal="cluster.local/ns/default/sa/sleep""#),
        "{}",
        lines[0]
    );
    assert!(
        lines[0].contains(r#"connection_security_policy="mutual_tls""#),
        "{}",
        lines[0]
    );
    // Denied by policy: once, with the workload the outcome names as the destination.
    refused(
        &node,
        "notsleep",
        &app.to_string(),
        StatusCode::UNAUTHORIZED,
    )
    .await;
    let denied = failed_lines(&node.metrics, "DENY");
    assert_eq!(denied.len(), 1, "{denied:?}");
    assert!(denied[0].ends_with(" 1"), "{}", denied[0]);
    assert!(
        denied[0].contains(r#"destination_workload="web""#),
        "{}",
        denied[0]
    );
    assert!(
        denied[0].contains(r#"source_principal="cluster.local/ns/default/sa/notsleep""#),
        "{}",
        denied[0]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workload_naming_an_unknown_policy_is_denied() {
    let app = echo_app(LOOPBACK).await;
    let node = node(&["default/allow-sleep", "default/not-received"]).await;
    let why = refused(&node, "sleep", &app.to_string(), StatusCode::UNAUTHORIZED).await;
    assert!(why.contains("default/not-received"), "{why}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_change_closes_a_connection_it_now_denies() {
    let app = echo_app(LOOPBACK).await;
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
    let o = first_outcome(&node).await;
    assert!(o.error.unwrap().contains("policy change"));
    assert!(node.connections.is_empty());
}

/// An app on `at` that runs `serve` on each connection and reports what it returned.
async fn reporting_app<T, F, Fut>(
    at: IpAddr,
    serve: F,
) -> (SocketAddr, tokio::sync::mpsc::UnboundedReceiver<T>)
where
    T: Send + 'static,
    F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = T> + Send + 'static,
{
    let listener = TcpListener::bind(SocketAddr::new(at, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let (tx, served) = (tx.clone(), serve(tcp));
            tokio::spawn(async move {
                let _ = tx.send(served.await);
            });
        }
    });
    (addr, rx)
}

/// An app that reads until its connection ends and reports how: `Ok(bytes)` for a clean end
/// (FIN), `Err(kind)` for a reset.
async fn recording_app(
    at: IpAddr,
) -> (
    SocketAddr,
    tokio::sync::mpsc::UnboundedReceiver<Result<Vec<u8>, std::io::ErrorKind>>,
) {
    reporting_app(at, |mut tcp| async move {
        let mut got = Vec::new();
        match tcp.read_to_end(&mut got).await {
            Ok(_) => Ok(got),
            Err(e) => Err(e.kind()),
        }
    })
    .await
}

/// An app that echoes each connection and reports how it ended: `Ok(())` for a clean end (FIN),
/// `Err(kind)` for a reset.
async fn echoing_app(
    at: IpAddr,
) -> (
    SocketAddr,
    tokio::sync::mpsc::UnboundedReceiver<Result<(), std::io::ErrorKind>>,
) {
    reporting_app(at, |mut tcp| async move {
        let (mut rd, mut wr) = tcp.split();
        match tokio::io::copy(&mut rd, &mut wr).await {
            Ok(_) => wr.shutdown().await.map_err(|e| e.kind()),
            Err(e) => Err(e.kind()),
        }
    })
    .await
}

/// Dials plain TCP and keeps a handle on each socket, so a test can cut the HBONE connection.
#[derive(Clone, Default)]
struct Cuttable(Arc<Mutex<Vec<std::net::TcpStream>>>);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tunnel_that_aborts_resets_the_apps_connection_instead_of_ending_it() {
    let (app, mut ends) = recording_app(LOOPBACK).await;
    let node = node(&["default/allow-sleep"]).await;
    let authority: Authority = app.to_string().parse().unwrap();
    // The client resets its tunnel half-way (RST_STREAM): the app must not take the half it got
    // for all of it.
    let mut t = client(&node.ca, "sleep")
        .connect((), node.addr, &authority, HeaderMap::new())
        .await
        .unwrap();
    t.write_all(b"half of it").await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    t.abort();
    let end = tokio::time::timeout(Duration::from_secs(5), ends.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(end, Err(std::io::ErrorKind::ConnectionReset), "{end:?}");
    // The whole HBONE connection is cut (no close_notify, no GOAWAY): the same.
    let sockets = Cuttable::default();
    let creds = node.ca.issue(&id("sleep"), HOUR).unwrap();
    let tls =
        identity::tls::client_config(creds.chain, creds.key, node.ca.roots(), vec![id("web")])
            .unwrap();
    let pool = Pool::new(Config::default(), CutDialer(Arc::new(tls), sockets.clone()));
    let mut t = pool
        .connect((), node.addr, &authority, HeaderMap::new())
        .await
        .unwrap();
    t.write_all(b"half of it").await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    for s in sockets.0.lock().unwrap().iter() {
        s.shutdown(std::net::Shutdown::Both).unwrap();
    }
    let end = tokio::time::timeout(Duration::from_secs(5), ends.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(end, Err(std::io::ErrorKind::ConnectionReset), "{end:?}");
    // And a clean end stays clean.
    let mut t = client(&node.ca, "sleep")
        .connect((), node.addr, &authority, HeaderMap::new())
        .await
        .unwrap();
    t.write_all(b"all of it").await.unwrap();
    t.shutdown().await.unwrap();
    let end = tokio::time::timeout(Duration::from_secs(5), ends.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(end, Ok(b"all of it".to_vec()));
}

/// A dialer with one TLS configuration that keeps a handle on every socket it opens.
struct CutDialer(Arc<rustls::ClientConfig>, Cuttable);

impl hbone::Dialer<()> for CutDialer {
    async fn client_config(&self, _: &()) -> Result<Arc<rustls::ClientConfig>, hbone::BoxError> {
        Ok(self.0.clone())
    }

    async fn connect_tcp(&self, _: &(), target: SocketAddr) -> std::io::Result<TcpStream> {
        let tcp = TcpStream::connect(target).await?.into_std()?;
        self.1.0.lock().unwrap().push(tcp.try_clone()?);
        TcpStream::from_std(tcp)
    }
}

/// A movable inbound HBONE server of workload `web` with its handler, and a second handler
/// beside it for adopted tunnels: the same state, their own registry, outcomes and metrics (one
/// proxy process of an upgrade).
struct Movable {
    server: Server<Inbound>,
    resumer: Arc<Inbound>,
    outcomes: Arc<Mutex<Vec<InboundOutcome>>>,
    metrics: Arc<Metrics>,
}

fn movable_server(node_ca: &DevCa, store: &Arc<StateStore>) -> Movable {
    let outcomes: Arc<Mutex<Vec<InboundOutcome>>> = Arc::default();
    let sink = outcomes.clone();
    let metrics = Metrics::new(HOUR);
    let make = || {
        let sink = sink.clone();
        Inbound::new(
            store.clone(),
            Connections::new(),
            "web",
            DirectConnector::default(),
            move |o| sink.lock().unwrap().push(o),
        )
        .with_metrics(metrics.clone())
        .movable(true)
    };
    let creds = node_ca.issue(&id("web"), HOUR).unwrap();
    let mut tls =
        identity::tls::server_config(creds.chain, creds.key, node_ca.roots(), "cluster.local")
            .unwrap();
    tls.key_log = hbone::handoff::traffic_secret_log();
    let mut config = Config::default();
    config.movable = true;
    Movable {
        server: Server::new(config, Arc::new(tls), make()),
        resumer: Arc::new(make()),
        outcomes,
        metrics,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_inbound_tunnels_move_to_another_handler_which_checks_the_policy_again() {
    let (app, mut app_ends) = echoing_app(LOOPBACK).await;
    let ca = DevCa::generate("cluster.local").unwrap();
    let store = Arc::new(StateStore::new(State::new("istio-system")));
    store.update(|s| {
        s.insert_address(Address::Workload(web(&["default/allow-sleep"])));
        s.insert_policy(allow("allow-sleep", "sleep"));
        s.set_synced(true);
    });
    let Movable {
        server: old,
        outcomes: old_outcomes,
        metrics: old_metrics,
        ..
    } = movable_server(&ca, &store);
    let Movable {
        server: new_server,
        resumer: new_inbound,
        outcomes: new_outcomes,
        ..
    } = movable_server(&ca, &store);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let serving = old.clone();
    tokio::spawn(async move { serving.serve(listener).await });
    let authority: Authority = app.to_string().parse().unwrap();
    let pool = client(&ca, "sleep");
    let mut tunnels = Vec::new();
    for n in 0..3u8 {
        let mut t = pool
            .connect((), addr, &authority, HeaderMap::new())
            .await
            .unwrap();
        let mut back = [0u8; 5];
        t.write_all(&[n; 5]).await.unwrap();
        t.read_exact(&mut back).await.unwrap();
        assert_eq!(back, [n; 5]);
        tunnels.push(t);
    }

    let handed = old.hand_off(Duration::from_secs(5)).await;
    assert!(handed.stayed.is_empty(), "{:?}", handed.stayed);
    let mut adopted = Vec::new();
    for connection in handed.moved {
        adopted.extend(new_server.adopt(connection).unwrap());
    }
    assert_eq!(adopted.len(), 3);
    // The last one finds the policy changed before it goes on: it is closed, as the change
    // would have closed it in the old process.
    let last = adopted.pop().unwrap();
    for tunnel in adopted {
        let inbound = new_inbound.clone();
        tokio::spawn(async move { inbound.resume(tunnel).await });
    }
    // Through their admission here (a round trip) before the policy changes.
    for (n, t) in tunnels.iter_mut().take(2).enumerate() {
        let mut back = [0u8; 2];
        t.write_all(&[n as u8 + 10; 2]).await.unwrap();
        t.read_exact(&mut back).await.unwrap();
        assert_eq!(back, [n as u8 + 10; 2]);
    }
    store.update(|s| s.insert_policy(allow("allow-sleep", "notsleep")));
    let inbound = new_inbound.clone();
    tokio::spawn(async move { inbound.resume(last).await });

    let mut tunnels = tunnels.into_iter();
    for n in 0..2u8 {
        let mut t = tunnels.next().unwrap();
        t.write_all(&[n + 10; 5]).await.unwrap();
        t.shutdown().await.unwrap();
        let mut back = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), t.read_to_end(&mut back))
            .await
            .expect("a moved tunnel stalled")
            .unwrap();
        assert_eq!(back, [n + 10; 5]);
    }
    let mut closed = tunnels.next().unwrap();
    let mut back = Vec::new();
    let cut = tokio::time::timeout(Duration::from_secs(10), closed.read_to_end(&mut back))
        .await
        .expect("the denied tunnel was not closed");
    assert!(cut.is_err(), "the denied tunnel ended cleanly: {back:?}");
    // The app's end is reset too: a clean end could pass for the end of the request.
    let mut ends = Vec::new();
    for _ in 0..3 {
        let end = tokio::time::timeout(Duration::from_secs(5), app_ends.recv()).await;
        ends.push(end.expect("an app connection did not end").unwrap());
    }
    ends.sort_by_key(|e| e.is_err());
    assert_eq!(
        ends,
        [Ok(()), Ok(()), Err(std::io::ErrorKind::ConnectionReset)]
    );

    // The new handler logs each one once, with the bytes of its whole life; the old, none.
    let outcomes = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let o = new_outcomes.lock().unwrap().clone();
            if o.len() == 3 {
                return o;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the moved tunnels were not all recorded");
    let mut bytes: Vec<(u64, u64)> = outcomes
        .iter()
        .filter(|o| o.error.is_none())
        .map(|o| o.bytes)
        .collect();
    bytes.sort();
    assert_eq!(bytes, [(12, 12), (12, 12)]);
    let denied: Vec<_> = outcomes.iter().filter_map(|o| o.error.clone()).collect();
    assert_eq!(denied.len(), 1);
    assert!(
        denied[0].contains("a moved tunnel was closed"),
        "{denied:?}"
    );
    assert!(
        outcomes
            .iter()
            .all(|o| o.source_identity.as_deref() == Some(id("sleep").as_str()))
    );
    assert!(old_outcomes.lock().unwrap().is_empty());
    let text = old_metrics.render();
    let opened = |name: &str| -> Vec<String> {
        text.lines()
            .filter(|l| l.starts_with(name))
            .map(str::to_owned)
            .collect()
    };
    assert!(
        opened("istio_tcp_connections_opened_total{")
            .iter()
            .any(|l| l.ends_with(" 3")),
        "{text}"
    );
    assert!(
        opened("istio_tcp_connections_closed_total{")
            .iter()
            .all(|l| l.ends_with(" 0")),
        "the old handler counted moved tunnels closed:\n{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_plaintext_connections_move_to_another_handler_which_checks_the_policy_again() {
    let app = echo_app(LOOPBACK).await;
    let ca = DevCa::generate("cluster.local").unwrap();
    let store = Arc::new(StateStore::new(State::new("istio-system")));
    // No policy: plaintext clients are allowed.
    store.update(|s| {
        s.insert_address(Address::Workload(web(&[])));
        s.set_synced(true);
    });
    let old = Arc::new(movable_server(&ca, &store).resumer.plain());
    let new = Arc::new(movable_server(&ca, &store).resumer.plain());
    let front = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut clients = Vec::new();
    let mut served = Vec::new();
    for n in 0..2u8 {
        let mut client = TcpStream::connect(front.local_addr().unwrap())
            .await
            .unwrap();
        let (accepted, peer) = front.accept().await.unwrap();
        let old = old.clone();
        served.push(tokio::spawn(async move {
            old.serve(accepted, ClientAddr(peer), OrigDst(app)).await
        }));
        let mut back = [0u8; 5];
        client.write_all(&[n; 5]).await.unwrap();
        client.read_exact(&mut back).await.unwrap();
        assert_eq!(back, [n; 5]);
        clients.push((client.local_addr().unwrap(), client));
    }

    let (moved, stayed) = old.hand_off(Duration::from_secs(5)).await;
    assert!(stayed.is_empty(), "{stayed:?}");
    assert_eq!(moved.len(), 2);
    for task in served {
        let outcome = task.await.unwrap();
        assert!(outcome.is_none(), "moved, not ended here: {outcome:?}");
    }
    // Which client each copy serves: its `a` socket's peer.
    let client_of = |m: &hbone::handoff::MovedPlain| {
        let a = std::net::TcpStream::from(m.a.try_clone().unwrap());
        a.peer_addr().unwrap()
    };
    let mut moved: Vec<_> = moved.into_iter().map(|m| (client_of(&m), m)).collect();
    moved.sort_by_key(|(client, _)| clients.iter().position(|(c, _)| c == client));
    let mut moved = moved.into_iter().map(|(_, m)| m);
    let mut clients = clients.into_iter().map(|(_, c)| c);

    // The first goes on here, whole.
    let (first, mut client) = (moved.next().unwrap(), clients.next().unwrap());
    let resumed = tokio::spawn({
        let new = new.clone();
        async move { new.resume(first).await }
    });
    client.write_all(&[7; 5]).await.unwrap();
    client.shutdown().await.unwrap();
    let mut back = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), client.read_to_end(&mut back))
        .await
        .expect("a moved connection stalled")
        .unwrap();
    assert_eq!(back, [7; 5]);
    let o = resumed.await.unwrap().expect("its outcome");
    assert!(o.error.is_none(), "{o:?}");
    assert_eq!(o.bytes, (10, 10), "its whole life: {o:?}");
    assert!(!o.mtls);

    // The second finds a policy that now denies plaintext clients: it is reset.
    store.update(|s| {
        s.insert_address(Address::Workload(web(&["default/allow-sleep"])));
        s.insert_policy(allow("allow-sleep", "sleep"));
    });
    let (second, mut client) = (moved.next().unwrap(), clients.next().unwrap());
    let o = new.resume(second).await.expect("the refusal's outcome");
    assert!(o.error.is_some(), "{o:?}");
    let mut back = Vec::new();
    let cut = tokio::time::timeout(Duration::from_secs(10), client.read_to_end(&mut back))
        .await
        .expect("the denied connection was not closed");
    assert!(
        cut.is_err(),
        "the denied connection ended cleanly: {back:?}"
    );
}
