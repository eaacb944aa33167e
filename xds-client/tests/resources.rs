//! Decoding the Istio resource types: round trips, defaults, and per-resource rejections.

use std::collections::BTreeMap;

use prost::Message;
use xds_client::proto::workload as pb;
use xds_client::resources::{
    Address, PortMapping, Service, Workload, WorkloadType, decode_address, encode_address,
};

#[path = "../../fuzz/seed_corpus.rs"]
mod seed_corpus;

fn workload() -> Workload {
    Workload {
        uid: "cluster1//Pod/default/sleep-7c9755c6d-nhwn6".into(),
        name: "sleep-7c9755c6d-nhwn6".into(),
        namespace: "default".into(),
        addresses: vec!["10.244.0.7".parse().unwrap(), "fd00::7".parse().unwrap()],
        network: String::new(),
        tunnel: xds_client::resources::Tunnel::Hbone,
        identity: "spiffe://cluster.local/ns/default/sa/sleep"
            .parse()
            .unwrap(),
        node: "node-a".into(),
        canonical_name: "sleep".into(),
        canonical_revision: "v1".into(),
        workload_type: WorkloadType::Deployment,
        workload_name: "sleep".into(),
        authorization_policies: vec!["default/allow-sleep".into()],
        healthy: true,
        cluster_id: "Kubernetes".into(),
        hostname: String::new(),
        services: BTreeMap::from([(
            "default/sleep.default.svc.cluster.local".to_owned(),
            vec![PortMapping {
                service_port: 80,
                target_port: 8080,
            }],
        )]),
        waypoint: None,
        network_gateway: None,
        network_mode: xds_client::resources::NetworkMode::Standard,
        locality: Default::default(),
        capacity: 1,
        native_tunnel: false,
        application_tunnel: None,
    }
}

#[test]
fn workloads_and_services_round_trip() {
    let w = Address::Workload(workload());
    assert_eq!(decode_address(&encode_address(&w)).unwrap(), w);
    assert_eq!(w.key(), "cluster1//Pod/default/sleep-7c9755c6d-nhwn6");
    let s = Address::Service(Service {
        name: "web".into(),
        namespace: "default".into(),
        hostname: "web.default.svc.cluster.local".into(),
        addresses: vec![(String::new(), "10.96.0.10".parse().unwrap())],
        ports: vec![PortMapping {
            service_port: 80,
            target_port: 8080,
        }],
        subject_alt_names: vec![],
        waypoint: None,
        ..Default::default()
    });
    assert_eq!(decode_address(&encode_address(&s)).unwrap(), s);
    assert_eq!(s.key(), "default/web.default.svc.cluster.local");
}

#[test]
fn elided_trust_domain_and_service_account_take_istio_defaults() {
    let proto = pb::Address {
        r#type: Some(pb::address::Type::Workload(pb::Workload {
            uid: "u1".into(),
            namespace: "prod".into(),
            ..Default::default()
        })),
    };
    let Address::Workload(w) = decode_address(&proto.encode_to_vec()).unwrap() else {
        panic!()
    };
    assert_eq!(
        w.identity.as_str(),
        "spiffe://cluster.local/ns/prod/sa/default"
    );
    assert!(!w.hbone());
}

#[test]
fn bad_resources_are_rejected_with_a_reason() {
    let reject = |w: pb::Workload| {
        let bytes = pb::Address {
            r#type: Some(pb::address::Type::Workload(w)),
        }
        .encode_to_vec();
        decode_address(&bytes).unwrap_err().to_string()
    };
    let base = || pb::Workload {
        uid: "u1".into(),
        namespace: "default".into(),
        ..Default::default()
    };
    let e = reject(pb::Workload {
        addresses: vec![vec![10, 0, 0]],
        ..base()
    });
    assert!(
        e.contains("Workload u1 addresses[0]") && e.contains("3 bytes"),
        "{e}"
    );
    let e = reject(pb::Workload {
        uid: String::new(),
        ..base()
    });
    assert!(e.contains("uid is empty"), "{e}");
    let e = reject(pb::Workload {
        tunnel_protocol: 7,
        ..base()
    });
    assert!(e.contains("unknown tunnel_protocol 7"), "{e}");
    let e = reject(pb::Workload {
        service_account: "Bad SA".into(),
        ..base()
    });
    assert!(e.contains("no valid identity"), "{e}");
    let e = reject(pb::Workload {
        services: [(
            "default/x".to_owned(),
            pb::PortList {
                ports: vec![pb::Port {
                    service_port: 70000,
                    target_port: 1,
                    ..Default::default()
                }],
            },
        )]
        .into(),
        ..base()
    });
    assert!(e.contains("port 70000"), "{e}");
    // Truncated bytes and an empty oneof.
    let full = encode_address(&Address::Workload(workload()));
    assert!(decode_address(&full[..full.len() / 2]).is_err());
    assert!(
        decode_address(&pb::Address { r#type: None }.encode_to_vec())
            .unwrap_err()
            .to_string()
            .contains("neither")
    );
}

#[test]
fn xds_resources_target_over_seed_corpus() {
    let mut seeds = seed_corpus::seeds("xds_resources");
    seeds.push(encode_address(&Address::Workload(workload())));
    let decoded = seeds
        .iter()
        .inspect(|d| xds_client::resources::fuzz_resources(d))
        .filter(|d| decode_address(d).is_ok())
        .count();
    assert!(
        decoded > 0 && decoded < seeds.len(),
        "{decoded} of {} decoded",
        seeds.len()
    );
}

/// Encodes one resource the way istiod would (from the generated message, not our model).
fn from_istiod(r#type: pb::address::Type) -> Result<Address, String> {
    decode_address(
        &pb::Address {
            r#type: Some(r#type),
        }
        .encode_to_vec(),
    )
    .map_err(|e| e.to_string())
}

#[test]
fn every_workload_field_a_proxy_acts_on_is_decoded() {
    use xds_client::resources::{
        ApplicationTunnel, Locality, NetworkMode, Tunnel, WaypointAddress,
    };
    let gateway = pb::GatewayAddress {
        destination: Some(pb::gateway_address::Destination::Address(
            pb::NetworkAddress {
                network: "west".into(),
                address: vec![203, 0, 113, 7],
                length: None,
            },
        )),
        hbone_mtls_port: 15009,
    };
    let Address::Workload(w) = from_istiod(pb::address::Type::Workload(pb::Workload {
        uid: "u1".into(),
        namespace: "default".into(),
        network: "west".into(),
        tunnel_protocol: pb::TunnelProtocol::LegacyIstioMtls as i32,
        network_gateway: Some(gateway),
        network_mode: pb::NetworkMode::HostNetwork as i32,
        locality: Some(pb::Locality {
            region: "eu".into(),
            zone: "eu-1".into(),
            subzone: "rack-4".into(),
        }),
        capacity: Some(7),
        native_tunnel: true,
        application_tunnel: Some(pb::ApplicationTunnel {
            protocol: pb::application_tunnel::Protocol::Proxy as i32,
            port: 15088,
        }),
        ..Default::default()
    }))
    .unwrap() else {
        panic!("a workload")
    };
    assert_eq!(w.tunnel, Tunnel::LegacyIstioMtls);
    let gw = w.network_gateway.as_ref().unwrap();
    assert_eq!(gw.hbone_port, 15009);
    assert!(
        matches!(&gw.destination, WaypointAddress::Ip { network, ip } if network == "west" && ip.to_string() == "203.0.113.7")
    );
    assert_eq!(w.network_mode, NetworkMode::HostNetwork);
    assert_eq!(
        w.locality,
        Locality {
            region: "eu".into(),
            zone: "eu-1".into(),
            subzone: "rack-4".into()
        }
    );
    assert_eq!(w.capacity, 7);
    assert!(w.native_tunnel);
    assert_eq!(
        w.application_tunnel,
        Some(ApplicationTunnel {
            proxy_protocol: true,
            port: 15088
        })
    );
    // Our encoding carries all of it back.
    assert_eq!(
        decode_address(&encode_address(&Address::Workload(w.clone()))).unwrap(),
        Address::Workload(w)
    );
    // Unset capacity is 1.
    let Address::Workload(w) = from_istiod(pb::address::Type::Workload(pb::Workload {
        uid: "u2".into(),
        namespace: "default".into(),
        ..Default::default()
    }))
    .unwrap() else {
        panic!("a workload")
    };
    assert_eq!(w.capacity, 1);
}

#[test]
fn every_service_field_a_proxy_acts_on_is_decoded() {
    use pb::load_balancing::{HealthPolicy, Mode, Scope};
    use xds_client::resources::{
        IpFamilies, LoadBalancing, LoadBalancingMode, LocalityScope, Visibility,
    };
    let waypoint = |last: u8| pb::GatewayAddress {
        destination: Some(pb::gateway_address::Destination::Address(
            pb::NetworkAddress {
                network: String::new(),
                address: vec![10, 0, 0, last],
                length: None,
            },
        )),
        hbone_mtls_port: 0,
    };
    let Address::Service(s) = from_istiod(pb::address::Type::Service(pb::Service {
        name: "wide".into(),
        namespace: "default".into(),
        hostname: "wide.example".into(),
        addresses: vec![
            pb::NetworkAddress {
                network: String::new(),
                address: vec![10, 96, 0, 1],
                length: Some(32),
            },
            pb::NetworkAddress {
                network: String::new(),
                address: vec![240, 1, 2, 3],
                length: Some(16),
            },
        ],
        load_balancing: Some(pb::LoadBalancing {
            routing_preference: vec![Scope::Region as i32, Scope::Node as i32],
            mode: Mode::Failover as i32,
            health_policy: HealthPolicy::AllowAll as i32,
        }),
        ip_families: pb::IpFamilies::Ipv6Only as i32,
        canonical: true,
        ingress_use_waypoint: true,
        weighted_waypoints: vec![
            pb::WeightedWaypoint {
                destination: Some(waypoint(30)),
                weight: 1,
            },
            pb::WeightedWaypoint {
                destination: Some(waypoint(31)),
                weight: 9,
            },
        ],
        visibility: pb::service::Visibility::Namespace as i32,
        ..Default::default()
    }))
    .unwrap() else {
        panic!("a service")
    };
    // A full-length prefix is one address; a shorter one a range (its network address).
    assert_eq!(
        s.addresses,
        vec![(String::new(), "10.96.0.1".parse().unwrap())]
    );
    assert_eq!(
        s.ranges,
        vec![(String::new(), "240.1.0.0/16".parse().unwrap())]
    );
    assert_eq!(
        s.load_balancing,
        Some(LoadBalancing {
            routing_preference: vec![LocalityScope::Region, LocalityScope::Node],
            mode: LoadBalancingMode::Failover,
            allow_unhealthy: true,
        })
    );
    assert_eq!(s.ip_families, IpFamilies::Ipv6Only);
    assert!(s.canonical && s.ingress_use_waypoint);
    assert_eq!(s.visibility, Visibility::Namespace);
    assert_eq!(
        s.weighted_waypoints
            .iter()
            .map(|(w, weight)| (w.hbone_port, *weight))
            .collect::<Vec<_>>(),
        vec![(15008, 1), (15008, 9)]
    );
    assert_eq!(
        decode_address(&encode_address(&Address::Service(s.clone()))).unwrap(),
        Address::Service(s)
    );
}

#[test]
fn values_of_the_new_fields_that_mean_nothing_are_rejected_with_the_field() {
    let workload = |w: pb::Workload| {
        from_istiod(pb::address::Type::Workload(pb::Workload {
            uid: "u1".into(),
            namespace: "default".into(),
            ..w
        }))
        .unwrap_err()
    };
    let e = workload(pb::Workload {
        network_mode: 5,
        ..Default::default()
    });
    assert!(e.contains("Workload u1: unknown network_mode 5"), "{e}");
    let e = workload(pb::Workload {
        application_tunnel: Some(pb::ApplicationTunnel {
            protocol: 9,
            port: 1,
        }),
        ..Default::default()
    });
    assert!(e.contains("unknown application_tunnel protocol 9"), "{e}");
    let e = workload(pb::Workload {
        application_tunnel: Some(pb::ApplicationTunnel {
            protocol: 1,
            port: 70000,
        }),
        ..Default::default()
    });
    assert!(
        e.contains("application_tunnel.port: port 70000 is out of range"),
        "{e}"
    );
    let e = workload(pb::Workload {
        network_gateway: Some(pb::GatewayAddress::default()),
        ..Default::default()
    });
    assert!(e.contains("Workload u1 network_gateway"), "{e}");
    let service = |s: pb::Service| {
        from_istiod(pb::address::Type::Service(pb::Service {
            namespace: "default".into(),
            hostname: "x.example".into(),
            ..s
        }))
        .unwrap_err()
    };
    let e = service(pb::Service {
        addresses: vec![pb::NetworkAddress {
            network: String::new(),
            address: vec![10, 0, 0, 1],
            length: Some(33),
        }],
        ..Default::default()
    });
    assert!(
        e.contains(
            "Service default/x.example addresses[0]: prefix length 33 does not fit 10.0.0.1"
        ),
        "{e}"
    );
    let e = service(pb::Service {
        load_balancing: Some(pb::LoadBalancing {
            routing_preference: vec![0],
            ..Default::default()
        }),
        ..Default::default()
    });
    assert!(
        e.contains("load_balancing: routing_preference 0 is not a scope"),
        "{e}"
    );
    let e = service(pb::Service {
        load_balancing: Some(pb::LoadBalancing {
            mode: 8,
            ..Default::default()
        }),
        ..Default::default()
    });
    assert!(e.contains("unknown mode 8"), "{e}");
    let e = service(pb::Service {
        load_balancing: Some(pb::LoadBalancing {
            health_policy: 4,
            ..Default::default()
        }),
        ..Default::default()
    });
    assert!(e.contains("unknown health_policy 4"), "{e}");
    let e = service(pb::Service {
        ip_families: 6,
        ..Default::default()
    });
    assert!(e.contains("unknown ip_families 6"), "{e}");
    let e = service(pb::Service {
        visibility: 3,
        ..Default::default()
    });
    assert!(e.contains("unknown visibility 3"), "{e}");
    let e = service(pb::Service {
        weighted_waypoints: vec![pb::WeightedWaypoint {
            destination: None,
            weight: 1,
        }],
        ..Default::default()
    });
    assert!(e.contains("weighted_waypoints[0]: no destination"), "{e}");
}

/// `Workload::new` is what a resource with only those fields decodes to.
#[test]
fn a_workload_built_by_hand_is_what_a_minimal_resource_decodes_to() {
    let Address::Workload(decoded) = from_istiod(pb::address::Type::Workload(pb::Workload {
        uid: "u1".into(),
        name: "web-0".into(),
        namespace: "default".into(),
        trust_domain: "cluster.local".into(),
        service_account: "web".into(),
        ..Default::default()
    }))
    .unwrap() else {
        panic!("not a workload")
    };
    let built = Workload::new(
        "u1",
        "web-0",
        "default",
        "spiffe://cluster.local/ns/default/sa/web".parse().unwrap(),
    );
    assert_eq!(built, decoded);
}
