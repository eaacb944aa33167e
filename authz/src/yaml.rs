//! Kubernetes `AuthorizationPolicy` YAML -> the L4 model, exactly as istiod translates it for
//! ztunnel (DESIGN.md, "From Kubernetes YAML"), with a warning for everything an L4 proxy cannot
//! honour and an error, with its YAML path, for anything malformed.

use std::collections::BTreeMap;
use std::fmt;

use ipnet::IpNet;
use serde::Deserialize;

use crate::model::{Action, Clause, Match, Policy, Rule, Scope, ServiceAccountMatch, StringMatch};

/// Istio's default root namespace: policies there without a selector apply mesh-wide.
pub const DEFAULT_ROOT_NAMESPACE: &str = "istio-system";
/// The annotation that makes a policy dry-run.
pub const DRY_RUN_ANNOTATION: &str = "istio.io/dry-run";

/// Something the L4 translation could not honour as written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Warning {
    /// `namespace/name` of the policy.
    pub policy: String,
    /// The rule index, when the warning is about one rule.
    pub rule: Option<usize>,
    /// The attribute concerned (`methods`, `targetRefs`, `when[request.headers]`, ...).
    pub attribute: String,
    /// What happens because of it.
    pub effect: String,
}

impl fmt::Display for Warning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.rule {
            Some(rule) => write!(
                f,
                "rule {rule} of {} uses `{}`, {}",
                self.policy, self.attribute, self.effect
            ),
            None => write!(
                f,
                "{} uses `{}`: {}",
                self.policy, self.attribute, self.effect
            ),
        }
    }
}

/// Malformed input: where (document and YAML path) and what.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{source_name}: document {document}, {path}: {message}")]
pub struct ParseError {
    /// The file or source the text came from.
    pub source_name: String,
    /// 1-based number of the YAML document in the text.
    pub document: usize,
    /// Path inside the document, e.g. `spec.rules[0].from[0].source.ipBlocks[1]`.
    pub path: String,
    /// What is wrong.
    pub message: String,
}

/// The result of translating YAML: the policies and the warnings.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Translation {
    /// The L4 policies.
    pub policies: Vec<Policy>,
    /// What could not be honoured as written.
    pub warnings: Vec<Warning>,
}

/// Translates every `AuthorizationPolicy` in a multi-document YAML text; other kinds are ignored.
/// `source_name` names the text in errors (a file name).
pub fn parse_policies(
    text: &str,
    source_name: &str,
    root_namespace: &str,
) -> Result<Translation, ParseError> {
    let mut out = Translation::default();
    for (document, value) in common::k8s::documents(text) {
        let error = |path: String, message: String| ParseError {
            source_name: source_name.to_owned(),
            document,
            path,
            message,
        };
        let value = value.map_err(|e| error("(document)".into(), e.to_string()))?;
        let kind = value
            .get("kind")
            .and_then(|k| k.as_str())
            .unwrap_or_default();
        if kind != "AuthorizationPolicy" {
            continue;
        }
        let api = value
            .get("apiVersion")
            .and_then(|k| k.as_str())
            .unwrap_or_default();
        if api != "security.istio.io/v1" && api != "security.istio.io/v1beta1" {
            return Err(error(
                "apiVersion".into(),
                format!("unsupported apiVersion {api:?}; expected security.istio.io/v1 or v1beta1"),
            ));
        }
        let doc: Document = serde_path_to_error::deserialize(value)
            .map_err(|e| error(display_path(&e.path().to_string()), e.inner().to_string()))?;
        translate(doc, root_namespace, &mut out).map_err(|(path, message)| error(path, message))?;
    }
    Ok(out)
}

fn display_path(path: &str) -> String {
    if path.is_empty() || path == "." {
        "(document)".to_owned()
    } else {
        path.to_owned()
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Document {
    #[allow(dead_code)]
    api_version: String,
    #[allow(dead_code)]
    kind: String,
    metadata: Metadata,
    #[serde(default)]
    spec: Spec,
}

#[derive(Deserialize)]
struct Metadata {
    name: String,
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
    // Labels, uid, resourceVersion, ...: allowed and ignored.
    #[serde(flatten)]
    _rest: BTreeMap<String, serde_yaml::Value>,
}

#[derive(Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Spec {
    #[serde(default)]
    selector: Option<Selector>,
    #[serde(default)]
    target_ref: Option<serde_yaml::Value>,
    #[serde(default)]
    target_refs: Option<Vec<serde_yaml::Value>>,
    #[serde(default)]
    action: Option<String>,
    #[serde(default)]
    provider: Option<serde_yaml::Value>,
    #[serde(default)]
    rules: Vec<YamlRule>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Selector {
    #[serde(default)]
    match_labels: BTreeMap<String, String>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct YamlRule {
    #[serde(default)]
    from: Option<Vec<From>>,
    #[serde(default)]
    to: Option<Vec<To>>,
    #[serde(default)]
    when: Option<Vec<Condition>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct From {
    source: Source,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct To {
    operation: Operation,
}

#[derive(Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Source {
    #[serde(default)]
    principals: Vec<String>,
    #[serde(default)]
    not_principals: Vec<String>,
    #[serde(default)]
    request_principals: Vec<String>,
    #[serde(default)]
    not_request_principals: Vec<String>,
    #[serde(default)]
    namespaces: Vec<String>,
    #[serde(default)]
    not_namespaces: Vec<String>,
    #[serde(default)]
    ip_blocks: Vec<String>,
    #[serde(default)]
    not_ip_blocks: Vec<String>,
    #[serde(default)]
    remote_ip_blocks: Vec<String>,
    #[serde(default)]
    not_remote_ip_blocks: Vec<String>,
    #[serde(default)]
    service_accounts: Vec<String>,
    #[serde(default)]
    not_service_accounts: Vec<String>,
}

impl Source {
    fn is_empty(&self) -> bool {
        [
            &self.principals,
            &self.not_principals,
            &self.request_principals,
            &self.not_request_principals,
            &self.namespaces,
            &self.not_namespaces,
            &self.ip_blocks,
            &self.not_ip_blocks,
            &self.remote_ip_blocks,
            &self.not_remote_ip_blocks,
            &self.service_accounts,
            &self.not_service_accounts,
        ]
        .iter()
        .all(|v| v.is_empty())
    }
}

#[derive(Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Operation {
    #[serde(default)]
    hosts: Vec<String>,
    #[serde(default)]
    not_hosts: Vec<String>,
    #[serde(default)]
    ports: Vec<PortValue>,
    #[serde(default)]
    not_ports: Vec<PortValue>,
    #[serde(default)]
    methods: Vec<String>,
    #[serde(default)]
    not_methods: Vec<String>,
    #[serde(default)]
    paths: Vec<String>,
    #[serde(default)]
    not_paths: Vec<String>,
}

impl Operation {
    fn is_empty(&self) -> bool {
        self.ports.is_empty()
            && self.not_ports.is_empty()
            && [
                &self.hosts,
                &self.not_hosts,
                &self.methods,
                &self.not_methods,
                &self.paths,
                &self.not_paths,
            ]
            .iter()
            .all(|v| v.is_empty())
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Condition {
    key: String,
    #[serde(default)]
    values: Vec<String>,
    #[serde(default)]
    not_values: Vec<String>,
}

/// Istio's CRD types ports as strings; people write numbers too.
#[derive(Deserialize)]
#[serde(untagged)]
enum PortValue {
    Number(i64),
    Text(String),
}

type PathError = (String, String);

fn translate(doc: Document, root_namespace: &str, out: &mut Translation) -> Result<(), PathError> {
    let namespace = doc
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".to_owned());
    let name = doc.metadata.name.clone();
    check_dns_name(&name, 253)
        .map_err(|why| ("metadata.name".to_owned(), format!("{name:?} {why}")))?;
    check_dns_name(&namespace, 63).map_err(|why| {
        (
            "metadata.namespace".to_owned(),
            format!("{namespace:?} {why}"),
        )
    })?;
    let key = format!("{namespace}/{name}");
    let spec = doc.spec;
    if spec.target_ref.is_some() || spec.target_refs.is_some() {
        out.warnings.push(Warning {
            policy: key,
            rule: None,
            attribute: "targetRefs".into(),
            effect:
                "policies with targetRefs are enforced by waypoints, not by this proxy; skipped"
                    .into(),
        });
        return Ok(());
    }
    let action = match spec.action.as_deref() {
        None | Some("ALLOW") => Action::Allow,
        Some("DENY") => Action::Deny,
        Some(other @ ("AUDIT" | "CUSTOM")) => {
            return Err((
                "spec.action".into(),
                format!(
                    "action {other} is not supported by an L4 proxy (it needs an HTTP-aware waypoint)"
                ),
            ));
        }
        Some(other) => {
            return Err((
                "spec.action".into(),
                format!("unknown action {other:?}; expected ALLOW or DENY"),
            ));
        }
    };
    if spec.provider.is_some() {
        return Err((
            "spec.provider".into(),
            "a provider is only valid with action CUSTOM, which an L4 proxy cannot run".into(),
        ));
    }
    let selector = spec.selector.map(|s| s.match_labels).unwrap_or_default();
    let scope = if !selector.is_empty() {
        Scope::WorkloadSelector
    } else if namespace == root_namespace {
        Scope::Global
    } else {
        Scope::Namespace
    };
    let dry_run = match doc
        .metadata
        .annotations
        .get(DRY_RUN_ANNOTATION)
        .map(String::as_str)
    {
        None | Some("false") => false,
        Some("true") => true,
        Some(other) => {
            return Err((
                format!("metadata.annotations.{DRY_RUN_ANNOTATION}"),
                format!("expected \"true\" or \"false\", got {other:?}"),
            ));
        }
    };
    let mut rules = Vec::new();
    for (i, rule) in spec.rules.iter().enumerate() {
        let mut http = Vec::new();
        let mut spiffe = Vec::new();
        let translated = translate_rule(rule, i, &namespace, &mut http, &mut spiffe)?;
        out.warnings
            .extend(spiffe.into_iter().map(|(attribute, effect)| Warning {
                policy: key.clone(),
                rule: Some(i),
                attribute,
                effect,
            }));
        if http.is_empty() {
            rules.push(translated);
            continue;
        }
        for attribute in http {
            let effect = match action {
                Action::Allow => "which an L4 proxy cannot see; in an ALLOW policy the whole rule is dropped, so it allows nothing".to_owned(),
                Action::Deny if translated.never_fires() => {
                    "which an L4 proxy cannot see; in a DENY policy the HTTP attributes are removed, and an entry that had only HTTP attributes never matches, so this rule never denies anything at L4".to_owned()
                }
                Action::Deny => "which an L4 proxy cannot see; in a DENY policy the HTTP attributes are removed, so the rule denies more (every request of the matching connections)".to_owned(),
            };
            out.warnings.push(Warning {
                policy: key.clone(),
                rule: Some(i),
                attribute,
                effect,
            });
        }
        if action == Action::Deny {
            rules.push(translated);
        }
    }
    if action == Action::Allow && rules.is_empty() {
        out.warnings.push(Warning {
            policy: key.clone(),
            rule: None,
            attribute: "rules".into(),
            effect: if spec.rules.is_empty() {
                "an ALLOW policy without rules matches nothing, so it denies every connection to the workloads it applies to".into()
            } else {
                "no rule is left after dropping HTTP-only rules, so it denies every connection to the workloads it applies to".into()
            },
        });
    }
    out.policies.push(Policy {
        name,
        namespace,
        scope,
        action,
        rules: rules.into_iter().map(|t| t.rule).collect(),
        dry_run,
        selector,
    });
    Ok(())
}

struct TranslatedRule {
    rule: Rule,
}

impl TranslatedRule {
    /// Some clause is left with only empty (never matching) matches.
    fn never_fires(&self) -> bool {
        self.rule
            .clauses
            .iter()
            .any(|c| !c.matches.is_empty() && c.matches.iter().all(Match::is_empty))
    }
}

fn translate_rule(
    rule: &YamlRule,
    i: usize,
    namespace: &str,
    http: &mut Vec<String>,
    spiffe: &mut Vec<(String, String)>,
) -> Result<TranslatedRule, PathError> {
    let mut clauses = Vec::new();
    if let Some(from) = &rule.from {
        let mut matches = Vec::new();
        for (j, entry) in from.iter().enumerate() {
            let path = format!("spec.rules[{i}].from[{j}].source");
            let s = &entry.source;
            if s.is_empty() {
                return Err((
                    path,
                    "an empty source matches nothing; Istio rejects it (remove the entry, or name what it should match)".into(),
                ));
            }
            for (attr, values, identity) in [
                ("principals", &s.principals, Identity::Principal),
                ("notPrincipals", &s.not_principals, Identity::NotPrincipal),
                ("namespaces", &s.namespaces, Identity::Namespace),
                ("notNamespaces", &s.not_namespaces, Identity::NotNamespace),
            ] {
                spiffe.extend(spiffe_warnings(attr, values, identity));
            }
            for (attr, values) in [
                ("requestPrincipals", &s.request_principals),
                ("notRequestPrincipals", &s.not_request_principals),
                ("remoteIpBlocks", &s.remote_ip_blocks),
                ("notRemoteIpBlocks", &s.not_remote_ip_blocks),
            ] {
                if !values.is_empty() {
                    push_once(http, attr);
                }
            }
            let m = Match {
                principals: patterns(&s.principals),
                not_principals: patterns(&s.not_principals),
                namespaces: patterns(&s.namespaces),
                not_namespaces: patterns(&s.not_namespaces),
                source_ips: cidrs(&s.ip_blocks, &format!("{path}.ipBlocks"))?,
                not_source_ips: cidrs(&s.not_ip_blocks, &format!("{path}.notIpBlocks"))?,
                service_accounts: service_accounts(
                    &s.service_accounts,
                    namespace,
                    &format!("{path}.serviceAccounts"),
                )?,
                not_service_accounts: service_accounts(
                    &s.not_service_accounts,
                    namespace,
                    &format!("{path}.notServiceAccounts"),
                )?,
                ..Match::default()
            };
            matches.push(m);
        }
        clauses.push(Clause { matches });
    }
    if let Some(to) = &rule.to {
        let mut matches = Vec::new();
        for (j, entry) in to.iter().enumerate() {
            let path = format!("spec.rules[{i}].to[{j}].operation");
            let o = &entry.operation;
            if o.is_empty() {
                return Err((
                    path,
                    "an empty operation matches nothing; Istio rejects it (remove the entry, or name what it should match)".into(),
                ));
            }
            for (attr, values) in [
                ("hosts", &o.hosts),
                ("notHosts", &o.not_hosts),
                ("methods", &o.methods),
                ("notMethods", &o.not_methods),
                ("paths", &o.paths),
                ("notPaths", &o.not_paths),
            ] {
                if !values.is_empty() {
                    push_once(http, attr);
                }
            }
            let m = Match {
                destination_ports: ports(&o.ports, &format!("{path}.ports"))?,
                not_destination_ports: ports(&o.not_ports, &format!("{path}.notPorts"))?,
                ..Match::default()
            };
            matches.push(m);
        }
        clauses.push(Clause { matches });
    }
    if let Some(when) = &rule.when {
        for (j, cond) in when.iter().enumerate() {
            let path = format!("spec.rules[{i}].when[{j}]");
            if cond.values.is_empty() && cond.not_values.is_empty() {
                return Err((
                    path,
                    format!(
                        "condition on {:?} has neither values nor notValues; Istio rejects it",
                        cond.key
                    ),
                ));
            }
            let mut m = Match::default();
            match cond.key.as_str() {
                "source.ip" => {
                    m.source_ips = cidrs(&cond.values, &format!("{path}.values"))?;
                    m.not_source_ips = cidrs(&cond.not_values, &format!("{path}.notValues"))?;
                }
                "source.namespace" => {
                    spiffe.extend(spiffe_warnings(
                        "when[source.namespace].values",
                        &cond.values,
                        Identity::Namespace,
                    ));
                    spiffe.extend(spiffe_warnings(
                        "when[source.namespace].notValues",
                        &cond.not_values,
                        Identity::NotNamespace,
                    ));
                    m.namespaces = patterns(&cond.values);
                    m.not_namespaces = patterns(&cond.not_values);
                }
                "source.principal" => {
                    spiffe.extend(spiffe_warnings(
                        "when[source.principal].values",
                        &cond.values,
                        Identity::Principal,
                    ));
                    spiffe.extend(spiffe_warnings(
                        "when[source.principal].notValues",
                        &cond.not_values,
                        Identity::NotPrincipal,
                    ));
                    m.principals = patterns(&cond.values);
                    m.not_principals = patterns(&cond.not_values);
                }
                "destination.ip" => {
                    m.destination_ips = cidrs(&cond.values, &format!("{path}.values"))?;
                    m.not_destination_ips = cidrs(&cond.not_values, &format!("{path}.notValues"))?;
                }
                "destination.port" => {
                    let to_ports = |v: &[String], p: String| {
                        ports(
                            &v.iter().cloned().map(PortValue::Text).collect::<Vec<_>>(),
                            &p,
                        )
                    };
                    m.destination_ports = to_ports(&cond.values, format!("{path}.values"))?;
                    m.not_destination_ports =
                        to_ports(&cond.not_values, format!("{path}.notValues"))?;
                }
                other => push_once(http, &format!("when[{other}]")),
            }
            clauses.push(Clause { matches: vec![m] });
        }
    }
    Ok(TranslatedRule {
        rule: Rule { clauses },
    })
}

/// Kubernetes object names: lowercase letters, digits, '-' and '.', starting and ending with a
/// letter or digit, at most `max` characters (namespaces: 63 and no '.').
fn check_dns_name(name: &str, max: usize) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("is empty");
    }
    if name.len() > max {
        return Err("is too long for a Kubernetes name");
    }
    let dots_allowed = max > 63;
    if !name.bytes().all(|b| {
        b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || (dots_allowed && b == b'.')
    }) {
        return Err("is not a valid Kubernetes name (lowercase letters, digits, '-' and '.')");
    }
    let edge_ok = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    if !edge_ok(name.as_bytes()[0]) || !edge_ok(name.as_bytes()[name.len() - 1]) {
        return Err("must start and end with a letter or digit");
    }
    Ok(())
}

/// Which identity list a `spiffe://` value was written in.
#[derive(Clone, Copy)]
enum Identity {
    Principal,
    NotPrincipal,
    Namespace,
    NotNamespace,
}

/// Warnings for values written with `spiffe://`. istiod sends principals and namespaces exactly
/// as written, and ztunnel compares principals without the `spiffe://` prefix (and namespaces
/// are bare names), so such a value never matches a peer. We translate exactly as istiod does
/// (the value is kept) and say what it means.
fn spiffe_warnings(
    attribute: &str,
    values: &[String],
    list: Identity,
) -> impl Iterator<Item = (String, String)> {
    values
        .iter()
        .filter(|v| v.starts_with("spiffe://"))
        .map(move |v| {
            let bare = v.trim_start_matches("spiffe://");
            let (what, suggestion) = match list {
                Identity::Principal | Identity::NotPrincipal => (
                    "principals are compared without the `spiffe://` prefix",
                    format!("write {bare:?}"),
                ),
                Identity::Namespace | Identity::NotNamespace => (
                    "namespaces are bare names",
                    match bare.split('/').collect::<Vec<_>>().as_slice() {
                        [_, "ns", ns, ..] => format!("write {ns:?}"),
                        _ => "write the namespace's name".to_owned(),
                    },
                ),
            };
            let effect = match list {
                Identity::Principal | Identity::Namespace => "it matches no peer",
                Identity::NotPrincipal | Identity::NotNamespace => "it excludes no peer",
            };
            (
                format!("{attribute}: {v:?}"),
                format!(
                    "and {effect}: {what} (istiod sends the value as written, and Istio's ztunnel never matches it either); {suggestion}"
                ),
            )
        })
}

fn push_once(list: &mut Vec<String>, item: &str) {
    if !list.iter().any(|x| x == item) {
        list.push(item.to_owned());
    }
}

fn patterns(values: &[String]) -> Vec<StringMatch> {
    values
        .iter()
        .map(|v| StringMatch::from_pattern(v))
        .collect()
}

fn cidrs(values: &[String], path: &str) -> Result<Vec<IpNet>, PathError> {
    values
        .iter()
        .enumerate()
        .map(|(k, v)| {
            let text = v.trim();
            text.parse::<IpNet>()
                .or_else(|_| text.parse::<std::net::IpAddr>().map(IpNet::from))
                .map(crate::model::canonical_net)
                .map_err(|_| {
                    (
                        format!("{path}[{k}]"),
                        format!("{v:?} is not an IP address or CIDR block"),
                    )
                })
        })
        .collect()
}

fn ports(values: &[PortValue], path: &str) -> Result<Vec<u16>, PathError> {
    values
        .iter()
        .enumerate()
        .map(|(k, v)| {
            let parsed = match v {
                PortValue::Number(n) => u16::try_from(*n).ok(),
                PortValue::Text(t) if t.bytes().all(|b| b.is_ascii_digit()) && !t.is_empty() => {
                    t.parse().ok()
                }
                PortValue::Text(_) => None,
            };
            match parsed {
                Some(p) if p != 0 => Ok(p),
                _ => {
                    let shown = match v {
                        PortValue::Number(n) => n.to_string(),
                        PortValue::Text(t) => format!("{t:?}"),
                    };
                    Err((
                        format!("{path}[{k}]"),
                        format!("port {shown} is out of range; expected 1-65535"),
                    ))
                }
            }
        })
        .collect()
}

fn service_accounts(
    values: &[String],
    namespace: &str,
    path: &str,
) -> Result<Vec<ServiceAccountMatch>, PathError> {
    values
        .iter()
        .enumerate()
        .map(|(k, v)| {
            let (ns, name) = v.split_once('/').unwrap_or((namespace, v));
            if ns.is_empty() || name.is_empty() || name.contains('/') {
                return Err((
                    format!("{path}[{k}]"),
                    format!("{v:?} is not a service account (<namespace>/<name> or <name>)"),
                ));
            }
            Ok(ServiceAccountMatch {
                namespace: ns.to_owned(),
                name: name.to_owned(),
            })
        })
        .collect()
}
