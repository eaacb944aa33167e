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
}

impl Default for Enablement {
    fn default() -> Self {
        Enablement {
            excluded_namespaces: DEFAULT_EXCLUDED_NAMESPACES
                .iter()
                .map(|n| (*n).to_owned())
                .collect(),
        }
    }
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
