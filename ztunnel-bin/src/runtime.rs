//! The async runtime a command runs on, and running it there.

use std::future::Future;
use std::process::ExitCode;

/// Runs `command` on a runtime with `worker_threads` data-path threads (tokio's default when
/// `None`) and returns the process's exit code.
pub(crate) fn run(
    worker_threads: Option<u16>,
    command: impl Future<Output = Result<ExitCode, crate::cmd::Error>> + Send + 'static,
) -> ExitCode {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    // The proxy's data path runs on ZTUNNEL_WORKER_THREADS threads. With one, the runtime is
    // tokio's single-threaded scheduler on this thread: no work-stealing bookkeeping, no wake-ups
    // of idle workers, 5% fewer instructions per forwarded message than a one-worker multi-thread
    // runtime (BENCHMARKS.md, issue 12 lever 12).
    match worker_threads {
        Some(1) => builder = tokio::runtime::Builder::new_current_thread(),
        Some(n) => {
            builder.worker_threads(usize::from(n));
        }
        None => {}
    }
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ztunnel: cannot start the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
    // The command runs as a task on the runtime's workers, not in `block_on` on this thread: a
    // proxy's accept loops inside `block_on` ran on the main thread, so every accepted
    // connection was handed across threads to a worker (a futex wake-up each, and a second
    // thread busy in what is configured as a one-worker proxy). BENCHMARKS.md, issue 12 lever 7.
    // (With the single-threaded scheduler, this thread is the worker and runs the task.)
    let joined = runtime.block_on(runtime.spawn(command));
    let result = match joined.map_err(tokio::task::JoinError::try_into_panic) {
        Ok(result) => result,
        Err(Ok(panic)) => std::panic::resume_unwind(panic),
        Err(Err(e)) => {
            // Only a runtime shutdown cancels it, and that cannot happen inside block_on.
            eprintln!("ztunnel: the command's task ended early: {e}");
            return ExitCode::from(2);
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
            ExitCode::from(2)
        }
    }
}
