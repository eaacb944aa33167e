//! The proxy's small HTTP endpoints (admin on localhost:15000, metrics on :15020, readiness on
//! :15021): one request per connection, HTTP/1.1, `connection: close`. Requests are bounded
//! (8 KiB of head, 5 s to send it); anything else is a 400, an unknown path a 404.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// The largest request head read.
const MAX_HEAD: usize = 8 * 1024;

/// A request: its method and its target (path and query).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// `GET`, `POST`, ...
    pub method: String,
    /// The path, without the query.
    pub path: String,
    /// The query (after `?`), or empty.
    pub query: String,
}

impl Request {
    /// The value of `name` in the query (`a=b&c=d`), if present.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.query
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v)
    }
}

/// An answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// `content-type`.
    pub content_type: &'static str,
    /// Body.
    pub body: String,
}

impl Response {
    /// A text/plain answer.
    pub fn text(status: u16, body: impl Into<String>) -> Self {
        Response {
            status,
            content_type: "text/plain; charset=utf-8",
            body: body.into(),
        }
    }

    /// An application/json answer.
    pub fn json(body: impl Into<String>) -> Self {
        Response {
            status: 200,
            content_type: "application/json",
            body: body.into(),
        }
    }

    /// 404 for `path`.
    pub fn not_found(path: &str) -> Self {
        Response::text(404, format!("no such endpoint: {path}\n"))
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        503 => "Service Unavailable",
        _ => "Status",
    }
}

/// What answers requests.
pub type Handler = Arc<dyn Fn(&Request) -> Response + Send + Sync>;

/// Serves `listener` for ever, answering each request with `handler`.
pub async fn serve(listener: TcpListener, handler: Handler) {
    crate::serve::accept_loop(listener, "http", move |stream, _| {
        let handler = handler.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(10), answer(stream, handler)).await;
        });
    })
    .await
}

async fn answer(mut stream: TcpStream, handler: Handler) {
    let response = match tokio::time::timeout(Duration::from_secs(5), read_head(&mut stream)).await
    {
        Ok(Ok(request)) => handler(&request),
        Ok(Err(why)) => Response::text(400, format!("{why}\n")),
        Err(_) => Response::text(400, "the request head did not arrive within 5 s\n"),
    };
    let head = format!(
        "HTTP/1.1 {} {}\r\ncontent-type: {}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        response.status,
        reason(response.status),
        response.content_type,
        response.body.len()
    );
    let _ = stream.write_all(head.as_bytes()).await;
    let _ = stream.write_all(response.body.as_bytes()).await;
    let _ = stream.shutdown().await;
}

async fn read_head(stream: &mut TcpStream) -> Result<Request, String> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        if buf.len() > MAX_HEAD {
            return Err(format!("request head larger than {MAX_HEAD} bytes"));
        }
        let n = stream
            .read(&mut chunk)
            .await
            .map_err(|e| format!("reading the request: {e}"))?;
        if n == 0 {
            return Err("the connection closed before the request head ended".into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    parse_request_line(&buf)
}

/// Parses `METHOD TARGET HTTP/1.x` from the start of `head`.
pub fn parse_request_line(head: &[u8]) -> Result<Request, String> {
    let line = head.split(|b| *b == b'\n').next().unwrap_or_default();
    let line = std::str::from_utf8(line)
        .map_err(|_| "the request line is not UTF-8".to_owned())?
        .trim_end_matches('\r');
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(format!("malformed request line {line:?}"));
    };
    if !version.starts_with("HTTP/1.") || !target.starts_with('/') || method.is_empty() {
        return Err(format!("malformed request line {line:?}"));
    }
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    Ok(Request {
        method: method.to_owned(),
        path: path.to_owned(),
        query: query.to_owned(),
    })
}

/// Readiness (`:15021`): `GET /healthz/ready` is 200 when `ready()` is, else 503 with the
/// reason.
pub fn readiness(ready: impl Fn() -> Result<(), String> + Send + Sync + 'static) -> Handler {
    Arc::new(move |r: &Request| match r.path.as_str() {
        "/healthz/ready" => match ready() {
            Ok(()) => Response::text(200, "ready\n"),
            Err(why) => Response::text(503, format!("not ready: {why}\n")),
        },
        path => Response::not_found(path),
    })
}

/// Metrics (`:15020`): `/metrics` and `/stats/prometheus`.
pub fn metrics(metrics: Arc<crate::telemetry::metrics::Metrics>) -> Handler {
    Arc::new(move |r: &Request| match r.path.as_str() {
        "/metrics" | "/stats/prometheus" => Response {
            status: 200,
            content_type: "text/plain; version=0.0.4; charset=utf-8",
            body: metrics.render(),
        },
        path => Response::not_found(path),
    })
}

/// Changes the log filter; returns the new filter or why it was refused.
pub type LogLevelHook = Box<dyn Fn(&str) -> Result<String, String> + Send + Sync>;

/// What the config dump says about one pod handed over to a shared proxy
/// ([`SharedProxy::pods`](crate::inpod::SharedProxy::pods)).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodStatus {
    /// The agent's uid for it.
    pub uid: String,
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// The identity its certificate carries.
    pub identity: String,
    /// The xDS workload it resolved to, if any yet.
    pub workload_uid: Option<String>,
    /// When its current certificate expires (`None`: none yet).
    pub cert_expiry: Option<std::time::SystemTime>,
    /// Connections open now.
    pub open_connections: usize,
}

/// What the admin endpoint (`localhost:15000`) can do.
pub struct AdminHooks {
    /// The `/config_dump` body (JSON).
    pub config_dump: Box<dyn Fn() -> String + Send + Sync>,
    /// Changes the log filter (`/logging?level=...`, e.g. `debug` or `info,proxy=debug`);
    /// returns the new filter or why it was refused.
    pub set_log_level: LogLevelHook,
    /// Asked to stop (`/quitquitquit`): the same drain as SIGTERM.
    pub quit: CancellationToken,
}

impl std::fmt::Debug for AdminHooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminHooks").finish_non_exhaustive()
    }
}

/// Admin (`localhost:15000`): `/config_dump`, `/logging?level=...`, `/quitquitquit` (POST).
pub fn admin(hooks: AdminHooks) -> Handler {
    Arc::new(move |r: &Request| match r.path.as_str() {
        "/config_dump" => Response::json((hooks.config_dump)()),
        "/logging" => match r.param("level") {
            None => Response::text(
                400,
                "usage: /logging?level=<filter> (e.g. debug, or info,proxy=debug)\n",
            ),
            Some(level) => match (hooks.set_log_level)(&percent_decode(level)) {
                Ok(now) => Response::text(200, format!("log level: {now}\n")),
                Err(why) => Response::text(400, format!("{why}\n")),
            },
        },
        "/quitquitquit" if r.method == "POST" => {
            hooks.quit.cancel();
            Response::text(200, "draining\n")
        }
        "/quitquitquit" => Response::text(405, "use POST /quitquitquit\n"),
        path => Response::not_found(path),
    })
}

/// Decodes `%XX` escapes (a log filter like `info,proxy=debug` arrives as `info%2Cproxy%3Ddebug`).
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (
            bytes[i],
            bytes.get(i + 1).copied().and_then(hex),
            bytes.get(i + 2).copied().and_then(hex),
        ) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The body of the `admin_request` fuzz target (also run over its seed corpus by `cargo test`):
/// any bytes as a request head are parsed without panicking, and what parses has a method, a
/// path starting with `/`, and lookups in its query that never panic.
#[doc(hidden)]
#[cfg(feature = "fuzzing")]
pub fn fuzz_request(data: &[u8]) {
    if let Ok(r) = parse_request_line(data) {
        assert!(!r.method.is_empty() && r.path.starts_with('/'));
        let _ = r.param("level");
        let _ = percent_decode(&r.query);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_lines_parse_or_fail_with_the_line() {
        let r =
            parse_request_line(b"GET /logging?level=debug HTTP/1.1\r\nhost: x\r\n\r\n").unwrap();
        assert_eq!((r.method.as_str(), r.path.as_str()), ("GET", "/logging"));
        assert_eq!(r.param("level"), Some("debug"));
        assert_eq!(r.param("other"), None);
        for bad in [
            &b"GET\r\n"[..],
            b"GET / HTTP/2\r\n",
            b"GET x HTTP/1.1\r\n",
            b"\xff / HTTP/1.1\r\n",
            b"A B C D\r\n",
        ] {
            assert!(parse_request_line(bad).is_err(), "{bad:?}");
        }
    }
}
