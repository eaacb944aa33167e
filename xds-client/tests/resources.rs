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
