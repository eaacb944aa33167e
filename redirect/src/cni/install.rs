//! Installing the plugin on a node: the binary copied into the runtime's CNI bin directory, and
//! an entry for it chained into the node's first network configuration list, as istio-cni's
//! installer does.
//!
//! The runtime uses the configuration file that sorts first in its directory (`.conflist`,
//! `.conf` or `.json`). [`chain`] appends our entry to that file's `plugins` (a single-plugin
//! `.conf` becomes a `.conflist` of it and ours), writing a new file and renaming it over the
//! old, so the runtime never reads half a file; it does nothing when the entry is already
//! there. The primary CNI may rewrite its file at any time (Calico and Cilium do when they
//! restart): [`keep_chained`] looks again every second and chains again. [`unchain`] removes our
//! entry from every file (handing a node back); a restarting agent does not unchain, which would
//! let pods start uncaptured meanwhile.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Map, Value, json};

/// The plugin's `type`, which is also its file name in the bin directory.
pub const PLUGIN_TYPE: &str = "ztunnel-cni";

/// Why the plugin could not be installed.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    /// A file or directory could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// No network configuration to chain into yet (the primary CNI has not written one).
    #[error("{0}: no CNI network configuration (.conflist, .conf, .json) to chain into")]
    NoConfiguration(PathBuf),
    /// The first configuration is not one (not JSON, no `plugins` or `type`).
    #[error("{path}: not a CNI network configuration: {reason}")]
    BadConfiguration {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> InstallError + '_ {
    move |source| InstallError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Our entry in a configuration list.
pub fn plugin_entry(agent_socket: &Path, kubeconfig: Option<&Path>) -> Value {
    let mut entry =
        json!({"type": PLUGIN_TYPE, "agent_socket": agent_socket.display().to_string()});
    if let Some(path) = kubeconfig {
        entry["kubernetes"] = json!({"kubeconfig": path.display().to_string()});
    }
    entry
}

/// Writes into our `entry` which pods join (`exclude_namespaces`, and `enablement_selectors`
/// when configured; istio-cni's plugin field names), so the plugin decides as the agent does
/// while the agent is down.
pub fn add_enablement(entry: &mut Value, enablement: &common::k8s::Enablement) {
    entry["exclude_namespaces"] = json!(enablement.excluded_namespaces);
    if let Some(selectors) = &enablement.selectors {
        entry["enablement_selectors"] = json!(selectors);
    }
}

/// Copies `binary` into `bin_dir` as [`PLUGIN_TYPE`], mode 0755, through a temporary file
/// renamed into place (a runtime running the old copy is not disturbed).
pub fn install_binary(binary: &Path, bin_dir: &Path) -> Result<PathBuf, InstallError> {
    use std::os::unix::fs::PermissionsExt;
    let target = bin_dir.join(PLUGIN_TYPE);
    let temporary = bin_dir.join(format!(".{PLUGIN_TYPE}.{}.new", std::process::id()));
    std::fs::copy(binary, &temporary).map_err(io(&temporary))?;
    std::fs::set_permissions(&temporary, std::fs::Permissions::from_mode(0o755))
        .map_err(io(&temporary))?;
    std::fs::rename(&temporary, &target).map_err(io(&target))?;
    Ok(target)
}

/// The configuration files of `conf_dir`, in the order the runtime reads them.
fn configurations(conf_dir: &Path) -> Result<Vec<PathBuf>, InstallError> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(conf_dir)
        .map_err(io(conf_dir))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_file()
                && !p
                    .file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with('.'))
                && matches!(
                    p.extension().and_then(|e| e.to_str()),
                    Some("conflist" | "conf" | "json")
                )
        })
        .collect();
    files.sort();
    Ok(files)
}

fn read_json(path: &Path) -> Result<Value, InstallError> {
    let text = std::fs::read(path).map_err(io(path))?;
    serde_json::from_slice(&text).map_err(|e| InstallError::BadConfiguration {
        path: path.to_owned(),
        reason: e.to_string(),
    })
}

/// Writes `value` to `path` through a temporary file renamed into place.
fn write_json(path: &Path, value: &Value) -> Result<(), InstallError> {
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let temporary = path.with_file_name(format!(".{name}.{}.new", std::process::id()));
    let text = serde_json::to_string_pretty(value).unwrap_or_default();
    std::fs::write(&temporary, text).map_err(io(&temporary))?;
    std::fs::rename(&temporary, path).map_err(io(path))
}

fn is_ours(plugin: &Value) -> bool {
    is_type(plugin, PLUGIN_TYPE)
}

fn is_type(plugin: &Value, plugin_type: &str) -> bool {
    plugin.get("type").and_then(Value::as_str) == Some(plugin_type)
}

/// The plugin type istio-cni chains (taken out when the agent takes a node over from it).
pub const ISTIO_CNI_TYPE: &str = "istio-cni";

/// Chains `entry` into the first configuration of `conf_dir`. Returns the file written, or
/// `None` when it already held an entry of ours (replaced by `entry` if it differed).
pub fn chain(conf_dir: &Path, entry: &Value) -> Result<Option<PathBuf>, InstallError> {
    let Some(first) = configurations(conf_dir)?.into_iter().next() else {
        return Err(InstallError::NoConfiguration(conf_dir.to_owned()));
    };
    let mut config = read_json(&first)?;
    let bad = |reason: &str| InstallError::BadConfiguration {
        path: first.clone(),
        reason: reason.to_owned(),
    };
    let is_list = config.get("plugins").is_some();
    if is_list {
        let plugins = config
            .get_mut("plugins")
            .and_then(Value::as_array_mut)
            .ok_or_else(|| bad("plugins is not a list"))?;
        if let Some(held) = plugins.iter_mut().find(|p| is_ours(p)) {
            if held == entry {
                return Ok(None);
            }
            *held = entry.clone();
        } else {
            plugins.push(entry.clone());
        }
        write_json(&first, &config)?;
        return Ok(Some(first));
    }
    // A single plugin: a list of it and ours, under the same name as a .conflist.
    let object = config
        .as_object_mut()
        .ok_or_else(|| bad("not a JSON object"))?;
    if object.get("type").and_then(Value::as_str).is_none() {
        return Err(bad("neither plugins nor type"));
    }
    let mut list = Map::new();
    for key in ["cniVersion", "name"] {
        if let Some(value) = object.get(key) {
            list.insert(key.to_owned(), value.clone());
        }
    }
    let mut primary = object.clone();
    primary.remove("cniVersion");
    primary.remove("name");
    list.insert("plugins".into(), json!([primary, entry.clone()]));
    let target = first.with_extension("conflist");
    write_json(&target, &Value::Object(list))?;
    if target != first {
        std::fs::remove_file(&first).map_err(io(&first))?;
    }
    Ok(Some(target))
}

/// Removes every entry of ours from the configurations of `conf_dir`; returns the files
/// rewritten.
pub fn unchain(conf_dir: &Path) -> Result<Vec<PathBuf>, InstallError> {
    unchain_type(conf_dir, PLUGIN_TYPE)
}

/// Removes every entry of type `plugin_type` (ours, or [`ISTIO_CNI_TYPE`] when taking a node
/// over) from the configurations of `conf_dir`; returns the files rewritten.
pub fn unchain_type(conf_dir: &Path, plugin_type: &str) -> Result<Vec<PathBuf>, InstallError> {
    let mut changed = Vec::new();
    for path in configurations(conf_dir)? {
        let Ok(mut config) = read_json(&path) else {
            continue;
        };
        let Some(plugins) = config.get_mut("plugins").and_then(Value::as_array_mut) else {
            continue;
        };
        let before = plugins.len();
        plugins.retain(|p| !is_type(p, plugin_type));
        if plugins.len() != before {
            write_json(&path, &config)?;
            changed.push(path);
        }
    }
    Ok(changed)
}

/// The file name of the kubeconfig the installer writes for the plugin in the CNI
/// configuration directory (sorting last, so the runtime never takes it for a network
/// configuration; it does not end in `.conf`, `.conflist` or `.json` anyway).
pub const KUBECONFIG_NAME: &str = "ZZZ-ztunnel-cni-kubeconfig";

/// A kubeconfig for the plugin: the API server at `server` (`https://HOST:PORT`), trusted
/// through `ca_pem`, with a bearer `token`.
pub fn plugin_kubeconfig(server: &str, ca_pem: &str, token: &str) -> String {
    use base64::Engine as _;
    let ca = base64::engine::general_purpose::STANDARD.encode(ca_pem);
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: local\n  cluster:\n    server: {server}\n    certificate-authority-data: {ca}\nusers:\n- name: ztunnel-cni\n  user:\n    token: {}\ncontexts:\n- name: ztunnel-cni-context\n  context:\n    cluster: local\n    user: ztunnel-cni\ncurrent-context: ztunnel-cni-context\n",
        token.trim()
    )
}

/// Writes `text` as the plugin's kubeconfig in `conf_dir` (mode 0600, through a temporary
/// file renamed into place) when it differs from what is there; returns its path and whether
/// it was written.
pub fn write_kubeconfig(conf_dir: &Path, text: &str) -> Result<(PathBuf, bool), InstallError> {
    let path = conf_dir.join(KUBECONFIG_NAME);
    if std::fs::read_to_string(&path).is_ok_and(|old| old == text) {
        return Ok((path, false));
    }
    let temporary = conf_dir.join(format!(".{KUBECONFIG_NAME}.{}.new", std::process::id()));
    common::fs::write_private(&temporary, text)
        .and_then(|()| std::fs::rename(&temporary, &path))
        .map_err(|e| {
            let _ = std::fs::remove_file(&temporary);
            InstallError::Io {
                path: path.clone(),
                source: e,
            }
        })?;
    Ok((path, true))
}

/// Chains `entry` now and again whenever the first configuration loses it, every `interval`,
/// forever (a thread's body), calling `each` first every time (to refresh the plugin's
/// kubeconfig). Failures are logged and tried again.
pub fn keep_chained(
    conf_dir: &Path,
    entry: &Value,
    interval: Duration,
    mut each: impl FnMut(),
) -> ! {
    loop {
        each();
        match chain(conf_dir, entry) {
            Ok(Some(file)) => {
                tracing::info!(file = %file.display(), "CNI: ztunnel-cni chained into the node's network configuration")
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, "CNI: cannot chain ztunnel-cni; trying again"),
        }
        std::thread::sleep(interval);
    }
}
