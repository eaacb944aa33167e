//! `ztunnel`: the node proxy of an ambient mesh, and tools to poke its parts by hand.
//!
//! This file only assembles: parse the command line (`cli`, each subcommand's arguments in
//! `cmd/`, shared values in `args`), set up logging (`logging`), run the command on its runtime (`runtime`).
#![forbid(unsafe_code)]

mod args;
mod cli;
mod cmd;
mod logfmt;
mod logging;
mod runtime;

use clap::Parser;

/// jemalloc instead of glibc's malloc: the data path allocates and frees buffers of tens of KiB
/// all the time, and glibc handed that memory back to the kernel and faulted it in again on
/// every reuse (a fifth of the server side's cycles under iperf3). jemalloc keeps it for a
/// while; mimalloc did too but cost 15 MiB more idle RSS (BENCHMARKS.md, issue 12).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    let cli = cli::Cli::parse();
    let log_control = logging::init(&cli.log_level, cli.log_format);
    let worker_threads = cli.command.worker_threads();
    runtime::run(worker_threads, cmd::run(cli.command, log_control))
}
