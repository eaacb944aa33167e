//! YAML translation: errors name the document and the YAML path; warnings name the policy, the
//! rule and the attribute.

use authz::{Action, Scope, parse_policies};

fn parse(yaml: &str) -> Result<authz::Translation, authz::ParseError> {
    parse_policies(yaml, "policies.yaml", "istio-system")
}

fn err(yaml: &str) -> String {
    parse(yaml).expect_err("should be rejected").to_string()
}

const HEAD: &str = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p, namespace: default}\n";

#[test]
fn malformed_input_names_the_path() {
    let e = err(&format!(
        "{HEAD}spec:\n  rules:\n  - from:\n    - source: {{ipBlocks: [10.0.0.0/8, 10.0.0.300/8]}}\n"
    ));
    assert!(
        e.contains("policies.yaml")
            && e.contains("document 1")
            && e.contains("spec.rules[0].from[0].source.ipBlocks[1]")
            && e.contains("10.0.0.300/8"),
        "{e}"
    );
    let e = err(&format!(
        "{HEAD}spec:\n  rules:\n  - to:\n    - operation: {{ports: [\"99999\"]}}\n"
    ));
    assert!(
        e.contains("spec.rules[0].to[0].operation.ports[0]") && e.contains("out of range"),
        "{e}"
    );
    let e = err(&format!(
        "{HEAD}spec:\n  rules:\n  - from:\n    - source: {{principal: [x]}}\n"
    ));
    assert!(
        e.contains("spec.rules[0].from[0].source") && e.contains("unknown field `principal`"),
        "{e}"
    );
    let e = err(&format!("{HEAD}spec:\n  rules: {{from: x}}\n"));
    assert!(
        e.contains("spec.rules") && e.contains("invalid type"),
        "{e}"
    );
    let e = err(&format!(
        "---\n{HEAD}spec: {{}}\n---\n{HEAD}spec: {{action: AUDIT}}\n"
    ));
    assert!(
        e.contains("document 2")
            && e.contains("spec.action")
            && e.contains("not supported by an L4 proxy"),
        "{e}"
    );
    let e = err(&format!(
        "{HEAD}spec: {{action: CUSTOM, provider: {{name: ext}}}}\n"
    ));
    assert!(e.contains("not supported by an L4 proxy"), "{e}");
    let e = err(&format!("{HEAD}spec: {{action: MAYBE}}\n"));
    assert!(e.contains("unknown action"), "{e}");
    let e =
        err("apiVersion: security.istio.io/v2\nkind: AuthorizationPolicy\nmetadata: {name: p}\n");
    assert!(e.contains("apiVersion"), "{e}");
    let e = err(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: \"\"}\n",
    );
    assert!(e.contains("metadata.name") && e.contains("is empty"), "{e}");
    let e = err(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: ok, namespace: Bad_NS}\n",
    );
    assert!(e.contains("metadata.namespace"), "{e}");
    let e = err("a: [unclosed\n");
    assert!(e.contains("document 1"), "{e}");
    let e = err(&format!(
        "{HEAD}spec:\n  rules: [{{from: [{{source: {{serviceAccounts: [a/b/c]}}}}]}}]\n"
    ));
    assert!(e.contains("serviceAccounts[0]"), "{e}");
}

#[test]
fn scopes_namespaces_and_dry_run() {
    let t = parse(concat!(
        "apiVersion: security.istio.io/v1beta1\nkind: AuthorizationPolicy\nmetadata: {name: g, namespace: istio-system}\nspec: {action: DENY, rules: [{}]}\n---\n",
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: n}\nspec: {}\n---\n",
        "apiVersion: v1\nkind: Service\nmetadata: {name: ignored}\n---\n",
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: s, namespace: prod, annotations: {istio.io/dry-run: \"true\"}, labels: {a: b}}\nspec: {selector: {matchLabels: {app: x}}}\n",
    ))
    .unwrap();
    let summary: Vec<_> = t
        .policies
        .iter()
        .map(|p| (p.key(), p.scope, p.action, p.dry_run))
        .collect();
    assert_eq!(
        summary,
        vec![
            (
                "istio-system/g".to_owned(),
                Scope::Global,
                Action::Deny,
                false
            ),
            (
                "default/n".to_owned(),
                Scope::Namespace,
                Action::Allow,
                false
            ),
            (
                "prod/s".to_owned(),
                Scope::WorkloadSelector,
                Action::Allow,
                true
            ),
        ]
    );
}

#[test]
fn warnings_name_policy_rule_and_attribute() {
    let t = parse(concat!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: web-api-rbac, namespace: default}\n",
        "spec:\n  rules:\n  - to: [{operation: {methods: [GET]}}]\n  - from: [{source: {principals: [a]}}]\n---\n",
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: d, namespace: default}\n",
        "spec:\n  action: DENY\n  rules:\n  - to: [{operation: {paths: [/admin]}}]\n  - from: [{source: {namespaces: [x]}}]\n    to: [{operation: {methods: [POST], ports: [\"8080\"]}}]\n---\n",
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: w, namespace: default}\n",
        "spec: {targetRefs: [{kind: Service, name: web}], rules: [{}]}\n",
    ))
    .unwrap();
    let texts: Vec<String> = t.warnings.iter().map(ToString::to_string).collect();
    let all = texts.join("\n");
    assert!(all.contains("rule 0 of default/web-api-rbac uses `methods`, which an L4 proxy cannot see; in an ALLOW policy the whole rule is dropped, so it allows nothing"), "{all}");
    assert!(
        all.contains("rule 0 of default/d uses `paths`")
            && all.contains("never denies anything at L4"),
        "{all}"
    );
    assert!(
        all.contains("rule 1 of default/d uses `methods`") && all.contains("denies more"),
        "{all}"
    );
    assert!(all.contains("default/w uses `targetRefs`"), "{all}");
    // The ALLOW policy keeps only its L4 rule; the DENY policy keeps both rules; `w` is skipped.
    assert_eq!(t.policies.len(), 2);
    assert_eq!(t.policies[0].rules.len(), 1);
    assert_eq!(t.policies[1].rules.len(), 2);
    // spec: {} is worth a warning too: it denies everything.
    let t = parse(&format!("{HEAD}spec: {{}}\n")).unwrap();
    assert!(
        t.warnings[0]
            .to_string()
            .contains("denies every connection"),
        "{:?}",
        t.warnings
    );
}
