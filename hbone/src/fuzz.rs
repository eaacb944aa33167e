//! The bodies of the HTTP/2 fuzz targets (feature `fuzzing`): `server_frames` and
//! `client_frames` send whatever a hostile peer can send after the TLS layer to a real server or
//! client connection, which must neither panic nor hang; `h2_differential` sends the same client
//! bytes to our server and to one made of the `h2` crate, and a stream ours forwards must be one
//! `h2` hands to its application. They live in the library so that an ordinary test runs them
//! over the seed corpus on stable.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::CertificateDer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::{Config, InboundConnect, Server};

/// The HTTP/2 client connection preface, sent before `data` so the fuzzer starts past it.
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Serves one HTTP/2 connection whose client sends the preface then `data`, lets the server act
/// on it, and closes its write side. The handler answers odd ports with 401 and echoes a little on even ones. Panics if the
/// server panics or has not finished 5 s after the client's end of input. Returns how many
/// CONNECT requests reached the handler.
pub fn fuzz_server_frames(data: &[u8]) -> usize {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a Tokio runtime");
    runtime.block_on(async {
        let handled = Arc::new(AtomicUsize::new(0));
        let counter = handled.clone();
        let config = Config {
            keepalive_interval: None,
            ..Config::default()
        };
        let server = Server::new(config, no_certificate_tls(), move |req: InboundConnect| {
            counter.fetch_add(1, Ordering::Relaxed);
            async move {
                if req.authority().port() % 2 == 1 {
                    req.reject(http::StatusCode::UNAUTHORIZED);
                } else if let Ok(mut tunnel) = req.accept() {
                    let mut buf = [0u8; 1024];
                    let _ = tunnel.read(&mut buf).await;
                    let _ = tunnel.write_all(b"ok").await;
                    let _ = tunnel.shutdown().await;
                }
            }
        });
        let server_io = scripted_peer([PREFACE, data].concat());
        let addr = SocketAddr::from(([127, 0, 0, 1], 15008));
        let certs: Arc<[CertificateDer<'static>]> =
            Arc::from(vec![CertificateDer::from(vec![0u8])]);
        let served = server.serve_h2(server_io, addr, addr, certs, None);
        let _ = tokio::time::timeout(Duration::from_secs(5), served)
            .await
            .expect("the HBONE server did not finish after the client closed");
        // Let the stream tasks the connection spawned run to their end.
        for _ in 0..16 {
            tokio::task::yield_now().await;
        }
        handled.load(Ordering::Relaxed)
    })
}

/// The body of the `client_frames` fuzz target: whatever a hostile server can send after the TLS
/// layer goes to a real client connection that has sent one CONNECT with its first bytes right
/// behind it (as the proxy sends what its client spoke first) and, if answered 200, writes and
/// reads on the tunnel. The server side first sends an empty SETTINGS frame, then `data`,
/// then closes. Panics if the client panics or has not finished 5 s after the server closed.
/// Returns whether the CONNECT was answered 200.
pub fn fuzz_client_frames(data: &[u8]) -> bool {
    use crate::wire::conn::Connection;
    use crate::wire::session::{Limits, Role};
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a Tokio runtime");
    runtime.block_on(async {
        // An empty SETTINGS frame first, as every server starts.
        let client_io = scripted_peer([&[0u8, 0, 0, 4, 0, 0, 0, 0, 0][..], data].concat());
        let connection = Connection::new(
            Role::Client,
            Limits::from_config(&Config::default()),
            client_io,
        );
        let driver = connection.clone();
        tokio::spawn(async move { driver.drive().await });
        let exchange = async {
            let (head, stream, _) = connection
                .connect("10.0.0.1:80", &http::HeaderMap::new(), b"spoke first")
                .await
                .ok()?;
            if head.status != http::StatusCode::OK {
                return Some(false);
            }
            let mut tunnel = crate::Tunnel::new(stream, None);
            let _ = tunnel.write_all(b"hello").await;
            let mut received = Vec::new();
            let _ = tunnel.read_to_end(&mut received).await;
            Some(true)
        };
        tokio::time::timeout(Duration::from_secs(5), exchange)
            .await
            .expect("the HBONE client did not finish after the server closed")
            .unwrap_or(false)
    })
}

/// One end of an in-memory connection whose other end sends `input`, gives the side under test
/// turns to act on every frame (all in memory, on this one thread) as a peer that keeps its
/// connection open would, then closes its write side; it reads and drops whatever it receives.
fn scripted_peer(input: Vec<u8>) -> tokio::io::DuplexStream {
    let (ours, peer) = tokio::io::duplex(64 * 1024);
    let (mut peer_rd, mut peer_wr) = tokio::io::split(peer);
    tokio::spawn(async move {
        let _ = peer_wr.write_all(&input).await;
        for _ in 0..64 {
            tokio::task::yield_now().await;
        }
        let _ = peer_wr.shutdown().await;
        // Keep the read half's peer alive until the side under test is done.
        std::future::pending::<()>().await;
    });
    tokio::spawn(async move {
        let mut sink = vec![0u8; 16 * 1024];
        while matches!(peer_rd.read(&mut sink).await, Ok(n) if n > 0) {}
    });
    ours
}

/// A TLS configuration that is never used for a handshake (the fuzzer starts after TLS).
fn no_certificate_tls() -> Arc<rustls::ServerConfig> {
    #[derive(Debug)]
    struct NoCertificate;
    impl ResolvesServerCert for NoCertificate {
        fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
            None
        }
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3 is supported")
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(NoCertificate));
    Arc::new(config)
}

/// What the differential target saw: CONNECTs our server forwarded, requests `h2` handed to its
/// application.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Differential {
    /// CONNECTs our server's handler received.
    pub ours: usize,
    /// Requests `h2`'s server returned from `accept` (any method).
    pub h2: usize,
}

/// A request as both servers' applications see it: method, authority (as our parser prints it,
/// when it parses), and the regular headers, sorted.
type Seen = (Vec<u8>, String, Vec<(String, Vec<u8>)>);

fn sorted_headers(headers: &http::HeaderMap) -> Vec<(String, Vec<u8>)> {
    let mut all: Vec<(String, Vec<u8>)> = headers
        .iter()
        .map(|(n, v)| (n.as_str().to_owned(), v.as_bytes().to_vec()))
        .collect();
    all.sort();
    all
}

/// The body of the `h2_differential` fuzz target: the client's preface, then `data`, goes to our
/// server and to a server made of the `h2` crate, one frame at a time with both given time to act
/// on each (so a later connection error takes back no stream either handed out before it), with
/// the same limits (header list, frame size, windows). Panics if either panics or if our server
/// forwards a CONNECT that `h2` does not hand to its application: a request we pass on must be
/// one the reference implementation accepts too. (We may refuse more: ours also requires
/// `:authority` to be an address we can dial.)
pub fn fuzz_h2_differential(data: &[u8]) -> Differential {
    let input = [PREFACE, data].concat();
    let mut chunks = frames_of(&input);
    // h2 ends the connection for a request with a malformed header field (an uppercase name, a
    // bad value, an unknown pseudo-header: its HPACK decoder refuses them), where RFC 9113
    // §8.1.1 makes it a stream error, as ours does: from the first such request on, the two may
    // differ by design, so the comparison stops there.
    chunks.truncate(before_first_malformed(&chunks));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a Tokio runtime");
    let ours = runtime.block_on(ours_forwarded(&chunks));
    let theirs = runtime.block_on(h2_handed(&chunks));
    let mut left = theirs.clone();
    for seen in &ours {
        match left.iter().position(|t| t == seen) {
            Some(i) => {
                left.swap_remove(i);
            }
            None => panic!(
                "our server forwarded {seen:?}, which h2 did not hand to its application (h2 handed {theirs:?})"
            ),
        }
    }
    Differential {
        ours: ours.len(),
        h2: theirs.len(),
    }
}

/// How many of `chunks` come before the one where our server first refuses a request as
/// malformed (all of them if it never does).
fn before_first_malformed(chunks: &[&[u8]]) -> usize {
    use crate::wire::session::{Limits, Role, Session};
    let mut session = Session::new(Role::Server, Limits::from_config(&differential_config()));
    let mut buf = bytes::BytesMut::new();
    for (i, chunk) in chunks.iter().enumerate() {
        buf.extend_from_slice(chunk);
        let _ = session.recv(&mut buf, std::time::Instant::now());
        while let std::task::Poll::Ready(Some(_)) =
            session.poll_accept(&mut std::task::Context::from_waker(std::task::Waker::noop()))
        {
        }
        if session.malformed() > 0 {
            return i;
        }
    }
    chunks.len()
}

/// The limits both servers of the differential target run with.
fn differential_config() -> Config {
    Config {
        keepalive_interval: None,
        // High enough that neither refuses a stream for concurrency on a fuzzer's input: the
        // two count differently (h2 until a stream closes, ours until its handler lets go).
        max_concurrent_streams: 10_000,
        stream_error_allowance: crate::Allowance::new(u32::MAX, 0),
        control_frame_allowance: crate::Allowance::new(u32::MAX, 0),
        ..Config::default()
    }
}

/// `input` cut at frame boundaries (the preface alone first); a last, unfinished frame is a chunk
/// of its own.
fn frames_of(input: &[u8]) -> Vec<&[u8]> {
    let mut chunks = vec![&input[..PREFACE.len().min(input.len())]];
    let mut rest = &input[chunks[0].len()..];
    while !rest.is_empty() {
        let n = if rest.len() >= 9 {
            (9 + u32::from_be_bytes([0, rest[0], rest[1], rest[2]]) as usize).min(rest.len())
        } else {
            rest.len()
        };
        chunks.push(&rest[..n]);
        rest = &rest[n..];
    }
    chunks
}

/// Writes `chunks` to `io` one at a time, letting the side under test act on each.
async fn feed<W: tokio::io::AsyncWrite + Unpin>(mut io: W, chunks: &[&[u8]]) -> W {
    for chunk in chunks {
        if io.write_all(chunk).await.is_err() {
            break;
        }
        for _ in 0..16 {
            tokio::task::yield_now().await;
        }
    }
    for _ in 0..64 {
        tokio::task::yield_now().await;
    }
    io
}

/// Drains and drops what the side under test writes.
fn sink(io: tokio::io::ReadHalf<tokio::io::DuplexStream>) {
    let mut io = io;
    tokio::spawn(async move {
        let mut buf = vec![0u8; 16 * 1024];
        while matches!(io.read(&mut buf).await, Ok(n) if n > 0) {}
    });
}

async fn ours_forwarded(chunks: &[&[u8]]) -> Vec<Seen> {
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let record = seen.clone();
    let server = Server::new(
        differential_config(),
        no_certificate_tls(),
        move |req: InboundConnect| {
            record.lock().expect("not poisoned").push((
                b"CONNECT".to_vec(),
                req.authority().to_string(),
                sorted_headers(req.headers()),
            ));
            // Refused at once: the differential is about which streams get this far.
            async move { req.reject(http::StatusCode::SERVICE_UNAVAILABLE) }
        },
    );
    let (ours, theirs) = tokio::io::duplex(1 << 20);
    let (from_server, to_server) = tokio::io::split(theirs);
    sink(from_server);
    let addr = SocketAddr::from(([127, 0, 0, 1], 15008));
    let certs: Arc<[CertificateDer<'static>]> = Arc::from(vec![CertificateDer::from(vec![0u8])]);
    let served = tokio::spawn(async move {
        let _ = server.serve_h2(ours, addr, addr, certs, None).await;
    });
    let to_server = feed(to_server, chunks).await;
    served.abort();
    drop(to_server);
    std::mem::take(&mut *seen.lock().expect("not poisoned"))
}

async fn h2_handed(chunks: &[&[u8]]) -> Vec<Seen> {
    let config = differential_config();
    let (ours, theirs) = tokio::io::duplex(1 << 20);
    let (from_server, to_server) = tokio::io::split(theirs);
    sink(from_server);
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let record = seen.clone();
    let served = tokio::spawn(async move {
        let mut builder = h2::server::Builder::new();
        builder
            .max_concurrent_streams(config.max_concurrent_streams)
            .max_header_list_size(config.max_header_list_size)
            .max_frame_size(config.max_frame_size)
            .initial_window_size(config.stream_window)
            .initial_connection_window_size(config.connection_window);
        let Ok(mut conn) = builder.handshake::<_, bytes::Bytes>(ours).await else {
            return;
        };
        while let Some(Ok((request, mut respond))) = conn.accept().await {
            let authority = request
                .uri()
                .authority()
                .map(|a| {
                    crate::Authority::parse(a.as_str())
                        .map_or_else(|_| a.as_str().to_owned(), |p| p.to_string())
                })
                .unwrap_or_default();
            record.lock().expect("not poisoned").push((
                request.method().as_str().as_bytes().to_vec(),
                authority,
                sorted_headers(request.headers()),
            ));
            let answer = http::Response::builder()
                .status(http::StatusCode::SERVICE_UNAVAILABLE)
                .body(())
                .expect("a response");
            let _ = respond.send_response(answer, true);
        }
    });
    let to_server = feed(to_server, chunks).await;
    served.abort();
    drop(to_server);
    std::mem::take(&mut *seen.lock().expect("not poisoned"))
}
