//! The field formatter of the plain (non-JSON) log format.
//!
//! It writes exactly what `tracing_subscriber`'s default formatter writes (`name=value`
//! separated by spaces, strings quoted and escaped as `{:?}` does), but plain strings, numbers,
//! booleans and `%`/`?` values go to the output without the default's per-field styling calls,
//! and plain strings without the `{:?}` escaping loop. Every proxied connection writes an
//! access-log line of 15 fields, and the default formatter made that line about a sixth of a
//! connection's instructions (BENCHMARKS.md, issue 12 lever 15). Everything else (the message,
//! errors, strings that need escaping, and all fields when colours are on) goes to the default
//! formatter.

use std::fmt;

use tracing::field::{Field, Visit};
use tracing_subscriber::field::{MakeVisitor, VisitFmt, VisitOutput};
use tracing_subscriber::fmt::format::{DefaultVisitor, Writer};

/// Formats an event's fields; see the module documentation.
#[derive(Debug, Default)]
pub(crate) struct PlainFields;

impl<'a> MakeVisitor<Writer<'a>> for PlainFields {
    type Visitor = PlainVisitor<'a>;

    fn make_visitor(&self, target: Writer<'a>) -> Self::Visitor {
        PlainVisitor {
            writer: target,
            is_empty: true,
            result: Ok(()),
        }
    }
}

/// Writes one event's fields.
pub(crate) struct PlainVisitor<'a> {
    writer: Writer<'a>,
    is_empty: bool,
    result: fmt::Result,
}

impl PlainVisitor<'_> {
    /// Whether `name` is written as `name=value` here (the default formatter treats `message`
    /// and raw identifiers specially, and styles names when colours are on).
    fn plain_name(&self, name: &str) -> bool {
        self.result.is_ok()
            && !self.writer.has_ansi_escapes()
            && name != "message"
            && !name.starts_with("r#")
    }

    fn name(&mut self, name: &str) -> fmt::Result {
        if self.is_empty {
            self.is_empty = false;
        } else {
            self.writer.write_char(' ')?;
        }
        self.writer.write_str(name)?;
        self.writer.write_char('=')
    }

    fn value(&mut self, name: &str, value: fmt::Arguments<'_>) {
        self.result = self.name(name).and_then(|()| self.writer.write_fmt(value));
    }

    /// Skips `log.*` fields (as the default does), writes `field` as `name=plain` when there is
    /// a `plain` text and the name allows it, and hands the rest to the default formatter.
    fn field(
        &mut self,
        field: &Field,
        plain: Option<fmt::Arguments<'_>>,
        record: impl FnOnce(&mut DefaultVisitor<'_>),
    ) {
        if field.name().starts_with("log.") {
            return;
        }
        match plain {
            Some(value) if self.plain_name(field.name()) => self.value(field.name(), value),
            _ => self.delegate(record),
        }
    }

    /// Hands one field to the default formatter, writing into the same output.
    fn delegate(&mut self, record: impl FnOnce(&mut DefaultVisitor<'_>)) {
        if self.result.is_err() {
            return;
        }
        let mut visitor = DefaultVisitor::new(self.writer.by_ref(), self.is_empty);
        record(&mut visitor);
        self.result = visitor.finish();
        // Every field but `log.*` (skipped before this) writes something.
        self.is_empty = false;
    }
}

/// A string that `{:?}` would write as `"` + itself + `"` (printable ASCII without `"` and `\`).
fn quotes_as_is(value: &str) -> bool {
    value
        .bytes()
        .all(|b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\')
}

impl Visit for PlainVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        let plain = quotes_as_is(value);
        self.field(field, plain.then_some(format_args!("\"{value}\"")), |v| {
            v.record_str(field, value)
        });
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.field(field, Some(format_args!("{value}")), |v| {
            v.record_u64(field, value)
        });
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.field(field, Some(format_args!("{value}")), |v| {
            v.record_i64(field, value)
        });
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.field(field, Some(format_args!("{value}")), |v| {
            v.record_bool(field, value)
        });
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.field(field, None, |v| v.record_error(field, value));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        // What the default writes too (for `%value` fields, `Debug` is the `Display`).
        self.field(field, Some(format_args!("{value:?}")), |v| {
            v.record_debug(field, value)
        });
    }
}

impl VisitOutput<fmt::Result> for PlainVisitor<'_> {
    fn finish(self) -> fmt::Result {
        self.result
    }
}

impl VisitFmt for PlainVisitor<'_> {
    fn writer(&mut self) -> &mut dyn fmt::Write {
        &mut self.writer
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io;
    use std::sync::{Arc, Mutex};
    use tracing_subscriber::fmt::MakeWriter;
    use tracing_subscriber::fmt::format::DefaultFields;
    use tracing_subscriber::layer::SubscriberExt as _;

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Captured {
        type Writer = Captured;
        fn make_writer(&'a self) -> Self::Writer {
            self.clone()
        }
    }

    #[derive(Debug)]
    struct Outer(io::Error);
    impl fmt::Display for Outer {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("outer failed")
        }
    }
    impl std::error::Error for Outer {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    /// Emits the same events through a formatter and returns the text.
    fn emit<F>(fields: F) -> String
    where
        F: for<'w> tracing_subscriber::fmt::FormatFields<'w> + Send + Sync + 'static,
    {
        let out = Captured::default();
        let layer = tracing_subscriber::fmt::layer()
            .without_time()
            .with_ansi(false)
            .fmt_fields(fields)
            .with_writer(out.clone());
        let subscriber = tracing_subscriber::registry().with(layer);
        tracing::subscriber::with_default(subscriber, || {
            let addr: std::net::SocketAddr = "10.0.0.1:8080".parse().unwrap();
            tracing::info!(
                target: "access",
                direction = "outbound",
                src.addr = %addr,
                src.identity = "spiffe://cluster.local/ns/default/sa/sleep",
                quoted = "say \"hi\"\\",
                control = "tab\there\nnewline",
                unicode = "héllo ✓",
                empty = "",
                mtls = true,
                bytes_sent = 12345u64,
                delta = -7i64,
                ratio = 0.5f64,
                debugged = ?Some("x"),
                error = "-",
                "connection complete"
            );
            tracing::warn!(r#type = "raw", "message with {} args", 2);
            tracing::error!(error = &Outer(io::Error::other("inner")) as &dyn std::error::Error);
            tracing::info!(only = 1u64);
            tracing::info!("only a message \u{1b}[31m with an escape");
            let span = tracing::info_span!("conn", peer = "a b", n = 3u64);
            let _entered = span.enter();
            tracing::info!(inside = "yes", "in a span");
        });
        let text = out.0.lock().unwrap().clone();
        String::from_utf8(text).unwrap()
    }

    #[test]
    fn writes_what_the_default_formatter_writes() {
        let ours = emit(PlainFields);
        let theirs = emit(DefaultFields::new());
        assert_eq!(ours, theirs);
        // The comparison covered the fast paths.
        assert!(ours.contains(r#"src.identity="spiffe://cluster.local/ns/default/sa/sleep""#));
        assert!(
            ours.contains("mtls=true bytes_sent=12345 delta=-7"),
            "{ours}"
        );
        assert!(ours.contains("conn{peer=\"a b\" n=3}"), "{ours}");
    }
}
