//! `ztunnel node-agent`: capture this node's ambient pods.

use crate::args::CaptureBackend;
use clap::Args;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::k8s::parse_enablement_selectors;
use controlplane::{Manifests, NETNS_ANNOTATION};
use redirect::agent::{
    AgentStatus, Enablement, HandBackError, Handoff, NetnsLookup, NoHandoff, NodeAgent, PodInfo,
    PodSource,
};
use redirect::cni::install::{
    ISTIO_CNI_TYPE, KUBECONFIG_NAME, add_enablement, chain, install_binary, keep_chained,
    plugin_entry, plugin_kubeconfig, unchain, unchain_type, write_kubeconfig,
};
use redirect::cni::{CniBoard, CniServer, CniServerConfig};
use redirect::host::ProbeSnat;
use redirect::k8s::KubeSource;
use redirect::zds::{ZdsConfig, ZdsServer};
use redirect::{Backend, RuleSet};

use super::Error;

#[derive(Debug, Args)]
pub(crate) struct NodeAgentArgs {
    /// Where pods come from: `manifests:DIR` (the local mesh's manifests; a pod's network
    /// namespace is given by its `ambient.local/netns` annotation, else found by its IP) or `kube`
    /// (watch the API server configured by KUBECONFIG, ~/.kube/config or the in-cluster account;
    /// namespaces found by pod IP).
    #[arg(long, value_name = "SOURCE")]
    pub(crate) source: String,
    /// This node's name (pods' `spec.nodeName`; a DaemonSet passes it as NODE_NAME).
    #[arg(long, value_name = "NAME", env = "NODE_NAME")]
    pub(crate) node: String,
    /// Rule engine.
    #[arg(long, value_enum, default_value_t = CaptureBackend::Iptables)]
    pub(crate) backend: CaptureBackend,
    /// Also hand each captured pod's network namespace to the proxy over Istio's ZDS protocol,
    /// listening on this Unix socket (Istio's default: /var/run/ztunnel/ztunnel.sock).
    #[arg(long, value_name = "PATH")]
    pub(crate) zds_socket: Option<PathBuf>,
    /// A user besides root whose processes may connect to the ZDS socket (repeat for several;
    /// comma-separated in the variable). The socket file is mode 0600 and every peer's
    /// credentials (SO_PEERCRED) are checked: anyone else is refused and logged, since the
    /// socket hands out pods' network namespaces.
    #[arg(
        long,
        value_name = "UID",
        env = "ZDS_ALLOWED_UIDS",
        value_delimiter = ','
    )]
    pub(crate) zds_allowed_uid: Vec<u32>,
    /// Namespaces whose pods are never captured, even labelled (istio-cni's setting; an empty
    /// value excludes none). Without the flag or EXCLUDE_NAMESPACES, istio-cni's chart's
    /// EXCLUDED_NAMESPACES is read; without any, kube-system.
    #[arg(
        long,
        value_name = "NAMESPACES",
        env = "EXCLUDE_NAMESPACES",
        value_delimiter = ','
    )]
    pub(crate) exclude_namespaces: Option<Vec<String>>,
    /// Which pods join, as istio-cni's enablement selectors (its chart's
    /// AMBIENT_ENABLEMENT_SELECTOR): a YAML or JSON list of `{podSelector, namespaceSelector}`
    /// Kubernetes label selectors; a pod joins when any entry's two selectors match it and its
    /// namespace (excluded namespaces and sidecars' pods never do). Default: the pod labelled
    /// istio.io/dataplane-mode=ambient, or its namespace labelled so and the pod not `none`.
    #[arg(
        long,
        value_name = "YAML",
        env = "AMBIENT_ENABLEMENT_SELECTOR",
        allow_hyphen_values = true
    )]
    pub(crate) enablement_selectors: Option<String>,
    /// Serve the CNI plugin (`ztunnel-cni`) on this Unix socket (mode 0600, root only): a new
    /// pod's network setup then waits until the agent has captured it and the proxy
    /// acknowledged it (the plugin's default: /var/run/ztunnel/cni.sock).
    #[arg(long, value_name = "PATH", env = "ZTUNNEL_CNI_SOCKET")]
    pub(crate) cni_socket: Option<PathBuf>,
    /// Install the CNI plugin on this node: copy `ztunnel-cni` into BIN_DIR and chain it into
    /// the first network configuration in CONF_DIR, chaining again whenever the primary CNI
    /// rewrites it (needs --cni-socket: a chained plugin with no agent behind it fails every new
    /// pod of the mesh). Paths as this process sees them (in a DaemonSet, the host's
    /// directories mounted, e.g. /host/opt/cni/bin,/host/etc/cni/net.d).
    #[arg(long, value_name = "BIN_DIR,CONF_DIR", env = "ZTUNNEL_INSTALL_CNI")]
    pub(crate) install_cni: Option<String>,
    /// The kubeconfig --install-cni gives the plugin (copied into CONF_DIR), with which it tells
    /// pods outside the mesh apart while the agent is down. Default: in a cluster, one made
    /// from this pod's service account (server, CA, token; rewritten when the token rotates);
    /// elsewhere none (then, while the agent is down, every pod's network setup fails).
    #[arg(long, value_name = "PATH")]
    pub(crate) cni_kubeconfig: Option<PathBuf>,
    /// The plugin binary --install-cni copies (default: `ztunnel-cni` beside this binary).
    #[arg(long, value_name = "PATH")]
    pub(crate) cni_plugin: Option<PathBuf>,
    /// Where the host's root file system is mounted in this process's view (a DaemonSet mounts
    /// it at /host): the network-namespace paths the runtime passes to the plugin, and the
    /// host's `proc` and `var/run/netns` where running pods' namespaces are looked for, are read
    /// under it. With `--source kube` a running pod's namespace is the one of the processes
    /// whose cgroup names the pod's uid, checked to hold the pod's IP; with manifests, the one
    /// namespace that holds the pod's IP.
    #[arg(long, value_name = "DIR", env = "HOST_ROOT", default_value = "/")]
    pub(crate) host_root: PathBuf,
    /// Capture each pod's DNS (UDP and TCP to port 53) to the node proxy's DNS proxy on port
    /// 15053, as istio-cni does by default (AMBIENT_DNS_CAPTURE, its chart's setting).
    #[arg(long, env = "AMBIENT_DNS_CAPTURE", default_value_t = true, action = clap::ArgAction::Set, value_name = "BOOL")]
    pub(crate) dns_capture: bool,
    /// Rewrite the source of connections this node opens to captured pods (the kubelet's
    /// probes) to 169.254.7.127, which the pods' rules let through to the app, as istio-cni
    /// does: iptables or nftables rules in this process's network namespace (the node's, on the
    /// host network), kept naming exactly the captured pods and removed on exit (SIGTERM,
    /// SIGINT). Off unless asked for: it changes the node's own rules.
    #[arg(long, env = "KUBELET_PROBE_SNAT")]
    pub(crate) kubelet_probe_snat: bool,
    /// Serve readiness here (`GET /healthz/ready` or `/readyz`: 200 once a pass completed with
    /// the pod source's full view, else 503 with the reason), e.g. `[::]:8000` (both
    /// families) in a DaemonSet; IP:PORT, `[::]:PORT` or `localhost:PORT`.
    #[arg(long, value_name = "ADDR")]
    pub(crate) health_addr: Option<super::ListenAddr>,
    /// Serve Prometheus metrics here (`GET /metrics`: pods captured, captures and releases and
    /// their failures, CNI requests by outcome, ZDS connections, refused peers), e.g.
    /// `[::]:15014` (as --health-addr).
    #[arg(long, value_name = "ADDR")]
    pub(crate) metrics_addr: Option<super::ListenAddr>,
    /// Take the node over from istio-cni: at start, its node rules (the probe chain, its
    /// ipsets, its nftables table) and its chained plugin (in --install-cni's CONF_DIR) are
    /// removed, and each pod's istio-cni rules are removed before the pod is captured with
    /// ours, so no pod holds two rule sets. Stop istio-cni's DaemonSet on the node first.
    #[arg(long, env = "TAKE_OVER_ISTIO_CNI")]
    pub(crate) take_over: bool,
    /// Hand the node back and exit: our plugin unchained from --install-cni's CONF_DIR, our
    /// kubeconfig and node rules removed, and our rules removed from every pod of the node the
    /// source lists; then start istio-cni, which captures the pods with its own.
    #[arg(long)]
    pub(crate) hand_back: bool,
}

/// Pods from a directory of manifests (the same parser as the local control plane).
///
/// A file that cannot be read or parsed (a typo, a half-written save) makes the whole pass an
/// error, as a Kubernetes source that has not listed yet is: the agent then changes nothing, so
/// a broken file never releases the pods it describes.
struct ManifestSource(PathBuf);

impl PodSource for ManifestSource {
    fn pods(&self) -> Result<Vec<PodInfo>, String> {
        let mut manifests = Manifests::default();
        let mut files: Vec<PathBuf> = std::fs::read_dir(&self.0)
            .map_err(|e| format!("{}: {e}", self.0.display()))?
            .map(|e| e.map(|e| e.path()))
            .collect::<Result<_, _>>()
            .map_err(|e| format!("{}: {e}", self.0.display()))?;
        files.retain(|p| {
            p.is_file() && matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml"))
        });
        files.sort();
        for file in files {
            let text = std::fs::read_to_string(&file)
                .map_err(|e| format!("{}: cannot read: {e}", file.display()))?;
            manifests
                .add(&text, &file.display().to_string())
                .map_err(|e| e.to_string())?;
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
                annotations: p.annotations.clone(),
            })
            .collect())
    }
}

/// The variable istio-cni's chart sets for the same list (its ConfigMap's `EXCLUDED_NAMESPACES`),
/// read when neither the flag nor `EXCLUDE_NAMESPACES` is given.
const CHART_EXCLUDED_NAMESPACES: &str = "EXCLUDED_NAMESPACES";

/// Which pods join the mesh: istio-cni's rules, with `--exclude-namespaces` (or
/// `EXCLUDE_NAMESPACES`, or istio-cni's chart's `EXCLUDED_NAMESPACES`; default `kube-system`).
fn enablement(args: &NodeAgentArgs) -> Result<Enablement, Error> {
    let mut enablement = excluding(&args.exclude_namespaces, |name| std::env::var(name).ok());
    if let Some(text) = args
        .enablement_selectors
        .as_deref()
        .filter(|t| !t.trim().is_empty())
    {
        enablement.selectors =
            Some(
                parse_enablement_selectors(text).map_err(|reason| Error::Flag {
                    flag: "--enablement-selectors",
                    value: text.to_owned(),
                    reason,
                })?,
            );
    }
    Ok(enablement)
}

/// [`enablement`] with the environment given.
fn excluding(flag: &Option<Vec<String>>, env: impl Fn(&str) -> Option<String>) -> Enablement {
    let names: Vec<String> = match flag {
        Some(names) => names.clone(),
        None => match env(CHART_EXCLUDED_NAMESPACES) {
            Some(list) => list.split(',').map(|n| n.trim().to_owned()).collect(),
            None => return Enablement::default(),
        },
    };
    Enablement {
        excluded_namespaces: names.into_iter().filter(|n| !n.is_empty()).collect(),
        ..Enablement::default()
    }
}

pub(crate) async fn run(args: NodeAgentArgs) -> Result<(), Error> {
    let backend: Backend = args.backend.into();
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

/// `--install-cni BIN_DIR,CONF_DIR`.
fn install_dirs(args: &NodeAgentArgs) -> Result<Option<(PathBuf, PathBuf)>, Error> {
    let Some(value) = &args.install_cni else {
        return Ok(None);
    };
    let bad = |reason: &str| Error::Flag {
        flag: "--install-cni",
        value: value.clone(),
        reason: reason.into(),
    };
    let (bin, conf) = value
        .split_once(',')
        .filter(|(b, c)| !b.is_empty() && !c.is_empty())
        .ok_or_else(|| bad("expected BIN_DIR,CONF_DIR"))?;
    if args.cni_socket.is_none() && !args.hand_back {
        return Err(bad(
            "needs --cni-socket: a chained plugin with no agent behind it would fail every new pod of the mesh",
        ));
    }
    Ok(Some((PathBuf::from(bin), PathBuf::from(conf))))
}

/// Where a pod's service account is mounted.
const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// The plugin's kubeconfig: a copy of `from`, or made from the in-cluster service account;
/// `None` when neither exists.
fn plugin_kubeconfig_text(from: Option<&Path>) -> Option<Result<String, String>> {
    if let Some(path) = from {
        return Some(std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display())));
    }
    let host = std::env::var("KUBERNETES_SERVICE_HOST").ok()?;
    let port = std::env::var("KUBERNETES_SERVICE_PORT").unwrap_or_else(|_| "443".into());
    let dir = Path::new(SERVICE_ACCOUNT_DIR);
    let read = |name: &str| {
        std::fs::read_to_string(dir.join(name))
            .map_err(|e| format!("{}: {e}", dir.join(name).display()))
    };
    let server = match host.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V6(ip)) => format!("https://[{ip}]:{port}"),
        _ => format!("https://{host}:{port}"),
    };
    Some(read("token").and_then(|token| Ok(plugin_kubeconfig(&server, &read("ca.crt")?, &token))))
}

/// Serves the CNI socket when asked to, and installs the plugin (only once the socket serves).
fn serve_cni(args: &NodeAgentArgs) -> Result<Option<(Arc<CniBoard>, CniServer)>, Error> {
    let install = install_dirs(args)?;
    let Some(socket) = &args.cni_socket else {
        return Ok(None);
    };
    let board = Arc::new(CniBoard::default());
    let mut config = CniServerConfig::default();
    config.host_root = args.host_root.clone();
    let server = CniServer::bind(socket, config, board.clone()).map_err(|source| Error::Io {
        what: format!("CNI socket {}", socket.display()),
        source,
    })?;
    tracing::info!(socket = %socket.display(), host_root = %args.host_root.display(), "serving the CNI plugin");
    if let Some((bin_dir, conf_dir)) = install {
        let binary = match &args.cni_plugin {
            Some(path) => path.clone(),
            None => std::env::current_exe()
                .map_err(|source| Error::Io {
                    what: "this binary's path".into(),
                    source,
                })?
                .with_file_name("ztunnel-cni"),
        };
        let installed = install_binary(&binary, &bin_dir).map_err(|e| Error::Flag {
            flag: "--install-cni",
            value: bin_dir.display().to_string(),
            reason: e.to_string(),
        })?;
        let kubeconfig_text = {
            let from = args.cni_kubeconfig.clone();
            move || plugin_kubeconfig_text(from.as_deref())
        };
        let kubeconfig = match kubeconfig_text() {
            Some(Ok(text)) => {
                let (path, _) = write_kubeconfig(&conf_dir, &text).map_err(|e| Error::Flag {
                    flag: "--install-cni",
                    value: conf_dir.display().to_string(),
                    reason: e.to_string(),
                })?;
                Some(path)
            }
            Some(Err(reason)) => {
                return Err(Error::Flag {
                    flag: "--cni-kubeconfig",
                    value: args
                        .cni_kubeconfig
                        .as_ref()
                        .map(|p| p.display().to_string())
                        .unwrap_or_else(|| "(in-cluster)".into()),
                    reason,
                });
            }
            None => {
                tracing::warn!(
                    "CNI: no kubeconfig for the plugin (not in a cluster, no --cni-kubeconfig): while the agent is down, every pod's network setup fails"
                );
                None
            }
        };
        // The plugin runs on the host: the path as the host sees it.
        let on_host = kubeconfig.as_ref().map(|path| {
            path.strip_prefix(&args.host_root)
                .map(|rest| Path::new("/").join(rest))
                .unwrap_or_else(|_| path.clone())
        });
        let mut entry = plugin_entry(socket, on_host.as_deref());
        add_enablement(&mut entry, &enablement(args)?);
        // Chained once here, so a configuration that cannot be chained stops the start.
        let chained = chain(&conf_dir, &entry).map_err(|e| Error::Flag {
            flag: "--install-cni",
            value: conf_dir.display().to_string(),
            reason: e.to_string(),
        })?;
        tracing::info!(binary = %installed.display(), conf_dir = %conf_dir.display(), chained = ?chained, "CNI plugin installed");
        std::thread::spawn(move || {
            let dir = conf_dir.clone();
            keep_chained(&conf_dir, &entry, Duration::from_secs(1), move || {
                // A rotated token is written again (the plugin reads it on each ADD).
                if let Some(Ok(text)) = kubeconfig_text()
                    && let Err(e) = write_kubeconfig(&dir, &text)
                {
                    tracing::warn!(error = %e, "CNI: cannot refresh the plugin's kubeconfig");
                }
            })
        });
    }
    Ok(Some((board, server)))
}

/// Serves `--health-addr` and `--metrics-addr` (each on the current runtime).
async fn serve_status(
    args: &NodeAgentArgs,
    status: Arc<AgentStatus>,
    extra: Vec<Arc<dyn Fn() -> String + Send + Sync>>,
) -> Result<(), Error> {
    use proxy::admin::{Request, Response, serve};
    let bind = |addr: super::ListenAddr, flag: &'static str| async move {
        super::listen_all(addr, false)
            .await
            .map_err(|e| Error::Flag {
                flag,
                value: addr.to_string(),
                reason: e.to_string(),
            })
    };
    if let Some(addr) = args.health_addr {
        let listeners = bind(addr, "--health-addr").await?;
        let status = status.clone();
        let handler: proxy::admin::Handler = Arc::new(move |r: &Request| match r.path.as_str() {
            "/healthz/ready" | "/readyz" if status.synced() => Response::text(200, "ready\n"),
            "/healthz/ready" | "/readyz" => Response::text(
                503,
                "not ready: the pod source has not given its full view yet\n",
            ),
            path => Response::not_found(path),
        });
        for listener in listeners {
            tokio::spawn(serve(listener, handler.clone()));
        }
    }
    if let Some(addr) = args.metrics_addr {
        let listeners = bind(addr, "--metrics-addr").await?;
        let handler: proxy::admin::Handler = Arc::new(move |r: &Request| match r.path.as_str() {
            "/metrics" | "/stats/prometheus" => {
                let mut text = status.render();
                for render in &extra {
                    text.push_str(&render());
                }
                Response {
                    status: 200,
                    content_type: "text/plain; version=0.0.4",
                    body: text,
                }
            }
            path => Response::not_found(path),
        });
        for listener in listeners {
            tokio::spawn(serve(listener, handler.clone()));
        }
    }
    Ok(())
}

async fn with_handoff<S: PodSource + 'static>(
    args: &NodeAgentArgs,
    backend: Backend,
    source: S,
) -> Result<(), Error> {
    match &args.zds_socket {
        None => {
            let agent = NodeAgent::new(&args.node, backend, rules(args), source, NoHandoff);
            configure_and_run(agent, args, backend, Vec::new()).await
        }
        Some(path) => {
            let mut config = ZdsConfig::default();
            config.allowed_uids = args.zds_allowed_uid.clone();
            let server = ZdsServer::bind_with(path, config).map_err(|source| Error::Io {
                what: format!("ZDS socket {}", path.display()),
                source,
            })?;
            tracing::info!(socket = %path.display(), allowed_uids = ?args.zds_allowed_uid, "serving the netns handoff (ZDS) to root and the allowed users");
            let zds = server.clone();
            let extra: Vec<Render> = vec![Arc::new(move || zds.render())];
            let agent = NodeAgent::new(&args.node, backend, rules(args), source, server);
            configure_and_run(agent, args, backend, extra).await
        }
    }
}

/// The pods' capture rules: Istio's, DNS capture per `--dns-capture`.
fn rules(args: &NodeAgentArgs) -> RuleSet {
    let mut rules = RuleSet::default();
    if !args.dns_capture {
        rules.dns_port = None;
    }
    rules
}

/// More Prometheus text for `--metrics-addr`.
type Render = Arc<dyn Fn() -> String + Send + Sync>;

/// Applies the flags to `agent`, then hands the node back (`--hand-back`) or runs it.
async fn configure_and_run<S: PodSource + 'static, H: Handoff + 'static>(
    agent: NodeAgent<S, H>,
    args: &NodeAgentArgs,
    backend: Backend,
    mut extra: Vec<Render>,
) -> Result<(), Error> {
    let root = args.host_root.clone();
    let lookup = if args.source == "kube" {
        NetnsLookup::ByUid { root }
    } else {
        NetnsLookup::ByIp { root }
    };
    let mut agent = agent
        .with_enablement(enablement(args)?)
        .with_netns_lookup(lookup)
        .with_takeover(args.take_over);
    if args.kubelet_probe_snat || args.hand_back {
        agent = agent.with_probe_snat(ProbeSnat::new(backend));
    }
    if args.hand_back && args.take_over {
        return Err(Error::Flag {
            flag: "--hand-back",
            value: "with --take-over".into(),
            reason: "taking the node over and handing it back at once means nothing; choose one"
                .into(),
        });
    }
    if args.hand_back {
        return hand_back(agent, args).await;
    }
    if args.take_over {
        take_over_node(args)?;
    }
    tracing::info!(node = %args.node, backend = %args.backend, source = %args.source, "node agent running");
    if let Some((board, server)) = serve_cni(args)? {
        extra.push(Arc::new(move || server.render()));
        agent = agent.with_cni(board);
    }
    drive(agent, args, extra).await
}

/// `--take-over`: istio-cni's node rules and chained plugin out, once, before anything runs.
fn take_over_node(args: &NodeAgentArgs) -> Result<(), Error> {
    let own = PathBuf::from(format!("/proc/{}/ns/net", std::process::id()));
    let removed = redirect::takeover::remove_istio_host_rules(&own).map_err(|e| Error::Flag {
        flag: "--take-over",
        value: "node rules".into(),
        reason: e.to_string(),
    })?;
    tracing::info!(removed = ?removed, "took the node over from istio-cni: its node rules removed");
    if let Some((_, conf_dir)) = install_dirs(args)? {
        let files = unchain_type(&conf_dir, ISTIO_CNI_TYPE).map_err(|e| Error::Flag {
            flag: "--take-over",
            value: conf_dir.display().to_string(),
            reason: e.to_string(),
        })?;
        tracing::info!(files = ?files, "istio-cni's plugin unchained");
    }
    Ok(())
}

/// `--hand-back`: our plugin, our node rules and our rules in every pod of the node out, then
/// exit (istio-cni, started again, captures the pods with its own).
async fn hand_back<S: PodSource + 'static, H: Handoff + 'static>(
    mut agent: NodeAgent<S, H>,
    args: &NodeAgentArgs,
) -> Result<(), Error> {
    if let Some((_, conf_dir)) = install_dirs(args)? {
        let files = unchain(&conf_dir).map_err(|e| Error::Flag {
            flag: "--hand-back",
            value: conf_dir.display().to_string(),
            reason: e.to_string(),
        })?;
        let _ = std::fs::remove_file(conf_dir.join(KUBECONFIG_NAME));
        tracing::info!(files = ?files, "ztunnel-cni unchained");
    }
    // A Kubernetes source needs its first list: try for a while.
    let outcome = tokio::task::spawn_blocking(move || {
        let start = std::time::Instant::now();
        loop {
            match agent.hand_back() {
                Err(HandBackError::Source(_)) if start.elapsed() < Duration::from_secs(30) => {
                    std::thread::sleep(Duration::from_millis(250));
                }
                outcome => return outcome,
            }
        }
    })
    .await
    .map_err(|e| Error::Io {
        what: "hand-back".into(),
        source: std::io::Error::other(e),
    })?;
    match outcome {
        Ok(pods) => {
            tracing::info!(
                pods,
                "handed the node back: our rules are out of its pods and the node"
            );
            Ok(())
        }
        Err(e) => Err(Error::Flag {
            flag: "--hand-back",
            value: args.node.clone(),
            reason: e.to_string(),
        }),
    }
}

/// Runs the agent until SIGTERM or SIGINT, then removes its node-level rules.
async fn drive<S: PodSource + 'static, H: Handoff + 'static>(
    agent: NodeAgent<S, H>,
    args: &NodeAgentArgs,
    extra: Vec<Render>,
) -> Result<(), Error> {
    use tokio::signal::unix::{SignalKind, signal};
    serve_status(args, agent.status(), extra).await?;
    let stop = Arc::new(AtomicBool::new(false));
    let keep = stop.clone();
    let mut task = tokio::task::spawn_blocking(move || {
        let mut agent =
            agent.run_while(Duration::from_millis(250), || !keep.load(Ordering::SeqCst));
        agent.shutdown();
    });
    let io = |source| Error::Io {
        what: "signal handler".into(),
        source,
    };
    let (mut term, mut int) = (
        signal(SignalKind::terminate()).map_err(io)?,
        signal(SignalKind::interrupt()).map_err(io)?,
    );
    let joined = tokio::select! {
        joined = &mut task => joined,
        _ = term.recv() => { stop.store(true, Ordering::SeqCst); task.await }
        _ = int.recv() => { stop.store(true, Ordering::SeqCst); task.await }
    };
    if stop.load(Ordering::SeqCst) {
        tracing::info!("node agent stopped");
    }
    joined.map_err(|e| Error::Io {
        what: "node agent".into(),
        source: std::io::Error::other(e),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn excluded_namespaces_come_from_the_flag_then_istio_cnis_chart_variable_then_the_default() {
        let names = |e: Enablement| e.excluded_namespaces.into_iter().collect::<Vec<_>>();
        let chart =
            |name: &str| (name == "EXCLUDED_NAMESPACES").then(|| "kube-system, infra".to_owned());
        let flag = Some(vec!["batch".to_owned()]);
        assert_eq!(names(excluding(&flag, chart)), ["batch"]);
        assert_eq!(names(excluding(&None, chart)), ["infra", "kube-system"]);
        assert_eq!(names(excluding(&None, |_| None)), ["kube-system"]);
        // An empty value excludes none.
        assert!(names(excluding(&Some(vec![String::new()]), |_| None)).is_empty());
    }

    #[test]
    fn a_broken_or_unreadable_file_fails_the_pass() {
        let dir = std::env::temp_dir().join(format!("na-src-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("a.yaml"),
            "apiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: default}\nspec: {nodeName: n}\n",
        )
        .unwrap();
        let source = ManifestSource(dir.clone());
        assert_eq!(source.pods().unwrap().len(), 1);
        // Half-written: a parse error names the file.
        std::fs::write(dir.join("b.yaml"), "kind: Pod\nmetadata: [\n").unwrap();
        let err = source.pods().unwrap_err();
        assert!(err.contains("b.yaml"), "{err}");
        // Unreadable (not UTF-8): an error too, never a pass without the file's pods.
        std::fs::write(dir.join("b.yaml"), b"kind: Pod\n\xff\xfe").unwrap();
        let err = source.pods().unwrap_err();
        assert!(
            err.contains("b.yaml") && err.contains("cannot read"),
            "{err}"
        );
        std::fs::remove_file(dir.join("b.yaml")).unwrap();
        assert_eq!(source.pods().unwrap().len(), 1);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
