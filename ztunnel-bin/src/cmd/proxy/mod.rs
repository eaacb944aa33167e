//! `ztunnel proxy`: the node proxy, shared or dedicated mode. The proxy itself lives in the
//! `proxy` crate; this file only loads configuration and assembles.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use controlplane::ComputeConfig;
use identity::ca::{CaClientConfig, IstioCaClient};
use identity::grpc::TrustRoot;
use identity::roots::TrustRoots;
use identity::{DevCa, DevCaSource, SecretManager, SecretManagerConfig};
use proxy::admin::AdminHooks;
use proxy::certs::Managed;
use proxy::certs::StaticCert;
use proxy::config_dump::DumpContext;
use proxy::dedicated::DedicatedConfig;
use proxy::inpod::{SharedConfig, SharedProxy};
use proxy::state::{State, StateStore};
use proxy::telemetry::metrics::Metrics;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use xds_client::client::ClientConfig;

use super::Error;
use crate::logging::LogControl;

mod args;
mod handoff;
pub(crate) mod istio;
mod manifests;

pub(crate) use args::ProxyArgs;
use args::{Mode, ProxyKind};
use manifests::{load, watch};

pub(crate) async fn run(args: ProxyArgs, log_control: LogControl) -> Result<(), Error> {
    if args.kind == Some(ProxyKind::Ztunnel) && args.mode == Mode::Dedicated {
        return Err(flag(
            "--mode",
            "`proxy ztunnel` (Istio's chart) is the node proxy, shared mode; --mode dedicated (PROXY_MODE) contradicts it",
        ));
    }
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
    c.cluster_id = args.cluster();
    c
}

/// Loads the state from local manifests (and watches them) or starts following xDS.
fn state_source(args: &ProxyArgs, store: &Arc<StateStore>) -> Result<(), Error> {
    match (&args.local_manifests, args.xds_url()?) {
        (Some(manifests), _) => {
            let config = compute_config(args);
            load(store, manifests, &config)?;
            tokio::spawn(watch(store.clone(), manifests.clone(), config));
            Ok(())
        }
        (None, Some(url)) => {
            let cluster = args.cluster();
            let pod = istio::ProxyPod {
                name: &args.pod_name,
                namespace: &args.pod_namespace,
                ip: &args.instance_ip,
                node: &args.node_name,
            };
            let (node_id, metadata) = istio::xds_node(&pod, &cluster, std::env::vars());
            let mut config = ClientConfig::new(url.clone(), node_id);
            let root =
                ProxyArgs::control_plane_root(&url, args.xds_root_ca.as_deref(), "--xds-root-ca")?;
            config.server_root = server_root(root);
            config.token_file = args.token_file();
            config.cluster_id = Some(cluster);
            config.node_metadata = metadata;
            config
                .node_metadata
                .insert("NETWORK".into(), args.network.clone());
            proxy::state::follow(store.clone(), config).map_err(|e| Error::Flag {
                flag: "--xds-address",
                value: url,
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

/// What the control plane's TLS certificate must chain to (a file is read again for each new
/// connection, so a root rotated in place is used without a restart).
fn server_root(source: Option<istio::RootSource>) -> Option<TrustRoot> {
    source.map(|source| match source {
        istio::RootSource::Inline(pem) => TrustRoot::Pem(pem),
        istio::RootSource::File(path) => TrustRoot::File(path),
        istio::RootSource::System => TrustRoot::System,
    })
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
        let roots = Arc::new(ca.trust_roots());
        let source = DevCaSource::new(ca, args.secret_ttl);
        return Ok(Managed {
            manager: SecretManager::new(Arc::new(source), config),
            roots,
        });
    }
    let Some(url) = args.ca_url()? else {
        return Err(flag(
            "--ca-address",
            "the proxy needs certificates: --ca-address (CA_ADDRESS) or --ca-dir (a development CA)",
        ));
    };
    let ca_root = ProxyArgs::control_plane_root(&url, args.ca_root_ca.as_deref(), "--ca-root-ca")?;
    let roots = Arc::new(mesh_roots(args.ca.as_deref(), ca_root.as_ref())?);
    let mut ca_config = CaClientConfig::new(url, roots.clone());
    ca_config.server_root = server_root(ca_root);
    ca_config.token_file = args.token_file();
    ca_config.cluster_id = Some(args.cluster());
    ca_config.cert_lifetime = args.secret_ttl;
    let client = IstioCaClient::new(ca_config)?;
    Ok(Managed {
        manager: SecretManager::new(Arc::new(client), config),
        roots,
    })
}

/// The mesh's trust roots with a CA server: `--ca`, else the CA's root when it is a file or
/// PEM (Istio's chart: the mounted `istio-ca-root-cert`), else the chart's mount itself. The
/// system's trust store is never the mesh's root. A file is followed: a root rotated in place
/// is used by the next handshake and the next certificate check, without a restart.
fn mesh_roots(ca: Option<&Path>, ca_root: Option<&istio::RootSource>) -> Result<TrustRoots, Error> {
    match (ca, ca_root) {
        (Some(path), _) => Ok(TrustRoots::follow(path)?),
        (None, Some(istio::RootSource::File(path))) => Ok(TrustRoots::follow(path)?),
        (None, Some(istio::RootSource::Inline(pem))) => {
            let inline = Path::new("CA_ROOT_CA (PEM given in the variable)");
            Ok(TrustRoots::fixed(
                identity::pem::parse_certs(pem.as_bytes(), inline)?,
                inline,
            )?)
        }
        (None, Some(istio::RootSource::System) | None) if istio::mounted(istio::DEFAULT_ROOT) => {
            Ok(TrustRoots::follow(Path::new(istio::DEFAULT_ROOT))?)
        }
        _ => Err(flag(
            "--ca",
            "with a CA server the mesh's trust root is needed: --ca ROOT, CA_ROOT_CA (a file or PEM), or Istio's mount at /var/run/secrets/istio/root-cert.pem",
        )),
    }
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
    let stats = super::listen_all(args.stats_addr, true).await?;
    let admin = super::listen_all(args.admin_addr, true).await?;
    let hooks = AdminHooks {
        config_dump,
        set_log_level: Box::new(move |level| log_control(level)),
        quit: quit.clone(),
    };
    let metrics_handler = proxy::admin::metrics(metrics.clone());
    for listener in stats {
        tokio::spawn(proxy::admin::serve(listener, metrics_handler.clone()));
    }
    let admin_handler = proxy::admin::admin(hooks);
    for listener in admin {
        tokio::spawn(proxy::admin::serve(listener, admin_handler.clone()));
    }
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

/// The per-pod DNS proxy's settings (`--dns-proxy`), its upstream read from
/// `--dns-resolv-conf`: a file that cannot be read or parsed stops the start, naming it; one
/// without `nameserver` lines leaves only the mesh's names answered (the rest refused, logged).
fn dns_settings(args: &ProxyArgs) -> Result<Option<proxy::inpod::DnsSettings>, Error> {
    if !args.dns_proxy {
        return Ok(None);
    }
    let path = &args.dns_resolv_conf;
    let bad = |reason: String| Error::Flag {
        flag: "--dns-resolv-conf",
        value: path.display().to_string(),
        reason,
    };
    let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
    let (servers, search_domains) = proxy::dns::Upstream::from_resolv_conf(&text).map_err(bad)?;
    if servers.is_empty() {
        tracing::warn!(file = %path.display(), "DNS proxy: no nameserver to forward to; names outside the mesh will be refused");
    }
    let mut config = proxy::dns::DnsConfig::default();
    config.cluster_domain = args.cluster_domain.trim_end_matches('.').to_owned();
    Ok(Some(proxy::inpod::DnsSettings {
        port: common::ports::DNS,
        config,
        upstream: proxy::dns::Upstream {
            servers,
            timeout: args.dns_upstream_timeout,
            mark: Some(args.packet_mark),
        },
        search_domains,
    }))
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
    config.hbone.movable = args.handoff_socket.is_some();
    config.termination_deadline = args.drain();
    config.port_reuse = args.inpod_port_reuse;
    config.original_source = args.original_source;
    config.dns = dns_settings(&args)?;
    let shared = SharedProxy::new(config, store.clone(), certs.clone(), metrics.clone());

    for readiness in super::listen_all(args.readiness_addr, true).await? {
        tokio::spawn(shared.clone().serve_readiness(readiness));
    }
    let (dump_store, dump_proxy, dump_certs) = (store.clone(), shared.clone(), certs.clone());
    let dump_config = args.dump_config();
    let stop = operations(
        &args,
        metrics,
        store.clone(),
        log_control,
        Box::new(move || {
            let context = DumpContext {
                certificates: dump_certs.dump(),
                pods: dump_proxy.pods(),
                config: dump_config.clone(),
            };
            proxy::config_dump::config_dump(&dump_store.snapshot(), &context)
        }),
    )
    .await?;
    tokio::spawn(shared.clone().run_zds(args.inpod_uds.clone()));
    info!(
        node = %args.node_name, inpod_uds = %args.inpod_uds.display(), admin = %args.admin_addr,
        stats = %args.stats_addr, readiness = %args.readiness_addr, "proxy started (shared mode)"
    );
    match &args.handoff_socket {
        None => stop.await,
        Some(path) => {
            let handed_off = handoff::session(shared.clone(), path.clone());
            tokio::select! {
                () = stop => {}
                () = handed_off => info!("handed over to the new proxy: draining the rest"),
            }
        }
    }
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
    let roots = Arc::new(TrustRoots::follow(ca)?);
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
    config.readiness = args.readiness_addr.single();
    config.metrics = metrics.clone();
    let certs = StaticCert { cert, roots };
    let (dump_certs, dump_config) = (certs.clone(), args.dump_config());
    let (bound, running) = proxy::dedicated::start(config, store.clone(), certs)
        .await
        .map_err(|e| Error::Io {
            what: "starting the proxy".into(),
            source: std::io::Error::other(e),
        })?;
    let dns_stop = CancellationToken::new();
    if let (Some(addr), Some(dns)) = (args.dns_proxy_addr, dns_settings(&args)?) {
        let bind_error = |e: std::io::Error| Error::Flag {
            flag: "--dns-proxy-addr",
            value: addr.to_string(),
            reason: e.to_string(),
        };
        let udp = tokio::net::UdpSocket::bind(addr)
            .await
            .map_err(bind_error)?;
        let tcp = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(bind_error)?;
        let server = proxy::dns::DnsServer::new(
            store.clone(),
            dns.config.clone(),
            dns.upstream.clone(),
            dns.asker(&namespace),
            metrics.dns.clone(),
        );
        tokio::spawn(server.serve(udp, tcp, dns_stop.clone()));
        info!(%addr, "DNS proxy serving the workload");
    }
    let _dns_stop = dns_stop.drop_guard();
    let dump_store = store.clone();
    let stop = operations(
        &args,
        metrics,
        store.clone(),
        log_control,
        Box::new(move || {
            let context = DumpContext {
                certificates: dump_certs.dump(),
                pods: Vec::new(),
                config: dump_config.clone(),
            };
            proxy::config_dump::config_dump(&dump_store.snapshot(), &context)
        }),
    )
    .await?;
    info!(
        workload = %local.uid, identity = %id, outbound = %bound.outbound, inbound = %bound.inbound,
        readiness = %bound.readiness, "proxy ready (dedicated mode)"
    );
    let drained = running.run_until(stop, args.drain()).await;
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
