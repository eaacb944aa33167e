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

use crate::cli::{CaCommand, Command, HboneCommand, PolicyCommand, RedirectCommand};

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

/// Runs a command; `Ok` carries the exit code of a verdict (0, or 1 for DENY / warnings).
/// Binds a TCP listener, naming the address when it cannot.
async fn listen(addr: std::net::SocketAddr) -> Result<tokio::net::TcpListener, Error> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| Error::Io {
            what: format!("cannot listen on {addr}"),
            source,
        })
}

/// Changes the process's log filter at runtime; returns the new filter or why it was refused.
pub(crate) type LogControl = std::sync::Arc<dyn Fn(&str) -> Result<String, String> + Send + Sync>;

pub(crate) async fn run(command: Command, log_control: LogControl) -> Result<ExitCode, Error> {
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
