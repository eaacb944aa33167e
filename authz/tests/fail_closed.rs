//! Fail-closed behaviour: a workload naming a policy the store lacks, a store that has not synced,
//! entries Istio's validation rejects, `spiffe://` written where Istio compares without it, and
//! IPv4-mapped IPv6 CIDRs.

use std::net::SocketAddr;

use authz::proto::{self, ProtoAddress};
use authz::{Connection, PolicyStore, Principal, Reason, Workload, parse_policies};

const HEAD: &str = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p, namespace: default}\n";

fn store(yaml: &str) -> PolicyStore {
    let mut store = PolicyStore::new("istio-system");
    for policy in parse_policies(yaml, "test.yaml", "istio-system")
        .unwrap()
        .policies
    {
        store.insert(policy);
    }
    store
}

fn conn(source: &str, principal: Option<&str>) -> Connection {
    Connection {
        source: source.parse::<SocketAddr>().unwrap(),
        destination: "10.9.9.9:8080".parse().unwrap(),
        peer: principal.map(Principal::parse),
    }
}

/// An xDS policy (action 0 ALLOW, 1 DENY; scope 1 NAMESPACE, 2 WORKLOAD_SELECTOR) with one
/// rule of one clause holding `m`, or a rule with no clauses when `m` is `None`.
fn xds_policy(
    name: &str,
    scope: i32,
    action: i32,
    m: Option<proto::ProtoMatch>,
) -> proto::Authorization {
    proto::Authorization {
        name: name.into(),
        namespace: "default".into(),
        scope,
        action,
        rules: vec![proto::ProtoRule {
            clauses: m
                .map(|m| proto::ProtoClause { matches: vec![m] })
                .into_iter()
                .collect(),
        }],
        dry_run: false,
        extensions: Vec::new(),
    }
}

fn workload(policies: &[&str]) -> Workload {
    Workload {
        namespace: "default".into(),
        labels: Default::default(),
        policies: policies.iter().map(|p| p.to_string()).collect(),
    }
}

#[test]
fn a_named_policy_the_store_lacks_denies_with_its_name() {
    // The store holds a permissive ALLOW the workload names; the second name is missing.
    let mut s = PolicyStore::new("istio-system");
    let allow_all = xds_policy("allow-all", 2, 0, None);
    s.insert(proto::from_proto(&allow_all).unwrap());
    let c = conn(
        "10.0.0.1:1234",
        Some("spiffe://cluster.local/ns/default/sa/sleep"),
    );
    assert!(s.decide(&c, &workload(&["default/allow-all"])).allowed);
    let w = workload(&["default/allow-all", "default/only-allow-sleep"]);
    let d = s.decide(&c, &w);
    assert!(!d.allowed, "{d}");
    assert_eq!(
        d.reason,
        Reason::MissingPolicies {
            policies: vec!["default/only-allow-sleep".into()]
        }
    );
    assert!(d.to_string().contains("default/only-allow-sleep"), "{d}");
    let (explained, text) = s.explain(&c, &w);
    assert_eq!(explained, d);
    assert!(text.contains("default/only-allow-sleep"), "{text}");
    // Its only ALLOW policy vanished: never "no ALLOW policy applies".
    let d = s.decide(&c, &workload(&["default/gone"]));
    assert!(!d.allowed, "{d}");
    assert!(!matches!(d.reason, Reason::NoAllowPolicies));
}

#[test]
fn an_unsynced_store_denies_everything_and_says_why() {
    let mut s = store(&format!(
        "{HEAD}spec: {{action: DENY, rules: [{{from: [{{source: {{namespaces: [other]}}}}]}}]}}\n"
    ));
    let c = conn(
        "10.0.0.1:1234",
        Some("spiffe://cluster.local/ns/default/sa/sleep"),
    );
    assert!(s.is_synced());
    assert!(s.decide(&c, &workload(&[])).allowed);
    s.set_synced(false);
    let d = s.decide(&c, &workload(&[]));
    assert!(!d.allowed);
    assert_eq!(d.reason, Reason::NotSynced);
    let (_, text) = s.explain(&c, &workload(&[]));
    assert!(text.contains("not synced"), "{text}");
    s.set_synced(true);
    assert!(s.decide(&c, &workload(&[])).allowed);
}

fn err(yaml: &str) -> String {
    parse_policies(yaml, "test.yaml", "istio-system")
        .expect_err("should be rejected")
        .to_string()
}

#[test]
fn entries_istio_rejects_are_errors_with_their_path() {
    let e = err(&format!(
        "{HEAD}spec:\n  rules:\n  - from:\n    - source: {{}}\n"
    ));
    assert!(
        e.contains("spec.rules[0].from[0].source") && e.contains("empty"),
        "{e}"
    );
    let e = err(&format!(
        "{HEAD}spec:\n  rules:\n  - to:\n    - operation: {{ports: [\"80\"]}}\n    - operation: {{}}\n"
    ));
    assert!(
        e.contains("spec.rules[0].to[1].operation") && e.contains("empty"),
        "{e}"
    );
    let e = err(&format!(
        "{HEAD}spec:\n  rules:\n  - when:\n    - key: source.ip\n"
    ));
    assert!(
        e.contains("spec.rules[0].when[0]") && e.contains("values") && e.contains("notValues"),
        "{e}"
    );
    let e = err(&format!(
        "{HEAD}spec:\n  rules:\n  - when:\n    - key: destination.port\n      values: [\"0\"]\n"
    ));
    assert!(e.contains("spec.rules[0].when[0].values[0]"), "{e}");
    let e = err(&format!(
        "{HEAD}spec:\n  rules:\n  - to:\n    - operation: {{ports: [0]}}\n"
    ));
    assert!(e.contains("spec.rules[0].to[0].operation.ports[0]"), "{e}");
}

#[test]
fn port_zero_is_an_error_from_xds_too() {
    for field in ["destination_ports", "not_destination_ports"] {
        let mut m = proto::ProtoMatch::default();
        match field {
            "destination_ports" => m.destination_ports = vec![80, 0],
            _ => m.not_destination_ports = vec![0],
        }
        let e = proto::from_proto(&xds_policy("p", 1, 1, Some(m)))
            .expect_err("port 0 accepted")
            .to_string();
        assert!(e.contains(field) && e.contains("port 0"), "{e}");
    }
}

#[test]
fn spiffe_prefixed_principals_and_namespaces_are_sent_as_istiod_sends_them_and_warned_about() {
    // istiod passes principals through verbatim and ztunnel compares them without `spiffe://`,
    // so this ALLOW matches nobody: the same here, and lint says so.
    let yaml = format!(
        "{HEAD}spec:\n  rules:\n  - from:\n    - source:\n        principals: [\"spiffe://cluster.local/ns/default/sa/sleep\"]\n        notNamespaces: [\"spiffe://cluster.local/ns/x\"]\n  - when:\n    - key: source.principal\n      notValues: [\"spiffe://*\"]\n"
    );
    let t = parse_policies(&yaml, "test.yaml", "istio-system").unwrap();
    let spiffe: Vec<_> = t
        .warnings
        .iter()
        .filter(|w| w.to_string().contains("spiffe://"))
        .collect();
    assert_eq!(spiffe.len(), 3, "{:?}", t.warnings);
    assert!(spiffe[0].attribute.contains("principals"), "{}", spiffe[0]);
    assert!(
        spiffe[1].attribute.contains("notNamespaces"),
        "{}",
        spiffe[1]
    );
    assert!(
        spiffe[2].attribute.contains("source.principal"),
        "{}",
        spiffe[2]
    );
    let sleep = conn(
        "10.0.0.1:1234",
        Some("spiffe://cluster.local/ns/default/sa/sleep"),
    );
    // The positive list matches nobody...
    let only_principals = format!(
        "{HEAD}spec:\n  rules:\n  - from:\n    - source:\n        principals: [\"spiffe://cluster.local/ns/default/sa/sleep\"]\n"
    );
    let d = store(&only_principals).decide(&sleep, &workload(&[]));
    assert!(!d.allowed, "a spiffe:// principal matched: {d}");
    // ...and the negative one excludes nobody, so rule 1 allows everyone (as in Istio).
    let d = store(&yaml).decide(&sleep, &workload(&[]));
    assert!(d.allowed && d.to_string().contains("rule 1"), "{d}");
}

#[test]
fn ipv4_mapped_cidrs_match_the_ipv4_connections_they_name() {
    let s = store(&format!(
        "{HEAD}spec:\n  action: DENY\n  rules:\n  - from:\n    - source: {{ipBlocks: [\"::ffff:10.1.0.0/112\"]}}\n"
    ));
    let d = s.decide(&conn("10.1.2.3:1234", None), &workload(&[]));
    assert!(!d.allowed, "{d}");
    assert!(
        s.decide(&conn("10.2.0.1:1234", None), &workload(&[]))
            .allowed
    );
    // The same written in xDS: 16 bytes, prefix 112.
    let mut m = proto::ProtoMatch::default();
    let mut address = vec![0u8; 10];
    address.extend([0xff, 0xff, 10, 1, 0, 0]);
    m.source_ips = vec![ProtoAddress {
        address,
        length: 112,
    }];
    let mut s = PolicyStore::new("istio-system");
    s.insert(proto::from_proto(&xds_policy("deny-mapped", 1, 1, Some(m))).unwrap());
    let d = s.decide(&conn("10.1.2.3:1234", None), &workload(&[]));
    assert!(!d.allowed, "{d}");
}

#[test]
fn a_policy_the_workload_names_applies_whatever_its_selector() {
    // A selector policy from YAML, named by a workload that carries no labels (as xDS workloads
    // do not): it must apply, never be skipped for want of matching labels.
    let s = store(&format!(
        "{HEAD}spec:\n  selector: {{matchLabels: {{app: web}}}}\n  rules:\n  - from: [{{source: {{principals: [cluster.local/ns/default/sa/sleep]}}}}]\n"
    ));
    let named = workload(&["default/p"]);
    let sleep = conn(
        "10.0.0.1:1234",
        Some("spiffe://cluster.local/ns/default/sa/sleep"),
    );
    let other = conn(
        "10.0.0.1:1234",
        Some("spiffe://cluster.local/ns/default/sa/other"),
    );
    assert!(s.decide(&sleep, &named).allowed);
    let d = s.decide(&other, &named);
    assert!(!d.allowed, "{d}");
    // Named and selected by labels at once: evaluated once, same outcome.
    let mut both = named.clone();
    both.labels.insert("app".into(), "web".into());
    assert!(!s.decide(&other, &both).allowed);
    assert!(s.decide(&sleep, &both).allowed);
    let (_, text) = s.explain(&other, &both);
    assert_eq!(text.matches("policy default/p").count(), 1, "{text}");
}
