//! `ztunnel proxy`: the node proxy. Today dedicated mode, fed by local manifests and certificate
//! files; the proxy itself lives in the `proxy` crate, this file only loads configuration.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use controlplane::{ComputeConfig, Manifests, compute};
use proxy::dedicated::{DedicatedConfig, StaticCert};
use proxy::state::{State, StateStore};
use tracing::{info, warn};
use xds_client::resources::Address;

use super::Error;
use crate::cli::ProxyArgs;

pub(crate) async fn run(args: ProxyArgs) -> Result<(), Error> {
    if args.mode != "dedicated" {
        return Err(Error::Flag {
            flag: "--mode",
            value: args.mode,
            reason:
                "shared mode is not available yet (issue 10 is building it); use --mode dedicated"
                    .into(),
        });
    }
    let flag = |flag: &'static str, reason: &str| Error::Flag {
        flag,
        value: String::new(),
        reason: reason.to_owned(),
    };
    let workload = args.workload.clone().ok_or_else(|| {
        flag(
            "--workload",
            "dedicated mode needs the workload (NS/NAME/SA, or PROXY_WORKLOAD_INFO)",
        )
    })?;
    let [namespace, name, service_account] = parse_workload(&workload)?;
    let manifests = args.local_manifests.clone().ok_or_else(|| {
        flag(
            "--local-manifests",
            "dedicated mode reads its workloads and policies from local manifests (xDS is not wired yet)",
        )
    })?;
    let (Some(cert), Some(key), Some(ca)) = (&args.cert, &args.key, &args.ca) else {
        return Err(flag(
            "--cert",
            "dedicated mode needs the workload's certificate files (--cert, --key, --ca)",
        ));
    };
    let chain = identity::pem::read_certs(cert)?;
    let key = identity::pem::read_key(key)?;
    let roots = Arc::new(identity::pem::read_roots(ca)?);
    let id = identity::tls::peer_spiffe_id(&chain)?;
    let cert = Arc::new(identity::WorkloadCert::new(
        id.clone(),
        identity::Credentials { chain, key },
    )?);

    let mut compute_config = ComputeConfig::default();
    compute_config.trust_domain = args.trust_domain.clone();
    compute_config.cluster_id = args.cluster_id.clone();
    let store = Arc::new(StateStore::new(State::new(&compute_config.root_namespace)));
    load(&store, &manifests, &compute_config)?;
    let state = store.snapshot();
    let local = state
        .workload_for_pod(&namespace, &name, &service_account, &args.node_name)
        .cloned()
        .ok_or_else(|| Error::Flag {
            flag: "--workload",
            value: workload.clone(),
            reason: format!(
                "no single pod {namespace}/{name} with service account {service_account}{} in {}",
                if args.node_name.is_empty() {
                    String::new()
                } else {
                    format!(" on node {}", args.node_name)
                },
                manifests.display()
            ),
        })?;
    if local.identity != id {
        return Err(Error::Flag {
            flag: "--cert",
            value: cert_path(&args),
            reason: format!(
                "the certificate is for {id}, but the workload's identity is {}",
                local.identity
            ),
        });
    }
    let mut config = DedicatedConfig::new(&local.uid);
    config.mark = Some(args.packet_mark);
    let (bound, running) =
        proxy::dedicated::start(config, store.clone(), StaticCert { cert, roots })
            .await
            .map_err(|e| Error::Io {
                what: "starting the proxy".into(),
                source: std::io::Error::other(e),
            })?;
    info!(
        workload = %local.uid, identity = %id, outbound = %bound.outbound, inbound = %bound.inbound,
        readiness = %bound.readiness, "proxy ready (dedicated mode)"
    );
    tokio::spawn(watch(store, manifests, compute_config));
    let drained = running
        .run_until(shutdown_signal(), args.connection_termination_deadline)
        .await;
    info!(cut = drained.cut, "proxy stopped");
    Ok(())
}

/// Resolves on SIGTERM or Ctrl-C.
async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(term) => term,
        Err(e) => {
            warn!(error = %e, "cannot watch SIGTERM; only Ctrl-C stops the proxy");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => info!("SIGTERM: draining"),
        _ = tokio::signal::ctrl_c() => info!("Ctrl-C: draining"),
    }
}

fn cert_path(args: &ProxyArgs) -> String {
    args.cert
        .as_ref()
        .map(|p| p.display().to_string())
        .unwrap_or_default()
}

fn parse_workload(text: &str) -> Result<[String; 3], Error> {
    let parts: Vec<&str> = text.split('/').collect();
    match parts.as_slice() {
        [ns, name, sa] if !ns.is_empty() && !name.is_empty() && !sa.is_empty() => {
            Ok([ns.to_string(), name.to_string(), sa.to_string()])
        }
        _ => Err(Error::Flag {
            flag: "--workload",
            value: text.to_owned(),
            reason: "expected NAMESPACE/NAME/SERVICE_ACCOUNT".into(),
        }),
    }
}

/// Reads the manifests (a file, or the `*.yaml`/`*.yml` files of a directory) and replaces the
/// store's workloads, services and policies with what they describe; marks it synced. Any
/// unreadable or malformed file is an error and changes nothing.
fn load(store: &StateStore, path: &Path, config: &ComputeConfig) -> Result<(), Error> {
    let mut manifests = Manifests::default();
    for file in manifest_files(path)? {
        let text = std::fs::read_to_string(&file).map_err(|source| Error::Io {
            what: format!("cannot read {}", file.display()),
            source,
        })?;
        manifests
            .add(&text, &file.display().to_string())
            .map_err(|e| Error::Io {
                what: "local manifests".into(),
                source: std::io::Error::other(e),
            })?;
    }
    let computed = compute(&manifests, config)?;
    // Exactly what xDS would deliver: selector policies are named by the workloads they select.
    let policies = computed
        .policies
        .iter()
        .map(|p| authz::proto::from_proto(&authz::proto::to_proto(p)))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Error::Io {
            what: "local manifests".into(),
            source: std::io::Error::other(e),
        })?;
    store.update(|state| {
        let mut next = State::new(&config.root_namespace);
        for w in computed.workloads {
            next.insert_address(Address::Workload(w));
        }
        for s in computed.services {
            next.insert_address(Address::Service(s));
        }
        for p in policies {
            next.insert_policy(p);
        }
        next.set_synced(true);
        *state = next;
    });
    Ok(())
}

fn manifest_files(path: &Path) -> Result<Vec<PathBuf>, Error> {
    if !path.exists() {
        return Err(Error::Io {
            what: format!("cannot read the manifests at {}", path.display()),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        });
    }
    Ok(controlplane::manifest_files(path))
}

/// Reloads the manifests when a file changes (checked every 250 ms); a broken edit is logged and
/// the last good state kept.
async fn watch(store: Arc<StateStore>, path: PathBuf, config: ComputeConfig) {
    let mut last = controlplane::fingerprint(&path);
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let now = controlplane::fingerprint(&path);
        if now == last {
            continue;
        }
        last = now;
        match load(&store, &path, &config) {
            Ok(()) => info!(manifests = %path.display(), "local manifests reloaded"),
            Err(e) => {
                warn!(error = %e, "local manifests not reloaded; keeping the last good state")
            }
        }
    }
}
