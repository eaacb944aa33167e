//! The outbound route decision: a table of the cases Istio's ztunnel distinguishes, and a
//! property test against an independent, naive oracle over random states and destinations.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use proptest::prelude::*;
use proxy::addr::OrigDst;
use proxy::outbound::{Route, RouteError, decide};
use proxy::state::{State, StateStore};
use xds_client::resources::{
    Address, IpFamilies, LoadBalancing, LoadBalancingMode, Locality, LocalityScope, NetworkMode,
    PortMapping, Service, Tunnel, Waypoint, WaypointAddress, Workload, WorkloadType,
};

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

fn workload(uid: &str, addr: &str, sa: &str) -> Workload {
    let mut w = Workload::new(
        uid,
        uid,
        "default",
        format!("spiffe://cluster.local/ns/default/sa/{sa}")
            .parse()
            .unwrap(),
    );
    w.addresses = vec![ip(addr)];
    w.tunnel = Tunnel::Hbone;
    w.node = "node-a".into();
    w.canonical_name = uid.into();
    w.canonical_revision = "latest".into();
    w.workload_type = WorkloadType::Pod;
    w.workload_name = uid.into();
    w.cluster_id = "Kubernetes".into();
    w
}

fn member(mut w: Workload, service: &str, ports: &[(u16, u16)]) -> Workload {
    w.services.insert(
        service.into(),
        ports
            .iter()
            .map(|&(service_port, target_port)| PortMapping {
                service_port,
                target_port,
            })
            .collect(),
    );
    w
}

fn service(name: &str, vip: &str, ports: &[(u16, u16)]) -> Service {
    Service {
        name: name.into(),
        namespace: "default".into(),
        hostname: format!("{name}.default.svc.cluster.local"),
        addresses: vec![(String::new(), ip(vip))],
        ports: ports
            .iter()
            .map(|&(service_port, target_port)| PortMapping {
                service_port,
                target_port,
            })
            .collect(),
        subject_alt_names: vec![],
        waypoint: None,
        ..Default::default()
    }
}

const WEB: &str = "default/web.default.svc.cluster.local";

fn route(state: &State, to: &str, pick: usize) -> Result<Route, RouteError> {
    let source = state.workload("sleep").unwrap().clone();
    decide(state, &source, OrigDst(to.parse().unwrap()), &mut |_| pick)
}

fn hbone_parts(r: &Route) -> (String, String, Vec<String>, String) {
    match r {
        Route::Hbone {
            target,
            authority,
            expected,
            destination,
            ..
        } => (
            target.to_string(),
            authority.to_string(),
            expected.iter().map(|i| i.as_str().to_owned()).collect(),
            destination.uid.clone(),
        ),
        other => panic!("expected HBONE, got {other:?}"),
    }
}

fn mesh() -> State {
    let mut s = State::new("istio-system");
    s.insert_address(Address::Workload(workload("sleep", "10.0.0.1", "sleep")));
    let mut sick = member(workload("web-0", "10.0.0.10", "web"), WEB, &[(80, 8080)]);
    sick.healthy = false;
    s.insert_address(Address::Workload(sick));
    s.insert_address(Address::Workload(member(
        workload("web-1", "10.0.0.11", "web"),
        WEB,
        &[(80, 9090)],
    )));
    s.insert_address(Address::Workload(member(
        workload("web-2", "10.0.0.12", "web"),
        WEB,
        &[],
    )));
    let mut outside = workload("legacy", "10.0.0.20", "legacy");
    outside.tunnel = Tunnel::None;
    s.insert_address(Address::Workload(outside));
    s.insert_address(Address::Service(service(
        "web",
        "10.96.0.10",
        &[(80, 8080), (81, 0)],
    )));
    s
}

#[test]
fn a_vip_reaches_a_healthy_endpoint_with_its_target_port() {
    let s = mesh();
    // Healthy endpoints in uid order: web-1 (own port map 80 -> 9090), web-2 (none: the
    // service's 80 -> 8080). The unhealthy web-0 is never picked.
    let (target, authority, expected, uid) = hbone_parts(&route(&s, "10.96.0.10:80", 0).unwrap());
    assert_eq!(
        (target.as_str(), authority.as_str(), uid.as_str()),
        ("10.0.0.11:15008", "10.0.0.11:9090", "web-1")
    );
    assert_eq!(expected, vec!["spiffe://cluster.local/ns/default/sa/web"]);
    let (_, authority, _, uid) = hbone_parts(&route(&s, "10.96.0.10:80", 1).unwrap());
    assert_eq!(
        (authority.as_str(), uid.as_str()),
        ("10.0.0.12:8080", "web-2")
    );
}

#[test]
fn service_errors_say_what_is_missing() {
    let s = mesh();
    assert_eq!(
        route(&s, "10.96.0.10:443", 0).unwrap_err(),
        RouteError::NoServicePort {
            service: WEB.into(),
            port: 443
        }
    );
    // Port 81 has target port 0 (a named port) and web-2 has no map for it.
    let err = route(&s, "10.96.0.10:81", 1).unwrap_err();
    assert!(
        matches!(err, RouteError::NoTargetPort { ref endpoint, .. } if endpoint == "web-2"),
        "{err}"
    );
    let mut none_healthy = s.clone();
    none_healthy.remove_address("web-1");
    none_healthy.remove_address("web-2");
    let err = route(&none_healthy, "10.96.0.10:80", 0).unwrap_err();
    assert!(
        matches!(err, RouteError::NoHealthyEndpoint { total: 1, .. }),
        "{err}"
    );
    assert!(err.to_string().contains(WEB), "{err}");
}

#[test]
fn pods_in_and_out_of_the_mesh_and_the_outside_world() {
    let s = mesh();
    let (target, authority, _, uid) = hbone_parts(&route(&s, "10.0.0.10:8080", 0).unwrap());
    assert_eq!(
        (target.as_str(), authority.as_str(), uid.as_str()),
        ("10.0.0.10:15008", "10.0.0.10:8080", "web-0"),
        "a pod addressed directly is reached even when not ready"
    );
    match route(&s, "10.0.0.20:5432", 0).unwrap() {
        Route::Passthrough {
            to, destination, ..
        } => {
            assert_eq!(to.to_string(), "10.0.0.20:5432");
            assert_eq!(destination.unwrap().uid, "legacy");
        }
        other => panic!("{other:?}"),
    }
    match route(&s, "93.184.216.34:443", 0).unwrap() {
        Route::Passthrough {
            to, destination, ..
        } => {
            assert_eq!(to.to_string(), "93.184.216.34:443");
            assert!(destination.is_none());
        }
        other => panic!("{other:?}"),
    }
    // Same node, even the source itself: HBONE.
    let (target, ..) = hbone_parts(&route(&s, "10.0.0.1:80", 0).unwrap());
    assert_eq!(target, "10.0.0.1:15008");
    // ...but never the source's own proxy ports.
    for port in [15001, 15006, 15008] {
        assert!(matches!(
            route(&s, &format!("10.0.0.1:{port}"), 0),
            Err(RouteError::SelfCall { .. })
        ));
    }
    // Another pod's 15008 is a destination like any other.
    assert!(route(&s, "10.0.0.11:15008", 0).is_ok());
}

#[test]
fn service_sans_are_expected_too_and_other_networks_are_invisible() {
    let mut s = mesh();
    let mut svc = service("web", "10.96.0.10", &[(80, 8080)]);
    svc.subject_alt_names = vec![
        "spiffe://cluster.local/ns/default/sa/web-canary".into(),
        "not a spiffe id".into(),
    ];
    s.insert_address(Address::Service(svc));
    let (_, _, expected, _) = hbone_parts(&route(&s, "10.96.0.10:80", 0).unwrap());
    assert_eq!(
        expected,
        vec![
            "spiffe://cluster.local/ns/default/sa/web",
            "spiffe://cluster.local/ns/default/sa/web-canary"
        ]
    );
    let mut far = workload("far", "10.0.0.30", "far");
    far.network = "net-2".into();
    s.insert_address(Address::Workload(far));
    assert!(matches!(
        route(&s, "10.0.0.30:80", 0).unwrap(),
        Route::Passthrough {
            destination: None,
            ..
        }
    ));
}

#[test]
fn the_last_claimant_of_an_address_holds_it_and_the_earlier_one_returns() {
    let mut s = mesh();
    s.insert_address(Address::Workload(workload(
        "web-1-new",
        "10.0.0.11",
        "other",
    )));
    let (_, _, _, uid) = hbone_parts(&route(&s, "10.0.0.11:80", 0).unwrap());
    assert_eq!(uid, "web-1-new");
    s.remove_address("web-1-new");
    let (_, _, _, uid) = hbone_parts(&route(&s, "10.0.0.11:80", 0).unwrap());
    assert_eq!(uid, "web-1");
}

#[test]
fn snapshots_never_change_under_their_reader_and_a_new_state_denies() {
    let store = StateStore::new(mesh());
    let before = store.snapshot();
    store.update(|s| s.remove_address("web-1"));
    assert!(before.workload("web-1").is_some());
    assert!(store.snapshot().workload("web-1").is_none());
    // Policies start unsynced: every decision denies until the first complete set.
    let state = store.snapshot();
    let conn = authz::Connection {
        source: "10.0.0.1:1234".parse().unwrap(),
        destination: "10.0.0.11:9090".parse().unwrap(),
        peer: None,
    };
    let workload = authz::Workload {
        namespace: "default".into(),
        ..Default::default()
    };
    assert!(!state.policies().decide(&conn, &workload).allowed);
    store.update(|s| s.set_synced(true));
    assert!(store.snapshot().policies().decide(&conn, &workload).allowed);
}

#[test]
fn a_handed_over_pod_is_found_only_when_exactly_one_workload_fits() {
    let mut s = mesh();
    let found = s
        .workload_for_pod("default", "sleep", "sleep", "node-a")
        .unwrap();
    assert_eq!(found.uid, "sleep");
    assert!(
        s.workload_for_pod("default", "sleep", "other-sa", "node-a")
            .is_none()
    );
    assert!(
        s.workload_for_pod("default", "sleep", "sleep", "node-b")
            .is_none()
    );
    // Two workloads for one pod name (another cluster's, say): ambiguous, none.
    let mut twin = workload("sleep-2", "10.0.0.2", "sleep");
    twin.name = "sleep".into();
    s.insert_address(Address::Workload(twin));
    assert!(
        s.workload_for_pod("default", "sleep", "sleep", "node-a")
            .is_none()
    );
}

// ---- property test against a naive oracle -------------------------------------------------

#[derive(Debug, Clone)]
enum Op {
    AddWorkload {
        id: u8,
        ip: u8,
        network: bool,
        hbone: bool,
        healthy: bool,
        ports: Vec<(u16, u16)>,
    },
    AddService {
        id: u8,
        vip: u8,
        ports: Vec<(u16, u16)>,
    },
    Remove(u8, bool),
}

fn ops() -> impl Strategy<Value = Vec<Op>> {
    let port_map = prop::collection::vec((prop_oneof![Just(80u16), Just(81)], 0u16..3), 0..3);
    let op = prop_oneof![
        (
            0u8..6,
            0u8..6,
            prop::bool::weighted(0.2),
            any::<bool>(),
            prop::bool::weighted(0.8),
            port_map.clone()
        )
            .prop_map(|(id, ip, network, hbone, healthy, ports)| Op::AddWorkload {
                id,
                ip,
                network,
                hbone,
                healthy,
                ports: ports.into_iter().map(|(s, t)| (s, t * 1000)).collect(),
            }),
        (0u8..3, 0u8..4, port_map).prop_map(|(id, vip, ports)| Op::AddService {
            id,
            vip,
            ports: ports.into_iter().map(|(s, t)| (s, t * 1000)).collect(),
        }),
        (0u8..6, any::<bool>()).prop_map(|(id, svc)| Op::Remove(id, svc)),
    ];
    prop::collection::vec(op, 0..24)
}

/// Builds both the state and the oracle's plain list of live resources, in insertion order.
fn build(ops: &[Op]) -> (State, Vec<Workload>, Vec<Service>) {
    let mut state = State::new("istio-system");
    let mut ws: Vec<Workload> = Vec::new();
    let mut ss: Vec<Service> = Vec::new();
    // Pod IPs 10.0.0.0-5 and VIPs 10.0.0.2-5 overlap on purpose (a VIP wins over a pod).
    for op in ops {
        match op {
            Op::AddWorkload {
                id,
                ip,
                network,
                hbone,
                healthy,
                ports,
            } => {
                let mut w = workload(
                    &format!("w{id}"),
                    &format!("10.0.0.{ip}"),
                    &format!("sa{id}"),
                );
                w.network = if *network { "n2".into() } else { String::new() };
                w.tunnel = if *hbone { Tunnel::Hbone } else { Tunnel::None };
                w.healthy = *healthy;
                // Every workload belongs to service s{id % 3}, with these port maps.
                let key = format!("default/s{}.default.svc.cluster.local", id % 3);
                w = member(w, &key, ports);
                ws.retain(|x| x.uid != w.uid);
                ws.push(w.clone());
                state.insert_address(Address::Workload(w));
            }
            Op::AddService { id, vip, ports } => {
                let s = service(&format!("s{id}"), &format!("10.0.0.{}", vip + 2), ports);
                ss.retain(|x| x.hostname != s.hostname);
                ss.push(s.clone());
                state.insert_address(Address::Service(s));
            }
            Op::Remove(id, svc) => {
                let key = if *svc {
                    format!("default/s{id}.default.svc.cluster.local")
                } else {
                    format!("w{id}")
                };
                ws.retain(|x| x.uid != key);
                ss.retain(|x| format!("default/{}", x.hostname) != key);
                state.remove_address(&key);
            }
        }
    }
    (state, ws, ss)
}

/// What the route should be, computed by scanning lists. `Ok((kind, destination uid, upstream))`
/// with kind "hbone" or "pass".
fn oracle(
    ws: &[Workload],
    ss: &[Service],
    source_network: &str,
    dst: SocketAddr,
    pick: usize,
) -> Result<(&'static str, Option<String>, SocketAddr), &'static str> {
    let svc = ss.iter().rev().find(|s| {
        s.addresses
            .iter()
            .any(|(n, ip)| n == source_network && *ip == dst.ip())
    });
    if let Some(s) = svc {
        let key = format!("default/{}", s.hostname);
        let Some(sp) = s.ports.iter().find(|p| p.service_port == dst.port()) else {
            return Err("no service port");
        };
        let mut members: Vec<&Workload> = ws
            .iter()
            .filter(|w| w.services.contains_key(&key))
            .filter(|w| w.healthy && w.network == source_network)
            .collect();
        members.sort_by(|a, b| a.uid.cmp(&b.uid));
        if members.is_empty() {
            return Err("no healthy endpoint");
        }
        let w = members[pick.min(members.len() - 1)];
        let own = w.services[&key]
            .iter()
            .find(|p| p.service_port == dst.port())
            .map(|p| p.target_port)
            .unwrap_or(0);
        let port = if own != 0 { own } else { sp.target_port };
        if port == 0 {
            return Err("no target port");
        }
        let kind = if w.hbone() { "hbone" } else { "pass" };
        return Ok((
            kind,
            Some(w.uid.clone()),
            SocketAddr::new(w.addresses[0], port),
        ));
    }
    let holder = ws
        .iter()
        .rev()
        .find(|w| w.network == source_network && w.addresses.contains(&dst.ip()));
    Ok(match holder {
        Some(w) if w.hbone() => ("hbone", Some(w.uid.clone()), dst),
        Some(w) => ("pass", Some(w.uid.clone()), dst),
        None => ("pass", None, dst),
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2048, ..ProptestConfig::default() })]

    #[test]
    fn decide_agrees_with_a_naive_oracle(ops in ops(), host in 0u8..8, port in prop_oneof![Just(80u16), Just(81), Just(443)], pick in 0usize..4, far in prop::bool::weighted(0.2)) {
        let (state, ws, ss) = build(&ops);
        let mut source = workload("client", "10.1.0.1", "client");
        source.network = if far { "n2".into() } else { String::new() };
        let dst: SocketAddr = format!("10.0.0.{host}:{port}").parse().unwrap();
        let got = decide(&state, &source, OrigDst(dst), &mut |_| pick);
        let want = oracle(&ws, &ss, &source.network, dst, pick);
        match (&got, &want) {
            (Ok(Route::Hbone { target, authority, destination, expected, .. }), Ok(("hbone", Some(uid), up))) => {
                prop_assert_eq!(&destination.uid, uid);
                prop_assert_eq!(authority.0, *up);
                prop_assert_eq!(target.0, SocketAddr::new(up.ip(), 15008));
                prop_assert_eq!(&expected[0], &destination.identity);
            }
            (Ok(Route::Passthrough { to, destination, .. }), Ok(("pass", uid, up))) => {
                prop_assert_eq!(to.0, *up);
                prop_assert_eq!(destination.as_ref().map(|w| w.uid.clone()), uid.clone());
            }
            (Err(e), Err(why)) => {
                let same = matches!((e, *why),
                    (RouteError::NoServicePort { .. }, "no service port")
                    | (RouteError::NoHealthyEndpoint { .. }, "no healthy endpoint")
                    | (RouteError::NoTargetPort { .. }, "no target port"));
                prop_assert!(same, "{:?} vs {:?}", e, why);
            }
            _ => prop_assert!(false, "decide {:?}\noracle {:?}", got, want),
        }
        // Shared Arcs: a route never copies the workload.
        if let Ok(Route::Hbone { destination, .. }) = &got {
            prop_assert!(Arc::ptr_eq(destination, state.workload(&destination.uid).unwrap()));
        }
    }
}

fn waypoint_at(ip_text: &str, port: u16) -> Waypoint {
    Waypoint {
        destination: WaypointAddress::Ip {
            network: String::new(),
            ip: ip(ip_text),
        },
        hbone_port: port,
    }
}

/// The mesh plus a waypoint pod (10.0.0.30, behind the `waypoint` service) used by the web
/// service and by web-2.
fn mesh_with_waypoint(service_uses: Waypoint, workload_uses: Waypoint) -> State {
    let mut s = mesh();
    let wp = member(
        workload("waypoint", "10.0.0.30", "waypoint"),
        "default/waypoint.default.svc.cluster.local",
        &[(15008, 15008)],
    );
    s.insert_address(Address::Workload(wp));
    s.insert_address(Address::Service(service(
        "waypoint",
        "10.96.0.30",
        &[(15008, 15008)],
    )));
    let mut web = service("web", "10.96.0.10", &[(80, 8080), (81, 0)]);
    web.waypoint = Some(service_uses);
    s.insert_address(Address::Service(web));
    let mut web2 = member(workload("web-2", "10.0.0.12", "web"), WEB, &[]);
    web2.waypoint = Some(workload_uses);
    s.insert_address(Address::Workload(web2));
    s
}

#[test]
fn a_destination_with_a_waypoint_is_tunneled_to_the_waypoint_with_the_original_authority() {
    let by_hostname = Waypoint {
        destination: WaypointAddress::Hostname {
            namespace: "default".into(),
            hostname: "waypoint.default.svc.cluster.local".into(),
        },
        hbone_port: 15008,
    };
    let s = mesh_with_waypoint(waypoint_at("10.0.0.30", 15088), by_hostname);
    // The service's waypoint, by address, on its own HBONE port; the authority stays the VIP.
    let r = route(&s, "10.96.0.10:80", 0).unwrap();
    assert_eq!(
        hbone_parts(&r),
        (
            "10.0.0.30:15088".into(),
            "10.96.0.10:80".into(),
            vec!["spiffe://cluster.local/ns/default/sa/waypoint".into()],
            "waypoint".into()
        )
    );
    // The workload's waypoint, by its service's hostname: an endpoint of that service.
    let r = route(&s, "10.0.0.12:8080", 0).unwrap();
    assert_eq!(
        hbone_parts(&r),
        (
            "10.0.0.30:15008".into(),
            "10.0.0.12:8080".into(),
            vec!["spiffe://cluster.local/ns/default/sa/waypoint".into()],
            "waypoint".into()
        )
    );
    // A workload without a waypoint is reached directly.
    let r = route(&s, "10.0.0.11:8080", 0).unwrap();
    assert_eq!(hbone_parts(&r).0, "10.0.0.11:15008");
}

#[test]
fn the_waypoint_itself_reaches_the_destination_directly() {
    let s = mesh_with_waypoint(
        waypoint_at("10.0.0.30", 15008),
        waypoint_at("10.0.0.30", 15008),
    );
    let waypoint = s.workload("waypoint").unwrap().clone();
    let r = decide(
        &s,
        &waypoint,
        OrigDst("10.0.0.12:8080".parse().unwrap()),
        &mut |_| 0,
    )
    .unwrap();
    assert_eq!(hbone_parts(&r).0, "10.0.0.12:15008");
    let r = decide(
        &s,
        &waypoint,
        OrigDst("10.96.0.10:80".parse().unwrap()),
        &mut |_| 0,
    )
    .unwrap();
    assert_eq!(hbone_parts(&r).3, "web-1");
}

#[test]
fn an_unknown_waypoint_is_an_error_not_a_bypass() {
    let s = mesh_with_waypoint(
        waypoint_at("10.0.0.99", 15008),
        waypoint_at("10.0.0.30", 15008),
    );
    let e = route(&s, "10.96.0.10:80", 0).unwrap_err();
    assert!(matches!(e, RouteError::NoWaypoint { .. }), "{e:?}");
    assert!(e.to_string().contains("10.0.0.99"), "{e}");
}

// ---- The fields of istio.workload that change where a connection goes. ----

/// The uid of the workload a route reaches (HBONE or passthrough), or the error's text.
fn reached(r: Result<Route, RouteError>) -> String {
    match r {
        Ok(Route::Hbone { destination, .. }) => destination.uid.clone(),
        Ok(Route::Passthrough {
            destination: Some(w),
            ..
        }) => w.uid.clone(),
        Ok(Route::Passthrough { to, .. }) => format!("passthrough {to}"),
        Err(e) => format!("error: {e}"),
    }
}

/// `sleep` at region r1, zone z1, node node-a, and a service `lb` (10.96.0.50:80 -> 8080) with
/// the given endpoints (uid, region, zone, node).
fn locality_mesh(lb: Option<LoadBalancing>, endpoints: &[(&str, &str, &str, &str)]) -> State {
    let mut s = State::new("istio-system");
    let mut sleep = workload("sleep", "10.0.0.1", "sleep");
    sleep.locality = Locality {
        region: "r1".into(),
        zone: "z1".into(),
        subzone: String::new(),
    };
    s.insert_address(Address::Workload(sleep));
    let key = "default/lb.default.svc.cluster.local";
    for (i, (uid, region, zone, node)) in endpoints.iter().enumerate() {
        let mut w = member(workload(uid, &format!("10.0.2.{}", i + 1), "lb"), key, &[]);
        w.locality = Locality {
            region: (*region).into(),
            zone: (*zone).into(),
            subzone: String::new(),
        };
        w.node = (*node).into();
        s.insert_address(Address::Workload(w));
    }
    let mut svc = service("lb", "10.96.0.50", &[(80, 8080)]);
    svc.load_balancing = lb;
    s.insert_address(Address::Service(svc));
    s
}

fn lb(mode: LoadBalancingMode, preference: &[LocalityScope]) -> Option<LoadBalancing> {
    Some(LoadBalancing {
        routing_preference: preference.to_vec(),
        mode,
        allow_unhealthy: false,
    })
}

#[test]
fn failover_prefers_the_endpoints_that_share_the_most_scopes_in_order() {
    use LocalityScope::{Region, Zone};
    let endpoints = [
        ("other-zone", "r1", "z2", "node-b"),
        ("same-zone", "r1", "z1", "node-c"),
        ("other-region", "r2", "z1", "node-a"),
    ];
    let s = locality_mesh(lb(LoadBalancingMode::Failover, &[Region, Zone]), &endpoints);
    // Whatever the pick, the one endpoint sharing region and zone.
    for pick in 0..3 {
        assert_eq!(reached(route(&s, "10.96.0.50:80", pick)), "same-zone");
    }
    // Without it, those sharing the region; without those, anyone.
    let s = locality_mesh(
        lb(LoadBalancingMode::Failover, &[Region, Zone]),
        &[endpoints[0], endpoints[2]],
    );
    for pick in 0..2 {
        assert_eq!(reached(route(&s, "10.96.0.50:80", pick)), "other-zone");
    }
    let s = locality_mesh(
        lb(LoadBalancingMode::Failover, &[Region, Zone]),
        &[endpoints[2]],
    );
    assert_eq!(reached(route(&s, "10.96.0.50:80", 0)), "other-region");
    // A zone match alone does not count: the order of preference is a prefix. other-region
    // shares the zone, not the region (rank 0), so it ties with a stranger.
    let s = locality_mesh(
        lb(LoadBalancingMode::Failover, &[Region, Zone]),
        &[endpoints[2], ("stranger", "r3", "z3", "node-z")],
    );
    assert_eq!(reached(route(&s, "10.96.0.50:80", 1)), "stranger");
}

#[test]
fn strict_refuses_rather_than_leave_the_locality_and_node_scope_compares_nodes() {
    use LocalityScope::{Node, Region, Zone};
    let endpoints = [
        ("other-zone", "r1", "z2", "node-b"),
        ("same-zone", "r1", "z1", "node-c"),
        ("same-node", "r9", "z9", "node-a"),
    ];
    let s = locality_mesh(lb(LoadBalancingMode::Strict, &[Region, Zone]), &endpoints);
    for pick in 0..3 {
        assert_eq!(reached(route(&s, "10.96.0.50:80", pick)), "same-zone");
    }
    let s = locality_mesh(
        lb(LoadBalancingMode::Strict, &[Region, Zone]),
        &[endpoints[0], endpoints[2]],
    );
    let e = reached(route(&s, "10.96.0.50:80", 0));
    assert!(e.contains("no healthy endpoint (of 2)"), "{e}");
    let s = locality_mesh(lb(LoadBalancingMode::Strict, &[Node]), &endpoints);
    assert_eq!(reached(route(&s, "10.96.0.50:80", 1)), "same-node");
    // No load_balancing at all: any endpoint, by the pick (uid order).
    let s = locality_mesh(None, &endpoints);
    assert_eq!(reached(route(&s, "10.96.0.50:80", 0)), "other-zone");
    assert_eq!(reached(route(&s, "10.96.0.50:80", 1)), "same-node");
    assert_eq!(reached(route(&s, "10.96.0.50:80", 2)), "same-zone");
}

#[test]
fn health_policy_allow_all_may_choose_unhealthy_endpoints_and_passthrough_mode_chooses_none() {
    let mut s = mesh();
    // mesh(): web-0 is unhealthy, and never chosen.
    assert_eq!(reached(route(&s, "10.96.0.10:80", 0)), "web-1");
    let mut web = service("web", "10.96.0.10", &[(80, 8080), (81, 0)]);
    web.load_balancing = Some(LoadBalancing {
        routing_preference: vec![],
        mode: LoadBalancingMode::Standard,
        allow_unhealthy: true,
    });
    s.insert_address(Address::Service(web.clone()));
    assert_eq!(reached(route(&s, "10.96.0.10:80", 0)), "web-0");
    web.load_balancing = lb(LoadBalancingMode::Passthrough, &[]);
    s.insert_address(Address::Service(web));
    let r = route(&s, "10.96.0.10:80", 0).unwrap();
    assert!(
        matches!(&r, Route::Passthrough { to, destination: None, service: Some(s) }
            if to.to_string() == "10.96.0.10:80" && s.name == "web"),
        "{r:?}"
    );
}

#[test]
fn capacity_weights_the_choice_and_zero_is_never_chosen() {
    let mut s = locality_mesh(
        None,
        &[
            ("big", "", "", "n"),
            ("small", "", "", "n"),
            ("off", "", "", "n"),
        ],
    );
    let set = |s: &mut State, uid: &str, capacity: u32| {
        let mut w = (**s.workload(uid).unwrap()).clone();
        w.capacity = capacity;
        s.insert_address(Address::Workload(w));
    };
    set(&mut s, "big", 3);
    set(&mut s, "off", 0);
    // Weight units laid end to end, in uid order: big 0..3, off none, small 3.
    for pick in 0..3 {
        assert_eq!(reached(route(&s, "10.96.0.50:80", pick)), "big");
    }
    assert_eq!(reached(route(&s, "10.96.0.50:80", 3)), "small");
    set(&mut s, "big", 0);
    set(&mut s, "small", 0);
    let e = reached(route(&s, "10.96.0.50:80", 0));
    assert!(e.contains("no healthy endpoint (of 3)"), "{e}");
}

#[test]
fn ip_families_choose_the_address_dialed() {
    let mut s = State::new("istio-system");
    s.insert_address(Address::Workload(workload("sleep", "10.0.0.1", "sleep")));
    let key = "default/dual.default.svc.cluster.local";
    let mut both = member(workload("both", "10.0.3.1", "dual"), key, &[]);
    both.addresses.push(ip("fd00::3:1"));
    s.insert_address(Address::Workload(both));
    let mut svc = service("dual", "10.96.0.60", &[(80, 8080)]);
    svc.addresses.push((String::new(), ip("fd00::60")));
    s.insert_address(Address::Service(svc.clone()));
    let authority = |s: &State, to: &str| hbone_parts(&route(s, to, 0).unwrap()).1;
    // AUTOMATIC: the family dialed.
    assert_eq!(authority(&s, "10.96.0.60:80"), "10.0.3.1:8080");
    assert_eq!(authority(&s, "[fd00::60]:80"), "[fd00::3:1]:8080");
    // IPV6_ONLY: v6 whatever was dialed; an endpoint without v6 is not chosen.
    svc.ip_families = IpFamilies::Ipv6Only;
    s.insert_address(Address::Service(svc.clone()));
    assert_eq!(authority(&s, "10.96.0.60:80"), "[fd00::3:1]:8080");
    let mut both = (**s.workload("both").unwrap()).clone();
    both.addresses.truncate(1);
    s.insert_address(Address::Workload(both));
    let e = reached(route(&s, "10.96.0.60:80", 0));
    assert!(e.contains("no healthy endpoint (of 1)"), "{e}");
    svc.ip_families = IpFamilies::Ipv4Only;
    s.insert_address(Address::Service(svc));
    assert_eq!(authority(&s, "[fd00::60]:80"), "10.0.3.1:8080");
}

#[test]
fn host_network_workloads_are_not_found_by_their_shared_address() {
    let mut s = mesh();
    let mut host = member(
        workload("host-pod", "192.168.1.5", "host"),
        "default/hostsvc.default.svc.cluster.local",
        &[],
    );
    host.network_mode = NetworkMode::HostNetwork;
    s.insert_address(Address::Workload(host.clone()));
    s.insert_address(Address::Service(service(
        "hostsvc",
        "10.96.0.70",
        &[(80, 8080)],
    )));
    // By address: the node, not the pod (outside the mesh: passthrough).
    assert!(s.workload_at("", ip("192.168.1.5")).is_none());
    assert_eq!(
        reached(route(&s, "192.168.1.5:8080", 0)),
        "passthrough 192.168.1.5:8080"
    );
    // Through its service: still an endpoint.
    assert_eq!(reached(route(&s, "10.96.0.70:80", 0)), "host-pod");
    // The same pod with its own network namespace is found by address.
    host.network_mode = NetworkMode::Standard;
    s.insert_address(Address::Workload(host));
    assert_eq!(reached(route(&s, "192.168.1.5:8080", 0)), "host-pod");
}

#[test]
fn a_service_range_holds_the_addresses_no_vip_holds_longest_prefix_first() {
    let mut s = mesh();
    let key = "default/wide.default.svc.cluster.local";
    s.insert_address(Address::Workload(member(
        workload("wide-0", "10.0.4.1", "wide"),
        key,
        &[],
    )));
    let narrow_key = "default/narrow.default.svc.cluster.local";
    s.insert_address(Address::Workload(member(
        workload("narrow-0", "10.0.4.2", "narrow"),
        narrow_key,
        &[],
    )));
    // The narrow range first: the longer prefix wins, not the later range.
    let mut narrow = service("narrow", "10.96.0.81", &[(80, 8080)]);
    narrow.ranges = vec![(String::new(), "240.1.2.0/24".parse().unwrap())];
    s.insert_address(Address::Service(narrow));
    let mut wide = service("wide", "10.96.0.80", &[(80, 8080)]);
    wide.ranges = vec![(String::new(), "240.1.0.0/16".parse().unwrap())];
    s.insert_address(Address::Service(wide));
    assert_eq!(reached(route(&s, "240.1.9.9:80", 0)), "wide-0");
    assert_eq!(reached(route(&s, "240.1.2.3:80", 0)), "narrow-0");
    // An exact VIP inside a range is its own service's.
    assert_eq!(reached(route(&s, "10.96.0.10:80", 0)), "web-1");
    // Outside every range: passthrough. Removed: the range is released.
    assert_eq!(
        reached(route(&s, "240.2.0.1:80", 0)),
        "passthrough 240.2.0.1:80"
    );
    s.remove_address(narrow_key);
    assert_eq!(reached(route(&s, "240.1.2.3:80", 0)), "wide-0");
}

#[test]
fn endpoints_only_behind_a_network_gateway_and_sidecar_mtls_are_refused_with_the_reason() {
    let mut s = mesh();
    let mut far = member(
        workload("far-0", "10.9.0.1", "far"),
        "default/far.default.svc.cluster.local",
        &[],
    );
    far.network = "west".into();
    far.network_gateway = Some(waypoint_at("203.0.113.7", 15008));
    s.insert_address(Address::Workload(far));
    s.insert_address(Address::Service(service(
        "far",
        "10.96.0.90",
        &[(80, 8080)],
    )));
    let e = reached(route(&s, "10.96.0.90:80", 0));
    assert!(
        e.contains("only in network \"west\", behind network gateway 203.0.113.7"),
        "{e}"
    );
    let mut sidecar = workload("sidecar", "10.0.5.1", "sidecar");
    sidecar.tunnel = Tunnel::LegacyIstioMtls;
    s.insert_address(Address::Workload(sidecar));
    let e = reached(route(&s, "10.0.5.1:8080", 0));
    assert!(
        e.contains("sidecar's mutual TLS (LEGACY_ISTIO_MTLS)"),
        "{e}"
    );
}

#[test]
fn weighted_waypoints_are_chosen_by_weight_in_place_of_the_waypoint() {
    let mut s = mesh_with_waypoint(
        waypoint_at("10.0.0.30", 15008),
        waypoint_at("10.0.0.30", 15008),
    );
    s.insert_address(Address::Workload(workload("canary", "10.0.0.31", "canary")));
    let mut web = (**s.service(WEB).unwrap()).clone();
    web.weighted_waypoints = vec![
        (waypoint_at("10.0.0.30", 15008), 1),
        (waypoint_at("10.0.0.31", 15008), 3),
    ];
    s.insert_address(Address::Service(web.clone()));
    assert_eq!(
        hbone_parts(&route(&s, "10.96.0.10:80", 0).unwrap()).0,
        "10.0.0.30:15008"
    );
    for pick in 1..4 {
        assert_eq!(
            hbone_parts(&route(&s, "10.96.0.10:80", pick).unwrap()).0,
            "10.0.0.31:15008"
        );
    }
    // Weights that add up to 0: the waypoint field.
    web.weighted_waypoints = vec![(waypoint_at("10.0.0.31", 15008), 0)];
    s.insert_address(Address::Service(web));
    assert_eq!(
        hbone_parts(&route(&s, "10.96.0.10:80", 3).unwrap()).0,
        "10.0.0.30:15008"
    );
}
