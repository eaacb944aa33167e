//! Which pods join the mesh (istio-cni's ambient rules), as a table: each rule, and which wins
//! when several apply.

use std::collections::BTreeMap;

use redirect::agent::{DATAPLANE_MODE_LABEL, Enablement, PodInfo, SIDECAR_STATUS_ANNOTATION, Skip};

fn labels(mode: Option<&str>) -> BTreeMap<String, String> {
    mode.map(|m| (DATAPLANE_MODE_LABEL.to_owned(), m.to_owned()))
        .into_iter()
        .collect()
}

/// A pod of `namespace` on node-a, with the pod's and the namespace's `dataplane-mode` labels.
fn pod(namespace: &str, pod_mode: Option<&str>, ns_mode: Option<&str>) -> PodInfo {
    PodInfo {
        uid: "uid".into(),
        name: "p".into(),
        namespace: namespace.into(),
        service_account: "sa".into(),
        labels: labels(pod_mode),
        namespace_labels: labels(ns_mode),
        node: "node-a".into(),
        netns: None,
        ips: Vec::new(),
        annotations: BTreeMap::new(),
    }
}

#[test]
fn each_rule_and_its_precedence() {
    let rules = Enablement::default();
    let verdict = |p: &PodInfo| p.admitted_by(&rules, "node-a");
    // Joined by its namespace, or by its own label in an unlabelled namespace.
    assert_eq!(verdict(&pod("default", None, Some("ambient"))), Ok(()));
    assert_eq!(verdict(&pod("default", Some("ambient"), None)), Ok(()));
    assert_eq!(verdict(&pod("default", None, None)), Err(Skip::NotEnabled));
    assert_eq!(
        verdict(&pod("default", None, Some("sidecar"))),
        Err(Skip::NotEnabled)
    );
    // A pod's `none` wins over its namespace's `ambient`.
    assert_eq!(
        verdict(&pod("default", Some("none"), Some("ambient"))),
        Err(Skip::OptedOut)
    );
    // A sidecar wins over every label.
    let mut sidecar = pod("default", Some("ambient"), Some("ambient"));
    sidecar
        .annotations
        .insert(SIDECAR_STATUS_ANNOTATION.into(), "{}".into());
    assert_eq!(verdict(&sidecar), Err(Skip::Sidecar));
    // kube-system is excluded by default, even labelled.
    assert_eq!(
        verdict(&pod("kube-system", Some("ambient"), Some("ambient"))),
        Err(Skip::ExcludedNamespace)
    );
    // Another node's pod is not ours.
    assert_eq!(
        pod("default", Some("ambient"), None).admitted_by(&rules, "node-b"),
        Err(Skip::OtherNode)
    );
    // The excluded namespaces are configurable (EXCLUDE_NAMESPACES).
    let custom = Enablement {
        excluded_namespaces: ["tools".to_owned()].into(),
        ..Enablement::default()
    };
    assert_eq!(
        pod("kube-system", Some("ambient"), None).admitted_by(&custom, "node-a"),
        Ok(())
    );
    assert_eq!(
        pod("tools", Some("ambient"), None).admitted_by(&custom, "node-a"),
        Err(Skip::ExcludedNamespace)
    );
}
