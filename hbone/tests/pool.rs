//! The client pool: connections shared and capped by stream limits, dials shared and bounded, failures and frozen servers that leave the pool usable, destinations never mixed.

mod support;

use hbone::{Authority, Config, Error, InboundConnect, Pool, Server, StaticTls};
use http::HeaderMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use support::{EchoServer, Pki, authority, echo, echo_round_trip, init_tracing, pool, round_trip};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

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

/// A TLS server that completes the TLS handshake and then never writes a byte.
async fn silent_after_tls(pki: &Pki) -> SocketAddr {
    support::serve_tls(pki, |mut tls| async move {
        let mut sink = vec![0u8; 4096];
        while matches!(tls.read(&mut sink).await, Ok(n) if n > 0) {}
    })
    .await
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
async fn thousand_concurrent_streams_use_ten_connections() {
    let pki = Pki::new();
    let server = EchoServer::start(&pki, Config::default()).await;
    let pool = pool(&pki, Config::default());
    let all_open = Arc::new(tokio::sync::Barrier::new(1000));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..1000u32 {
        let pool = pool.clone();
        let all_open = all_open.clone();
        let addr = server.addr;
        tasks.spawn(async move {
            let mut t = pool
                .connect("k", addr, &authority(), HeaderMap::new())
                .await
                .unwrap();
            all_open.wait().await;
            let msg = i.to_be_bytes();
            t.write_all(&msg).await.unwrap();
            t.shutdown().await.unwrap();
            let mut back = Vec::new();
            t.read_to_end(&mut back).await.unwrap();
            assert_eq!(back, msg);
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    // 1000 streams open at once, at most 100 per connection: exactly 10 connections.
    assert_eq!(server.accepted.load(Ordering::SeqCst), 10);
    assert_eq!(server.handled.load(Ordering::SeqCst), 1000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_stream_cap_below_the_servers_limit_opens_more_connections() {
    let pki = Pki::new();
    let server = EchoServer::start(&pki, Config::default()).await;
    let mut config = Config::default();
    config.max_concurrent_streams = 7;
    let pool = pool(&pki, config);
    let mut held = Vec::new();
    for _ in 0..30 {
        held.push(
            pool.connect("k", server.addr, &authority(), HeaderMap::new())
                .await
                .unwrap(),
        );
    }
    // 30 open tunnels, 7 per connection: 5 connections (4 full, 1 with 2).
    assert_eq!(pool.connection_count_for(&"k"), 5);
    assert_eq!(server.accepted.load(Ordering::SeqCst), 5);
    // Closing tunnels frees slots that new tunnels reuse without dialing.
    held.truncate(20);
    tokio::time::sleep(Duration::from_millis(50)).await;
    for _ in 0..10 {
        held.push(
            pool.connect("k", server.addr, &authority(), HeaderMap::new())
                .await
                .unwrap(),
        );
    }
    assert_eq!(server.accepted.load(Ordering::SeqCst), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn burst_on_a_new_key_dials_once() {
    let pki = Pki::new();
    let server = EchoServer::start(&pki, Config::default()).await;
    let pool = pool(&pki, Config::default());
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..50 {
        let pool = pool.clone();
        let addr = server.addr;
        tasks.spawn(async move {
            let t = pool
                .connect("burst", addr, &authority(), HeaderMap::new())
                .await
                .unwrap();
            drop(t);
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    assert_eq!(server.accepted.load(Ordering::SeqCst), 1);
    assert_eq!(pool.connection_count_for(&"burst"), 1);
    // A different key never shares that connection.
    pool.connect("other", server.addr, &authority(), HeaderMap::new())
        .await
        .unwrap();
    assert_eq!(server.accepted.load(Ordering::SeqCst), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn burst_shares_a_failed_dial() {
    let pki = Pki::new();
    // Nothing listens here: bind, learn the port, close.
    let addr = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let pool = pool(&pki, Config::default());
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..20 {
        let pool = pool.clone();
        tasks.spawn(async move {
            pool.connect("k", addr, &authority(), HeaderMap::new())
                .await
        });
    }
    let mut failures = 0;
    while let Some(r) = tasks.join_next().await {
        let err = r.unwrap().unwrap_err();
        let text = err.to_string();
        assert!(text.contains(&addr.to_string()), "{text}");
        failures += 1;
    }
    assert_eq!(failures, 20);
    assert_eq!(pool.connection_count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_evicted() {
    let pki = Pki::new();
    let server = EchoServer::start(&pki, Config::default()).await;
    let mut config = Config::default();
    config.idle_timeout = Duration::from_millis(300);
    let pool = pool(&pki, config);
    assert_eq!(echo_round_trip(&pool, &server, b"a").await, b"a");
    assert_eq!(pool.connection_count(), 1);
    // Reuse within the idle time keeps the connection.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(echo_round_trip(&pool, &server, b"b").await, b"b");
    assert_eq!(server.accepted.load(Ordering::SeqCst), 1);
    // A connection with an open tunnel is never evicted, however long it lasts.
    let mut held = pool
        .connect("k", server.addr, &authority(), HeaderMap::new())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(pool.connection_count(), 1);
    held.write_all(b"c").await.unwrap();
    held.shutdown().await.unwrap();
    let mut back = Vec::new();
    held.read_to_end(&mut back).await.unwrap();
    assert_eq!(back, b"c");
    drop(held);
    // Idle past the timeout: gone, and the next tunnel dials anew.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while pool.connection_count() != 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "idle connection was not evicted"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(echo_round_trip(&pool, &server, b"d").await, b"d");
    assert_eq!(server.accepted.load(Ordering::SeqCst), 2);
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

#[tokio::test]
async fn a_connect_refused_by_a_fresh_connections_goaway_is_sent_again_on_another() {
    // The first connection is served by a server that is going away (an old proxy during an
    // upgrade): it answers the handshake, then GOAWAY(0) without processing the CONNECT. The
    // pool dials again and the tunnel goes through the next connection.
    let pki = Pki::new();
    let leaving = Server::new(Config::default(), pki.server_config(), echo);
    leaving.go_away();
    let staying = Server::new(Config::default(), pki.server_config(), echo);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let server = if count.fetch_add(1, Ordering::SeqCst) == 0 {
                leaving.clone()
            } else {
                staying.clone()
            };
            tokio::spawn(async move { server.serve_connection(tcp).await });
        }
    });
    let pool = pool(&pki, Config::default());
    let mut tunnel = pool
        .connect("k", addr, &authority(), HeaderMap::new())
        .await
        .expect("the refused CONNECT was not sent again");
    tunnel.write_all(b"again").await.unwrap();
    tunnel.shutdown().await.unwrap();
    let mut back = Vec::new();
    tunnel.read_to_end(&mut back).await.unwrap();
    assert_eq!(back, b"again");
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
}
