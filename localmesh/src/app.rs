//! The built-in workloads of the local mesh, and the small HTTP client the tutorial and
//! `ztunnel local get` use. HTTP/1.1, one request per connection, bodies of a few hundred bytes:
//! enough to see a request cross the mesh, nothing more.
//!
//! - An HTTP app answers `GET` with its name; with an upstream, it first calls the upstream and
//!   appends the answer (`web-api -> recommendation -> purchase-history`), or answers 502 naming
//!   the upstream that failed. `GET /whoami` answers `remote=IP:PORT` (IPv6 in brackets), the
//!   address the connection came from as the app sees it, without calling the upstream.
//! - A gateway forwards a request whose `Host` it has a route for to that route's URL and relays
//!   the status and body; 404 for other hosts.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A response: status and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// HTTP status.
    pub status: u16,
    /// Body.
    pub body: String,
}

/// Splits `http://host[:port]/path` into (host, port, path).
pub fn split_url(url: &str) -> Result<(String, u16, String), String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("{url:?}: only http:// URLs are supported"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let (host, port) = if let Some(rest) = authority.strip_prefix('[') {
        // An IPv6 address: `[addr]` or `[addr]:port`.
        let (addr, after) = rest
            .split_once(']')
            .ok_or_else(|| format!("{url:?}: `[` without `]`"))?;
        let port = match after.strip_prefix(':') {
            Some(p) => p
                .parse()
                .map_err(|_| format!("{url:?}: port {p:?} is not a number"))?,
            None if after.is_empty() => 80,
            None => return Err(format!("{url:?}: {after:?} after the address")),
        };
        (addr, port)
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (
                h,
                p.parse()
                    .map_err(|_| format!("{url:?}: port {p:?} is not a number"))?,
            ),
            None => (authority, 80),
        }
    };
    if host.is_empty() {
        return Err(format!("{url:?}: no host"));
    }
    Ok((host.to_owned(), port, path.to_owned()))
}

/// The request bytes of a `GET` of `path` with `host` as `Host`.
pub fn request(host: &str, path: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nhost: {host}\r\nuser-agent: ztunnel-local\r\nconnection: close\r\n\r\n"
    )
}

/// Parses a whole response (head and body, read until the server closed).
pub fn parse_response(bytes: &[u8]) -> Result<Answer, String> {
    let text = String::from_utf8_lossy(bytes);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("incomplete response ({} bytes)", bytes.len()))?;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("malformed status line {:?}", head.lines().next()))?;
    Ok(Answer {
        status,
        body: body.to_owned(),
    })
}

/// `GET url` from this process's network namespace (names resolved by the system resolver, so
/// `/etc/hosts` inside a pod), with `host` overriding the `Host` header; the whole exchange is
/// limited to `timeout`.
pub async fn get(url: &str, host: Option<&str>, timeout: Duration) -> Result<Answer, String> {
    let (name, port, path) = split_url(url)?;
    let exchange = async {
        let mut stream = TcpStream::connect((name.as_str(), port))
            .await
            .map_err(|e| format!("connect to {name}:{port}: {e}"))?;
        exchange(&mut stream, host.unwrap_or(&name), &path).await
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| format!("{url}: no answer within {timeout:?}"))?
}

async fn exchange(stream: &mut TcpStream, host: &str, path: &str) -> Result<Answer, String> {
    stream
        .write_all(request(host, path).as_bytes())
        .await
        .map_err(|e| format!("sending the request: {e}"))?;
    let mut bytes = Vec::new();
    stream
        .read_to_end(&mut bytes)
        .await
        .map_err(|e| format!("reading the response: {e}"))?;
    parse_response(&bytes)
}

/// What a built-in app does with a request.
#[derive(Debug, Clone)]
pub enum Behaviour {
    /// Answer with `name`, after calling `upstream` if set.
    Http {
        /// The pod's name (its Deployment's).
        name: String,
        /// URL called first.
        upstream: Option<String>,
    },
    /// Route by `Host`.
    Gateway {
        /// Host -> URL.
        routes: Vec<(String, String)>,
    },
}

/// Serves `behaviour` on `addr` until the process ends.
pub async fn serve(addr: SocketAddr, behaviour: Behaviour) -> std::io::Result<()> {
    serve_on(TcpListener::bind(addr).await?, behaviour).await
}

/// Serves `behaviour` on `port` of every address of both families (one dual-stack socket on
/// `[::]`), or of IPv4 alone where the pod has no IPv6, until the process ends.
pub async fn serve_port(port: u16, behaviour: Behaviour) -> std::io::Result<()> {
    serve_on(bind_port(port).await?, behaviour).await
}

/// A listener on `port` of every address: `[::]` (dual-stack, the system's default), or
/// `0.0.0.0` where there is no IPv6.
async fn bind_port(port: u16) -> std::io::Result<TcpListener> {
    match TcpListener::bind((std::net::Ipv6Addr::UNSPECIFIED, port)).await {
        Ok(l) => Ok(l),
        Err(_) => TcpListener::bind((std::net::Ipv4Addr::UNSPECIFIED, port)).await,
    }
}

/// A TCP echo on `port` of both families (as [`serve_port`]) until the process ends: each
/// connection gets back every byte it sends, in order, and its end when it ends its sending.
pub async fn serve_echo(port: u16) -> std::io::Result<()> {
    let listener = bind_port(port).await?;
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        tokio::spawn(async move {
            let _ = stream.set_nodelay(true);
            let (mut read, mut write) = stream.split();
            if tokio::io::copy(&mut read, &mut write).await.is_ok() {
                let _ = write.shutdown().await;
            }
        });
    }
}

/// Serves `behaviour` on `listener` until the process ends.
async fn serve_on(listener: TcpListener, behaviour: Behaviour) -> std::io::Result<()> {
    loop {
        let (mut stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let behaviour = behaviour.clone();
        tokio::spawn(async move {
            let answer =
                match tokio::time::timeout(Duration::from_secs(5), read_head(&mut stream)).await {
                    Ok(Ok((path, host))) => respond(&behaviour, &path, &host, peer).await,
                    _ => Answer {
                        status: 400,
                        body: "bad request\n".into(),
                    },
                };
            let reason = match answer.status {
                200 => "OK",
                404 => "Not Found",
                502 => "Bad Gateway",
                _ => "Status",
            };
            let text = format!(
                "HTTP/1.1 {} {reason}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{}",
                answer.status,
                answer.body.len(),
                answer.body
            );
            let _ = stream.write_all(text.as_bytes()).await;
            let _ = stream.shutdown().await;
        });
    }
}

async fn respond(behaviour: &Behaviour, path: &str, host: &str, peer: SocketAddr) -> Answer {
    match behaviour {
        Behaviour::Http { .. } if path == "/whoami" => Answer {
            status: 200,
            // An IPv4 client of a dual-stack listener shows as itself, not as ::ffff:a.b.c.d.
            body: format!(
                "remote={}\n",
                SocketAddr::new(peer.ip().to_canonical(), peer.port())
            ),
        },
        Behaviour::Http { name, upstream } => match upstream {
            None => Answer {
                status: 200,
                body: format!("{name}\n"),
            },
            Some(url) => match get(url, None, Duration::from_secs(5)).await {
                Ok(a) if a.status == 200 => Answer {
                    status: 200,
                    body: format!("{name} -> {}", a.body),
                },
                Ok(a) => Answer {
                    status: 502,
                    body: format!("{name}: upstream {url} answered {}: {}", a.status, a.body),
                },
                Err(e) => Answer {
                    status: 502,
                    body: format!("{name}: upstream {url} failed: {e}\n"),
                },
            },
        },
        Behaviour::Gateway { routes } => {
            let bare = host.split(':').next().unwrap_or("");
            match routes.iter().find(|(h, _)| h == bare) {
                None => Answer {
                    status: 404,
                    body: format!("no route for host {bare:?}\n"),
                },
                Some((_, url)) => {
                    let (_, _, base) = split_url(url).unwrap_or_default();
                    let target = if base == "/" {
                        url.trim_end_matches('/').to_owned() + path
                    } else {
                        url.clone()
                    };
                    match get(&target, None, Duration::from_secs(5)).await {
                        Ok(a) => a,
                        Err(e) => Answer {
                            status: 502,
                            body: format!("gateway: {target} failed: {e}\n"),
                        },
                    }
                }
            }
        }
    }
}

/// Reads a request head; returns (path, Host).
async fn read_head(stream: &mut TcpStream) -> Result<(String, String), String> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        if buf.len() > 8192 {
            return Err("request head too large".into());
        }
        let n = stream.read(&mut chunk).await.map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("closed".into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let text = String::from_utf8_lossy(&buf);
    let mut lines = text.lines();
    let path = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .unwrap_or("/")
        .to_owned();
    let host = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("host"))
        .map(|(_, v)| v.trim().to_owned())
        .unwrap_or_default();
    Ok((path, host))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_urls_split() {
        assert_eq!(
            split_url("http://[fd7a:afa:ff96::a]:8080/whoami").unwrap(),
            ("fd7a:afa:ff96::a".to_owned(), 8080, "/whoami".to_owned())
        );
        assert_eq!(split_url("http://[::1]/").unwrap().1, 80);
        assert!(split_url("http://[::1/").is_err());
        assert!(split_url("http://[::1]x/").is_err());
    }

    #[test]
    fn urls_split_and_responses_parse() {
        assert_eq!(
            split_url("http://web-api:8080/x").unwrap(),
            ("web-api".into(), 8080, "/x".into())
        );
        assert_eq!(split_url("http://h").unwrap(), ("h".into(), 80, "/".into()));
        assert!(split_url("https://h/").is_err());
        assert!(split_url("http://h:x/").is_err());
        let a = parse_response(b"HTTP/1.1 502 Bad Gateway\r\nx: y\r\n\r\nbody").unwrap();
        assert_eq!((a.status, a.body.as_str()), (502, "body"));
        assert!(parse_response(b"HTTP/1.1 200 OK\r\n").is_err());
    }

    #[tokio::test]
    async fn a_chain_answers_through_its_upstreams_and_a_gateway_routes_by_host() {
        let free = || {
            std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
        };
        let (back, front, gw) = (free(), free(), free());
        tokio::spawn(serve(
            back,
            Behaviour::Http {
                name: "back".into(),
                upstream: None,
            },
        ));
        tokio::spawn(serve(
            front,
            Behaviour::Http {
                name: "front".into(),
                upstream: Some(format!("http://{back}/")),
            },
        ));
        tokio::spawn(serve(
            gw,
            Behaviour::Gateway {
                routes: vec![("example.test".into(), format!("http://{front}/"))],
            },
        ));
        tokio::time::sleep(Duration::from_millis(100)).await;
        let t = Duration::from_secs(5);
        let a = get(&format!("http://{front}/"), None, t).await.unwrap();
        assert_eq!((a.status, a.body.as_str()), (200, "front -> back\n"));
        let a = get(&format!("http://{gw}/"), Some("example.test"), t)
            .await
            .unwrap();
        assert_eq!((a.status, a.body.as_str()), (200, "front -> back\n"));
        let a = get(&format!("http://{gw}/"), Some("other.test"), t)
            .await
            .unwrap();
        assert_eq!(a.status, 404);
        let broken = free();
        let lonely = free();
        tokio::spawn(serve(
            lonely,
            Behaviour::Http {
                name: "lonely".into(),
                upstream: Some(format!("http://{broken}/")),
            },
        ));
        tokio::time::sleep(Duration::from_millis(50)).await;
        let a = get(&format!("http://{lonely}/"), None, t).await.unwrap();
        assert_eq!(a.status, 502);
        assert!(a.body.contains("upstream"), "{}", a.body);
        // `/whoami` names the caller and never calls the (broken) upstream.
        let mut stream = TcpStream::connect(lonely).await.unwrap();
        let me = stream.local_addr().unwrap();
        let a = exchange(&mut stream, "lonely", "/whoami").await.unwrap();
        assert_eq!((a.status, a.body), (200, format!("remote={me}\n")));
    }
}
