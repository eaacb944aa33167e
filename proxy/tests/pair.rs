//! An outbound and an inbound proxy in process, on loopback addresses of their own (each test
//! uses a distinct 127.x.y.0/24, so port 15008 is free): a service VIP reaches its endpoint
//! through HBONE with the source's own certificate, policy applies with that identity, and a
//! destination outside the mesh passes through.

use std::net::{IpAddr, SocketAddr};

mod common;

use common::{HOUR, allow, echo_app, failed_lines, id, workload};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hbone::{Config, Server};
use identity::{DevCa, SpiffeId, WorkloadCert};
use proxy::addr::{ClientAddr, OrigDst};
use proxy::certs::Certificates;
use proxy::connections::Connections;
use proxy::inbound::{DirectConnector, Inbound, InboundOutcome};
use proxy::outbound::{Outbound, OutboundOutcome};
use proxy::state::{State, StateStore};
use proxy::telemetry::metrics::Metrics;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use xds_client::resources::{Address, PortMapping, Service};

const WEB_SVC: &str = "default/web.default.svc.cluster.local";

/// 127.<pid>.<test>.<host>: addresses no other test (or test run) uses.
fn ip(test: u8, host: u8) -> IpAddr {
    IpAddr::from([127, (std::process::id() % 200 + 20) as u8, test, host])
}

/// Certificates issued on demand by a development CA.
struct DevCerts(DevCa, Arc<identity::roots::TrustRoots>);

impl Certificates for DevCerts {
    async fn get(&self, id: &SpiffeId) -> Result<Arc<WorkloadCert>, identity::Error> {
        let creds = self.0.issue(id, HOUR)?;
        Ok(Arc::new(WorkloadCert::new(id.clone(), creds)?))
    }

    fn trust_roots(&self) -> &Arc<identity::roots::TrustRoots> {
        &self.1
    }

    fn watch(&self, id: &SpiffeId) -> proxy::certs::CertWatch {
        let cert = self.0.issue(id, HOUR).ok();
        let cert = cert.and_then(|c| WorkloadCert::new(id.clone(), c).ok());
        tokio::sync::watch::channel(cert.map(Arc::new)).1
    }
}

struct Mesh {
    outbound: Arc<Outbound<DevCerts>>,
    /// Another outbound path of the same workloads (a new proxy process, in an upgrade), when
    /// the mesh was made movable.
    successor: Option<Arc<Outbound<DevCerts>>>,
    metrics: Arc<Metrics>,
    inbound_log: Arc<Mutex<Vec<InboundOutcome>>>,
    app: SocketAddr,
    test: u8,
}

/// sleep and notsleep (clients), web (in the mesh, only sleep allowed, behind a service VIP),
/// legacy (outside the mesh); web's node proxy listens on web's address, port 15008.
async fn mesh(test: u8) -> Mesh {
    mesh_with(test, false).await
}

/// [`mesh`], its outbound paths `movable` (and then with a successor).
async fn mesh_with(test: u8, movable: bool) -> Mesh {
    let ca = DevCa::generate("cluster.local").unwrap();
    let web_ip = ip(test, 2);
    let app = echo_app(web_ip).await;
    let store = Arc::new(StateStore::new(State::new("istio-system")));
    store.update(|s| {
        s.insert_address(Address::Workload(workload("sleep", ip(test, 1), true, &[])));
        s.insert_address(Address::Workload(workload(
            "notsleep",
            ip(test, 3),
            true,
            &[],
        )));
        let mut web = workload("web", web_ip, true, &["default/allow-sleep"]);
        web.services.insert(
            WEB_SVC.into(),
            vec![PortMapping {
                service_port: 80,
                target_port: app.port(),
            }],
        );
        s.insert_address(Address::Workload(web));
        s.insert_address(Address::Service(Service {
            name: "web".into(),
            namespace: "default".into(),
            hostname: "web.default.svc.cluster.local".into(),
            addresses: vec![(String::new(), ip(test, 100))],
            ports: vec![PortMapping {
                service_port: 80,
                target_port: 0,
            }],
            subject_alt_names: vec![],
            waypoint: None,
            ..Default::default()
        }));
        let p = allow("allow-sleep", "sleep");
        s.insert_policy(p);
        s.set_synced(true);
    });
    let inbound_log: Arc<Mutex<Vec<InboundOutcome>>> = Arc::default();
    let sink = inbound_log.clone();
    let inbound = Inbound::new(
        store.clone(),
        Connections::new(),
        "web",
        DirectConnector::default(),
        move |o| sink.lock().unwrap().push(o),
    );
    let creds = ca.issue(&id("web"), HOUR).unwrap();
    let tls =
        identity::tls::server_config(creds.chain, creds.key, ca.roots(), "cluster.local").unwrap();
    let server = Server::new(Config::default(), Arc::new(tls), inbound);
    let listener = TcpListener::bind(SocketAddr::new(web_ip, 15008))
        .await
        .unwrap();
    tokio::spawn(async move { server.serve(listener).await });
    let metrics = Metrics::new(Duration::from_secs(300));
    let roots = Arc::new(ca.trust_roots());
    let certs = Arc::new(DevCerts(ca, roots));
    let mut config = Config::default();
    config.movable = movable;
    let outbound = |metrics: Arc<Metrics>| {
        Arc::new(
            Outbound::new(store.clone(), certs.clone(), config.clone(), None).with_metrics(metrics),
        )
    };
    Mesh {
        outbound: outbound(metrics.clone()),
        successor: movable.then(|| outbound(Metrics::new(Duration::from_secs(300)))),
        metrics,
        inbound_log,
        app,
        test,
    }
}

/// A connection from an application at host `source_host` of the test's network, as the proxy
/// would take it from its capture: the application's end, the proxy's end, and the
/// application's address.
async fn captured(mesh: &Mesh, source_host: u8) -> (TcpStream, TcpStream, SocketAddr) {
    let capture = TcpListener::bind(SocketAddr::new(ip(mesh.test, source_host), 0))
        .await
        .unwrap();
    let app_side = TcpStream::connect(capture.local_addr().unwrap())
        .await
        .unwrap();
    let (captured, peer) = capture.accept().await.unwrap();
    (app_side, captured, peer)
}

/// Plays a captured client of `source` calling `destination`: sends `data`, half-closes, and
/// returns what came back and the outbound outcome.
async fn call(
    mesh: &Mesh,
    source: &str,
    source_host: u8,
    destination: SocketAddr,
    data: &[u8],
) -> (Vec<u8>, OutboundOutcome) {
    let (mut app_side, captured, peer) = captured(mesh, source_host).await;
    let outbound = mesh.outbound.clone();
    let source = proxy::state::LocalWorkload::from(source);
    let task = tokio::spawn(async move {
        outbound
            .serve(captured, ClientAddr(peer), OrigDst(destination), &source)
            .await
    });
    app_side.write_all(data).await.unwrap();
    app_side.shutdown().await.unwrap();
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), app_side.read_to_end(&mut got)).await;
    let outcome = tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("the outbound connection did not end")
        .unwrap()
        .expect("not movable: it cannot have moved");
    (got, outcome)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_vip_reaches_its_endpoint_through_hbone_with_the_source_identity() {
    let mesh = mesh(1).await;
    let vip = SocketAddr::new(ip(1, 100), 80);
    let (got, out) = call(&mesh, "sleep", 1, vip, b"through the mesh").await;
    assert_eq!(got, b"through the mesh", "{out:?}");
    assert!(out.error.is_none(), "{out:?}");
    assert!(out.mtls);
    assert_eq!(
        out.destination_workload.as_ref().map(|w| w.uid.as_str()),
        Some("web")
    );
    assert_eq!(out.hbone_target, Some(SocketAddr::new(ip(1, 2), 15008)));
    assert_eq!(out.bytes, (16, 16));
    let inbound = last_inbound(&mesh).await;
    assert_eq!(
        inbound.source_identity.as_deref(),
        Some(id("sleep").as_str())
    );
    assert_eq!(inbound.destination, mesh.app.to_string());
    assert_eq!(inbound.bytes, (16, 16));
    // The pod's own address works too.
    let (got, out) = call(&mesh, "sleep", 1, mesh.app, b"direct").await;
    assert_eq!(got, b"direct", "{out:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_sent_before_the_route_is_known_go_with_the_connect_and_are_counted() {
    let mesh = mesh(4).await;
    let (mut app_side, captured, peer) = captured(&mesh, 1).await;
    // The client has spoken and closed its side before the proxy looks at the connection.
    app_side.write_all(b"spoke first").await.unwrap();
    app_side.shutdown().await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let out = tokio::time::timeout(
        Duration::from_secs(5),
        mesh.outbound.serve(
            captured,
            ClientAddr(peer),
            OrigDst(mesh.app),
            &proxy::state::LocalWorkload::from("sleep"),
        ),
    )
    .await
    .expect("the outbound connection did not end")
    .expect("not movable: it cannot have moved");
    let mut got = Vec::new();
    app_side.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, b"spoke first", "{out:?}");
    assert!(out.error.is_none(), "{out:?}");
    assert_eq!(out.bytes, (11, 11));
    assert_eq!(last_inbound(&mesh).await.bytes, (11, 11));
    let text = mesh.metrics.render();
    let received = text
        .lines()
        .find(|l| l.starts_with("istio_tcp_received_bytes_total{"))
        .unwrap_or_else(|| panic!("no received bytes in\n{text}"));
    assert!(received.ends_with(" 11"), "{received}");
}

/// The inbound side's last outcome. It is recorded when its handler finishes, which may be just
/// after the client has seen the answer (the refusal is on the wire first), so wait for it.
async fn last_inbound(mesh: &Mesh) -> InboundOutcome {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(last) = mesh.inbound_log.lock().unwrap().last().cloned() {
            return last;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the inbound side recorded no outcome within 5 s"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_applies_to_the_source_workloads_own_identity() {
    let mesh = mesh(2).await;
    let vip = SocketAddr::new(ip(2, 100), 80);
    let (got, out) = call(&mesh, "notsleep", 3, vip, b"let me in").await;
    assert!(got.is_empty());
    let error = out.error.unwrap();
    assert!(error.contains("401"), "{error}");
    let inbound = last_inbound(&mesh).await;
    assert_eq!(
        inbound.source_identity.as_deref(),
        Some(id("notsleep").as_str())
    );
    assert!(inbound.error.unwrap().contains("denied"));
    // The outbound record names what the route found; the metrics count its failure from it.
    assert_eq!(
        out.service.as_ref().map(|s| s.hostname.as_str()),
        Some("web.default.svc.cluster.local")
    );
    assert_eq!(out.destination_identity, Some(id("web")));
    assert_eq!(out.response_flags, Some("DENY"));
    let failed = failed_lines(&mesh.metrics, "DENY");
    assert_eq!(failed.len(), 1, "{failed:?}");
    for label in [
        r#"reporter="source""#,
        r#"source_workload="notsleep""#,
        r#"destination_service="web.default.svc.cluster.local""#,
        r#"destination_principal="cluster.local/ns/default/sa/web""#,
        r#"connection_security_policy="mutual_tls""#,
    ] {
        assert!(
            failed[0].contains(label),
            "{label} missing in {}",
            failed[0]
        );
    }
    assert!(failed[0].ends_with(" 1"), "{}", failed[0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_the_state_does_not_know_is_refused_and_counted() {
    let mesh = mesh(6).await;
    let (got, out) = call(&mesh, "ghost", 1, mesh.app, b"who am I").await;
    assert!(got.is_empty());
    let error = out.error.unwrap();
    assert!(error.contains("unknown source workload ghost"), "{error}");
    assert_eq!(out.response_flags, Some("CONNECT"));
    let failed = failed_lines(&mesh.metrics, "CONNECT");
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert!(
        failed[0].contains(r#"source_workload="unknown""#),
        "{}",
        failed[0]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outside_the_mesh_is_a_passthrough_and_a_dead_hbone_port_is_explained() {
    let mesh = mesh(3).await;
    let outside = echo_app(ip(3, 9)).await;
    let (got, out) = call(&mesh, "sleep", 1, outside, b"plain").await;
    assert_eq!(got, b"plain", "{out:?}");
    assert!(!out.mtls);
    assert!(out.hbone_target.is_none());
    // notsleep's address has no HBONE listener: the dial fails and says where.
    let (_, out) = call(&mesh, "sleep", 1, SocketAddr::new(ip(3, 3), 8080), b"x").await;
    let error = out.error.unwrap();
    assert!(error.contains(&format!("{}:15008", ip(3, 3))), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_that_resets_its_connection_resets_the_clients_too() {
    // The destination app resets after reading the request: its proxy resets the tunnel, and
    // the client's proxy must reset the client's connection, not end it cleanly.
    let mesh = mesh(5).await;
    let resetting = TcpListener::bind(SocketAddr::new(ip(5, 2), 0))
        .await
        .unwrap();
    let destination = resetting.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut tcp, _) = resetting.accept().await.unwrap();
            let mut buf = [0u8; 5];
            let _ = tcp.read_exact(&mut buf).await;
            tcp.set_zero_linger().unwrap();
            drop(tcp);
        }
    });
    let (mut app_side, captured, peer) = captured(&mesh, 1).await;
    let outbound = mesh.outbound.clone();
    let task = tokio::spawn(async move {
        let source = proxy::state::LocalWorkload::from("sleep");
        outbound
            .serve(captured, ClientAddr(peer), OrigDst(destination), &source)
            .await
    });
    app_side.write_all(b"hello").await.unwrap();
    let mut got = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), app_side.read_to_end(&mut got))
        .await
        .expect("the client's connection did not end");
    assert_eq!(
        read.map_err(|e| e.kind()),
        Err(std::io::ErrorKind::ConnectionReset),
        "the client saw a clean end after {} bytes",
        got.len()
    );
    let outcome = task
        .await
        .unwrap()
        .expect("not movable: it cannot have moved");
    assert!(outcome.error.is_some(), "{outcome:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_outbound_tunnels_move_to_another_outbound_path_which_checks_them_again() {
    const CLIENTS: usize = 3;
    let mesh = mesh_with(7, true).await;
    let next = mesh.successor.clone().unwrap();
    let sleep = proxy::state::LocalWorkload::from("sleep");
    let vip = SocketAddr::new(ip(mesh.test, 100), 80);
    let mut clients = Vec::new();
    let mut served = Vec::new();
    for n in 0..CLIENTS {
        let (mut app_side, captured, peer) = captured(&mesh, 1).await;
        let (outbound, sleep) = (mesh.outbound.clone(), sleep.clone());
        served.push(tokio::spawn(async move {
            outbound
                .serve(captured, ClientAddr(peer), OrigDst(vip), &sleep)
                .await
        }));
        let said = format!("before {n}");
        app_side.write_all(said.as_bytes()).await.unwrap();
        let mut back = vec![0u8; said.len()];
        app_side.read_exact(&mut back).await.unwrap();
        assert_eq!(back, said.as_bytes());
        clients.push(app_side);
    }

    let handed = mesh.outbound.hand_off(Duration::from_secs(5)).await;
    assert!(handed.pool.stayed.is_empty(), "{:?}", handed.pool.stayed);
    assert_eq!(handed.pool.moved.len(), 1, "one pooled connection to web");
    let mut resumed = Vec::new();
    for moved in handed.pool.moved {
        assert_eq!(moved.key.source, id("sleep"));
        let key = Arc::new(moved.key);
        let tunnels = next.adopt((*key).clone(), moved.connection).unwrap();
        assert_eq!(tunnels.len(), CLIENTS);
        for tunnel in tunnels {
            let (next, key, sleep) = (next.clone(), key.clone(), sleep.clone());
            resumed.push(tokio::spawn(async move {
                next.resume(tunnel, &key, &sleep).await
            }));
        }
    }
    for task in served {
        let outcome = task.await.unwrap();
        assert!(outcome.is_none(), "moved, not ended here: {outcome:?}");
    }

    for (n, mut app_side) in clients.into_iter().enumerate() {
        let said = format!("after {n}");
        app_side.write_all(said.as_bytes()).await.unwrap();
        app_side.shutdown().await.unwrap();
        let mut back = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), app_side.read_to_end(&mut back))
            .await
            .expect("a moved tunnel stalled")
            .unwrap();
        assert_eq!(back, said.as_bytes());
    }
    for task in resumed {
        let o = task.await.unwrap().expect("the resumed tunnel's outcome");
        assert!(o.error.is_none(), "{o:?}");
        // Its whole life: "before n" and "after n" each way.
        assert_eq!(o.bytes, (15, 15), "{o:?}");
        assert_eq!(o.destination.0, vip);
        assert_eq!(o.destination_identity, Some(id("web")));
        assert_eq!(o.service.as_ref().map(|s| s.name.as_str()), Some("web"));
        assert_eq!(o.source_workload.as_ref().unwrap().uid, "sleep");
        assert!(o.duration > Duration::ZERO);
    }
    // The server's side saw each tunnel once, whole.
    let inbound = mesh.inbound_log.lock().unwrap().clone();
    assert_eq!(inbound.len(), CLIENTS, "{inbound:?}");
    assert!(
        inbound
            .iter()
            .all(|o| o.bytes == (15, 15) && o.error.is_none()),
        "{inbound:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_moved_outbound_tunnel_whose_key_is_not_the_workloads_is_reset() {
    let mesh = mesh_with(8, true).await;
    let next = mesh.successor.clone().unwrap();
    let sleep = proxy::state::LocalWorkload::from("sleep");
    let vip = SocketAddr::new(ip(mesh.test, 100), 80);
    let (mut app_side, captured, peer) = captured(&mesh, 1).await;
    let (outbound, source) = (mesh.outbound.clone(), sleep.clone());
    let served = tokio::spawn(async move {
        outbound
            .serve(captured, ClientAddr(peer), OrigDst(vip), &source)
            .await
    });
    app_side.write_all(b"hello").await.unwrap();
    let mut back = [0u8; 5];
    app_side.read_exact(&mut back).await.unwrap();
    let mut handed = mesh.outbound.hand_off(Duration::from_secs(5)).await;
    let moved = handed.pool.moved.pop().expect("the connection moved");
    assert!(served.await.unwrap().is_none());
    // Taken in for another workload than the one it was pooled by: it presents sleep's identity,
    // and notsleep's traffic must not ride it.
    let key = moved.key.clone();
    let tunnel = next
        .adopt(key.clone(), moved.connection)
        .unwrap()
        .pop()
        .unwrap();
    let notsleep = proxy::state::LocalWorkload::from("notsleep");
    let o = next
        .resume(tunnel, &key, &notsleep)
        .await
        .expect("the refusal's outcome");
    assert!(
        o.error.as_deref().is_some_and(|e| e.contains("presents")),
        "{o:?}"
    );
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), app_side.read_to_end(&mut rest))
        .await
        .expect("the client's connection did not end");
    assert_eq!(
        read.map_err(|e| e.kind()),
        Err(std::io::ErrorKind::ConnectionReset),
        "the client saw a clean end"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_passthrough_connection_moves_to_another_outbound_path() {
    let mesh = mesh_with(9, true).await;
    let next = mesh.successor.clone().unwrap();
    let sleep = proxy::state::LocalWorkload::from("sleep");
    let outside = echo_app(ip(9, 9)).await;
    let (mut app_side, captured, peer) = captured(&mesh, 1).await;
    let (outbound, source) = (mesh.outbound.clone(), sleep.clone());
    let served = tokio::spawn(async move {
        outbound
            .serve(captured, ClientAddr(peer), OrigDst(outside), &source)
            .await
    });
    app_side.write_all(b"before").await.unwrap();
    let mut back = [0u8; 6];
    app_side.read_exact(&mut back).await.unwrap();

    let mut handed = mesh.outbound.hand_off(Duration::from_secs(5)).await;
    assert!(handed.plain_stayed.is_empty(), "{:?}", handed.plain_stayed);
    assert!(handed.pool.moved.is_empty());
    let moved = handed
        .plain
        .pop()
        .expect("the passthrough connection moved");
    assert!(served.await.unwrap().is_none(), "moved, not ended here");
    let resumed = tokio::spawn(async move { next.resume_passthrough(moved, &sleep).await });
    app_side.write_all(b"after").await.unwrap();
    app_side.shutdown().await.unwrap();
    let mut back = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), app_side.read_to_end(&mut back))
        .await
        .expect("the moved connection stalled")
        .unwrap();
    assert_eq!(back, b"after");
    let o = resumed.await.unwrap().expect("its outcome");
    assert!(o.error.is_none(), "{o:?}");
    assert!(!o.mtls && o.hbone_target.is_none(), "{o:?}");
    assert_eq!(o.destination.0, outside);
    assert_eq!(o.bytes, (11, 11), "its whole life: {o:?}");
}
