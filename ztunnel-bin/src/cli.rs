//! The command line's top: the flags every subcommand takes (logging). Each subcommand's own
//! arguments live with its code, in `cmd/`; values several share, in `args`.

use clap::Parser;

use crate::args::LogFormat;
use crate::cmd::Command;

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
    #[arg(long, global = true, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Plain)]
    pub(crate) log_format: LogFormat,

    #[command(subcommand)]
    pub(crate) command: Command,
}
