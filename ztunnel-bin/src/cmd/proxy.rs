//! `ztunnel proxy`: the node proxy, shared or dedicated mode. The proxy itself lives in the
//! `proxy` crate; this file only loads configuration and assembles.

use crate::args::parse_duration;
use clap::Args;
use common::ports;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use controlplane::{ComputeConfig, Manifests, compute};
use identity::ca::{CaClientConfig, IstioCaClient};
use identity::{DevCa, DevCaSource, SecretManager, SecretManagerConfig};
use proxy::admin::AdminHooks;
use proxy::certs::Managed;
use proxy::certs::StaticCert;
use proxy::dedicated::DedicatedConfig;
use proxy::inpod::{SharedConfig, SharedProxy};
use proxy::state::{State, StateStore};
use proxy::telemetry::metrics::Metrics;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use xds_client::client::ClientConfig;
use xds_client::resources::Address;

use super::Error;
use crate::logging::LogControl;

#[derive(Debug, Args)]
pub(crate) struct ProxyArgs {
    /// How many workloads this proxy serves.
    #[arg(long, env = "PROXY_MODE", value_enum, default_value_t = Mode::Shared)]
    pub(crate) mode: Mode,
    /// Dedicated mode: the workload this proxy serves, `NAMESPACE/NAME/SERVICE_ACCOUNT`.
    #[arg(long, env = "PROXY_WORKLOAD_INFO", value_name = "NS/NAME/SA")]
    pub(crate) workload: Option<String>,
    /// A Kubernetes YAML file or directory (Namespace, Pod, Deployment, Service,
    /// AuthorizationPolicy), read as `ztunnel controlplane` reads it, instead of xDS; watched for
    /// changes (a file that fails to parse keeps the last good state).
    #[arg(long, env = "LOCAL_MANIFESTS", value_name = "PATH")]
    pub(crate) local_manifests: Option<PathBuf>,
    /// Dedicated mode: PEM certificate chain of the workload's identity (leaf first).
    #[arg(long, value_name = "PEM", requires_all = ["key", "ca"])]
    pub(crate) cert: Option<PathBuf>,
    /// PEM private key of `--cert`.
    #[arg(long, value_name = "PEM", requires = "cert")]
    pub(crate) key: Option<PathBuf>,
    /// PEM trust roots of the mesh (with `--cert`, or with `--ca-address`).
    #[arg(long, value_name = "PEM")]
    pub(crate) ca: Option<PathBuf>,
    /// The mark (`SO_MARK`) on the proxy's own sockets, which capture rules skip.
    #[arg(long, env = "PACKET_MARK", default_value_t = common::PACKET_MARK, value_parser = parse_u32)]
    pub(crate) packet_mark: u32,
    /// This node's name (pods' `spec.nodeName`; in dedicated mode it picks the workload when
    /// several share a name).
    #[arg(long, env = "NODE_NAME", default_value = "")]
    pub(crate) node_name: String,
    /// Threads of the data path. With 1, the proxy runs everything on its main thread (tokio's
    /// single-threaded scheduler, the cheapest per message); with more, a work-stealing pool.
    #[arg(long, env = "ZTUNNEL_WORKER_THREADS", default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub(crate) worker_threads: u16,
    /// Trust domain of the identities computed from local manifests.
    #[arg(long, env = "TRUST_DOMAIN", default_value = "cluster.local")]
    pub(crate) trust_domain: String,
    /// Cluster id (workload uids and telemetry).
    #[arg(long, env = "CLUSTER_ID", default_value = "Kubernetes")]
    pub(crate) cluster_id: String,
    /// On SIGTERM (or Ctrl-C): stop accepting, then wait this long for open connections to
    /// finish before exiting 0 (e.g. `5s`, `1m`). Also how long a deleted pod's connections may
    /// finish (shared mode).
    #[arg(long, env = "CONNECTION_TERMINATION_DEADLINE", default_value = "5s", value_parser = parse_duration)]
    pub(crate) connection_termination_deadline: Duration,
    /// Shared mode: the node agent's ZDS socket (ours: `ztunnel node-agent --zds-socket`; Istio's
    /// istio-cni uses the default).
    #[arg(
        long,
        env = "INPOD_UDS",
        value_name = "PATH",
        default_value = "/var/run/ztunnel/ztunnel.sock"
    )]
    pub(crate) inpod_uds: PathBuf,
    /// A development CA directory (`root-cert.pem`, `root-key.pem`; created with a new root if
    /// missing): every local pod's certificate is issued in process from it, no CA server.
    #[arg(long, value_name = "DIR", conflicts_with = "ca_address")]
    pub(crate) ca_dir: Option<PathBuf>,
    /// The xDS server (istiod, or `ztunnel controlplane`), `https://host:port` or `http://...`
    /// (plaintext, local use only).
    #[arg(
        long,
        env = "XDS_ADDRESS",
        value_name = "URL",
        conflicts_with = "local_manifests"
    )]
    pub(crate) xds_address: Option<String>,
    /// The CA (istiod's, or `ztunnel controlplane`'s), `https://host:port` or `http://...`.
    #[arg(long, env = "CA_ADDRESS", value_name = "URL")]
    pub(crate) ca_address: Option<String>,
    /// PEM root that the xDS server's TLS certificate must chain to.
    #[arg(long, env = "XDS_ROOT_CA", value_name = "PEM")]
    pub(crate) xds_root_ca: Option<PathBuf>,
    /// PEM root that the CA's TLS certificate must chain to; also the mesh's trust root when
    /// `--ca` is not given.
    #[arg(long, env = "CA_ROOT_CA", value_name = "PEM")]
    pub(crate) ca_root_ca: Option<PathBuf>,
    /// File holding the bearer token sent on xDS and CA calls (read again on each connection).
    #[arg(long, env = "AUTH_TOKEN", value_name = "PATH")]
    pub(crate) auth_token: Option<PathBuf>,
    /// This node's network (workload addresses are looked up in it).
    #[arg(long, env = "NETWORK", default_value = "")]
    pub(crate) network: String,
    /// Lifetime asked for workload certificates (rotated at half of it).
    #[arg(long, env = "SECRET_TTL", default_value = "24h", value_parser = parse_duration)]
    pub(crate) secret_ttl: Duration,
    /// Tunnels sharing one pooled HBONE connection, at most.
    #[arg(long, env = "POOL_MAX_STREAMS_PER_CONNECTION", default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) pool_max_streams_per_connection: u32,
    /// A pooled HBONE connection without tunnels is closed after this long.
    #[arg(long, env = "POOL_UNUSED_RELEASE_TIMEOUT", default_value = "5m", value_parser = parse_duration)]
    pub(crate) pool_unused_release_timeout: Duration,
    /// HTTP/2 initial window of each tunnel, bytes.
    #[arg(long, env = "HTTP2_STREAM_WINDOW_SIZE", default_value_t = 4 * 1024 * 1024, value_parser = clap::value_parser!(u32).range(65_535..=2_147_483_647))]
    pub(crate) http2_stream_window_size: u32,
    /// HTTP/2 window of each connection, bytes.
    #[arg(long, env = "HTTP2_CONNECTION_WINDOW_SIZE", default_value_t = 16 * 1024 * 1024, value_parser = clap::value_parser!(u32).range(65_535..=2_147_483_647))]
    pub(crate) http2_connection_window_size: u32,
    /// Largest HTTP/2 frame payload accepted, bytes.
    #[arg(long, env = "HTTP2_FRAME_SIZE", default_value_t = 1024 * 1024, value_parser = clap::value_parser!(u32).range(16_384..=16_777_215))]
    pub(crate) http2_frame_size: u32,
    /// Admin endpoint.
    #[arg(long, default_value_t = SocketAddr::from(([127, 0, 0, 1], ports::ADMIN)))]
    pub(crate) admin_addr: SocketAddr,
    /// Metrics endpoint.
    #[arg(long, default_value_t = SocketAddr::from(([0, 0, 0, 0], ports::STATS)))]
    pub(crate) stats_addr: SocketAddr,
    /// Readiness endpoint.
    #[arg(long, default_value_t = SocketAddr::from(([0, 0, 0, 0], ports::READINESS)))]
    pub(crate) readiness_addr: SocketAddr,
    /// Series of gone pods are dropped from the metrics after this long without connections.
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    pub(crate) metrics_expiry: Duration,
}

/// How many workloads one proxy serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Mode {
    /// One proxy per node; the node agent hands it each captured pod (ZDS).
    Shared,
    /// One workload, in the proxy's own network namespace.
    Dedicated,
}

/// A number in decimal or `0x` hexadecimal.
fn parse_u32(text: &str) -> Result<u32, String> {
    let parsed = match text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => text.parse(),
    };
    parsed.map_err(|_| format!("{text:?} is not a number (decimal or 0x hex)"))
}

pub(crate) async fn run(args: ProxyArgs, log_control: LogControl) -> Result<(), Error> {
    let metrics = Metrics::new(args.metrics_expiry);
    match args.mode {
        Mode::Dedicated => run_dedicated(args, metrics, log_control).await,
        Mode::Shared => run_shared(args, metrics, log_control).await,
    }
}

fn flag(flag: &'static str, reason: &str) -> Error {
    Error::Flag {
        flag,
        value: String::new(),
        reason: reason.to_owned(),
    }
}

/// The HBONE settings the flags describe.
fn hbone_config(args: &ProxyArgs) -> hbone::Config {
    let mut c = hbone::Config::default();
    c.max_concurrent_streams = args.pool_max_streams_per_connection;
    c.idle_timeout = args.pool_unused_release_timeout;
    c.stream_window = args.http2_stream_window_size;
    c.connection_window = args.http2_connection_window_size;
    c.max_frame_size = args.http2_frame_size;
    c
}

fn compute_config(args: &ProxyArgs) -> ComputeConfig {
    let mut c = ComputeConfig::default();
    c.trust_domain = args.trust_domain.clone();
    c.cluster_id = args.cluster_id.clone();
    c
}

/// Loads the state from local manifests (and watches them) or starts following xDS.
fn state_source(args: &ProxyArgs, store: &Arc<StateStore>) -> Result<(), Error> {
    match (&args.local_manifests, &args.xds_address) {
        (Some(manifests), _) => {
            let config = compute_config(args);
            load(store, manifests, &config)?;
            tokio::spawn(watch(store.clone(), manifests.clone(), config));
            Ok(())
        }
        (None, Some(address)) => {
            let node_id = format!(
                "ztunnel~0.0.0.0~{}.istio-system~istio-system.svc.cluster.local",
                if args.node_name.is_empty() {
                    "ztunnel"
                } else {
                    &args.node_name
                }
            );
            let mut config = ClientConfig::new(address.clone(), node_id);
            config.ca_root_pem = read_pem_text(args.xds_root_ca.as_deref(), "--xds-root-ca")?;
            config.token_file = args.auth_token.clone();
            config
                .node_metadata
                .insert("NODE_NAME".into(), args.node_name.clone());
            config
                .node_metadata
                .insert("NETWORK".into(), args.network.clone());
            config
                .node_metadata
                .insert("CLUSTER_ID".into(), args.cluster_id.clone());
            proxy::state::follow(store.clone(), config).map_err(|e| Error::Flag {
                flag: "--xds-address",
                value: address.clone(),
                reason: e.to_string(),
            })?;
            Ok(())
        }
        (None, None) => Err(flag(
            "--xds-address",
            "the proxy needs a source of workloads and policies: --xds-address (XDS_ADDRESS) or --local-manifests (LOCAL_MANIFESTS)",
        )),
    }
}

fn read_pem_text(path: Option<&Path>, what: &'static str) -> Result<Option<String>, Error> {
    path.map(|p| {
        std::fs::read_to_string(p).map_err(|source| Error::Io {
            what: format!("{what}: cannot read {}", p.display()),
            source,
        })
    })
    .transpose()
}

/// Where pods' certificates come from: an in-process development CA or a CA server.
fn certificates(args: &ProxyArgs) -> Result<Managed, Error> {
    let config = SecretManagerConfig::default();
    if let Some(dir) = &args.ca_dir {
        let ca = if dir.join("root-cert.pem").exists() {
            DevCa::load(dir)?
        } else {
            DevCa::init(dir, &args.trust_domain)?
        };
        if ca.trust_domain() != args.trust_domain {
            return Err(Error::Flag {
                flag: "--ca-dir",
                value: dir.display().to_string(),
                reason: format!(
                    "the CA signs trust domain {:?}, but TRUST_DOMAIN is {:?}",
                    ca.trust_domain(),
                    args.trust_domain
                ),
            });
        }
        let ca = Arc::new(ca);
        let roots = ca.roots();
        let source = DevCaSource::new(ca, args.secret_ttl);
        return Ok(Managed {
            manager: SecretManager::new(Arc::new(source), config),
            roots,
        });
    }
    let Some(address) = &args.ca_address else {
        return Err(flag(
            "--ca-address",
            "the proxy needs certificates: --ca-address (CA_ADDRESS) or --ca-dir (a development CA)",
        ));
    };
    let roots_file = args
        .ca
        .as_deref()
        .or(args.ca_root_ca.as_deref())
        .ok_or_else(|| {
            flag(
                "--ca",
                "with a CA server the mesh's trust root is needed: --ca ROOT, or CA_ROOT_CA",
            )
        })?;
    let roots = Arc::new(identity::pem::read_roots(roots_file)?);
    let mut ca_config = CaClientConfig::new(address.clone(), roots.clone());
    ca_config.ca_root_pem = read_pem_text(args.ca_root_ca.as_deref(), "--ca-root-ca")?;
    ca_config.token_file = args.auth_token.clone();
    ca_config.cluster_id = Some(args.cluster_id.clone());
    ca_config.cert_lifetime = args.secret_ttl;
    let client = IstioCaClient::new(ca_config)?;
    Ok(Managed {
        manager: SecretManager::new(Arc::new(client), config),
        roots,
    })
}

/// The operations side of both modes: binds the metrics and admin listeners, drops the metric
/// series of gone pods now and then, and returns what resolves when the proxy is asked to stop
/// (SIGTERM, Ctrl-C or `/quitquitquit`).
async fn operations(
    args: &ProxyArgs,
    metrics: Arc<Metrics>,
    store: Arc<StateStore>,
    log_control: LogControl,
    config_dump: Box<dyn Fn() -> String + Send + Sync>,
) -> Result<impl Future<Output = ()> + use<>, Error> {
    let quit = CancellationToken::new();
    let stats = super::listen(args.stats_addr).await?;
    let admin = super::listen(args.admin_addr).await?;
    let hooks = AdminHooks {
        config_dump,
        set_log_level: Box::new(move |level| log_control(level)),
        quit: quit.clone(),
    };
    tokio::spawn(proxy::admin::serve(
        stats,
        proxy::admin::metrics(metrics.clone()),
    ));
    tokio::spawn(proxy::admin::serve(admin, proxy::admin::admin(hooks)));
    tokio::spawn(expire_metrics(metrics, store));
    Ok(async move {
        tokio::select! {
            () = shutdown_signal() => {}
            () = quit.cancelled() => info!("/quitquitquit: draining"),
        }
    })
}

/// Drops metric series of gone pods now and then.
async fn expire_metrics(metrics: Arc<Metrics>, store: Arc<StateStore>) {
    loop {
        tokio::time::sleep(Duration::from_secs(30)).await;
        let dropped = metrics.expire(&store.snapshot());
        if dropped > 0 {
            info!(dropped, "metrics: dropped the series of gone workloads");
        }
    }
}

async fn run_shared(
    args: ProxyArgs,
    metrics: Arc<Metrics>,
    log_control: LogControl,
) -> Result<(), Error> {
    let root_namespace = compute_config(&args).root_namespace;
    let store = Arc::new(StateStore::new(State::new(&root_namespace)));
    state_source(&args, &store)?;
    let certs = Arc::new(certificates(&args)?);
    let mut config = SharedConfig::new(&args.node_name, &args.trust_domain);
    config.mark = Some(args.packet_mark);
    config.hbone = hbone_config(&args);
    config.termination_deadline = args.connection_termination_deadline;
    let shared = SharedProxy::new(config, store.clone(), certs.clone(), metrics.clone());

    let readiness = super::listen(args.readiness_addr).await?;
    tokio::spawn(shared.clone().serve_readiness(readiness));
    let (dump_store, dump_proxy, dump_certs) = (store.clone(), shared.clone(), certs.clone());
    let stop = operations(
        &args,
        metrics,
        store.clone(),
        log_control,
        Box::new(move || {
            let held: Vec<_> = dump_certs
                .manager
                .identities()
                .into_iter()
                .map(|id| {
                    let expiry = dump_certs
                        .manager
                        .subscribe(&id)
                        .borrow()
                        .as_ref()
                        .map(|c| c.not_after());
                    (id.to_string(), expiry)
                })
                .collect();
            proxy::admin::config_dump(&dump_store.snapshot(), &held, &dump_proxy.pods())
        }),
    )
    .await?;
    tokio::spawn(shared.clone().run_zds(args.inpod_uds.clone()));
    info!(
        node = %args.node_name, inpod_uds = %args.inpod_uds.display(), admin = %args.admin_addr,
        stats = %args.stats_addr, readiness = %args.readiness_addr, "proxy started (shared mode)"
    );
    stop.await;
    let cut = shared.drain_all().await;
    info!(cut, "proxy stopped");
    Ok(())
}

async fn run_dedicated(
    args: ProxyArgs,
    metrics: Arc<Metrics>,
    log_control: LogControl,
) -> Result<(), Error> {
    for (given, name) in [
        (args.ca_dir.is_some(), "--ca-dir"),
        (args.ca_address.is_some(), "--ca-address"),
        (args.xds_address.is_some(), "--xds-address"),
    ] {
        if given {
            return Err(flag(
                name,
                "dedicated mode runs from --local-manifests and --cert/--key/--ca alone; this flag is for shared mode",
            ));
        }
    }
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
            "dedicated mode reads its workloads and policies from local manifests",
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

    let compute_config = compute_config(&args);
    let store = Arc::new(StateStore::new(State::new(&compute_config.root_namespace)));
    state_source(&args, &store)?;
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
    config.hbone = hbone_config(&args);
    config.readiness = args.readiness_addr;
    config.metrics = metrics.clone();
    let held = vec![(id.to_string(), Some(cert.not_after()))];
    let (bound, running) =
        proxy::dedicated::start(config, store.clone(), StaticCert { cert, roots })
            .await
            .map_err(|e| Error::Io {
                what: "starting the proxy".into(),
                source: std::io::Error::other(e),
            })?;
    let dump_store = store.clone();
    let stop = operations(
        &args,
        metrics,
        store.clone(),
        log_control,
        Box::new(move || proxy::admin::config_dump(&dump_store.snapshot(), &held, &[])),
    )
    .await?;
    info!(
        workload = %local.uid, identity = %id, outbound = %bound.outbound, inbound = %bound.inbound,
        readiness = %bound.readiness, "proxy ready (dedicated mode)"
    );
    let drained = running
        .run_until(stop, args.connection_termination_deadline)
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
