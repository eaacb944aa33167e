//! The subcommands. Each is a thin wrapper over the library crates.

mod ca;
mod controlplane;
mod demo;
mod hbone_cli;
mod local;
mod node_agent;
mod policy;
mod proxy;
mod redirect_cli;

use std::process::ExitCode;

use clap::Subcommand;

use ca::CaCommand;
use controlplane::ControlplaneArgs;
use demo::DemoArgs;
use hbone_cli::HboneCommand;
use local::LocalArgs;
use node_agent::NodeAgentArgs;
use policy::PolicyCommand;
use proxy::ProxyArgs;
use redirect_cli::RedirectCommand;

/// Every subcommand, with its arguments (each defined next to its code).
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

impl Command {
    /// The data path's worker threads this command asks for (the proxy's
    /// `--worker-threads`); `None` for the tools, which take the runtime's default.
    pub(crate) fn worker_threads(&self) -> Option<u16> {
        match self {
            Command::Proxy(args) => Some(args.worker_thread_count()),
            _ => None,
        }
    }
}

/// Errors a command reports before exiting non-zero.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum Error {
    /// Certificates, keys or trust roots could not be loaded or used.
    #[error(transparent)]
    Identity(#[from] identity::Error),
    /// An HBONE operation failed.
    #[error(transparent)]
    Hbone(#[from] hbone::Error),
    /// A socket or stream operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What we were doing.
        what: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A flag's value is unusable.
    #[error("invalid {flag} {value:?}: {reason}")]
    Flag {
        /// The flag, e.g. `--authority`.
        flag: &'static str,
        /// The value given.
        value: String,
        /// Why it is unusable.
        reason: String,
    },
    /// Capture rules could not be applied or read.
    #[error(transparent)]
    Redirect(#[from] redirect::Error),
    /// A policy file is malformed.
    #[error(transparent)]
    Policy(#[from] authz::ParseError),
    /// The control plane's node tokens could not be created or read.
    #[error(transparent)]
    NodeTokens(#[from] ::controlplane::TokenError),
    /// The local mesh failed.
    #[error(transparent)]
    Local(#[from] localmesh::Error),
    /// The demo saw something other than what it expected.
    #[error("demo check failed: {0}")]
    Demo(String),
}

/// Where an operations endpoint listens: an address, `[::]:PORT` (every address of both
/// families: one dual-stack socket, or IPv4 alone where there is no IPv6), or
/// `localhost:PORT` (127.0.0.1 and, where there is IPv6, ::1), as Istio's ztunnel binds them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ListenAddr {
    /// One address (`[::]` meaning both families).
    Addr(std::net::SocketAddr),
    /// Both loopback addresses.
    Localhost(u16),
}

impl std::str::FromStr for ListenAddr {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        if let Some(port) = text.strip_prefix("localhost:") {
            return port
                .parse()
                .map(ListenAddr::Localhost)
                .map_err(|_| format!("{port:?} is not a port"));
        }
        text.parse().map(ListenAddr::Addr).map_err(|_| {
            format!("expected IP:PORT, [::]:PORT (both families) or localhost:PORT, got {text:?}")
        })
    }
}

impl std::fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ListenAddr::Addr(a) => a.fmt(f),
            ListenAddr::Localhost(port) => write!(f, "localhost:{port}"),
        }
    }
}

impl ListenAddr {
    /// The one address a single listener binds: `[::]` where there is IPv6 (a dual-stack
    /// socket when bound by tokio, as the system's default `bindv6only=0` makes it), else
    /// `0.0.0.0`; `localhost` as 127.0.0.1.
    pub(crate) fn single(self) -> std::net::SocketAddr {
        use std::net::{Ipv4Addr, SocketAddr};
        match self {
            ListenAddr::Addr(a)
                if a.ip().is_unspecified() && a.is_ipv6() && !::proxy::sockets::has_ipv6() =>
            {
                SocketAddr::from((Ipv4Addr::UNSPECIFIED, a.port()))
            }
            ListenAddr::Addr(a) => a,
            ListenAddr::Localhost(port) => SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
        }
    }
}

/// Binds the listeners of `addr` (see [`ListenAddr`]), naming the address when one cannot be;
/// with `reuse_port`, `SO_REUSEPORT`, so a second process of the same user binds beside the
/// first (a proxy's rolling restart where both share a network namespace, as the local mesh's
/// nodes do) and takes the connections alone once the first has gone.
async fn listen_all(
    addr: ListenAddr,
    reuse_port: bool,
) -> Result<Vec<tokio::net::TcpListener>, Error> {
    use std::net::{Ipv6Addr, SocketAddr};
    let bind = |a: SocketAddr, what: String, dual: bool| {
        let socket = if dual {
            dual_stack(a.port(), reuse_port)
        } else {
            ::proxy::sockets::listener(a, reuse_port)
        };
        socket
            .and_then(tokio::net::TcpListener::from_std)
            .map_err(|source| Error::Io { what, source })
    };
    match addr {
        ListenAddr::Addr(a)
            if a.ip().is_unspecified() && a.is_ipv6() && ::proxy::sockets::has_ipv6() =>
        {
            Ok(vec![bind(
                a,
                format!("cannot listen on {a} (both families)"),
                true,
            )?])
        }
        ListenAddr::Addr(_) => {
            let a = addr.single();
            Ok(vec![bind(a, format!("cannot listen on {a}"), false)?])
        }
        ListenAddr::Localhost(port) => {
            let a = addr.single();
            let mut all = vec![bind(a, format!("cannot listen on {a}"), false)?];
            if ::proxy::sockets::has_ipv6() {
                let a = SocketAddr::from((Ipv6Addr::LOCALHOST, port));
                all.push(bind(a, format!("cannot listen on {a}"), false)?);
            }
            Ok(all)
        }
    }
}

/// A listener on `[::]:port` that takes IPv4 too (`IPV6_V6ONLY` off, whatever the system's
/// default), non-blocking.
fn dual_stack(port: u16, reuse_port: bool) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::IPV6, Type::STREAM, None)?;
    socket.set_only_v6(false)?;
    socket.set_reuse_address(true)?;
    if reuse_port {
        socket.set_reuse_port(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&std::net::SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, port)).into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}

/// Binds a TCP listener, naming the address when it cannot.
async fn listen(addr: std::net::SocketAddr) -> Result<tokio::net::TcpListener, Error> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| Error::Io {
            what: format!("cannot listen on {addr}"),
            source,
        })
}

/// Runs a command; `Ok` carries the exit code of a verdict (0, or 1 for DENY / warnings).
pub(crate) async fn run(
    command: Command,
    log_control: crate::logging::LogControl,
) -> Result<ExitCode, Error> {
    let ok = |r: Result<(), Error>| r.map(|()| ExitCode::SUCCESS);
    match command {
        Command::Hbone(HboneCommand::Serve(args)) => ok(hbone_cli::serve(args).await),
        Command::Hbone(HboneCommand::Connect(args)) => ok(hbone_cli::connect(args).await),
        Command::Ca(CaCommand::Init(args)) => ok(ca::init(args)),
        Command::Ca(CaCommand::Issue(args)) => ok(ca::issue(args)),
        Command::Policy(PolicyCommand::Check(args)) => policy::check(args),
        Command::Policy(PolicyCommand::Lint(args)) => policy::lint(args),
        Command::Controlplane(args) => ok(controlplane::run(args).await),
        Command::NodeAgent(args) => ok(node_agent::run(args).await),
        Command::Redirect(RedirectCommand::Apply(args)) => redirect_cli::apply(args),
        Command::Redirect(RedirectCommand::Remove(args)) => redirect_cli::remove(args),
        Command::Redirect(RedirectCommand::Check(args)) => redirect_cli::check(args),
        Command::Redirect(RedirectCommand::Reconcile(args)) => redirect_cli::reconcile(args),
        Command::Demo(args) => ok(demo::run(args).await),
        Command::Local(args) => local::run(args).await,
        Command::Proxy(args) => ok(proxy::run(*args, log_control).await),
    }
}
