//! Local manifests as the proxy's source of workloads and policies: read, computed as the control
//! plane would, and watched.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use controlplane::{ComputeConfig, Manifests, compute};
use proxy::state::{State, StateStore};
use tracing::{info, warn};
use xds_client::resources::Address;

use super::Error;

/// Reads the manifests (a file, or the `*.yaml`/`*.yml` files of a directory) and replaces the
/// store's workloads, services and policies with what they describe; marks it synced. Any
/// unreadable or malformed file is an error and changes nothing.
pub(super) fn load(store: &StateStore, path: &Path, config: &ComputeConfig) -> Result<(), Error> {
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
pub(super) async fn watch(store: Arc<StateStore>, path: PathBuf, config: ComputeConfig) {
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
