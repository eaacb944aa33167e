//! A local istiod stand-in: reads Kubernetes YAML and computes the ambient xDS resources istiod
//! would send a ztunnel (workloads, services, authorization policies).
//!
//! Today: [`Manifests`] reads Namespaces, Pods, Deployments, Services and AuthorizationPolicies;
//! [`compute`] turns them into `xds_client` workloads and services and `authz` policies, exactly as
//! istiod does for ambient: a pod is in the mesh (HBONE) when its namespace carries
//! `istio.io/dataplane-mode=ambient` and the pod does not opt out with
//! `istio.io/dataplane-mode=none`; a workload names the selector policies that select it (in its
//! namespace or the root namespace). [`LocalControlPlane`] serves them over delta ADS with the
//! Istio CA, follows the directory (a broken edit keeps its file's last good version), and
//! serves only node proxies that present their node's token ([`NodeTokens`]); the CA signs for a
//! node only the identities of the pods on it ([`NodeAuthorizer`]).
//!
//! ```
//! use controlplane::{ComputeConfig, Manifests, compute};
//!
//! let mut manifests = Manifests::default();
//! manifests.add(r#"
//! apiVersion: v1
//! kind: Namespace
//! metadata: {name: default, labels: {istio.io/dataplane-mode: ambient}}
//! ---
//! apiVersion: v1
//! kind: Pod
//! metadata: {name: sleep, namespace: default, labels: {app: sleep}}
//! spec: {serviceAccountName: sleep, nodeName: node-a}
//! status: {podIP: 10.244.0.7}
//! "#, "example.yaml")?;
//! let computed = compute(&manifests, &ComputeConfig::default()).unwrap();
//! let sleep = &computed.workloads[0];
//! assert!(sleep.hbone());
//! assert_eq!(sleep.identity.as_str(), "spiffe://cluster.local/ns/default/sa/sleep");
//! # Ok::<(), controlplane::ManifestError>(())
//! ```
#![forbid(unsafe_code)]

mod auth;
mod manifests;
mod serve;

use std::collections::BTreeMap;

pub use auth::{IdentityNodes, NodeAuthorizer, NodeTokens, TokenError};
pub use manifests::{Deployment, ManifestError, Manifests, NETNS_ANNOTATION, Pod, Service};
pub use serve::{CaService, LocalControlPlane, Reload, TwoServices, fingerprint, manifest_files};
use xds_client::resources::{self as xds, PortMapping, WorkloadType};

/// The label that puts a namespace in the mesh (`ambient`) or takes a pod out (`none`).
pub use common::k8s::DATAPLANE_MODE_LABEL;
use common::k8s::Enablement;

/// Mesh-wide settings of the computation.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ComputeConfig {
    /// Trust domain of the identities.
    pub trust_domain: String,
    /// Cluster id (also the first part of workload uids).
    pub cluster_id: String,
    /// Root namespace: policies there without a selector are global.
    pub root_namespace: String,
}

impl Default for ComputeConfig {
    fn default() -> Self {
        ComputeConfig {
            trust_domain: "cluster.local".into(),
            cluster_id: "Kubernetes".into(),
            root_namespace: "istio-system".into(),
        }
    }
}

/// What the control plane serves.
#[derive(Debug, Clone, Default)]
pub struct Computed {
    /// One workload per pod.
    pub workloads: Vec<xds::Workload>,
    /// One service per Service.
    pub services: Vec<xds::Service>,
    /// The authorization policies.
    pub policies: Vec<authz::Policy>,
    /// What the policy translation could not honour.
    pub warnings: Vec<authz::Warning>,
}

/// Computes the ambient resources from the manifests.
pub fn compute(m: &Manifests, config: &ComputeConfig) -> Result<Computed, authz::ParseError> {
    let mut out = Computed::default();
    for (i, doc) in m.policy_documents.iter().enumerate() {
        let t = authz::parse_policies(
            doc,
            &format!("AuthorizationPolicy #{}", i + 1),
            &config.root_namespace,
        )?;
        out.policies.extend(t.policies);
        out.warnings.extend(t.warnings);
    }
    let selects = |selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>| {
        !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
    };
    let hostname = |s: &Service| format!("{}.{}.svc.cluster.local", s.name, s.namespace);
    for pod in &m.pods {
        // In the mesh (HBONE) as the node agent decides capture: istio-cni's rules.
        let in_mesh = Enablement::default()
            .admits(
                &pod.namespace,
                &pod.labels,
                &pod.annotations,
                &m.namespaces
                    .get(&pod.namespace)
                    .cloned()
                    .unwrap_or_default(),
            )
            .is_ok();
        let Ok(identity) =
            identity::SpiffeId::istio(&config.trust_domain, &pod.namespace, &pod.service_account)
        else {
            continue; // a name that cannot form an identity cannot be in the mesh
        };
        let deployment = m
            .deployments
            .iter()
            .find(|d| d.namespace == pod.namespace && selects(&d.selector, &pod.labels));
        let (workload_type, workload_name) = match deployment {
            Some(d) => (WorkloadType::Deployment, d.name.clone()),
            None => (WorkloadType::Pod, pod.name.clone()),
        };
        let label = |keys: &[&str]| keys.iter().find_map(|k| pod.labels.get(*k).cloned());
        let canonical_name = label(&[
            "service.istio.io/canonical-name",
            "app.kubernetes.io/name",
            "app",
        ])
        .unwrap_or_else(|| workload_name.clone());
        let canonical_revision = label(&[
            "service.istio.io/canonical-revision",
            "app.kubernetes.io/version",
            "version",
        ])
        .unwrap_or_else(|| "latest".into());
        let authorization_policies = out
            .policies
            .iter()
            .filter(|p| p.scope == authz::Scope::WorkloadSelector)
            .filter(|p| p.namespace == pod.namespace || p.namespace == config.root_namespace)
            .filter(|p| selects(&p.selector, &pod.labels))
            .map(authz::Policy::key)
            .collect();
        let services = m
            .services
            .iter()
            .filter(|s| s.namespace == pod.namespace && selects(&s.selector, &pod.labels))
            .map(|s| {
                let ports = s
                    .ports
                    .iter()
                    .map(|(port, target)| PortMapping {
                        service_port: *port,
                        target_port: *target,
                    })
                    .collect();
                (format!("{}/{}", s.namespace, hostname(s)), ports)
            })
            .collect();
        out.workloads.push(xds::Workload {
            uid: format!("{}//Pod/{}/{}", config.cluster_id, pod.namespace, pod.name),
            name: pod.name.clone(),
            namespace: pod.namespace.clone(),
            addresses: pod.ips.clone(),
            network: String::new(),
            tunnel: if in_mesh {
                xds::Tunnel::Hbone
            } else {
                xds::Tunnel::None
            },
            identity,
            node: pod.node.clone(),
            canonical_name,
            canonical_revision,
            workload_type,
            workload_name,
            authorization_policies,
            healthy: pod.ready,
            cluster_id: config.cluster_id.clone(),
            hostname: String::new(),
            services,
            waypoint: None,
            network_gateway: None,
            network_mode: xds::NetworkMode::Standard,
            locality: Default::default(),
            capacity: 1,
            native_tunnel: false,
            application_tunnel: None,
        });
    }
    for s in &m.services {
        out.services.push(xds::Service {
            name: s.name.clone(),
            namespace: s.namespace.clone(),
            hostname: hostname(s),
            addresses: s
                .cluster_ips
                .iter()
                .map(|ip| (String::new(), *ip))
                .collect(),
            ports: s
                .ports
                .iter()
                .map(|(port, target)| PortMapping {
                    service_port: *port,
                    target_port: *target,
                })
                .collect(),
            subject_alt_names: Vec::new(),
            waypoint: None,
            ..Default::default()
        });
    }
    Ok(out)
}

/// The README's example, compiled and run as a doctest so it stays true.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
