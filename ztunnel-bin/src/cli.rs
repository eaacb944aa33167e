//! The command line: every subcommand and flag, with its help text.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// ztunnel: the L4 node proxy of an ambient service mesh (HBONE, SPIFFE mTLS, L4 policy).
#[derive(Debug, Parser)]
#[command(name = "ztunnel", version, about, long_about = None)]
pub(crate) struct Cli {
    /// Log filter for stderr, e.g. `info`, `debug`, `hbone=debug,info`.
    #[arg(long, global = true, default_value = "info")]
    pub(crate) log_level: String,

    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Poke HBONE by hand: terminate tunnels or open them.
    #[command(subcommand)]
    Hbone(HboneCommand),
    /// Run a self-contained HBONE demo on loopback (development CA, server, client, traffic).
    Demo(DemoArgs),
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
    /// Refuse a server whose certificate lacks this URI SAN (repeat to accept any of several).
    #[arg(long, value_name = "URI")]
    pub(crate) expect_san: Vec<String>,
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
