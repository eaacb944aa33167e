//! Kubernetes and Istio names that ambient mode reads, and the documents of a multi-document
//! Kubernetes YAML text.

/// The label that puts a namespace (or a pod) in a data-plane mode.
pub const DATAPLANE_MODE_LABEL: &str = "istio.io/dataplane-mode";
/// The value of [`DATAPLANE_MODE_LABEL`] that captures into the ambient mesh.
pub const DATAPLANE_MODE_AMBIENT: &str = "ambient";
/// Our local mesh's pod annotation telling the node agent where the pod's network namespace is
/// (a path such as `/var/run/netns/NAME`): a node without a container runtime has no other way.
pub const NETNS_ANNOTATION: &str = "ambient.local/netns";

/// The pod annotation that tells istiod a pod's traffic is redirected to the node proxy (it then
/// advertises the pod as an HBONE workload); written through `pods/status` by the node agent.
pub const REDIRECTION_ANNOTATION: &str = "ambient.istio.io/redirection";

/// Values of [`REDIRECTION_ANNOTATION`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Redirection {
    /// The pod's rules are in and the node proxy acknowledged it.
    Enabled,
    /// The pod's rules are in, but no node proxy has acknowledged it yet.
    Pending,
}

impl Redirection {
    /// The annotation's value.
    pub fn as_str(self) -> &'static str {
        match self {
            Redirection::Enabled => "enabled",
            Redirection::Pending => "pending",
        }
    }
}

/// The annotation a pod with an Istio sidecar carries; such a pod never joins the ambient mesh.
pub const SIDECAR_STATUS_ANNOTATION: &str = "sidecar.istio.io/status";

/// The namespaces whose pods never join unless configured otherwise (istio-cni's default).
pub const DEFAULT_EXCLUDED_NAMESPACES: &[&str] = &["kube-system"];

/// Which pods join the ambient mesh, as istio-cni decides it: one definition for the node
/// agent (which captures them) and the local control plane (which tells the mesh they speak
/// HBONE).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Enablement {
    /// Namespaces whose pods never join (`EXCLUDE_NAMESPACES`).
    pub excluded_namespaces: std::collections::BTreeSet<String>,
    /// istio-cni's enablement selectors (`AMBIENT_ENABLEMENT_SELECTOR`): a pod joins when any
    /// selector's pod and namespace selectors both match. `None`: Istio's default (the pod
    /// labelled `ambient`, or its namespace labelled `ambient` and the pod not `none`).
    pub selectors: Option<Vec<EnablementSelector>>,
}

impl Default for Enablement {
    fn default() -> Self {
        Enablement {
            excluded_namespaces: DEFAULT_EXCLUDED_NAMESPACES
                .iter()
                .map(|n| (*n).to_owned())
                .collect(),
            selectors: None,
        }
    }
}

/// One of istio-cni's enablement selectors: Kubernetes label selectors for the pod and its
/// namespace (an empty selector matches everything).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EnablementSelector {
    /// Matched against the pod's labels.
    #[serde(default)]
    pub pod_selector: LabelSelector,
    /// Matched against its namespace's labels.
    #[serde(default)]
    pub namespace_selector: LabelSelector,
}

/// A Kubernetes label selector (`matchLabels` and `matchExpressions`, all of which must hold).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LabelSelector {
    /// Labels that must be present with these values.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub match_labels: std::collections::BTreeMap<String, String>,
    /// Expressions that must hold.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub match_expressions: Vec<LabelExpression>,
}

/// One `matchExpressions` entry.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LabelExpression {
    /// The label.
    pub key: String,
    /// `In`, `NotIn`, `Exists` or `DoesNotExist`.
    pub operator: LabelOperator,
    /// The values `In` and `NotIn` compare with (must be empty for the others).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
}

/// A `matchExpressions` operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum LabelOperator {
    /// The label's value is one of the values.
    In,
    /// The label is absent or its value is none of the values.
    NotIn,
    /// The label is present.
    Exists,
    /// The label is absent.
    DoesNotExist,
}

impl LabelSelector {
    /// Whether `labels` satisfy every part of the selector.
    pub fn matches(&self, labels: &std::collections::BTreeMap<String, String>) -> bool {
        self.match_labels
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
            && self.match_expressions.iter().all(|e| {
                let value = labels.get(&e.key);
                match e.operator {
                    LabelOperator::In => value.is_some_and(|v| e.values.contains(v)),
                    LabelOperator::NotIn => value.is_none_or(|v| !e.values.contains(v)),
                    LabelOperator::Exists => value.is_some(),
                    LabelOperator::DoesNotExist => value.is_none(),
                }
            })
    }
}

/// Parses `AMBIENT_ENABLEMENT_SELECTOR` (YAML or JSON: a list of [`EnablementSelector`]), as
/// istio-cni's chart writes it. An error names what is wrong; a selector list that means
/// nothing (an `In` without values, values on `Exists`) is refused, never read as matching all.
pub fn parse_enablement_selectors(text: &str) -> Result<Vec<EnablementSelector>, String> {
    let selectors: Vec<EnablementSelector> = serde_yaml::from_str(text)
        .map_err(|e| format!("not a list of enablement selectors: {e}"))?;
    for (i, selector) in selectors.iter().enumerate() {
        for (which, labels) in [
            ("podSelector", &selector.pod_selector),
            ("namespaceSelector", &selector.namespace_selector),
        ] {
            for (j, e) in labels.match_expressions.iter().enumerate() {
                let needs_values = matches!(e.operator, LabelOperator::In | LabelOperator::NotIn);
                if needs_values == e.values.is_empty() {
                    return Err(format!(
                        "selector {i}: {which}.matchExpressions[{j}] ({} {:?}): In and NotIn need values, Exists and DoesNotExist take none",
                        e.key, e.operator
                    ));
                }
            }
        }
    }
    Ok(selectors)
}

/// Why a pod does not join.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Skip {
    /// It runs on another node (the node agent's concern).
    OtherNode,
    /// Its namespace is excluded.
    ExcludedNamespace,
    /// It has an Istio sidecar.
    Sidecar,
    /// It is labelled `istio.io/dataplane-mode=none`.
    OptedOut,
    /// Neither it nor its namespace is labelled `istio.io/dataplane-mode=ambient`.
    NotEnabled,
    /// No configured enablement selector matches it.
    NotSelected,
}

impl std::fmt::Display for Skip {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Skip::OtherNode => "the pod runs on another node",
            Skip::ExcludedNamespace => "its namespace is excluded",
            Skip::Sidecar => "the pod has a sidecar",
            Skip::OptedOut => "the pod opted out (istio.io/dataplane-mode=none)",
            Skip::NotEnabled => {
                "neither the pod nor its namespace is labelled istio.io/dataplane-mode=ambient"
            }
            Skip::NotSelected => "no enablement selector matches the pod and its namespace",
        })
    }
}

impl std::error::Error for Skip {}

/// The `istio.io/dataplane-mode` label among `labels`.
fn mode(labels: &std::collections::BTreeMap<String, String>) -> Option<&str> {
    labels.get(DATAPLANE_MODE_LABEL).map(String::as_str)
}

impl Enablement {
    /// `Ok` when a pod of `namespace` with these labels and annotations, in a namespace with
    /// `namespace_labels`, joins; in this order of precedence: not in an excluded namespace, no
    /// sidecar, not opted out, then labelled `ambient` itself or in a namespace labelled so.
    pub fn admits(
        &self,
        namespace: &str,
        labels: &std::collections::BTreeMap<String, String>,
        annotations: &std::collections::BTreeMap<String, String>,
        namespace_labels: &std::collections::BTreeMap<String, String>,
    ) -> Result<(), Skip> {
        if self.excluded_namespaces.contains(namespace) {
            Err(Skip::ExcludedNamespace)
        } else if annotations.contains_key(SIDECAR_STATUS_ANNOTATION) {
            Err(Skip::Sidecar)
        } else if let Some(selectors) = &self.selectors {
            if selectors.iter().any(|s| {
                s.pod_selector.matches(labels) && s.namespace_selector.matches(namespace_labels)
            }) {
                Ok(())
            } else {
                Err(Skip::NotSelected)
            }
        } else if mode(labels) == Some("none") {
            Err(Skip::OptedOut)
        } else if mode(labels) == Some(DATAPLANE_MODE_AMBIENT)
            || mode(namespace_labels) == Some(DATAPLANE_MODE_AMBIENT)
        {
            Ok(())
        } else {
            Err(Skip::NotEnabled)
        }
    }
}

/// The documents of a multi-document YAML text, each with its number in the text (from 1,
/// counting empty documents, so errors name the document a person sees); empty documents are
/// skipped. A document that is not YAML is an `Err` for that document, and the last item: the
/// parser cannot find where the next document starts after it.
pub fn documents(
    text: &str,
) -> impl Iterator<Item = (usize, Result<serde_yaml::Value, serde_yaml::Error>)> + '_ {
    use serde::Deserialize as _;
    let mut failed = false;
    serde_yaml::Deserializer::from_str(text)
        .enumerate()
        .map_while(move |(i, de)| {
            if failed {
                return None;
            }
            let doc = serde_yaml::Value::deserialize(de);
            failed = doc.is_err();
            Some((i + 1, doc))
        })
        .filter(|(_, doc)| !matches!(doc, Ok(serde_yaml::Value::Null)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> std::collections::BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    /// Istio's default selectors, written out, decide as the built-in rule does.
    #[test]
    fn istios_default_selectors_decide_as_the_built_in_rule() {
        let default = parse_enablement_selectors(
            "- podSelector: {matchLabels: {istio.io/dataplane-mode: ambient}}\n- namespaceSelector: {matchLabels: {istio.io/dataplane-mode: ambient}}\n  podSelector:\n    matchExpressions: [{key: istio.io/dataplane-mode, operator: NotIn, values: [none]}]\n",
        )
        .unwrap();
        let selecting = Enablement {
            selectors: Some(default),
            ..Enablement::default()
        };
        let built_in = Enablement::default();
        let none = std::collections::BTreeMap::new();
        for pod in [
            labels(&[]),
            labels(&[("istio.io/dataplane-mode", "ambient")]),
            labels(&[("istio.io/dataplane-mode", "none")]),
            labels(&[("app", "web")]),
        ] {
            for ns in [
                labels(&[]),
                labels(&[("istio.io/dataplane-mode", "ambient")]),
            ] {
                for namespace in ["shop", "kube-system"] {
                    assert_eq!(
                        selecting.admits(namespace, &pod, &none, &ns).is_ok(),
                        built_in.admits(namespace, &pod, &none, &ns).is_ok(),
                        "{namespace} {pod:?} {ns:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn custom_selectors_and_bad_ones() {
        let selectors = parse_enablement_selectors(
            r#"[{"namespaceSelector": {"matchExpressions": [{"key": "team", "operator": "In", "values": ["pay", "shop"]}]}, "podSelector": {"matchExpressions": [{"key": "legacy", "operator": "DoesNotExist"}]}}]"#,
        )
        .unwrap();
        let e = Enablement {
            selectors: Some(selectors),
            ..Enablement::default()
        };
        let none = std::collections::BTreeMap::new();
        assert!(
            e.admits("a", &labels(&[]), &none, &labels(&[("team", "pay")]))
                .is_ok()
        );
        assert_eq!(
            e.admits(
                "a",
                &labels(&[("legacy", "1")]),
                &none,
                &labels(&[("team", "pay")])
            ),
            Err(Skip::NotSelected)
        );
        assert_eq!(
            e.admits("a", &labels(&[]), &none, &labels(&[("team", "ops")])),
            Err(Skip::NotSelected)
        );
        // Excluded namespaces and sidecars still come first.
        assert_eq!(
            e.admits(
                "kube-system",
                &labels(&[]),
                &none,
                &labels(&[("team", "pay")])
            ),
            Err(Skip::ExcludedNamespace)
        );
        for bad in [
            "- podSelector: {matchExpressions: [{key: a, operator: In}]}",
            "- podSelector: {matchExpressions: [{key: a, operator: Exists, values: [x]}]}",
            "- podSelector: {matchExpressions: [{key: a, operator: Like, values: [x]}]}",
            "- podSelecter: {}",
            "podSelector: {}",
        ] {
            assert!(parse_enablement_selectors(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn documents_are_numbered_as_written_and_a_broken_one_is_an_error() {
        let docs: Vec<_> = documents("kind: A\n---\n\n---\nkind: [\n").collect();
        assert_eq!(docs.len(), 2);
        assert_eq!(docs[0].0, 1);
        assert_eq!(docs[0].1.as_ref().unwrap()["kind"], "A");
        assert_eq!(docs[1].0, 3);
        assert!(docs[1].1.is_err());
    }
}
