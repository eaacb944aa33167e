//! The control plane marks a workload HBONE exactly when the node agent captures it (one set of
//! rules, istio-cni's: `common::k8s::Enablement`).

use controlplane::{ComputeConfig, Manifests, compute};

#[test]
fn hbone_workloads_follow_the_agents_enablement_rules() {
    let mut m = Manifests::default();
    m.add(
        r#"
apiVersion: v1
kind: Namespace
metadata: {name: plain}
---
apiVersion: v1
kind: Namespace
metadata: {name: mesh, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: kube-system, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: joins-alone, namespace: plain, labels: {istio.io/dataplane-mode: ambient}}
spec: {nodeName: n}
status: {podIP: 10.0.0.1}
---
apiVersion: v1
kind: Pod
metadata: {name: outside, namespace: plain}
spec: {nodeName: n}
status: {podIP: 10.0.0.2}
---
apiVersion: v1
kind: Pod
metadata: {name: member, namespace: mesh}
spec: {nodeName: n}
status: {podIP: 10.0.0.3}
---
apiVersion: v1
kind: Pod
metadata: {name: opted-out, namespace: mesh, labels: {istio.io/dataplane-mode: none}}
spec: {nodeName: n}
status: {podIP: 10.0.0.4}
---
apiVersion: v1
kind: Pod
metadata: {name: sidecar, namespace: mesh, annotations: {sidecar.istio.io/status: "{}"}}
spec: {nodeName: n}
status: {podIP: 10.0.0.5}
---
apiVersion: v1
kind: Pod
metadata: {name: system, namespace: kube-system}
spec: {nodeName: n}
status: {podIP: 10.0.0.6}
"#,
        "cluster.yaml",
    )
    .unwrap();
    let computed = compute(&m, &ComputeConfig::default()).unwrap();
    let mut hbone: Vec<&str> = computed
        .workloads
        .iter()
        .filter(|w| w.hbone())
        .map(|w| w.name.as_str())
        .collect();
    hbone.sort();
    assert_eq!(hbone, ["joins-alone", "member"]);
    assert_eq!(computed.workloads.len(), 6);
}
