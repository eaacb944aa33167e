//! The subcommands. Each is a thin wrapper over the library crates.

mod ca;
mod demo;
mod hbone_cli;

use crate::cli::{CaCommand, Command, HboneCommand};

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
    /// The demo saw something other than what it expected.
    #[error("demo check failed: {0}")]
    Demo(String),
}

pub(crate) async fn run(command: Command) -> Result<(), Error> {
    match command {
        Command::Hbone(HboneCommand::Serve(args)) => hbone_cli::serve(args).await,
        Command::Hbone(HboneCommand::Connect(args)) => hbone_cli::connect(args).await,
        Command::Ca(CaCommand::Init(args)) => ca::init(args),
        Command::Ca(CaCommand::Issue(args)) => ca::issue(args),
        Command::Demo(args) => demo::run(args).await,
    }
}
