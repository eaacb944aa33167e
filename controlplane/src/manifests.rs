//! Reading the Kubernetes objects the local control plane understands from multi-document YAML.
//!
//! Only the fields istiod uses for ambient are read; everything else is ignored, so ordinary
//! manifests (with containers, probes, ...) load as they are. A malformed document is an error
//! naming the source and the document; the caller reports it and skips that file.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::Deserialize;

/// The objects of one or more manifest files.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Manifests {
    /// Namespaces and their labels.
    pub namespaces: BTreeMap<String, BTreeMap<String, String>>,
    /// Pods.
    pub pods: Vec<Pod>,
    /// Deployments (they name the workloads of the pods they select).
    pub deployments: Vec<Deployment>,
    /// Services.
    pub services: Vec<Service>,
    /// The AuthorizationPolicy documents, kept as text for the `authz` translation.
    pub policy_documents: Vec<String>,
}

/// A pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pod {
    /// Name.
    pub name: String,
    /// Namespace.
    pub namespace: String,
    /// `metadata.uid`, or a stable one made from the namespace and name when absent.
    pub uid: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// `spec.serviceAccountName` (default `default`).
    pub service_account: String,
    /// `spec.nodeName`.
    pub node: String,
    /// `status.podIPs` (or `status.podIP`).
    pub ips: Vec<IpAddr>,
    /// Annotations (the local mesh records a pod's network namespace in
    /// [`NETNS_ANNOTATION`]).
    pub annotations: BTreeMap<String, String>,
    /// Ready to serve: false when `status.conditions` has `Ready` other than `"True"` (no such
    /// condition: ready, as a pod written by hand usually lacks it). Unready pods are sent as
    /// unhealthy workloads, which the proxy skips when picking a service endpoint.
    pub ready: bool,
}

/// The annotation with which the local mesh tells the node agent where a pod's network
/// namespace is (a path such as `/var/run/netns/NAME`).
pub use common::k8s::NETNS_ANNOTATION;

/// A deployment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deployment {
    /// Name.
    pub name: String,
    /// Namespace.
    pub namespace: String,
    /// `spec.selector.matchLabels`.
    pub selector: BTreeMap<String, String>,
}

/// A service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    /// Name.
    pub name: String,
    /// Namespace.
    pub namespace: String,
    /// `spec.selector`.
    pub selector: BTreeMap<String, String>,
    /// `spec.clusterIP(s)`.
    pub cluster_ips: Vec<IpAddr>,
    /// (port, targetPort) pairs; a named or missing targetPort maps to the port itself.
    pub ports: Vec<(u16, u16)>,
}

/// A manifest that could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{source_name}: document {document}: {message}")]
pub struct ManifestError {
    /// File name.
    pub source_name: String,
    /// 1-based document number.
    pub document: usize,
    /// What is wrong.
    pub message: String,
}

#[derive(Deserialize)]
struct Meta {
    name: String,
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    uid: Option<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct PodDoc {
    metadata: Meta,
    #[serde(default)]
    spec: PodSpec,
    #[serde(default)]
    status: PodStatus,
}

#[derive(Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PodSpec {
    #[serde(default)]
    service_account_name: Option<String>,
    #[serde(default)]
    node_name: Option<String>,
}

#[derive(Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PodStatus {
    #[serde(default, rename = "podIP")]
    pod_ip: Option<String>,
    #[serde(default, rename = "podIPs")]
    pod_ips: Vec<PodIp>,
    #[serde(default)]
    conditions: Vec<PodCondition>,
}

#[derive(Deserialize)]
struct PodCondition {
    #[serde(rename = "type")]
    kind: String,
    status: String,
}

#[derive(Deserialize)]
struct PodIp {
    ip: String,
}

#[derive(Deserialize)]
struct DeploymentDoc {
    metadata: Meta,
    spec: DeploymentSpec,
}

#[derive(Deserialize)]
struct DeploymentSpec {
    selector: LabelSelector,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct LabelSelector {
    #[serde(default)]
    match_labels: BTreeMap<String, String>,
}

#[derive(Deserialize)]
struct ServiceDoc {
    metadata: Meta,
    #[serde(default)]
    spec: ServiceSpec,
}

#[derive(Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ServiceSpec {
    #[serde(default)]
    selector: BTreeMap<String, String>,
    #[serde(default, rename = "clusterIP")]
    cluster_ip: Option<String>,
    #[serde(default, rename = "clusterIPs")]
    cluster_ips: Vec<String>,
    #[serde(default)]
    ports: Vec<ServicePort>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ServicePort {
    port: u16,
    #[serde(default)]
    target_port: Option<serde_yaml::Value>,
}

impl Manifests {
    /// Adds the objects of `other` (a namespace defined in both takes `other`'s labels).
    pub fn merge(&mut self, other: Manifests) {
        self.namespaces.extend(other.namespaces);
        self.pods.extend(other.pods);
        self.deployments.extend(other.deployments);
        self.services.extend(other.services);
        self.policy_documents.extend(other.policy_documents);
    }

    /// Adds the objects of one multi-document YAML text.
    pub fn add(&mut self, text: &str, source_name: &str) -> Result<(), ManifestError> {
        for (document, value) in common::k8s::documents(text) {
            let err = |message: String| ManifestError {
                source_name: source_name.to_owned(),
                document,
                message,
            };
            let value = value.map_err(|e| err(e.to_string()))?;
            let kind = value
                .get("kind")
                .and_then(|k| k.as_str())
                .unwrap_or_default()
                .to_owned();
            let parse = |what: &str| err(format!("malformed {what}"));
            match kind.as_str() {
                "Namespace" => {
                    let meta: Meta =
                        serde_yaml::from_value(value.get("metadata").cloned().unwrap_or_default())
                            .map_err(|e| err(format!("Namespace metadata: {e}")))?;
                    self.namespaces.insert(meta.name, meta.labels);
                }
                "Pod" => {
                    let doc: PodDoc =
                        serde_yaml::from_value(value).map_err(|e| err(format!("Pod: {e}")))?;
                    let namespace = doc.metadata.namespace.unwrap_or_else(|| "default".into());
                    let mut ips = Vec::new();
                    for text in doc
                        .status
                        .pod_ips
                        .iter()
                        .map(|p| &p.ip)
                        .chain(doc.status.pod_ip.iter())
                    {
                        let ip: IpAddr = text.parse().map_err(|_| {
                            err(format!(
                                "Pod {namespace}/{}: status IP {text:?} is not an address",
                                doc.metadata.name
                            ))
                        })?;
                        if !ips.contains(&ip) {
                            ips.push(ip);
                        }
                    }
                    let ready = doc
                        .status
                        .conditions
                        .iter()
                        .filter(|c| c.kind == "Ready")
                        .all(|c| c.status == "True");
                    self.pods.push(Pod {
                        ready,
                        uid: doc
                            .metadata
                            .uid
                            .unwrap_or_else(|| format!("{namespace}/{}", doc.metadata.name)),
                        name: doc.metadata.name,
                        namespace,
                        labels: doc.metadata.labels,
                        annotations: doc.metadata.annotations,
                        service_account: doc
                            .spec
                            .service_account_name
                            .unwrap_or_else(|| "default".into()),
                        node: doc.spec.node_name.unwrap_or_default(),
                        ips,
                    });
                }
                "Deployment" => {
                    let doc: DeploymentDoc = serde_yaml::from_value(value)
                        .map_err(|e| err(format!("Deployment: {e}")))?;
                    self.deployments.push(Deployment {
                        name: doc.metadata.name,
                        namespace: doc.metadata.namespace.unwrap_or_else(|| "default".into()),
                        selector: doc.spec.selector.match_labels,
                    });
                }
                "Service" => {
                    let doc: ServiceDoc =
                        serde_yaml::from_value(value).map_err(|e| err(format!("Service: {e}")))?;
                    let namespace = doc.metadata.namespace.unwrap_or_else(|| "default".into());
                    let mut cluster_ips = Vec::new();
                    for text in doc
                        .spec
                        .cluster_ips
                        .iter()
                        .chain(doc.spec.cluster_ip.iter())
                    {
                        if text == "None" || text.is_empty() {
                            continue;
                        }
                        let ip: IpAddr = text.parse().map_err(|_| parse("Service clusterIP"))?;
                        if !cluster_ips.contains(&ip) {
                            cluster_ips.push(ip);
                        }
                    }
                    let ports = doc
                        .spec
                        .ports
                        .iter()
                        .map(|p| {
                            let target = match &p.target_port {
                                Some(serde_yaml::Value::Number(n)) => n
                                    .as_u64()
                                    .and_then(|n| u16::try_from(n).ok())
                                    .ok_or_else(|| parse("Service targetPort"))?,
                                _ => p.port,
                            };
                            Ok((p.port, target))
                        })
                        .collect::<Result<Vec<_>, ManifestError>>()?;
                    self.services.push(Service {
                        name: doc.metadata.name,
                        namespace,
                        selector: doc.spec.selector,
                        cluster_ips,
                        ports,
                    });
                }
                "AuthorizationPolicy" => {
                    let text = serde_yaml::to_string(&value).map_err(|e| err(e.to_string()))?;
                    self.policy_documents.push(text);
                }
                _ => {}
            }
        }
        Ok(())
    }
}
