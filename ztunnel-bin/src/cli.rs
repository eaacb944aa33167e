//! The command line: every subcommand and flag, with its help text.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// ztunnel: the L4 node proxy of an ambient service mesh (HBONE, SPIFFE mTLS, L4 policy).
#[derive(Debug, Parser)]
#[command(name = "ztunnel", version, about, long_about = None)]
pub(crate) struct Cli {
    /// Log filter for stderr, e.g. `info`, `debug`, `hbone=debug,info` (`RUST_LOG`). The proxy's
    /// admin endpoint changes it at runtime (`/logging?level=...`).
    #[arg(long, global = true, env = "RUST_LOG", default_value = "info")]
    pub(crate) log_level: String,
    /// Log line format on stderr: `plain` (key=value) or `json` (one object per line; access-log
    /// fields become JSON fields) (`LOG_FORMAT`).
    #[arg(long, global = true, env = "LOG_FORMAT", value_parser = ["plain", "json"], default_value = "plain")]
    pub(crate) log_format: String,

    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Poke HBONE by hand: terminate tunnels or open them.
    #[command(subcommand)]
    Hbone(HboneCommand),
    /// Development certificate authority: create a root, issue workload certificates.
    #[command(subcommand)]
    Ca(CaCommand),
    /// L4 AuthorizationPolicy tools: decide a connection, lint policies.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Run a local control plane: Kubernetes YAML in a directory, served as istiod serves ambient
    /// proxies (delta ADS and the Istio CA on one gRPC listener); edits are pushed within a second.
    Controlplane(ControlplaneArgs),
    /// Traffic capture rules inside a pod's network namespace.
    #[command(subcommand)]
    Redirect(RedirectCommand),
    /// Run the node agent: capture this node's pods whose namespace is in ambient mode.
    NodeAgent(NodeAgentArgs),
    /// Run a self-contained HBONE demo on loopback (development CA, server, client, traffic).
    Demo(DemoArgs),
    /// A whole ambient mesh on this machine (nodes and pods in network namespaces, the control
    /// plane, node agents, proxies, built-in apps), and the ambient walkthrough as a tutorial.
    Local(LocalArgs),
    /// Run the node proxy. Every flag can also be given by the environment variable Istio's
    /// ztunnel reads (named in each flag's help).
    ///
    /// State comes from xDS (`--xds-address`) or local manifests (`--local-manifests`);
    /// certificates from a CA (`--ca-address`), an in-process development CA (`--ca-dir`) or, in
    /// dedicated mode, files (`--cert/--key/--ca`). Shared mode serves the pods a node agent hands
    /// over on `--inpod-uds`; dedicated mode serves one workload in the current netns. Admin on
    /// 127.0.0.1:15000 (/config_dump, /logging?level=, POST /quitquitquit), metrics on :15020
    /// (/metrics, /stats/prometheus), readiness on :15021 (/healthz/ready).
    #[command(
        after_long_help = "Environment without a flag:\n  HBONE_TLS_AEAD=ring|aws-lc  which \
                           implementation seals and opens HBONE's TLS records (default: aws-lc \
                           where the CPU has AVX-512 VAES or is not x86-64, else ring)"
    )]
    Proxy(Box<ProxyArgs>),
}

#[derive(Debug, Args)]
pub(crate) struct ProxyArgs {
    /// `shared` (one proxy per node, pods handed over ZDS) or `dedicated` (one workload, in the
    /// current network namespace).
    #[arg(long, env = "PROXY_MODE", value_parser = ["shared", "dedicated"], default_value = "shared")]
    pub(crate) mode: String,
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
    #[arg(long, env = "PACKET_MARK", default_value = "1337", value_parser = parse_u32)]
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
    pub(crate) connection_termination_deadline: std::time::Duration,
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
    pub(crate) secret_ttl: std::time::Duration,
    /// Tunnels sharing one pooled HBONE connection, at most.
    #[arg(long, env = "POOL_MAX_STREAMS_PER_CONNECTION", default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) pool_max_streams_per_connection: u32,
    /// A pooled HBONE connection without tunnels is closed after this long.
    #[arg(long, env = "POOL_UNUSED_RELEASE_TIMEOUT", default_value = "5m", value_parser = parse_duration)]
    pub(crate) pool_unused_release_timeout: std::time::Duration,
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
    #[arg(long, default_value = "127.0.0.1:15000")]
    pub(crate) admin_addr: SocketAddr,
    /// Metrics endpoint.
    #[arg(long, default_value = "0.0.0.0:15020")]
    pub(crate) stats_addr: SocketAddr,
    /// Readiness endpoint.
    #[arg(long, default_value = "0.0.0.0:15021")]
    pub(crate) readiness_addr: SocketAddr,
    /// Series of gone pods are dropped from the metrics after this long without connections.
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    pub(crate) metrics_expiry: std::time::Duration,
}

/// A number in decimal or `0x` hexadecimal.
fn parse_u32(text: &str) -> Result<u32, String> {
    let parsed = match text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => text.parse(),
    };
    parsed.map_err(|_| format!("{text:?} is not a number (decimal or 0x hex)"))
}

#[derive(Debug, Subcommand)]
pub(crate) enum RedirectCommand {
    /// Install (or replace) the capture rules; idempotent.
    Apply(RedirectArgs),
    /// Remove exactly the rules `apply` installed.
    Remove(RedirectArgs),
    /// Report drift between the live rules and what `apply` installs; exit 1 on drift.
    Check(RedirectArgs),
    /// Repair drift (reapply when `check` would report any).
    Reconcile(RedirectArgs),
}

#[derive(Debug, Args)]
pub(crate) struct RedirectArgs {
    /// The pod's network namespace: `/var/run/netns/NAME` or `/proc/PID/ns/net`.
    #[arg(long, value_name = "PATH")]
    pub(crate) netns: PathBuf,
    /// Rule engine.
    #[arg(long, value_parser = ["iptables", "nftables"], default_value = "iptables")]
    pub(crate) backend: String,
    /// Install IPv4 rules only.
    #[arg(long)]
    pub(crate) ipv4_only: bool,
}

#[derive(Debug, Args)]
pub(crate) struct NodeAgentArgs {
    /// Where pods come from: `manifests:DIR` (the local mesh's manifests; a pod's network
    /// namespace is given by its `ambient.local/netns` annotation, else found by its IP) or `kube`
    /// (watch the API server configured by KUBECONFIG, ~/.kube/config or the in-cluster account;
    /// namespaces found by pod IP).
    #[arg(long, value_name = "SOURCE")]
    pub(crate) source: String,
    /// This node's name (pods' `spec.nodeName`).
    #[arg(long, value_name = "NAME")]
    pub(crate) node: String,
    /// Rule engine.
    #[arg(long, value_parser = ["iptables", "nftables"], default_value = "iptables")]
    pub(crate) backend: String,
    /// Also hand each captured pod's network namespace to the proxy over Istio's ZDS protocol,
    /// listening on this Unix socket (Istio's default: /var/run/ztunnel/ztunnel.sock).
    #[arg(long, value_name = "PATH")]
    pub(crate) zds_socket: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub(crate) struct ControlplaneArgs {
    /// Directory of Kubernetes YAML (Namespace, Pod, Deployment, Service, AuthorizationPolicy).
    #[arg(long, value_name = "DIR")]
    pub(crate) manifests: PathBuf,
    /// Address to serve on.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:15012")]
    pub(crate) listen: SocketAddr,
    /// Development CA directory (created with a new root if missing); default `DIR/.ca`.
    #[arg(long, value_name = "DIR")]
    pub(crate) ca_dir: Option<PathBuf>,
    /// Directory of per-node bearer tokens (`<node>.token`, created for every node a pod runs
    /// on); default `DIR/.node-tokens`. A node's proxy must present its node's token on xDS and
    /// CA calls (`AUTH_TOKEN`); the CA signs only identities of pods on the caller's node.
    #[arg(long, value_name = "DIR")]
    pub(crate) node_tokens: Option<PathBuf>,
    /// Extra DNS names or IPs for the serving certificate (besides istiod.istio-system.svc).
    #[arg(long, value_name = "NAME")]
    pub(crate) tls_name: Vec<String>,
    /// Serve plaintext gRPC instead of TLS (tests and local experiments only).
    #[arg(long)]
    pub(crate) plaintext: bool,
    /// Longest certificate lifetime the CA grants.
    #[arg(long, default_value = "24h", value_parser = parse_duration)]
    pub(crate) max_cert_ttl: std::time::Duration,
}

#[derive(Debug, Subcommand)]
pub(crate) enum PolicyCommand {
    /// Decide one connection against AuthorizationPolicy YAML, as ztunnel would. Prints ALLOW or
    /// DENY with the reason; exit code 0 for ALLOW, 1 for DENY, 2 for an error.
    Check(PolicyCheckArgs),
    /// Print what an L4 proxy cannot honour in the policies (one warning per line); exit code 0
    /// when there is nothing to say, 1 when warnings were printed, 2 for an error.
    Lint(PolicyLintArgs),
}

/// Where policies come from, shared by `policy check` and `policy lint`.
#[derive(Debug, Args)]
pub(crate) struct PolicyFiles {
    /// Kubernetes YAML with AuthorizationPolicy documents (other kinds are ignored); repeatable.
    #[arg(
        short = 'f',
        long = "file",
        value_name = "POLICIES.yaml",
        required = true
    )]
    pub(crate) files: Vec<PathBuf>,
    /// The mesh's root namespace (policies there apply mesh-wide).
    #[arg(long, default_value = "istio-system")]
    pub(crate) root_namespace: String,
}

#[derive(Debug, Args)]
pub(crate) struct PolicyCheckArgs {
    #[command(flatten)]
    pub(crate) policies: PolicyFiles,
    /// Namespace of the destination workload.
    #[arg(long, value_name = "NS")]
    pub(crate) namespace: String,
    /// Labels of the destination workload, `k=v,k2=v2`.
    #[arg(long, value_name = "K=V,...", default_value = "")]
    pub(crate) labels: String,
    /// The client's identity (`spiffe://td/ns/NS/sa/SA` or `td/ns/NS/sa/SA`); omit for a
    /// plaintext client with no identity.
    #[arg(long, value_name = "PRINCIPAL")]
    pub(crate) source_principal: Option<String>,
    /// The client's IP address (default 0.0.0.0, which no ipBlock contains).
    #[arg(long, value_name = "IP", default_value = "0.0.0.0")]
    pub(crate) source_ip: std::net::IpAddr,
    /// The destination IP address (default 0.0.0.0).
    #[arg(long, value_name = "IP", default_value = "0.0.0.0")]
    pub(crate) dest_ip: std::net::IpAddr,
    /// The destination port.
    #[arg(long, value_name = "N")]
    pub(crate) dest_port: u16,
    /// Print every step: which policies applied and which rule, clause and match failed and why.
    #[arg(long)]
    pub(crate) explain: bool,
}

#[derive(Debug, Args)]
pub(crate) struct PolicyLintArgs {
    #[command(flatten)]
    pub(crate) policies: PolicyFiles,
}

#[derive(Debug, Subcommand)]
pub(crate) enum CaCommand {
    /// Create a development root CA in DIR (`root-cert.pem`, and `root-key.pem` readable by its
    /// owner only). Refuses to overwrite an existing one.
    Init(CaInitArgs),
    /// Issue a workload certificate from the CA in DIR; writes `cert-chain.pem`, `key.pem` and
    /// `root-cert.pem` into OUT.
    Issue(CaIssueArgs),
}

#[derive(Debug, Args)]
pub(crate) struct CaInitArgs {
    /// Directory for the CA files (created if missing).
    #[arg(long, value_name = "DIR")]
    pub(crate) dir: PathBuf,
    /// Trust domain of the mesh; recorded as the root's O= and checked by `issue`.
    #[arg(long, default_value = "cluster.local")]
    pub(crate) trust_domain: String,
}

#[derive(Debug, Args)]
pub(crate) struct CaIssueArgs {
    /// Directory of the CA made by `ztunnel ca init`.
    #[arg(long, value_name = "DIR")]
    pub(crate) dir: PathBuf,
    /// The workload's SPIFFE id, e.g. `spiffe://cluster.local/ns/default/sa/sleep`.
    #[arg(long, value_name = "SPIFFE_ID")]
    pub(crate) id: String,
    /// Lifetime: a number with a unit, `s`, `m`, `h` or `d` (e.g. `90s`, `24h`, `7d`).
    #[arg(long, default_value = "24h", value_parser = parse_duration)]
    pub(crate) ttl: std::time::Duration,
    /// Directory for the workload's files (created if missing).
    #[arg(long, value_name = "DIR")]
    pub(crate) out: PathBuf,
}

/// Parses `90s`, `15m`, `24h`, `7d`.
pub(crate) fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("{text:?} has no unit; use s, m, h or d (e.g. 24h)"))?;
    let (number, unit) = text.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} does not start with a whole number"))?;
    let seconds = match unit {
        "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86_400,
        _ => return Err(format!("{text:?} has unit {unit:?}; use s, m, h or d")),
    };
    if seconds == 0 {
        return Err("a lifetime must be longer than zero".into());
    }
    Ok(std::time::Duration::from_secs(seconds))
}

#[derive(Debug, Subcommand)]
pub(crate) enum HboneCommand {
    /// Terminate HBONE: accept mTLS + HTTP/2 CONNECT and forward each stream over TCP.
    ///
    /// Prints one line per stream on stdout: peer identity (URI SAN), authority, upstream,
    /// status, bytes each way, duration.
    Serve(ServeArgs),
    /// Open an HBONE tunnel: from stdin/stdout (like `nc`), or for each TCP connection accepted
    /// on `--listen`.
    Connect(ConnectArgs),
}

/// Certificate files shared by both ends.
#[derive(Debug, Args)]
pub(crate) struct TlsFiles {
    /// PEM certificate chain to present, leaf first.
    #[arg(long, value_name = "PEM")]
    pub(crate) cert: PathBuf,
    /// PEM private key of the leaf certificate.
    #[arg(long, value_name = "PEM")]
    pub(crate) key: PathBuf,
    /// PEM trust roots; the peer's chain must verify against them.
    #[arg(long, value_name = "PEM")]
    pub(crate) ca: PathBuf,
}

#[derive(Debug, Args)]
pub(crate) struct ServeArgs {
    /// Address to listen on, e.g. `0.0.0.0:15008`.
    #[arg(long, value_name = "ADDR")]
    pub(crate) listen: SocketAddr,
    #[command(flatten)]
    pub(crate) tls: TlsFiles,
    /// Forward every stream to this address instead of the stream's `:authority`.
    #[arg(long, value_name = "ADDR")]
    pub(crate) forward_to: Option<String>,
}

#[derive(Debug, Args)]
pub(crate) struct ConnectArgs {
    /// The HBONE server to dial, `ip:port` or `host:port`.
    #[arg(long, value_name = "ADDR")]
    pub(crate) to: String,
    /// The tunnel's destination, sent as the CONNECT `:authority` (`ip:port`, `[v6]:port`,
    /// `host:port`).
    #[arg(long, value_name = "HOST:PORT")]
    pub(crate) authority: String,
    #[command(flatten)]
    pub(crate) tls: TlsFiles,
    /// The SPIFFE id the server must present (repeat to accept any of several). Required unless
    /// --insecure-any-san is given.
    #[arg(long, value_name = "URI", required_unless_present = "insecure_any_san")]
    pub(crate) expect_san: Vec<String>,
    /// INSECURE, for debugging: accept a server with any identity issued under --ca (any
    /// workload of the mesh could then pose as the destination). Says so on stderr.
    #[arg(long, conflicts_with = "expect_san")]
    pub(crate) insecure_any_san: bool,
    /// Accept plain TCP here and tunnel each connection, instead of using stdin/stdout.
    #[arg(long, value_name = "ADDR")]
    pub(crate) listen: Option<SocketAddr>,
}

#[derive(Debug, Args)]
pub(crate) struct DemoArgs {
    /// Concurrent tunnels to open.
    #[arg(long, default_value_t = 8)]
    pub(crate) streams: usize,
    /// Bytes each tunnel sends (and gets echoed back).
    #[arg(long, default_value_t = 4 * 1024 * 1024)]
    pub(crate) bytes: usize,
    /// Also write the demo's CA and the client/server certificates here, for use with
    /// `ztunnel hbone serve|connect` (subfolders `server/` and `client/`).
    #[arg(long, value_name = "DIR")]
    pub(crate) write_certs: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub(crate) struct LocalArgs {
    /// Run directory: state, manifests, logs, sockets (`ZTUNNEL_LOCAL_DIR`).
    #[arg(
        long,
        global = true,
        env = "ZTUNNEL_LOCAL_DIR",
        default_value = "/run/ztunnel-local"
    )]
    pub(crate) run_dir: PathBuf,
    /// Prefix of every network namespace and link the mesh makes.
    #[arg(long, global = true, default_value = "zl")]
    pub(crate) prefix: String,
    /// First two octets of the mesh's addresses (nodes in A.B.0.0/24, node i's pods in
    /// A.B.(1+i).0/24).
    #[arg(long, global = true, default_value = "10.250", value_parser = parse_subnet)]
    pub(crate) subnet: [u8; 2],
    /// Capture rules of the node agents.
    #[arg(long, global = true, value_parser = ["iptables", "nftables"], default_value = "iptables")]
    pub(crate) backend: String,
    #[command(subcommand)]
    pub(crate) command: LocalCommand,
}

fn parse_subnet(text: &str) -> Result<[u8; 2], String> {
    let parts: Vec<&str> = text.split('.').collect();
    match parts.as_slice() {
        [a, b] => match (a.parse::<u8>(), b.parse::<u8>()) {
            (Ok(a), Ok(b)) => Ok([a, b]),
            _ => Err(format!("{text:?}: expected two octets such as 10.250")),
        },
        _ => Err(format!("{text:?}: expected two octets such as 10.250")),
    }
}

#[derive(Debug, Subcommand)]
pub(crate) enum LocalCommand {
    /// Create the nodes and pods and start everything (cleans up a crashed mesh first); returns
    /// once every proxy is ready.
    Up {
        /// Kubernetes YAML to run (a file or a directory of them); default: the walkthrough's
        /// workloads (examples/ambient-walkthrough/apps.yaml, built in).
        #[arg(long, value_name = "PATH")]
        manifests: Option<PathBuf>,
    },
    /// Stop everything and remove every namespace, link, rule, process and file the mesh made.
    Down,
    /// Set (`k=v`) or remove (`k-`) labels: `ztunnel local label namespace default
    /// istio.io/dataplane-mode=ambient`.
    Label {
        /// Only `namespace`.
        #[arg(value_parser = ["namespace", "ns"])]
        kind: String,
        /// The namespace.
        name: String,
        /// Changes.
        #[arg(required = true)]
        labels: Vec<String>,
    },
    /// Add or replace documents (Namespace, ServiceAccount, Deployment, Service,
    /// AuthorizationPolicy).
    Apply {
        /// A file or directory of Kubernetes YAML.
        #[arg(short = 'f', long = "filename", value_name = "PATH")]
        file: PathBuf,
    },
    /// Remove the documents a file names.
    Delete {
        /// A file or directory of Kubernetes YAML.
        #[arg(short = 'f', long = "filename", value_name = "PATH")]
        file: PathBuf,
    },
    /// Run a command inside a pod's network namespace (`NAME` in `default`, or `NS/NAME`).
    Exec {
        /// The pod.
        pod: String,
        /// The command and its arguments (after `--`).
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Print a part's log.
    Logs {
        /// `ztunnel`, `node-agent` or `controlplane`.
        #[arg(value_parser = ["ztunnel", "node-agent", "controlplane"])]
        part: String,
        /// Only this node.
        #[arg(long)]
        node: Option<String>,
    },
    /// Nodes, proxies, pods (captured or not, certificates), services.
    Status,
    /// Replay the ambient walkthrough on a fresh mesh, checking every step; removes the mesh at
    /// the end. Exit 0 only if every observation matched.
    Tutorial,
    /// A built-in app (what the mesh runs in a pod).
    #[command(hide = true)]
    App {
        /// The app's name (answers carry it).
        #[arg(long)]
        name: String,
        /// Port.
        #[arg(long)]
        port: u16,
        /// URL to call first.
        #[arg(long)]
        upstream: Option<String>,
        /// Gateway routes, `host=url`.
        #[arg(long)]
        route: Vec<String>,
    },
    /// GET a URL and print the body (exit 1 unless 200): `ztunnel local exec sleep -- ztunnel
    /// local get http://web-api:8080/`.
    Get {
        /// `http://host[:port]/path`.
        url: String,
        /// Host header.
        #[arg(long)]
        host: Option<String>,
    },
}
