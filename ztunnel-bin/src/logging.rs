//! Logging: set up once, on stderr, in the format asked for, with a filter that the proxy's
//! admin endpoint can change at runtime.

use crate::args::LogFormat;

/// Changes the process's log filter at runtime; returns the new filter or why it was refused.
pub(crate) type LogControl = std::sync::Arc<dyn Fn(&str) -> Result<String, String> + Send + Sync>;

/// Logs go to stderr, so stdout stays free for data (`hbone connect`) and per-stream lines. The
/// returned control changes the filter at runtime (the proxy's `/logging`).
pub(crate) fn init(level: &str, format: LogFormat) -> LogControl {
    let json = format == LogFormat::Json;
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
            .fmt_fields(crate::logfmt::PlainFields)
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
