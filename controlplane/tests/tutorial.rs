//! Golden test: the tutorial's manifests become the workloads, services and policies istiod
//! would send; label changes flip the tunnel protocol.

use controlplane::{ComputeConfig, Manifests, compute};

fn load() -> Manifests {
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut m = Manifests::default();
    for file in [
        "examples/mesh/tutorial.yaml",
        "examples/policies/tutorial.yaml",
    ] {
        let text = std::fs::read_to_string(root.join(file)).unwrap();
        m.add(&text, file).unwrap();
    }
    m
}

#[test]
fn tutorial_namespace_golden() {
    let computed = compute(&load(), &ComputeConfig::default()).unwrap();
    let summary: Vec<String> = computed
        .workloads
        .iter()
        .map(|w| {
            format!(
                "{} {} hbone={} id={} node={} type={:?}/{} canonical={}/{} policies={:?} services={:?} ips={:?}",
                w.uid,
                w.name,
                w.hbone(),
                w.identity,
                w.node,
                w.workload_type,
                w.workload_name,
                w.canonical_name,
                w.canonical_revision,
                w.authorization_policies,
                w.services.keys().collect::<Vec<_>>(),
                w.addresses,
            )
        })
        .collect();
    let expected = [
        "Kubernetes//Pod/default/sleep sleep hbone=true id=spiffe://cluster.local/ns/default/sa/sleep node=node-a type=Pod/sleep canonical=sleep/latest policies=[] services=[] ips=[10.244.1.10]",
        "Kubernetes//Pod/default/notsleep notsleep hbone=true id=spiffe://cluster.local/ns/default/sa/notsleep node=node-a type=Pod/notsleep canonical=notsleep/latest policies=[] services=[] ips=[10.244.1.11]",
        "Kubernetes//Pod/default/web-api-7c9755c6d-nhwn6 web-api-7c9755c6d-nhwn6 hbone=true id=spiffe://cluster.local/ns/default/sa/web-api node=node-b type=Deployment/web-api canonical=web-api/v1 policies=[\"default/web-api-rbac\"] services=[\"default/web-api.default.svc.cluster.local\"] ips=[10.244.2.20, fd00::2:20]",
        "Kubernetes//Pod/default/recommendation recommendation hbone=true id=spiffe://cluster.local/ns/default/sa/recommendation node=node-b type=Pod/recommendation canonical=recommendation/latest policies=[\"default/recommendation-rbac\"] services=[\"default/recommendation.default.svc.cluster.local\"] ips=[10.244.2.21]",
        "Kubernetes//Pod/default/purchase-history purchase-history hbone=false id=spiffe://cluster.local/ns/default/sa/purchase-history node=node-a type=Pod/purchase-history canonical=purchase-history/latest policies=[] services=[] ips=[10.244.1.12]",
    ];
    assert_eq!(summary, expected, "\n{}", summary.join("\n"));

    let services: Vec<String> = computed
        .services
        .iter()
        .map(|s| {
            format!(
                "{}/{} {:?} {:?}",
                s.namespace, s.hostname, s.addresses, s.ports
            )
        })
        .collect();
    assert_eq!(
        services,
        [
            "default/web-api.default.svc.cluster.local [(\"\", 10.96.0.20)] [PortMapping { service_port: 8080, target_port: 8080 }]",
            "default/recommendation.default.svc.cluster.local [(\"\", 10.96.0.21)] [PortMapping { service_port: 80, target_port: 8080 }]",
        ]
    );
    let policies: Vec<(String, authz::Scope)> = computed
        .policies
        .iter()
        .map(|p| (p.key(), p.scope))
        .collect();
    assert_eq!(
        policies,
        [
            ("default/allow-nothing".to_owned(), authz::Scope::Namespace),
            (
                "default/web-api-rbac".to_owned(),
                authz::Scope::WorkloadSelector
            ),
            (
                "default/recommendation-rbac".to_owned(),
                authz::Scope::WorkloadSelector
            ),
        ]
    );
    // Every workload survives the xDS encoding.
    for w in &computed.workloads {
        let address = xds_client::resources::Address::Workload(w.clone());
        let bytes = xds_client::resources::encode_address(&address);
        assert_eq!(
            xds_client::resources::decode_address(&bytes).unwrap(),
            address
        );
    }
}

#[test]
fn namespace_label_flips_tunnel_protocol() {
    let mut m = load();
    m.namespaces
        .get_mut("default")
        .unwrap()
        .remove("istio.io/dataplane-mode");
    let computed = compute(&m, &ComputeConfig::default()).unwrap();
    assert!(computed.workloads.iter().all(|w| !w.hbone()));
    m.namespaces
        .get_mut("default")
        .unwrap()
        .insert("istio.io/dataplane-mode".into(), "ambient".into());
    let computed = compute(&m, &ComputeConfig::default()).unwrap();
    assert_eq!(
        computed.workloads.iter().filter(|w| w.hbone()).count(),
        4,
        "all but the opted-out pod"
    );
}

#[test]
fn bad_manifests_name_file_and_document() {
    let mut m = Manifests::default();
    let err = m
        .add("apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n---\nkind: Pod\nmetadata: {name: p}\nstatus: {podIP: nope}\n", "pods.yaml")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("pods.yaml") && err.contains("document 2") && err.contains("\"nope\""),
        "{err}"
    );
    let err = m.add("kind: [", "broken.yaml").unwrap_err().to_string();
    assert!(
        err.contains("broken.yaml") && err.contains("document 1"),
        "{err}"
    );
}
