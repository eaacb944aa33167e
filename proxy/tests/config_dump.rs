//! `/config_dump` in the shape Istio's ztunnel writes and `istioctl ztunnel-config` reads: the
//! keys, value formats and omissions of each workload, service, policy and certificate, for a
//! state that uses the fields where the formats differ (waypoints, gateways, ranges, locality,
//! load balancing, application tunnels, every kind of policy match). The expected values were
//! checked against Istio's ztunnel's dump of the same state (interop/config_dump.sh).

mod common;

use std::time::Duration;

use base64::Engine;
use proxy::admin::PodStatus;
use proxy::config_dump::{CertificateDump, DumpContext, config_dump};
use proxy::state::State;
use serde_json::{Value, json};
use xds_client::resources::{
    Address, ApplicationTunnel, IpFamilies, LoadBalancing, LoadBalancingMode, Locality,
    LocalityScope, NetworkMode, PortMapping, Service, Tunnel, Visibility, Waypoint,
    WaypointAddress,
};

fn at(network: &str, ip: &str, port: u16) -> Waypoint {
    Waypoint {
        destination: WaypointAddress::Ip {
            network: network.into(),
            ip: ip.parse().unwrap(),
        },
        hbone_port: port,
    }
}

const WEB: &str = "default/web.default.svc.cluster.local";

fn state() -> State {
    let mut s = State::new("istio-system");
    let mut web = common::workload(
        "web",
        "10.0.0.10".parse().unwrap(),
        true,
        &["default/allow-sleep"],
    );
    web.uid = "c1//Pod/default/web-0".into();
    web.name = "web-0".into();
    web.identity = common::id("web");
    web.addresses.push("fd00::10".parse().unwrap());
    web.cluster_id = "c1".into();
    web.canonical_name = "web".into();
    web.canonical_revision = "v1".into();
    web.workload_name = "web".into();
    web.workload_type = xds_client::resources::WorkloadType::Deployment;
    web.healthy = false;
    web.waypoint = Some(at("", "10.0.0.30", 15008));
    web.locality = Locality {
        region: "r1".into(),
        zone: "z1".into(),
        subzone: "s1".into(),
    };
    web.capacity = 3;
    web.services.insert(
        WEB.into(),
        vec![PortMapping {
            service_port: 80,
            target_port: 8080,
        }],
    );
    s.insert_address(Address::Workload(web));
    let mut host = common::workload("host", "192.168.1.5".parse().unwrap(), false, &[]);
    host.uid = "c1//Pod/default/host-0".into();
    host.name = "host-0".into();
    host.identity = "spiffe://example.org/ns/default/sa/host".parse().unwrap();
    host.tunnel = Tunnel::None;
    host.network_mode = NetworkMode::HostNetwork;
    host.application_tunnel = Some(ApplicationTunnel {
        proxy_protocol: true,
        port: 15088,
    });
    host.network_gateway = Some(at("west", "203.0.113.7", 15009));
    host.native_tunnel = true;
    host.hostname = "host.example".into();
    host.network = "west".into();
    host.cluster_id = String::new();
    host.canonical_name = String::new();
    host.canonical_revision = String::new();
    host.workload_name = String::new();
    s.insert_address(Address::Workload(host));
    s.insert_address(Address::Service(Service {
        name: "web".into(),
        namespace: "default".into(),
        hostname: "web.default.svc.cluster.local".into(),
        addresses: vec![
            (String::new(), "10.96.0.10".parse().unwrap()),
            (String::new(), "fd00::a".parse().unwrap()),
        ],
        ranges: vec![(String::new(), "240.1.0.0/16".parse().unwrap())],
        ports: vec![PortMapping {
            service_port: 80,
            target_port: 8080,
        }],
        subject_alt_names: vec!["spiffe://cluster.local/ns/default/sa/web".into()],
        waypoint: Some(Waypoint {
            destination: WaypointAddress::Hostname {
                namespace: "default".into(),
                hostname: "waypoint.default.svc.cluster.local".into(),
            },
            hbone_port: 15008,
        }),
        load_balancing: Some(LoadBalancing {
            routing_preference: vec![LocalityScope::Region, LocalityScope::Zone],
            mode: LoadBalancingMode::Failover,
            allow_unhealthy: true,
        }),
        ip_families: IpFamilies::Ipv6Only,
        canonical: true,
        visibility: Visibility::Namespace,
        ..Default::default()
    }));
    let policy = authz::parse_policies(
        r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-sleep, namespace: default, annotations: {istio.io/dry-run: "true"}}
spec:
  selector: {matchLabels: {app: web}}
  action: ALLOW
  rules:
  - from:
    - source:
        namespaces: ["default", "pre*", "*suf"]
        notNamespaces: ["evil"]
        principals: ["cluster.local/ns/default/sa/sleep"]
        ipBlocks: ["10.0.0.0/8"]
    to:
    - operation: {ports: ["8080"]}
"#,
        "policy.yaml",
        "istio-system",
    )
    .unwrap()
    .policies
    .remove(0);
    s.insert_policy(policy);
    s.set_synced(true);
    s
}

#[test]
fn workloads_are_written_as_istio_writes_them() {
    let dump: Value =
        serde_json::from_str(&config_dump(&state(), &DumpContext::default())).unwrap();
    assert_eq!(
        dump["workloads"],
        json!([
            {
                "uid": "c1//Pod/default/host-0",
                "workloadIps": ["192.168.1.5"],
                "networkGateway": {"destination": "west/203.0.113.7", "hboneMtlsPort": 15009},
                "protocol": "TCP",
                "networkMode": "HostNetwork",
                "name": "host-0",
                "namespace": "default",
                "trustDomain": "example.org",
                "serviceAccount": "host",
                "network": "west",
                "workloadType": "pod",
                "hostname": "host.example",
                "node": "node-a",
                "nativeTunnel": true,
                "applicationTunnel": {"protocol": "PROXY", "port": 15088},
                "status": "Healthy",
                "clusterId": "",
                "capacity": 1
            },
            {
                "uid": "c1//Pod/default/web-0",
                "workloadIps": ["10.0.0.10", "fd00::10"],
                "waypoint": {"destination": "/10.0.0.30", "hboneMtlsPort": 15008},
                "protocol": "HBONE",
                "networkMode": "Standard",
                "name": "web-0",
                "namespace": "default",
                "trustDomain": "cluster.local",
                "serviceAccount": "web",
                "workloadName": "web",
                "workloadType": "deployment",
                "canonicalName": "web",
                "canonicalRevision": "v1",
                "node": "node-a",
                "authorizationPolicies": ["default/allow-sleep"],
                "status": "Unhealthy",
                "clusterId": "c1",
                "locality": {"region": "r1", "zone": "z1", "subzone": "s1"},
                "services": ["default/web.default.svc.cluster.local"],
                "capacity": 3
            }
        ])
    );
}

#[test]
fn services_and_policies_are_written_as_istio_writes_them() {
    let dump: Value =
        serde_json::from_str(&config_dump(&state(), &DumpContext::default())).unwrap();
    assert_eq!(
        dump["services"],
        json!([{
            "name": "web",
            "namespace": "default",
            "hostname": "web.default.svc.cluster.local",
            "vips": ["/10.96.0.10", "/fd00::a"],
            "cidrVips": [{"network": "", "cidr": "240.1.0.0/16"}],
            "ports": {"80": 8080},
            "endpoints": {
                "c1//Pod/default/web-0": {
                    "workloadUid": "c1//Pod/default/web-0",
                    "port": {"80": 8080},
                    "status": "Unhealthy"
                }
            },
            "subjectAltNames": ["spiffe://cluster.local/ns/default/sa/web"],
            "waypoint": {
                "destination": "default/waypoint.default.svc.cluster.local",
                "hboneMtlsPort": 15008
            },
            "loadBalancer": {
                "routingPreferences": ["Region", "Zone"],
                "mode": "Failover",
                "healthPolicy": "AllowAll"
            },
            "ipFamilies": "IPv6",
            "canonical": true,
            "visibility": "Namespace"
        }])
    );
    assert_eq!(
        dump["policies"],
        json!([{
            "name": "allow-sleep",
            "namespace": "default",
            "scope": "WorkloadSelector",
            "action": "Allow",
            "dryRun": true,
            "rules": [[
                [{
                    "namespaces": [{"Exact": "default"}, {"Prefix": "pre"}, {"Suffix": "suf"}],
                    "notNamespaces": [{"Exact": "evil"}],
                    "principals": [{"Exact": "cluster.local/ns/default/sa/sleep"}],
                    "sourceIps": ["10.0.0.0/8"]
                }],
                [{"destinationPorts": [8080]}]
            ]]
        }])
    );
    assert_eq!(dump["synced"], true);
    // Without ALLOW_ALL, an unhealthy endpoint is not one a connection may go to, and is not
    // listed (as Istio's ztunnel leaves it out).
    let mut s = state();
    let mut web = (**s.service(WEB).unwrap()).clone();
    web.load_balancing = None;
    s.insert_address(Address::Service(web));
    let dump: Value = serde_json::from_str(&config_dump(&s, &DumpContext::default())).unwrap();
    assert_eq!(dump["services"][0]["endpoints"], json!({}));
}

#[test]
fn certificates_and_served_pods_are_written_as_istio_writes_them() {
    let ca = identity::DevCa::generate("cluster.local").unwrap();
    let creds = ca
        .issue(&common::id("web"), Duration::from_secs(3600))
        .unwrap();
    let leaf = identity::CertInfo::parse(&creds.chain[0]).unwrap();
    let context = DumpContext {
        certificates: vec![
            CertificateDump {
                identity: common::id("web").to_string(),
                chain: creds.chain.clone(),
                roots: vec![ca.root()],
                error: None,
            },
            CertificateDump {
                identity: common::id("late").to_string(),
                chain: vec![],
                roots: vec![ca.root()],
                error: Some("the CA refused: no token".into()),
            },
        ],
        pods: vec![PodStatus {
            uid: "pod-uid-1".into(),
            namespace: "default".into(),
            name: "web-0".into(),
            identity: common::id("web").to_string(),
            workload_uid: Some("c1//Pod/default/web-0".into()),
            cert_expiry: Some(leaf.not_after),
            open_connections: 2,
        }],
        config: json!({"proxyMode": "Shared"}),
    };
    let dump: Value = serde_json::from_str(&config_dump(&state(), &context)).unwrap();
    let certs = dump["certificates"].as_array().unwrap();
    assert_eq!(certs.len(), 2);
    // In identity order: late, then web.
    assert_eq!(
        certs[0]["identity"],
        "spiffe://cluster.local/ns/default/sa/late"
    );
    assert_eq!(certs[0]["state"], "Unavailable: the CA refused: no token");
    assert_eq!(certs[0]["certChain"], json!([]));
    let web = &certs[1];
    assert_eq!(web["state"], "Available");
    let leaf_dump = &web["certChain"][0];
    let pem = base64::engine::general_purpose::STANDARD
        .decode(leaf_dump["pem"].as_str().unwrap())
        .unwrap();
    assert_eq!(
        identity::pem::parse_certs(&pem, std::path::Path::new("dump")).unwrap()[0],
        creds.chain[0]
    );
    assert_eq!(leaf_dump["serialNumber"], leaf.serial_number.as_str());
    assert!(
        leaf.serial_number.chars().all(|c| c.is_ascii_digit()),
        "decimal: {}",
        leaf.serial_number
    );
    assert_eq!(leaf_dump["validFrom"], identity::fmt_time(leaf.not_before));
    assert_eq!(
        leaf_dump["expirationTime"],
        identity::fmt_time(leaf.not_after)
    );
    assert_eq!(web["rootCerts"].as_array().unwrap().len(), 1);
    assert_eq!(
        dump["workloadState"],
        json!({"pod-uid-1": {"state": "Up", "info": {
            "name": "web-0", "namespace": "default",
            "trustDomain": "cluster.local", "serviceAccount": "web"
        }}})
    );
    assert_eq!(dump["pods"][0]["openConnections"], 2);
    assert_eq!(dump["config"]["proxyMode"], "Shared");
    assert_eq!(dump["version"]["implementation"], "ambient-rs");
}
