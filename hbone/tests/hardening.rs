//! Fail-closed behaviour against hostile or broken peers: stream limits of zero, frozen peers at
//! every stage, oversized headers, handshake floods, and a pool that never mixes destinations.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use hbone::{Authority, Config, Error, InboundConnect, Pool, Server, StaticTls};
use http::{HeaderMap, HeaderValue, Method, Request};
use rustls_pki_types::ServerName;
use support::{EchoServer, Pki, echo, init_tracing};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn authority() -> Authority {
    "10.0.0.1:8080".parse().unwrap()
}

fn pool(pki: &Pki, config: Config) -> Pool<&'static str, StaticTls> {
    Pool::new(config, StaticTls(pki.client_config()))
}

async fn round_trip(pool: &Pool<&'static str, StaticTls>, target: SocketAddr) -> Vec<u8> {
    let mut t = pool
        .connect("k", target, &authority(), HeaderMap::new())
        .await
        .unwrap();
    t.write_all(b"hi").await.unwrap();
    t.shutdown().await.unwrap();
    let mut out = Vec::new();
    t.read_to_end(&mut out).await.unwrap();
    out
}

/// Runs `connect` in its own task, so that a panic inside the pool shows up as a test failure
/// with a message instead of unwinding through the test.
async fn connect_in_task(
    pool: &Pool<&'static str, StaticTls>,
    key: &'static str,
    target: SocketAddr,
) -> Result<hbone::Tunnel, Error> {
    let pool = pool.clone();
    tokio::spawn(async move {
        pool.connect(key, target, &authority(), HeaderMap::new())
            .await
    })
    .await
    .expect("the pool panicked")
}

/// Serves `server` on a fresh port; counts accepted connections and those that have ended.
async fn serve_counting<H: hbone::ConnectHandler>(
    server: Server<H>,
) -> (SocketAddr, Arc<AtomicUsize>, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let ended = Arc::new(AtomicUsize::new(0));
    let (accepted2, ended2) = (accepted.clone(), ended.clone());
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            accepted2.fetch_add(1, Ordering::SeqCst);
            let server = server.clone();
            let ended = ended2.clone();
            tokio::spawn(async move {
                let _ = server.serve_connection(tcp).await;
                ended.fetch_add(1, Ordering::SeqCst);
            });
        }
    });
    (addr, accepted, ended)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_allowing_no_streams_is_a_clear_error_and_the_pool_survives() {
    init_tracing();
    let pki = Pki::new();
    let mut zero = Config::default();
    zero.max_concurrent_streams = 0;
    let (stingy, accepted, ended) =
        serve_counting(Server::new(zero, pki.server_config(), echo)).await;
    let good = EchoServer::start(&pki, Config::default()).await;
    let pool = pool(&pki, Config::default());
    for _ in 0..2 {
        let err = connect_in_task(&pool, "a", stingy).await.unwrap_err();
        assert!(matches!(err, Error::NoStreamCapacity { .. }), "{err}");
        assert!(
            err.to_string().contains("SETTINGS_MAX_CONCURRENT_STREAMS"),
            "{err}"
        );
    }
    // Neither that failure nor anything else poisoned the pool for other callers.
    assert_eq!(round_trip(&pool, good.addr).await, b"hi");
    // The useless connections were closed at once, not kept until they idled out.
    let start = Instant::now();
    while ended.load(Ordering::SeqCst) < 2 {
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "connections kept open"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
    assert_eq!(pool.tracked_entries(), 1);
}

// A scripted HTTP/2 server written frame by frame: it allows one stream, answers the first
// CONNECT with 200, then lowers SETTINGS_MAX_CONCURRENT_STREAMS to 0 on that connection; later
// connections allow 0 streams from the start.
const FRAME_DATA: u8 = 0;
const FRAME_HEADERS: u8 = 1;
const FRAME_SETTINGS: u8 = 4;
const FRAME_PING: u8 = 6;
const FLAG_ACK: u8 = 1;
const FLAG_END_HEADERS: u8 = 4;
const SETTINGS_MAX_CONCURRENT_STREAMS: u16 = 3;

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut out = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

fn max_streams_setting(n: u32) -> Vec<u8> {
    let mut payload = SETTINGS_MAX_CONCURRENT_STREAMS.to_be_bytes().to_vec();
    payload.extend_from_slice(&n.to_be_bytes());
    frame(FRAME_SETTINGS, 0, 0, &payload)
}

async fn scripted_stream_lowering_server(pki: &Pki) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(pki.server_config());
    let connections = Arc::new(AtomicUsize::new(0));
    let count = connections.clone();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let nth = count.fetch_add(1, Ordering::SeqCst);
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut preface = [0u8; 24];
                if tls.read_exact(&mut preface).await.is_err() {
                    return;
                }
                let initial = if nth == 0 { 1 } else { 0 };
                if tls.write_all(&max_streams_setting(initial)).await.is_err() {
                    return;
                }
                loop {
                    let mut head = [0u8; 9];
                    if tls.read_exact(&mut head).await.is_err() {
                        return;
                    }
                    let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
                    let mut payload = vec![0u8; len];
                    if tls.read_exact(&mut payload).await.is_err() {
                        return;
                    }
                    let stream =
                        u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & !(1 << 31);
                    let reply = match (head[3], head[4] & FLAG_ACK) {
                        (FRAME_SETTINGS, 0) => frame(FRAME_SETTINGS, FLAG_ACK, 0, &[]),
                        (FRAME_PING, 0) => frame(FRAME_PING, FLAG_ACK, 0, &payload),
                        (FRAME_HEADERS, _) => {
                            // HPACK static table index 8 is ":status: 200".
                            let mut out = frame(FRAME_HEADERS, FLAG_END_HEADERS, stream, &[0x88]);
                            out.extend(max_streams_setting(0));
                            out
                        }
                        (FRAME_DATA, _) => Vec::new(),
                        _ => Vec::new(),
                    };
                    if !reply.is_empty() && tls.write_all(&reply).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, connections)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_lowering_its_stream_limit_to_zero_mid_connection_is_a_clear_error() {
    init_tracing();
    let pki = Pki::new();
    let (addr, connections) = scripted_stream_lowering_server(&pki).await;
    let mut config = Config::default();
    config.connect_timeout = Duration::from_secs(2);
    let pool = pool(&pki, config);
    let first = connect_in_task(&pool, "k", addr)
        .await
        .expect("first CONNECT");
    // Let the lowered limit arrive.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    let err = tokio::time::timeout(Duration::from_secs(10), connect_in_task(&pool, "k", addr))
        .await
        .expect("the second CONNECT hung")
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::NoStreamCapacity { .. } | Error::ConnectTimeout { .. }
        ),
        "{err}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    // The lowered connection was not used for the second tunnel: a new one was dialed.
    assert_eq!(connections.load(Ordering::SeqCst), 2);
    drop(first);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tunnels_to_different_targets_never_share_a_connection() {
    let pki = Pki::new();
    let a = EchoServer::start(&pki, Config::default()).await;
    let b = EchoServer::start(&pki, Config::default()).await;
    let pool = pool(&pki, Config::default());
    // Same key, two destinations: each must get its own connection.
    let _ta = pool
        .connect("k", a.addr, &authority(), HeaderMap::new())
        .await
        .unwrap();
    let _tb = pool
        .connect("k", b.addr, &authority(), HeaderMap::new())
        .await
        .unwrap();
    assert_eq!(a.handled.load(Ordering::SeqCst), 1);
    assert_eq!(b.handled.load(Ordering::SeqCst), 1, "B's tunnel went to A");
    assert_eq!(b.accepted.load(Ordering::SeqCst), 1);
    assert_eq!(pool.connection_count_for(&"k"), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_dials_leave_nothing_behind() {
    let pki = Pki::new();
    let pool = pool(&pki, Config::default());
    // Ports that refuse: bind, note the port, close.
    let mut targets = Vec::new();
    for _ in 0..20 {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        targets.push(l.local_addr().unwrap());
    }
    for (i, target) in targets.iter().enumerate() {
        let key: &'static str = if i % 2 == 0 { "even" } else { "odd" };
        assert!(
            pool.connect(key, *target, &authority(), HeaderMap::new())
                .await
                .is_err()
        );
    }
    assert_eq!(pool.tracked_entries(), 0);
    assert_eq!(pool.connection_count(), 0);
}

fn timeouts(limit: Duration) -> Config {
    let mut config = Config::default();
    config.tls_handshake_timeout = limit;
    config.h2_handshake_timeout = limit;
    config.connect_timeout = limit;
    config
}

/// Serves exactly one accepted connection with `server` and reports how it ended.
async fn serve_one<H: hbone::ConnectHandler>(
    server: Server<H>,
) -> (
    SocketAddr,
    tokio::task::JoinHandle<(Result<(), Error>, Duration)>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let started = Instant::now();
        let result = server.serve_connection(tcp).await;
        (result, started.elapsed())
    });
    (addr, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_gives_up_on_a_client_frozen_in_the_tls_handshake() {
    let pki = Pki::new();
    let server = Server::new(
        timeouts(Duration::from_millis(300)),
        pki.server_config(),
        echo,
    );
    let (addr, task) = serve_one(server).await;
    let _silent = TcpStream::connect(addr).await.unwrap();
    let (result, took) = tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("server hung on a silent client")
        .unwrap();
    let err = result.unwrap_err();
    assert!(matches!(err, Error::HandshakeTimeout { .. }), "{err}");
    assert!(err.to_string().contains("TLS"), "{err}");
    assert!(took < Duration::from_secs(3), "{took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_gives_up_on_a_client_frozen_before_http2() {
    let pki = Pki::new();
    let mut config = Config::default();
    config.h2_handshake_timeout = Duration::from_millis(300);
    let server = Server::new(config, pki.server_config(), echo);
    let (addr, task) = serve_one(server).await;
    // TLS completes, then not a byte of HTTP/2.
    let tcp = TcpStream::connect(addr).await.unwrap();
    let _tls = tokio_rustls::TlsConnector::from(pki.client_config())
        .connect(ServerName::IpAddress(addr.ip().into()), tcp)
        .await
        .unwrap();
    let (result, took) = tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("server hung on a client that never sent the HTTP/2 preface")
        .unwrap();
    let err = result.unwrap_err();
    assert!(matches!(err, Error::HandshakeTimeout { .. }), "{err}");
    assert!(err.to_string().contains("HTTP/2"), "{err}");
    assert!(took < Duration::from_secs(3), "{took:?}");
}

/// A TLS server that completes the TLS handshake and then never writes a byte.
async fn silent_after_tls(pki: &Pki) -> SocketAddr {
    support::serve_tls(pki, |mut tls| async move {
        let mut sink = vec![0u8; 4096];
        while matches!(tls.read(&mut sink).await, Ok(n) if n > 0) {}
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_gives_up_on_a_server_frozen_before_http2() {
    let pki = Pki::new();
    let addr = silent_after_tls(&pki).await;
    let mut config = Config::default();
    config.h2_handshake_timeout = Duration::from_millis(300);
    let pool = pool(&pki, config);
    dial_times_out(&pool, addr, "HTTP/2").await;
    assert_eq!(pool.tracked_entries(), 0);
}

/// Dials `addr`, which must fail with a handshake timeout naming `stage`, well within 3 s.
async fn dial_times_out(pool: &Pool<&'static str, StaticTls>, addr: SocketAddr, stage: &str) {
    let started = Instant::now();
    let err = tokio::time::timeout(
        Duration::from_secs(5),
        pool.connect("k", addr, &authority(), HeaderMap::new()),
    )
    .await
    .expect("dial hung")
    .unwrap_err();
    assert!(matches!(err, Error::HandshakeTimeout { .. }), "{err}");
    assert!(err.to_string().contains(stage), "{err}");
    assert!(started.elapsed() < Duration::from_secs(3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_gives_up_on_a_server_frozen_in_the_tls_handshake() {
    let pki = Pki::new();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let _hold = tokio::spawn(async move {
        let (_tcp, _) = listener.accept().await.unwrap();
        tokio::time::sleep(Duration::from_secs(600)).await;
    });
    let mut config = Config::default();
    config.tls_handshake_timeout = Duration::from_millis(300);
    let pool = pool(&pki, config);
    dial_times_out(&pool, addr, "TLS").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unanswered_connect_times_out_and_frees_its_stream_slot() {
    init_tracing();
    let pki = Pki::new();
    // Answers PINGs (the connection is served) but never answers a CONNECT to port 1.
    let server = Server::new(
        Config::default(),
        pki.server_config(),
        |req: InboundConnect| async move {
            if req.authority().port() == 1 {
                std::future::pending::<()>().await;
            }
            echo(req).await
        },
    );
    let (addr, accepted, _) = serve_counting(server).await;
    let mut config = Config::default();
    config.connect_timeout = Duration::from_millis(300);
    config.max_concurrent_streams = 1;
    config.keepalive_interval = Some(Duration::from_millis(100));
    let pool = pool(&pki, config);
    let hang: Authority = "10.0.0.1:1".parse().unwrap();
    let started = Instant::now();
    let err = tokio::time::timeout(
        Duration::from_secs(5),
        pool.connect("k", addr, &hang, HeaderMap::new()),
    )
    .await
    .expect("CONNECT without an answer hung the caller")
    .unwrap_err();
    assert!(matches!(err, Error::ConnectTimeout { .. }), "{err}");
    assert!(started.elapsed() < Duration::from_secs(3));
    // The one stream slot is free again: the next tunnel uses the same connection.
    assert_eq!(round_trip(&pool, addr).await, b"hi");
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_request_headers_are_refused_without_the_handler() {
    let pki = Pki::new();
    let server = EchoServer::start(&pki, Config::default()).await;
    let tcp = TcpStream::connect(server.addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(pki.client_config())
        .connect(ServerName::IpAddress(server.addr.ip().into()), tcp)
        .await
        .unwrap();
    let (send, conn) = h2::client::handshake(tls).await.unwrap();
    tokio::spawn(conn);
    let mut req = Request::builder()
        .method(Method::CONNECT)
        .uri("10.0.0.1:80")
        .body(())
        .unwrap();
    let big = HeaderValue::from_str(&"x".repeat(64 * 1024)).unwrap();
    req.headers_mut().insert("x-padding", big);
    let mut ready = send.ready().await.unwrap();
    let (resp, _body) = ready.send_request(req, false).unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(5), resp)
        .await
        .expect("no answer");
    // A reset refuses too; an answer must be a client error.
    if let Ok(resp) = answer {
        assert!(
            resp.status().is_client_error(),
            "64 KiB of headers accepted: {}",
            resp.status()
        );
    }
    assert_eq!(server.handled.load(Ordering::SeqCst), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshakes_computed_at_once_are_bounded_and_silent_clients_take_no_slot() {
    let pki = Pki::new();
    let mut config = Config::default();
    config.max_concurrent_handshakes = 2;
    let server = Server::new(config, pki.server_config(), echo);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let serving = server.clone();
    tokio::spawn(async move { serving.serve(listener).await });
    // Silent clients hold no slot: only a client's bytes make a handshake take one.
    let mut silent = Vec::new();
    for _ in 0..10 {
        silent.push(TcpStream::connect(addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(server.handshakes_in_progress(), 0);
    // Twenty clients at once: every one gets through, never more than two computed at once.
    let watcher = server.clone();
    let most = Arc::new(AtomicUsize::new(0));
    let seen = most.clone();
    let watch = tokio::spawn(async move {
        loop {
            seen.fetch_max(watcher.handshakes_in_progress(), Ordering::SeqCst);
            tokio::task::yield_now().await;
        }
    });
    let mut clients = tokio::task::JoinSet::new();
    for _ in 0..20 {
        // A pool each: a connection (and a handshake) each.
        let client = pool(&pki, Config::default());
        clients.spawn(async move { round_trip(&client, addr).await });
    }
    while let Some(echoed) = clients.join_next().await {
        assert_eq!(echoed.unwrap(), b"hi");
    }
    watch.abort();
    let most = most.load(Ordering::SeqCst);
    assert!(most <= 2, "{most} handshakes computed at once (limit 2)");
    drop(silent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_without_a_peer_address_is_not_reported_as_tls() {
    let pki = Pki::new();
    let server = Server::new(Config::default(), pki.server_config(), echo);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let client = TcpStream::connect(addr).await.unwrap();
    let (accepted, _) = listener.accept().await.unwrap();
    // The client resets the connection before the server looks at it.
    client.set_zero_linger().unwrap();
    drop(client);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let err = server.serve_connection(accepted).await.unwrap_err();
    let text = err.to_string();
    assert!(!text.contains("0.0.0.0"), "{text}");
    assert!(!matches!(err, Error::Tls { .. }), "{text}");
}

/// A dialer whose TLS lookup panics for the key "boom" (a bug in caller code).
struct Panicky(Arc<rustls::ClientConfig>);

impl hbone::Dialer<String> for Panicky {
    async fn client_config(
        &self,
        key: &String,
    ) -> Result<Arc<rustls::ClientConfig>, hbone::BoxError> {
        assert_ne!(key, "boom", "injected panic in the dialer");
        Ok(self.0.clone())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_while_dialing_leaves_the_pool_usable() {
    let pki = Pki::new();
    let server = EchoServer::start(&pki, Config::default()).await;
    let pool = Pool::new(Config::default(), Panicky(pki.client_config()));
    for _ in 0..2 {
        let p = pool.clone();
        let addr = server.addr;
        let joined = tokio::spawn(async move {
            p.connect("boom".to_owned(), addr, &authority(), HeaderMap::new())
                .await
        })
        .await;
        assert!(joined.unwrap_err().is_panic());
    }
    // Nothing is left half-dialed or poisoned: other keys work, and the panicking key's entry
    // is gone.
    let mut t = pool
        .connect("ok".to_owned(), server.addr, &authority(), HeaderMap::new())
        .await
        .unwrap();
    t.write_all(b"x").await.unwrap();
    let mut buf = [0u8; 1];
    t.read_exact(&mut buf).await.unwrap();
    assert_eq!(pool.tracked_entries(), 1);
}
