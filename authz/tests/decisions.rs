//! The decision table: policy sets written as Kubernetes YAML, a connection, and the decision
//! Istio's semantics require. Each case also checks that the proto round trip decides the same.

use authz::{Connection, PolicyStore, Principal, Workload, parse_policies};

struct Case {
    name: &'static str,
    yaml: &'static str,
    /// Workload namespace and labels (`k=v,...`).
    workload: (&'static str, &'static str),
    /// Peer identity (`ns/sa` in cluster.local), or "" for plaintext.
    peer: &'static str,
    src: &'static str,
    dst: &'static str,
    allowed: bool,
    /// A fragment the decision's text must contain.
    reason: &'static str,
}

const TUTORIAL: &str = r#"
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata: {name: allow-nothing, namespace: default}
spec: {}
---
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata: {name: web-api-rbac, namespace: default}
spec:
  selector: {matchLabels: {app: web-api}}
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/default/sa/sleep", "cluster.local/ns/istio-system/sa/istio-ingressgateway-service-account"]
---
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata: {name: recommendation-rbac, namespace: default}
spec:
  selector: {matchLabels: {app: recommendation}}
  rules:
  - from:
    - source: {principals: ["cluster.local/ns/default/sa/web-api"]}
"#;

macro_rules! ap {
    ($ns:literal, $name:literal, $spec:literal) => {
        concat!(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: ",
            $name,
            ", namespace: ",
            $ns,
            "}\nspec:\n",
            $spec,
            "\n---\n"
        )
    };
}

const S: &str = "10.0.0.1:40000";
const D: &str = "10.0.0.2:8080";

#[allow(clippy::too_many_arguments)] // one table row, read left to right
fn c(
    name: &'static str,
    yaml: &'static str,
    workload: (&'static str, &'static str),
    peer: &'static str,
    src: &'static str,
    dst: &'static str,
    allowed: bool,
    reason: &'static str,
) -> Case {
    Case {
        name,
        yaml,
        workload,
        peer,
        src,
        dst,
        allowed,
        reason,
    }
}

fn cases() -> Vec<Case> {
    let def = ("default", "");
    let web = ("default", "app=web-api");
    let rec = ("default", "app=recommendation");
    vec![
        // The tutorial.
        c(
            "sleep -> web-api",
            TUTORIAL,
            web,
            "default/sleep",
            S,
            D,
            true,
            "web-api-rbac",
        ),
        c(
            "notsleep -> web-api",
            TUTORIAL,
            web,
            "default/notsleep",
            S,
            D,
            false,
            "no ALLOW policy matched",
        ),
        c(
            "ingress -> web-api",
            TUTORIAL,
            web,
            "istio-system/istio-ingressgateway-service-account",
            S,
            D,
            true,
            "rule 0",
        ),
        c(
            "web-api -> recommendation",
            TUTORIAL,
            rec,
            "default/web-api",
            S,
            D,
            true,
            "recommendation-rbac",
        ),
        c(
            "sleep -> recommendation",
            TUTORIAL,
            rec,
            "default/sleep",
            S,
            D,
            false,
            "allow-nothing",
        ),
        c(
            "plaintext -> recommendation",
            TUTORIAL,
            rec,
            "",
            S,
            D,
            false,
            "no ALLOW policy matched",
        ),
        c(
            "sleep -> other workload",
            TUTORIAL,
            def,
            "default/sleep",
            S,
            D,
            false,
            "default/allow-nothing",
        ),
        // Basics.
        c(
            "no policies",
            "",
            def,
            "default/sleep",
            S,
            D,
            true,
            "no ALLOW policy applies",
        ),
        c(
            "spec {} denies mTLS",
            ap!("default", "none", "  {}"),
            def,
            "default/sleep",
            S,
            D,
            false,
            "default/none",
        ),
        c(
            "spec {} denies plaintext",
            ap!("default", "none", "  {}"),
            def,
            "",
            S,
            D,
            false,
            "default/none",
        ),
        c(
            "rules [{}] allows all",
            ap!("default", "all", "  rules: [{}]"),
            def,
            "",
            S,
            D,
            true,
            "rule 0 of ALLOW policy default/all",
        ),
        c(
            "DENY rules [{}] denies all",
            ap!("default", "d", "  action: DENY\n  rules: [{}]"),
            def,
            "default/sleep",
            S,
            D,
            false,
            "DENY policy default/d",
        ),
        c(
            "DENY without rules never matches",
            ap!("default", "d", "  action: DENY"),
            def,
            "default/sleep",
            S,
            D,
            true,
            "no ALLOW policy applies",
        ),
        c(
            "empty from list counts as a match",
            ap!("default", "a", "  rules: [{from: []}]"),
            def,
            "",
            S,
            D,
            true,
            "default/a",
        ),
        // Principals.
        c(
            "principal exact",
            ap!(
                "default",
                "a",
                "  rules: [{from: [{source: {principals: [cluster.local/ns/default/sa/sleep]}}]}]"
            ),
            def,
            "default/sleep",
            S,
            D,
            true,
            "",
        ),
        c(
            "principal prefix",
            ap!(
                "default",
                "a",
                "  rules: [{from: [{source: {principals: [\"cluster.local/ns/default/*\"]}}]}]"
            ),
            def,
            "default/anything",
            S,
            D,
            true,
            "",
        ),
        c(
            "principal prefix other ns",
            ap!(
                "default",
                "a",
                "  rules: [{from: [{source: {principals: [\"cluster.local/ns/default/*\"]}}]}]"
            ),
            def,
            "prod/anything",
            S,
            D,
            false,
            "",
        ),
        c(
            "principal suffix",
            ap!(
                "default",
                "a",
                "  rules: [{from: [{source: {principals: [\"*/sa/sleep\"]}}]}]"
            ),
            def,
            "other/sleep",
            S,
            D,
            true,
            "",
        ),
        c(
            "principal presence with identity",
            ap!(
                "default",
                "a",
                "  rules: [{from: [{source: {principals: [\"*\"]}}]}]"
            ),
            def,
            "x/y",
            S,
            D,
            true,
            "",
        ),
        c(
            "principal presence plaintext",
            ap!(
                "default",
                "a",
                "  rules: [{from: [{source: {principals: [\"*\"]}}]}]"
            ),
            def,
            "",
            S,
            D,
            false,
            "",
        ),
        c(
            "notPrincipals DENY spares sleep",
            ap!(
                "default",
                "d",
                "  action: DENY\n  rules: [{from: [{source: {notPrincipals: [cluster.local/ns/default/sa/sleep]}}]}]"
            ),
            def,
            "default/sleep",
            S,
            D,
            true,
            "",
        ),
        c(
            "notPrincipals DENY hits others",
            ap!(
                "default",
                "d",
                "  action: DENY\n  rules: [{from: [{source: {notPrincipals: [cluster.local/ns/default/sa/sleep]}}]}]"
            ),
            def,
            "default/other",
            S,
            D,
            false,
            "default/d",
        ),
        c(
            "notPrincipals DENY hits plaintext",
            ap!(
                "default",
                "d",
                "  action: DENY\n  rules: [{from: [{source: {notPrincipals: [cluster.local/ns/default/sa/sleep]}}]}]"
            ),
            def,
            "",
            S,
            D,
            false,
            "default/d",
        ),
        // Namespaces.
        c(
            "namespaces match",
            ap!(
                "default",
                "a",
                "  rules: [{from: [{source: {namespaces: [foo]}}]}]"
            ),
            def,
            "foo/x",
            S,
            D,
            true,
            "",
        ),
        c(
            "namespaces other",
            ap!(
                "default",
                "a",
                "  rules: [{from: [{source: {namespaces: [foo]}}]}]"
            ),
            def,
            "bar/x",
            S,
            D,
            false,
            "",
        ),
        c(
            "namespaces plaintext",
            ap!(
                "default",
                "a",
                "  rules: [{from: [{source: {namespaces: [foo]}}]}]"
            ),
            def,
            "",
            S,
            D,
            false,
            "",
        ),
        c(
            "namespace prefix",
            ap!(
                "default",
                "a",
                "  rules: [{from: [{source: {namespaces: [\"te*\"]}}]}]"
            ),
            def,
            "test/x",
            S,
            D,
            true,
            "",
        ),
        c(
            "notNamespaces allows others",
            ap!(
                "default",
                "a",
                "  rules: [{from: [{source: {notNamespaces: [foo]}}]}]"
            ),
            def,
            "bar/x",
            S,
            D,
            true,
            "",
        ),
        c(
            "notNamespaces excludes",
            ap!(
                "default",
                "a",
                "  rules: [{from: [{source: {notNamespaces: [foo]}}]}]"
            ),
            def,
            "foo/x",
            S,
            D,
            false,
            "",
        ),
        c(
            "notNamespaces passes plaintext",
            ap!(
                "default",
                "a",
                "  rules: [{from: [{source: {notNamespaces: [foo]}}]}]"
            ),
            def,
            "",
            S,
            D,
            true,
            "",
        ),
        // Source IPs.
        c(
            "ipBlocks match",
            ap!(
                "default",
                "a",
                "  rules: [{from: [{source: {ipBlocks: [10.0.0.0/8]}}]}]"
            ),
            def,
            "",
            "10.1.2.3:1",
            D,
            true,
            "",
        ),
        c(
            "ipBlocks miss",
            ap!(
                "default",
                "a",
                "  rules: [{from: [{source: {ipBlocks: [10.0.0.0/8]}}]}]"
            ),
            def,
            "",
            "192.168.1.1:1",
            D,
            false,
            "",
        ),
        c(
            "ipBlocks single address",
            ap!(
                "default",
                "a",
                "  rules: [{from: [{source: {ipBlocks: [10.0.0.5]}}]}]"
            ),
            def,
            "",
            "10.0.0.5:1",
            D,
            true,
            "",
        ),
        c(
            "ipBlocks IPv6",
            ap!(
                "default",
                "a",
                "  rules: [{from: [{source: {ipBlocks: [\"fd00::/8\"]}}]}]"
            ),
            def,
            "",
            "[fd00::1]:1",
            D,
            true,
            "",
        ),
        c(
            "ipBlocks IPv4-mapped",
            ap!(
                "default",
                "a",
                "  rules: [{from: [{source: {ipBlocks: [10.0.0.0/8]}}]}]"
            ),
            def,
            "",
            "[::ffff:10.1.1.1]:1",
            D,
            true,
            "",
        ),
        c(
            "notIpBlocks DENY hits outside",
            ap!(
                "default",
                "d",
                "  action: DENY\n  rules: [{from: [{source: {notIpBlocks: [10.0.0.0/8]}}]}]"
            ),
            def,
            "",
            "192.168.1.1:1",
            D,
            false,
            "default/d",
        ),
        c(
            "notIpBlocks DENY spares inside",
            ap!(
                "default",
                "d",
                "  action: DENY\n  rules: [{from: [{source: {notIpBlocks: [10.0.0.0/8]}}]}]"
            ),
            def,
            "",
            "10.9.9.9:1",
            D,
            true,
            "",
        ),
        // Destination IPs and ports.
        c(
            "when destination.ip",
            ap!(
                "default",
                "a",
                "  rules: [{when: [{key: destination.ip, values: [10.0.0.2]}]}]"
            ),
            def,
            "",
            S,
            D,
            true,
            "",
        ),
        c(
            "when destination.ip notValues",
            ap!(
                "default",
                "a",
                "  rules: [{when: [{key: destination.ip, notValues: [10.0.0.2]}]}]"
            ),
            def,
            "",
            S,
            D,
            false,
            "",
        ),
        c(
            "ports match",
            ap!(
                "default",
                "a",
                "  rules: [{to: [{operation: {ports: [\"8080\"]}}]}]"
            ),
            def,
            "",
            S,
            D,
            true,
            "",
        ),
        c(
            "ports miss",
            ap!(
                "default",
                "a",
                "  rules: [{to: [{operation: {ports: [\"8080\"]}}]}]"
            ),
            def,
            "",
            S,
            "10.0.0.2:9090",
            false,
            "",
        ),
        c(
            "ports as numbers",
            ap!(
                "default",
                "a",
                "  rules: [{to: [{operation: {ports: [8080, 9090]}}]}]"
            ),
            def,
            "",
            S,
            "10.0.0.2:9090",
            true,
            "",
        ),
        c(
            "notPorts DENY hits others",
            ap!(
                "default",
                "d",
                "  action: DENY\n  rules: [{to: [{operation: {notPorts: [\"8080\"]}}]}]"
            ),
            def,
            "",
            S,
            "10.0.0.2:9090",
            false,
            "default/d",
        ),
        c(
            "notPorts DENY spares 8080",
            ap!(
                "default",
                "d",
                "  action: DENY\n  rules: [{to: [{operation: {notPorts: [\"8080\"]}}]}]"
            ),
            def,
            "",
            S,
            D,
            true,
            "",
        ),
        c(
            "when destination.port",
            ap!(
                "default",
                "a",
                "  rules: [{when: [{key: destination.port, values: [\"8080\"]}]}]"
            ),
            def,
            "",
            S,
            D,
            true,
            "",
        ),
        // Service accounts.
        c(
            "serviceAccounts ns/name",
            ap!(
                "default",
                "a",
                "  rules: [{from: [{source: {serviceAccounts: [default/sleep]}}]}]"
            ),
            def,
            "default/sleep",
            S,
            D,
            true,
            "",
        ),
        c(
            "serviceAccounts name only",
            ap!(
                "default",
                "a",
                "  rules: [{from: [{source: {serviceAccounts: [sleep]}}]}]"
            ),
            def,
            "default/sleep",
            S,
            D,
            true,
            "",
        ),
        c(
            "serviceAccounts other ns",
            ap!(
                "default",
                "a",
                "  rules: [{from: [{source: {serviceAccounts: [sleep]}}]}]"
            ),
            def,
            "prod/sleep",
            S,
            D,
            false,
            "",
        ),
        c(
            "serviceAccounts plaintext",
            ap!(
                "default",
                "a",
                "  rules: [{from: [{source: {serviceAccounts: [default/sleep]}}]}]"
            ),
            def,
            "",
            S,
            D,
            false,
            "",
        ),
        c(
            "notServiceAccounts DENY spares",
            ap!(
                "default",
                "d",
                "  action: DENY\n  rules: [{from: [{source: {notServiceAccounts: [default/sleep]}}]}]"
            ),
            def,
            "default/sleep",
            S,
            D,
            true,
            "",
        ),
        c(
            "notServiceAccounts DENY hits",
            ap!(
                "default",
                "d",
                "  action: DENY\n  rules: [{from: [{source: {notServiceAccounts: [default/sleep]}}]}]"
            ),
            def,
            "default/web",
            S,
            D,
            false,
            "",
        ),
        // when conditions.
        c(
            "when source.namespace",
            ap!(
                "default",
                "a",
                "  rules: [{when: [{key: source.namespace, values: [foo]}]}]"
            ),
            def,
            "foo/x",
            S,
            D,
            true,
            "",
        ),
        c(
            "when source.principal",
            ap!(
                "default",
                "a",
                "  rules: [{when: [{key: source.principal, values: [cluster.local/ns/foo/sa/x]}]}]"
            ),
            def,
            "foo/x",
            S,
            D,
            true,
            "",
        ),
        c(
            "when source.ip miss",
            ap!(
                "default",
                "a",
                "  rules: [{when: [{key: source.ip, values: [192.168.0.0/16]}]}]"
            ),
            def,
            "foo/x",
            S,
            D,
            false,
            "",
        ),
        // AND of clauses, OR of rules and entries.
        c(
            "from AND to: wrong port",
            ap!(
                "default",
                "a",
                "  rules: [{from: [{source: {namespaces: [foo]}}], to: [{operation: {ports: [\"8080\"]}}]}]"
            ),
            def,
            "foo/x",
            S,
            "10.0.0.2:9090",
            false,
            "",
        ),
        c(
            "from AND to: both",
            ap!(
                "default",
                "a",
                "  rules: [{from: [{source: {namespaces: [foo]}}], to: [{operation: {ports: [\"8080\"]}}]}]"
            ),
            def,
            "foo/x",
            S,
            D,
            true,
            "",
        ),
        c(
            "second rule matches",
            ap!(
                "default",
                "a",
                "  rules: [{from: [{source: {namespaces: [foo]}}]}, {to: [{operation: {ports: [\"9090\"]}}]}]"
            ),
            def,
            "bar/x",
            S,
            "10.0.0.2:9090",
            true,
            "rule 1",
        ),
        c(
            "second from entry matches",
            ap!(
                "default",
                "a",
                "  rules: [{from: [{source: {namespaces: [foo]}}, {source: {namespaces: [bar]}}]}]"
            ),
            def,
            "bar/x",
            S,
            D,
            true,
            "",
        ),
        c(
            "fields inside one source are AND-ed",
            ap!(
                "default",
                "a",
                "  rules: [{from: [{source: {namespaces: [bar], ipBlocks: [192.168.0.0/16]}}]}]"
            ),
            def,
            "bar/x",
            S,
            D,
            false,
            "",
        ),
        // Scopes.
        c(
            "root namespace DENY is global",
            ap!(
                "istio-system",
                "g",
                "  action: DENY\n  rules: [{from: [{source: {namespaces: [evil]}}]}]"
            ),
            ("prod", ""),
            "evil/x",
            S,
            D,
            false,
            "istio-system/g",
        ),
        c(
            "root selector applies across namespaces",
            ap!(
                "istio-system",
                "g",
                "  selector: {matchLabels: {app: web}}\n  action: DENY\n  rules: [{}]"
            ),
            ("prod", "app=web"),
            "a/b",
            S,
            D,
            false,
            "istio-system/g",
        ),
        c(
            "root selector skips unlabeled",
            ap!(
                "istio-system",
                "g",
                "  selector: {matchLabels: {app: web}}\n  action: DENY\n  rules: [{}]"
            ),
            ("prod", "app=db"),
            "a/b",
            S,
            D,
            true,
            "",
        ),
        c(
            "namespace policy stays in its namespace",
            ap!("default", "none", "  {}"),
            ("prod", ""),
            "a/b",
            S,
            D,
            true,
            "no ALLOW policy applies",
        ),
        c(
            "selector needs every label",
            ap!(
                "default",
                "s",
                "  selector: {matchLabels: {app: web, tier: front}}\n  action: DENY\n  rules: [{}]"
            ),
            ("default", "app=web"),
            "a/b",
            S,
            D,
            true,
            "",
        ),
        c(
            "selector with every label",
            ap!(
                "default",
                "s",
                "  selector: {matchLabels: {app: web, tier: front}}\n  action: DENY\n  rules: [{}]"
            ),
            ("default", "app=web,tier=front,x=y"),
            "a/b",
            S,
            D,
            false,
            "default/s",
        ),
        // Dry-run.
        c(
            "dry-run DENY is not enforced",
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: d, namespace: default, annotations: {istio.io/dry-run: \"true\"}}\nspec: {action: DENY, rules: [{}]}\n",
            def,
            "a/b",
            S,
            D,
            true,
            "dry-run policies would have denied",
        ),
        c(
            "dry-run allow-nothing is not enforced",
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: d, namespace: default, annotations: {istio.io/dry-run: \"true\"}}\nspec: {}\n",
            def,
            "a/b",
            S,
            D,
            true,
            "would have denied",
        ),
        // HTTP-only attributes.
        c(
            "ALLOW with methods is dropped: deny",
            ap!(
                "default",
                "a",
                "  rules: [{to: [{operation: {methods: [GET]}}]}]"
            ),
            def,
            "a/b",
            S,
            D,
            false,
            "default/a",
        ),
        c(
            "ALLOW with requestPrincipals is dropped",
            ap!(
                "default",
                "a",
                "  rules: [{from: [{source: {requestPrincipals: [\"*\"]}}]}]"
            ),
            def,
            "a/b",
            S,
            D,
            false,
            "",
        ),
        c(
            "DENY with methods and principals narrows",
            ap!(
                "default",
                "d",
                "  action: DENY\n  rules: [{from: [{source: {principals: [cluster.local/ns/a/sa/b]}}], to: [{operation: {methods: [POST], ports: [\"8080\"]}}]}]"
            ),
            def,
            "a/b",
            S,
            D,
            false,
            "default/d",
        ),
        c(
            "DENY with only methods never fires",
            ap!(
                "default",
                "d",
                "  action: DENY\n  rules: [{to: [{operation: {methods: [POST]}}]}]"
            ),
            def,
            "a/b",
            S,
            D,
            true,
            "",
        ),
        c(
            "DENY with an HTTP when never fires",
            ap!(
                "default",
                "d",
                "  action: DENY\n  rules: [{when: [{key: \"request.headers[x]\", values: [y]}]}]"
            ),
            def,
            "a/b",
            S,
            D,
            true,
            "",
        ),
        // Precedence.
        c(
            "DENY beats ALLOW",
            concat!(
                ap!("default", "a", "  rules: [{}]"),
                ap!(
                    "default",
                    "d",
                    "  action: DENY\n  rules: [{from: [{source: {namespaces: [a]}}]}]"
                )
            ),
            def,
            "a/b",
            S,
            D,
            false,
            "default/d",
        ),
    ]
}

fn workload(ns: &str, labels: &str) -> Workload {
    Workload {
        namespace: ns.to_owned(),
        labels: authz::parse_labels(labels).unwrap(),
        policies: Vec::new(),
    }
}

fn connection(peer: &str, src: &str, dst: &str) -> Connection {
    Connection {
        source: src.parse().unwrap(),
        destination: dst.parse().unwrap(),
        peer: (!peer.is_empty()).then(|| {
            let (ns, sa) = peer.split_once('/').unwrap();
            Principal::parse(&format!("spiffe://cluster.local/ns/{ns}/sa/{sa}"))
        }),
    }
}

#[test]
fn decision_table() {
    let cases = cases();
    assert!(
        cases.len() >= 60,
        "the table must have at least 60 cases, has {}",
        cases.len()
    );
    let mut failures = Vec::new();
    for case in &cases {
        let translation = parse_policies(case.yaml, case.name, "istio-system")
            .unwrap_or_else(|e| panic!("{}: {e}", case.name));
        let mut store = PolicyStore::new("istio-system");
        let mut xds_store = PolicyStore::new("istio-system");
        let mut w = workload(case.workload.0, case.workload.1);
        // The xDS view: the same policies through the proto, selector policies named by the
        // workload when their labels select it (as istiod computes).
        let mut xds_workload = w.clone();
        for policy in &translation.policies {
            let selects = policy
                .selector
                .iter()
                .all(|(k, v)| w.labels.get(k) == Some(v))
                && (policy.namespace == w.namespace || policy.namespace == "istio-system");
            if !policy.selector.is_empty() && selects {
                xds_workload.policies.push(policy.key());
            }
            let bytes = prost::Message::encode_to_vec(&authz::proto::to_proto(policy));
            xds_store.insert(authz::proto::decode(&bytes).unwrap());
            store.insert(policy.clone());
        }
        w.policies.clear();
        let conn = connection(case.peer, case.src, case.dst);
        let decision = store.decide(&conn, &w);
        let xds = xds_store.decide(&conn, &xds_workload);
        let text = decision.to_string();
        if decision.allowed != case.allowed || !text.contains(case.reason) {
            failures.push(format!(
                "{}: expected {} with {:?}, got {text}",
                case.name,
                if case.allowed { "ALLOW" } else { "DENY" },
                case.reason
            ));
        }
        if xds != decision {
            failures.push(format!(
                "{}: the proto round trip decided {xds}, YAML decided {text}",
                case.name
            ));
        }
        // The explanation reaches the same decision.
        let (explained, trace) = store.explain(&conn, &w);
        assert_eq!(explained, decision, "{}", case.name);
        assert!(trace.contains("decision:"), "{}: {trace}", case.name);
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}
