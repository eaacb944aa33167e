//! `ztunnel node-agent`: capture this node's ambient pods.

use std::path::{Path, PathBuf};
use std::time::Duration;

use controlplane::{Manifests, NETNS_ANNOTATION};
use redirect::agent::{Handoff, NoHandoff, NodeAgent, PodInfo, PodSource};
use redirect::k8s::KubeSource;
use redirect::zds::ZdsServer;
use redirect::{Backend, RuleSet};

use super::Error;
use crate::cli::NodeAgentArgs;

/// Pods from a directory of manifests (the same parser as the local control plane).
struct ManifestSource(PathBuf);

impl PodSource for ManifestSource {
    fn pods(&self) -> Result<Vec<PodInfo>, String> {
        let mut manifests = Manifests::default();
        let mut files: Vec<PathBuf> = std::fs::read_dir(&self.0)
            .map_err(|e| format!("{}: {e}", self.0.display()))?
            .flatten()
            .map(|e| e.path())
            .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")))
            .collect();
        files.sort();
        for file in files {
            let Ok(text) = std::fs::read_to_string(&file) else {
                continue;
            };
            let mut attempt = manifests.clone();
            match attempt.add(&text, &file.display().to_string()) {
                Ok(()) => manifests = attempt,
                Err(e) => tracing::warn!(error = %e, "node agent: skipped a manifest"),
            }
        }
        Ok(manifests
            .pods
            .iter()
            .map(|p| PodInfo {
                uid: p.uid.clone(),
                name: p.name.clone(),
                namespace: p.namespace.clone(),
                service_account: p.service_account.clone(),
                labels: p.labels.clone(),
                namespace_labels: manifests
                    .namespaces
                    .get(&p.namespace)
                    .cloned()
                    .unwrap_or_default(),
                node: p.node.clone(),
                netns: p
                    .annotations
                    .get(NETNS_ANNOTATION)
                    .map(|s| Path::new(s).to_owned()),
                ips: p.ips.clone(),
            })
            .collect())
    }
}

pub(crate) async fn run(args: NodeAgentArgs) -> Result<(), Error> {
    let backend: Backend = args.backend.parse().expect("clap restricts the values");
    if args.source == "kube" {
        let source = KubeSource::connect(&args.node)
            .await
            .map_err(|e| Error::Flag {
                flag: "--source",
                value: args.source.clone(),
                reason: format!(
                    "cannot configure the Kubernetes client (KUBECONFIG, ~/.kube/config or in-cluster): {e}"
                ),
            })?;
        return with_handoff(&args, backend, source).await;
    }
    match args.source.split_once(':') {
        Some(("manifests", dir)) if !dir.is_empty() => {
            let source = ManifestSource(PathBuf::from(dir));
            with_handoff(&args, backend, source).await
        }
        _ => Err(Error::Flag {
            flag: "--source",
            value: args.source,
            reason: "expected manifests:DIR or kube".into(),
        }),
    }
}

async fn with_handoff<S: PodSource + 'static>(
    args: &NodeAgentArgs,
    backend: Backend,
    source: S,
) -> Result<(), Error> {
    tracing::info!(node = %args.node, backend = %args.backend, source = %args.source, "node agent running");
    match &args.zds_socket {
        None => {
            drive(NodeAgent::new(
                &args.node,
                backend,
                RuleSet::default(),
                source,
                NoHandoff,
            ))
            .await
        }
        Some(path) => {
            let server = ZdsServer::bind(path).map_err(|source| Error::Io {
                what: format!("ZDS socket {}", path.display()),
                source,
            })?;
            tracing::info!(socket = %path.display(), "serving the netns handoff (ZDS)");
            drive(NodeAgent::new(
                &args.node,
                backend,
                RuleSet::default(),
                source,
                server,
            ))
            .await
        }
    }
}

async fn drive<S: PodSource + 'static, H: Handoff + 'static>(
    agent: NodeAgent<S, H>,
) -> Result<(), Error> {
    tokio::task::spawn_blocking(move || agent.run(Duration::from_millis(250)))
        .await
        .map_err(|e| Error::Io {
            what: "node agent".into(),
            source: std::io::Error::other(e),
        })
}
