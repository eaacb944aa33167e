//! `ztunnel proxy`'s arguments: every flag, with the environment variable that sets it (Istio's
//! names where Istio's ztunnel has one).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use common::ports;

use super::istio;
use crate::args::parse_duration;
use crate::cmd::{Error, ListenAddr};

#[derive(Debug, Args)]
pub(crate) struct ProxyArgs {
    /// `ztunnel`, as Istio's chart passes it (`args: [proxy, ztunnel]`): the node proxy, shared
    /// mode.
    #[arg(value_enum, value_name = "KIND")]
    pub(crate) kind: Option<ProxyKind>,
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
    /// Threads of the data path: a number (1 to 256; 0 for one per CPU) or a percentage of the
    /// CPUs (`50%`); unset, a quarter of the CPUs, at least 2. With 1, the proxy runs everything
    /// on its main thread (tokio's single-threaded scheduler, the cheapest per message); with
    /// more, a work-stealing pool.
    #[arg(long, env = "ZTUNNEL_WORKER_THREADS", value_name = "N|P%", value_parser = istio::parse_worker_threads)]
    pub(crate) worker_threads: Option<istio::WorkerThreads>,
    /// The CPUs the proxy may use, a Kubernetes quantity (`2`, `1500m`; Istio's chart passes the
    /// container's `limits.cpu`); the worker threads are counted against it. Default: the CPUs
    /// this process may run on.
    #[arg(long, env = "ZTUNNEL_CPU_LIMIT", value_name = "CPUS", value_parser = istio::parse_cpu_quantity)]
    pub(crate) cpu_limit: Option<u32>,
    /// Trust domain of the identities computed from local manifests.
    #[arg(long, env = "TRUST_DOMAIN", default_value = "cluster.local")]
    pub(crate) trust_domain: String,
    /// Cluster id (workload uids, telemetry, the `clusterid` header and node metadata on xDS
    /// and CA calls). From `ISTIO_META_CLUSTER_ID` (Istio's chart), else `CLUSTER_ID`, else
    /// `Kubernetes`.
    #[arg(long, env = "ISTIO_META_CLUSTER_ID", value_name = "ID")]
    pub(crate) cluster_id: Option<String>,
    /// This proxy's pod name (Istio's chart: the downward API), in its xDS node id.
    #[arg(long, env = "POD_NAME", default_value = "")]
    pub(crate) pod_name: String,
    /// This proxy's namespace, in its xDS node id (istiod checks it against the token's).
    #[arg(long, env = "POD_NAMESPACE", default_value = "")]
    pub(crate) pod_namespace: String,
    /// This proxy's IP, in its xDS node id.
    #[arg(long, env = "INSTANCE_IP", default_value = "")]
    pub(crate) instance_ip: String,
    /// On SIGTERM (or Ctrl-C): stop accepting, then wait this long for open connections to
    /// finish before exiting 0 (e.g. `5s`, `1m`). Also how long a deleted pod's connections may
    /// finish (shared mode). Default: the pod's termination grace period less 5 s (less 1 s
    /// when it is 10 s or shorter), else 5s.
    #[arg(long, env = "CONNECTION_TERMINATION_DEADLINE", value_parser = parse_duration)]
    pub(crate) connection_termination_deadline: Option<Duration>,
    /// The pod's `terminationGracePeriodSeconds` (Istio's chart passes it), from which the
    /// drain is derived when `CONNECTION_TERMINATION_DEADLINE` is not given.
    #[arg(long, env = "TERMINATION_GRACE_PERIOD_SECONDS", value_name = "SECONDS")]
    pub(crate) termination_grace_period_seconds: Option<u64>,
    /// Shared mode: the node agent's ZDS socket (ours: `ztunnel node-agent --zds-socket`; Istio's
    /// istio-cni uses the default).
    #[arg(
        long,
        env = "INPOD_UDS",
        value_name = "PATH",
        default_value = "/var/run/ztunnel/ztunnel.sock"
    )]
    pub(crate) inpod_uds: PathBuf,
    /// Shared mode: bind each pod's listeners with `SO_REUSEPORT`, so a new proxy can serve the
    /// pods beside the old one during a rolling update (Istio's chart rolls out with
    /// `maxSurge: 1, maxUnavailable: 0`).
    #[arg(long, env = "INPOD_PORT_REUSE", default_value_t = true, action = clap::ArgAction::Set, value_name = "BOOL")]
    pub(crate) inpod_port_reuse: bool,
    /// Shared mode: upgrade without dropping connections through this Unix socket (ours alone,
    /// not Istio's). Once this proxy serves every pod it connects here and takes over the live
    /// inbound HBONE connections of the proxy it replaces, tunnels and all; then it listens here
    /// itself, and hands its own to its successor, after which it drains what could not move and
    /// exits. Unset: an upgrade drains as Istio's does.
    #[arg(long, env = "ZTUNNEL_HANDOFF_SOCKET", value_name = "PATH")]
    pub(crate) handoff_socket: Option<PathBuf>,
    /// Shared mode: connect to each pod's app from the client's address (a transparent socket in
    /// the pod's namespace), so the app sees who called it; needs the return route the node
    /// agent installs in each pod (ours and Istio's istio-cni both do). `false`: the app sees
    /// connections from its own pod address (Istio's ENABLE_ORIG_SRC).
    #[arg(long, env = "ENABLE_ORIG_SRC", default_value_t = true, action = clap::ArgAction::Set, value_name = "BOOL")]
    pub(crate) original_source: bool,
    /// Shared mode: serve each pod's DNS on 127.0.0.1:15053 in its namespace (UDP and TCP, where
    /// the node agent's DNS capture sends port 53): names of the mesh's services answered from
    /// xDS, the rest forwarded to the resolvers of --dns-resolv-conf (Istio's
    /// ISTIO_META_DNS_CAPTURE).
    #[arg(long, env = "ISTIO_META_DNS_CAPTURE", default_value_t = true, action = clap::ArgAction::Set, value_name = "BOOL")]
    pub(crate) dns_proxy: bool,
    /// Dedicated mode: serve the workload's DNS proxy on this address (UDP and TCP; Istio's
    /// DNS_PROXY_ADDR, e.g. `127.0.0.1:15053` or `localhost:15053`). Without it dedicated mode
    /// serves no DNS (the address is the pod's to choose; in shared mode each pod gets
    /// 127.0.0.1:15053 in its own namespace).
    #[arg(long, env = "DNS_PROXY_ADDR", value_parser = parse_dns_addr, value_name = "ADDR")]
    pub(crate) dns_proxy_addr: Option<SocketAddr>,
    /// Where the DNS proxy forwards names that are not the mesh's: the `nameserver` lines of
    /// this file (its `search` domains are added to each pod's own).
    #[arg(long, value_name = "PATH", default_value = "/etc/resolv.conf")]
    pub(crate) dns_resolv_conf: PathBuf,
    /// How long a forwarded DNS query may take per upstream resolver.
    #[arg(long, value_parser = parse_duration, default_value = "5s", value_name = "DURATION")]
    pub(crate) dns_upstream_timeout: Duration,
    /// The cluster's DNS domain (`<svc>.<ns>.svc.<domain>`).
    #[arg(
        long,
        env = "CLUSTER_DOMAIN",
        default_value = "cluster.local",
        value_name = "DOMAIN"
    )]
    pub(crate) cluster_domain: String,
    /// A development CA directory (`root-cert.pem`, `root-key.pem`; created with a new root if
    /// missing): every local pod's certificate is issued in process from it, no CA server.
    #[arg(long, value_name = "DIR", conflicts_with = "ca_address")]
    pub(crate) ca_dir: Option<PathBuf>,
    /// The xDS server (istiod, or `ztunnel controlplane`): `host:port` (TLS, as Istio's chart
    /// writes it), `https://host:port`, or `http://...` (plaintext, local use only).
    #[arg(
        long,
        env = "XDS_ADDRESS",
        value_name = "URL",
        conflicts_with = "local_manifests"
    )]
    pub(crate) xds_address: Option<String>,
    /// The CA (istiod's, or `ztunnel controlplane`'s): `host:port` (TLS), `https://host:port`
    /// or `http://...`.
    #[arg(long, env = "CA_ADDRESS", value_name = "URL")]
    pub(crate) ca_address: Option<String>,
    /// The root that the xDS server's TLS certificate must chain to: a PEM file, `SYSTEM` (the
    /// system's trust store) or the PEM itself. Default: /var/run/secrets/istio/root-cert.pem
    /// (Istio's chart mounts the mesh root there) when it exists.
    #[arg(long, env = "XDS_ROOT_CA", value_name = "FILE|SYSTEM|PEM")]
    pub(crate) xds_root_ca: Option<String>,
    /// The root that the CA's TLS certificate must chain to (a PEM file, `SYSTEM` or the PEM
    /// itself); also the mesh's trust root when `--ca` is not given. Default:
    /// /var/run/secrets/istio/root-cert.pem when it exists.
    #[arg(long, env = "CA_ROOT_CA", value_name = "FILE|SYSTEM|PEM")]
    pub(crate) ca_root_ca: Option<String>,
    /// File holding the bearer token sent on xDS and CA calls (read again on each connection).
    /// Default: /var/run/secrets/tokens/istio-token (the projected token Istio's chart mounts)
    /// when it exists.
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
    /// Admin endpoint: IP:PORT, `[::]:PORT` (both families) or `localhost:PORT` (127.0.0.1
    /// and ::1).
    #[arg(long, default_value_t = ListenAddr::Localhost(ports::ADMIN), value_name = "ADDR")]
    pub(crate) admin_addr: ListenAddr,
    /// Metrics endpoint (as --admin-addr; default: every address of both families).
    #[arg(long, default_value_t = ListenAddr::Addr(SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, ports::STATS))), value_name = "ADDR")]
    pub(crate) stats_addr: ListenAddr,
    /// Readiness endpoint (as --admin-addr; default: every address of both families).
    #[arg(long, default_value_t = ListenAddr::Addr(SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, ports::READINESS))), value_name = "ADDR")]
    pub(crate) readiness_addr: ListenAddr,
    /// Series of gone pods are dropped from the metrics after this long without connections.
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    pub(crate) metrics_expiry: Duration,
}

/// What Istio's chart asks for in the argument after `proxy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum ProxyKind {
    /// The node proxy (Istio's `proxy ztunnel`): shared mode.
    Ztunnel,
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

impl ProxyArgs {
    /// The cluster id: `--cluster-id` (`ISTIO_META_CLUSTER_ID`), else `CLUSTER_ID`, else
    /// `Kubernetes`.
    pub(crate) fn cluster(&self) -> String {
        let plain = std::env::var("CLUSTER_ID").ok();
        istio::cluster_id(self.cluster_id.as_deref(), plain.as_deref())
    }

    /// How long to drain on SIGTERM.
    pub(crate) fn drain(&self) -> Duration {
        istio::drain_deadline(
            self.connection_termination_deadline,
            self.termination_grace_period_seconds,
        )
    }

    /// The data path's threads, counted against `--cpu-limit` or the CPUs this process may run
    /// on.
    pub(crate) fn worker_thread_count(&self) -> u16 {
        let cpus = self.cpu_limit.unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map_or(1, |n| u32::try_from(n.get()).unwrap_or(u32::MAX))
        });
        istio::worker_threads(self.worker_threads, cpus)
    }

    /// The effective settings, for `/config_dump`'s `config` (Istio's key names where it has
    /// the setting; no secrets: token and root paths only).
    pub(crate) fn dump_config(&self) -> serde_json::Value {
        serde_json::json!({
            "proxyMode": format!("{:?}", self.mode),
            "clusterId": self.cluster(),
            "localNode": self.node_name,
            "network": self.network,
            "trustDomain": self.trust_domain,
            "xdsAddress": self.xds_address,
            "caAddress": self.ca_address,
            "authToken": self.token_file(),
            "adminAddr": self.admin_addr.to_string(),
            "statsAddr": self.stats_addr.to_string(),
            "readinessAddr": self.readiness_addr.to_string(),
            "inpodUds": self.inpod_uds,
            "inpodPortReuse": self.inpod_port_reuse,
            "handoffSocket": self.handoff_socket,
            "originalSource": self.original_source,
            "dnsProxy": self.dns_proxy,
            "clusterDomain": self.cluster_domain,
            "numWorkerThreads": self.worker_thread_count(),
            "packetMark": self.packet_mark,
            "poolMaxStreamsPerConn": self.pool_max_streams_per_connection,
            "poolUnusedReleaseTimeout": format!("{:?}", self.pool_unused_release_timeout),
            "terminationGracePeriod": format!("{:?}", self.drain()),
            "secretTtl": format!("{:?}", self.secret_ttl),
            "proxyMetadata": {
                "POD_NAME": self.pod_name,
                "POD_NAMESPACE": self.pod_namespace,
                "INSTANCE_IP": self.instance_ip,
            },
        })
    }

    /// The bearer token file: `--auth-token`, else Istio's projected token when mounted.
    pub(crate) fn token_file(&self) -> Option<PathBuf> {
        istio::token_file(self.auth_token.as_deref(), istio::DEFAULT_TOKEN)
    }

    /// `--xds-address` as a URL (`https://` when it has no scheme).
    pub(crate) fn xds_url(&self) -> Result<Option<String>, Error> {
        url(self.xds_address.as_deref(), "--xds-address")
    }

    /// `--ca-address` as a URL (`https://` when it has no scheme).
    pub(crate) fn ca_url(&self) -> Result<Option<String>, Error> {
        url(self.ca_address.as_deref(), "--ca-address")
    }

    /// Where the root for the TLS to `url` (the xDS server or the CA) comes from: `value`
    /// (`--xds-root-ca`, `--ca-root-ca`), else the chart's mounted root for an `https://` URL.
    pub(crate) fn control_plane_root(
        url: &str,
        value: Option<&str>,
        flag: &'static str,
    ) -> Result<Option<istio::RootSource>, Error> {
        let https = url.starts_with("https://");
        if value.is_none() && !https {
            return Ok(None);
        }
        istio::root_source(value, istio::DEFAULT_ROOT).map_err(|reason| Error::Flag {
            flag,
            value: value.unwrap_or_default().to_owned(),
            reason,
        })
    }
}

fn url(value: Option<&str>, flag: &'static str) -> Result<Option<String>, Error> {
    value
        .map(|v| {
            istio::control_plane_url(v).map_err(|reason| Error::Flag {
                flag,
                value: v.to_owned(),
                reason,
            })
        })
        .transpose()
}

/// `IP:PORT` or `localhost:PORT` (as Istio writes DNS_PROXY_ADDR).
fn parse_dns_addr(text: &str) -> Result<SocketAddr, String> {
    if let Some(port) = text.strip_prefix("localhost:") {
        let port: u16 = port
            .parse()
            .map_err(|_| format!("{port:?} is not a port"))?;
        return Ok(SocketAddr::from(([127, 0, 0, 1], port)));
    }
    text.parse()
        .map_err(|_| format!("expected IP:PORT or localhost:PORT, got {text:?}"))
}
