//! Kubernetes and Istio names that ambient mode reads, and the documents of a multi-document
//! Kubernetes YAML text.

/// The label that puts a namespace (or a pod) in a data-plane mode.
pub const DATAPLANE_MODE_LABEL: &str = "istio.io/dataplane-mode";
/// The value of [`DATAPLANE_MODE_LABEL`] that captures into the ambient mesh.
pub const DATAPLANE_MODE_AMBIENT: &str = "ambient";
/// Our local mesh's pod annotation telling the node agent where the pod's network namespace is
/// (a path such as `/var/run/netns/NAME`): a node without a container runtime has no other way.
pub const NETNS_ANNOTATION: &str = "ambient.local/netns";

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
