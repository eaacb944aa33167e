//! `ztunnel`: the node proxy of an ambient mesh, and tools to poke its parts by hand.
//!
//! This file only assembles: parse the command line, set up logging, run the command.
#![forbid(unsafe_code)]

mod cli;
mod cmd;
mod logfmt;

use clap::Parser;

/// jemalloc instead of glibc's malloc: the data path allocates and frees buffers of tens of KiB
/// all the time, and glibc handed that memory back to the kernel and faulted it in again on
/// every reuse (a fifth of the server side's cycles under iperf3). jemalloc keeps it for a
/// while; mimalloc did too but cost 15 MiB more idle RSS (BENCHMARKS.md, issue 12).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    let cli = cli::Cli::parse();
    let log_control = init_logging(&cli.log_level, cli.log_format == "json");
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    // The proxy's data path runs on ZTUNNEL_WORKER_THREADS threads. With one, the runtime is
    // tokio's single-threaded scheduler on this thread: no work-stealing bookkeeping, no wake-ups
    // of idle workers, 5% fewer instructions per forwarded message than a one-worker multi-thread
    // runtime (BENCHMARKS.md, issue 12 lever 12).
    if let cli::Command::Proxy(args) = &cli.command {
        if args.worker_threads == 1 {
            builder = tokio::runtime::Builder::new_current_thread();
        } else {
            builder.worker_threads(usize::from(args.worker_threads));
        }
    }
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ztunnel: cannot start the async runtime: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    // The command runs as a task on the runtime's workers, not in `block_on` on this thread: a
    // proxy's accept loops inside `block_on` ran on the main thread, so every accepted
    // connection was handed across threads to a worker (a futex wake-up each, and a second
    // thread busy in what is configured as a one-worker proxy). BENCHMARKS.md, issue 12 lever 7.
    // (With the single-threaded scheduler, this thread is the worker and runs the task.)
    let joined = runtime.block_on(runtime.spawn(cmd::run(cli.command, log_control)));
    let result = match joined.map_err(tokio::task::JoinError::try_into_panic) {
        Ok(result) => result,
        Err(Ok(panic)) => std::panic::resume_unwind(panic),
        Err(Err(e)) => {
            // Only a runtime shutdown cancels it, and that cannot happen inside block_on.
            eprintln!("ztunnel: the command's task ended early: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    // Do not wait for blocking stdin readers or lingering connections.
    runtime.shutdown_background();
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ztunnel: error: {e:#}");
            // 2, so that `policy check` (1 = DENY) and `policy lint` (1 = warnings) can tell a
            // verdict from a failure.
            std::process::ExitCode::from(2)
        }
    }
}

/// Logs go to stderr, so stdout stays free for data (`hbone connect`) and per-stream lines. The
/// returned control changes the filter at runtime (the proxy's `/logging`).
fn init_logging(level: &str, json: bool) -> cmd::LogControl {
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    let filter = tracing_subscriber::EnvFilter::try_new(level).unwrap_or_else(|e| {
        eprintln!("ztunnel: log filter {level:?} is invalid ({e}); using info");
        tracing_subscriber::EnvFilter::new("info")
    });
    let (filter, handle) = tracing_subscriber::reload::Layer::new(filter);
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let plain = (!json).then(|| {
        tracing_subscriber::fmt::layer()
            .fmt_fields(logfmt::PlainFields)
            .with_writer(std::io::stderr)
            .with_ansi(ansi)
    });
    let json = json.then(|| {
        tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_writer(std::io::stderr)
    });
    tracing_subscriber::registry()
        .with(filter)
        .with(plain)
        .with(json)
        .init();
    std::sync::Arc::new(move |level: &str| {
        let filter = tracing_subscriber::EnvFilter::try_new(level)
            .map_err(|e| format!("invalid log filter {level:?}: {e}"))?;
        handle
            .reload(filter)
            .map_err(|e| format!("cannot change the log filter: {e}"))?;
        Ok(level.to_owned())
    })
}
