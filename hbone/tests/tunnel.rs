//! End-to-end tests of the HBONE client pool and server over real TLS and HTTP/2 on loopback.

mod support;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use hbone::{Authority, Config, Error, InboundConnect, Pool, Server, StaticTls};
use http::{HeaderMap, Method, Request, StatusCode};
use proptest::prelude::*;
use rustls_pki_types::ServerName;
use support::{EchoServer, Pki, init_tracing};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn authority() -> Authority {
    "10.0.0.1:8080".parse().unwrap()
}

fn pool(pki: &Pki, config: Config) -> Pool<&'static str, StaticTls> {
    Pool::new(config, StaticTls(pki.client_config()))
}

async fn echo_round_trip(
    pool: &Pool<&'static str, StaticTls>,
    server: &EchoServer,
    data: &[u8],
) -> Vec<u8> {
    let tunnel = pool
        .connect("k", server.addr, &authority(), HeaderMap::new())
        .await
        .unwrap();
    let (mut rd, mut wr) = tokio::io::split(tunnel);
    let writer = async {
        wr.write_all(data).await.unwrap();
        wr.shutdown().await.unwrap();
    };
    let reader = async {
        let mut out = Vec::new();
        rd.read_to_end(&mut out).await.unwrap();
        out
    };
    let ((), out) = tokio::join!(writer, reader);
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// Bytes come back exactly: no loss, reordering or duplication, for sizes from 0 to 2 MiB.
    #[test]
    fn echo_is_byte_exact(seed in any::<u64>(), len in prop_oneof![0usize..64, 64usize..70_000, 70_000usize..2_100_000]) {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        rt.block_on(async {
            let pki = Pki::new();
            let server = EchoServer::start(&pki, Config::default()).await;
            let pool = pool(&pki, Config::default());
            let mut state = seed | 1;
            let data: Vec<u8> = (0..len).map(|_| { state ^= state << 13; state ^= state >> 7; state ^= state << 17; state as u8 }).collect();
            let out = echo_round_trip(&pool, &server, &data).await;
            prop_assert_eq!(out.len(), data.len());
            prop_assert!(out == data, "echoed bytes differ");
            Ok(())
        })?;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_half_close_lets_server_answer_after_eof() {
    init_tracing();
    let pki = Pki::new();
    // The server reads to EOF first, then answers with the byte count and closes.
    let server = Server::new(
        Config::default(),
        pki.server_config(),
        |req: InboundConnect| async move {
            let mut t = req.accept().unwrap();
            let mut buf = Vec::new();
            t.read_to_end(&mut buf).await.unwrap();
            t.write_all(format!("got {}", buf.len()).as_bytes())
                .await
                .unwrap();
            t.shutdown().await.unwrap();
        },
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move { server.serve(listener).await });
    let pool = pool(&pki, Config::default());
    let mut t = pool
        .connect("k", addr, &authority(), HeaderMap::new())
        .await
        .unwrap();
    t.write_all(&[7u8; 100_000]).await.unwrap();
    t.shutdown().await.unwrap();
    let mut answer = String::new();
    t.read_to_string(&mut answer).await.unwrap();
    assert_eq!(answer, "got 100000");
    task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_half_close_lets_client_keep_sending() {
    let pki = Pki::new();
    // The server says hello and half-closes at once, then keeps reading until the client's EOF,
    // and reports what it read through a channel.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let server = Server::new(
        Config::default(),
        pki.server_config(),
        move |req: InboundConnect| {
            let tx = tx.clone();
            async move {
                let mut t = req.accept().unwrap();
                t.write_all(b"hello").await.unwrap();
                t.shutdown().await.unwrap();
                let mut buf = Vec::new();
                t.read_to_end(&mut buf).await.unwrap();
                tx.send(buf).unwrap();
            }
        },
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move { server.serve(listener).await });
    let pool = pool(&pki, Config::default());
    let mut t = pool
        .connect("k", addr, &authority(), HeaderMap::new())
        .await
        .unwrap();
    let mut hello = Vec::new();
    t.read_to_end(&mut hello).await.unwrap();
    assert_eq!(hello, b"hello");
    // Our read side is at EOF; our write side still works.
    t.write_all(&[1u8; 300_000]).await.unwrap();
    t.shutdown().await.unwrap();
    let got = rx.recv().await.unwrap();
    assert_eq!(got.len(), 300_000);
    task.abort();
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
async fn refusal_statuses_reach_the_client() {
    let pki = Pki::new();
    let server = EchoServer::start(&pki, Config::default()).await;
    let pool = pool(&pki, Config::default());
    let denied: Authority = "10.0.0.1:401".parse().unwrap();
    let err = pool
        .connect("k", server.addr, &denied, HeaderMap::new())
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(StatusCode::UNAUTHORIZED), "{err}");
    let dropped: Authority = "10.0.0.1:503".parse().unwrap();
    let err = pool
        .connect("k", server.addr, &dropped, HeaderMap::new())
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(StatusCode::SERVICE_UNAVAILABLE), "{err}");
    // The connection survives refusals.
    assert_eq!(
        echo_round_trip(&pool, &server, b"still here").await,
        b"still here"
    );
    assert_eq!(server.accepted.load(Ordering::SeqCst), 1);
}

/// Opens a raw HTTP/2 connection (bypassing the pool's request building) to send bad requests.
async fn raw_h2(pki: &Pki, addr: std::net::SocketAddr) -> h2::client::SendRequest<bytes::Bytes> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(pki.client_config())
        .connect(ServerName::IpAddress(addr.ip().into()), tcp)
        .await
        .unwrap();
    let (send, conn) = h2::client::handshake(tls).await.unwrap();
    tokio::spawn(conn);
    send
}

async fn raw_status(
    send: &mut h2::client::SendRequest<bytes::Bytes>,
    req: Request<()>,
) -> StatusCode {
    let mut ready = send.clone().ready().await.unwrap();
    let (resp, _body) = ready.send_request(req, false).unwrap();
    resp.await.unwrap().status()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_connect_and_bad_authority_get_400_without_the_handler() {
    let pki = Pki::new();
    let server = EchoServer::start(&pki, Config::default()).await;
    let mut send = raw_h2(&pki, server.addr).await;
    let get = Request::builder()
        .method(Method::GET)
        .uri("https://10.0.0.1:80/")
        .body(())
        .unwrap();
    assert_eq!(raw_status(&mut send, get).await, StatusCode::BAD_REQUEST);
    for bad in [
        "10.0.0.1",
        "10.0.0.1:0",
        "10.0.0.1:99999",
        "bad_host!:80",
        "fd00::1:80",
        "[fd00::1]",
    ] {
        let connect = Request::builder().method(Method::CONNECT).uri(bad).body(());
        let Ok(connect) = connect else { continue }; // the http crate itself refuses some
        assert_eq!(
            raw_status(&mut send, connect).await,
            StatusCode::BAD_REQUEST,
            "authority {bad:?}"
        );
    }
    assert_eq!(server.handled.load(Ordering::SeqCst), 0);
    // A good CONNECT on the same connection still works.
    let good = Request::builder()
        .method(Method::CONNECT)
        .uri("[fd00::1]:80")
        .body(())
        .unwrap();
    assert_eq!(raw_status(&mut send, good).await, StatusCode::OK);
    assert_eq!(server.handled.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_without_certificate_is_refused() {
    let pki = Pki::new();
    let server = EchoServer::start(&pki, Config::default()).await;
    let pool = Pool::new(
        Config::default(),
        StaticTls(pki.client_config_without_cert()),
    );
    let result = pool
        .connect("k", server.addr, &authority(), HeaderMap::new())
        .await;
    assert!(
        result.is_err(),
        "a client without a certificate got a tunnel"
    );
    assert_eq!(server.handled.load(Ordering::SeqCst), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_without_alpn_h2_is_refused() {
    let pki = Pki::new();
    let server = EchoServer::start(&pki, Config::default()).await;
    // Offers only http/1.1: the TLS handshake itself fails (no common protocol).
    let pool = Pool::new(
        Config::default(),
        StaticTls(pki.client_config_with_alpn(vec![b"http/1.1".to_vec()])),
    );
    assert!(
        pool.connect("k", server.addr, &authority(), HeaderMap::new())
            .await
            .is_err()
    );
    // Offers no ALPN at all: TLS completes, the server refuses before HTTP/2.
    let tcp = TcpStream::connect(server.addr).await.unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(pki.client_config_with_alpn(vec![]))
        .connect(ServerName::IpAddress(server.addr.ip().into()), tcp)
        .await
        .unwrap();
    let _ = tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await;
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(5), tls.read(&mut buf))
        .await
        .expect("server closed promptly");
    assert!(
        matches!(n, Ok(0) | Err(_)),
        "server spoke HTTP/2 without ALPN: {n:?}"
    );
    // And our own client refuses a server that does not select h2.
    let pool = Pool::new(
        Config::default(),
        StaticTls(pki.client_config_with_alpn(vec![])),
    );
    let err = pool
        .connect("k", server.addr, &authority(), HeaderMap::new())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Alpn { .. }), "{err}");
    assert_eq!(server.handled.load(Ordering::SeqCst), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_below_1_3_is_refused() {
    let pki = Pki::new();
    // Even a server configuration that allows TLS 1.2 serves no HBONE over it.
    let server = EchoServer::start_with(pki.server_config_any_version(), Config::default()).await;
    let pool = Pool::new(Config::default(), StaticTls(pki.client_config_tls12()));
    let err = pool
        .connect("k", server.addr, &authority(), HeaderMap::new())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::TlsVersion { .. }), "{err}");
    assert!(err.to_string().contains("TLS 1.3"), "{err}");
    assert_eq!(server.handled.load(Ordering::SeqCst), 0);
    // The same server still serves TLS 1.3 clients.
    let pool = pool_for_default(&pki);
    assert_eq!(echo_round_trip(&pool, &server, b"ok").await, b"ok");
}

fn pool_for_default(pki: &Pki) -> Pool<&'static str, StaticTls> {
    pool(pki, Config::default())
}

fn fast_keepalive() -> Config {
    let mut config = Config::default();
    config.keepalive_interval = Some(Duration::from_millis(200));
    config.keepalive_timeout = Duration::from_millis(300);
    config
}

/// A TCP relay that can be frozen: it stops moving bytes but keeps both sockets open, as a peer
/// whose machine died would.
async fn freezable_relay(
    to: std::net::SocketAddr,
) -> (std::net::SocketAddr, Arc<tokio::sync::Notify>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let freeze = Arc::new(tokio::sync::Notify::new());
    let freeze2 = freeze.clone();
    tokio::spawn(async move {
        let (mut inbound, _) = listener.accept().await.unwrap();
        let mut outbound = TcpStream::connect(to).await.unwrap();
        tokio::select! {
            _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
            _ = freeze2.notified() => {
                // Hold both sockets open, silently, for longer than the test.
                tokio::time::sleep(Duration::from_secs(600)).await;
                drop((inbound, outbound));
            }
        }
    });
    (addr, freeze)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unresponsive_peer_fails_streams_within_keepalive() {
    init_tracing();
    let pki = Pki::new();
    let server = EchoServer::start(&pki, Config::default()).await;
    let (relay, freeze) = freezable_relay(server.addr).await;
    let pool = pool(&pki, fast_keepalive());
    let mut t = pool
        .connect("k", relay, &authority(), HeaderMap::new())
        .await
        .unwrap();
    t.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    t.read_exact(&mut buf).await.unwrap();
    freeze.notify_one();
    // The read hangs forever without keepalive; with it, it fails once a PING goes unanswered
    // (interval 200 ms + timeout 300 ms). 5 s only guards against a hang.
    let read = tokio::time::timeout(Duration::from_secs(5), t.read(&mut buf)).await;
    let result = read.expect("tunnel hung after the peer stopped answering");
    assert!(result.is_err(), "expected an error, got {result:?}");
    // The dead connection left the pool.
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(pool.connection_count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_server_fails_streams_promptly() {
    let pki = Pki::new();
    let server = EchoServer::start(&pki, Config::default()).await;
    let pool = pool(&pki, Config::default());
    let mut t = pool
        .connect("k", server.addr, &authority(), HeaderMap::new())
        .await
        .unwrap();
    t.write_all(b"x").await.unwrap();
    let mut buf = [0u8; 1];
    t.read_exact(&mut buf).await.unwrap();
    drop(server); // aborts the accept loop and, with it, every connection task
    let read = tokio::time::timeout(Duration::from_secs(5), t.read(&mut buf))
        .await
        .expect("hang");
    let err = read.expect_err("expected an error after the server died");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_detects_unresponsive_client() {
    let pki = Pki::new();
    let (ended_tx, ended_rx) = tokio::sync::oneshot::channel();
    let ended_tx = Arc::new(std::sync::Mutex::new(Some(ended_tx)));
    let server = Server::new(
        fast_keepalive(),
        pki.server_config(),
        move |req: InboundConnect| {
            let ended_tx = ended_tx.clone();
            async move {
                let mut t = req.accept().unwrap();
                let mut buf = [0u8; 16];
                let result = t.read(&mut buf).await;
                if let Some(tx) = ended_tx.lock().unwrap().take() {
                    let _ = tx.send(result.map_err(|e| e.kind()));
                }
            }
        },
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move { server.serve(listener).await });
    let (relay, freeze) = freezable_relay(addr).await;
    let mut client_config = Config::default();
    client_config.keepalive_interval = None;
    let pool = pool(&pki, client_config);
    let _t = pool
        .connect("k", relay, &authority(), HeaderMap::new())
        .await
        .unwrap();
    freeze.notify_one();
    let result = tokio::time::timeout(Duration::from_secs(5), ended_rx)
        .await
        .expect("server hung")
        .unwrap();
    assert!(result.is_err(), "server read should fail, got {result:?}");
    task.abort();
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
async fn reset_by_the_server_is_an_error_not_eof() {
    let pki = Pki::new();
    let server = Server::new(
        Config::default(),
        pki.server_config(),
        |req: InboundConnect| async move {
            let mut t = req.accept().unwrap();
            t.write_all(b"partial").await.unwrap();
            tokio::time::sleep(Duration::from_millis(50)).await;
            t.abort();
        },
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move { server.serve(listener).await });
    let pool = pool(&pki, Config::default());
    let mut t = pool
        .connect("k", addr, &authority(), HeaderMap::new())
        .await
        .unwrap();
    let mut out = Vec::new();
    let err = t.read_to_end(&mut out).await.unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{err}");
    assert_eq!(out, b"partial");
    task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handler_sees_request_details() {
    let pki = Pki::new();
    let seen = Arc::new(std::sync::Mutex::new(None));
    let seen2 = seen.clone();
    let server = Server::new(
        Config::default(),
        pki.server_config(),
        move |req: InboundConnect| {
            let seen = seen2.clone();
            async move {
                *seen.lock().unwrap() = Some((
                    req.authority().clone(),
                    req.headers().get(hbone::headers::FORWARDED).cloned(),
                    req.peer_certificates().len(),
                    req.local_addr(),
                ));
                req.reject(StatusCode::FORBIDDEN);
            }
        },
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move { server.serve(listener).await });
    let pool = pool(&pki, Config::default());
    let mut headers = HeaderMap::new();
    headers.insert(
        hbone::headers::FORWARDED,
        hbone::headers::forwarded_for("10.9.8.7:6543".parse().unwrap()),
    );
    let target: Authority = "[fd00::5]:9090".parse().unwrap();
    let err = pool.connect("k", addr, &target, headers).await.unwrap_err();
    assert_eq!(err.status(), Some(StatusCode::FORBIDDEN));
    let (authority, forwarded, certs, local) = seen.lock().unwrap().take().unwrap();
    assert_eq!(authority, target);
    assert_eq!(forwarded.unwrap(), "for=\"10.9.8.7:6543\"");
    assert_eq!(certs, 1);
    assert_eq!(local, addr);
    task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_joins_tcp_and_tunnel_with_half_close_and_counts() {
    copy_scenario(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_copy_variant_joins_tcp_and_tunnel_the_same_way() {
    copy_scenario(true).await;
}

async fn copy_scenario(zero_copy: bool) {
    let pki = Pki::new();
    // The server side forwards each tunnel to a TCP "backend" that answers with the reversed
    // input after the client's EOF.
    let backend = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend_addr = backend.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = backend.accept().await.unwrap();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                s.read_to_end(&mut buf).await.unwrap();
                buf.reverse();
                s.write_all(&buf).await.unwrap();
                s.shutdown().await.unwrap();
            });
        }
    });
    let counts = Arc::new(std::sync::Mutex::new(Vec::new()));
    let counts2 = counts.clone();
    let server = Server::new(
        Config::default(),
        pki.server_config(),
        move |req: InboundConnect| {
            let counts = counts2.clone();
            async move {
                let dst = req.authority().socket_addr().unwrap();
                let mut upstream = TcpStream::connect(dst).await.unwrap();
                let mut t = req.accept().unwrap();
                let moved = if zero_copy {
                    hbone::copy_tunnel_bidirectional(&mut t, &mut upstream).await
                } else {
                    hbone::copy_bidirectional(&mut t, &mut upstream).await
                };
                let moved = moved.unwrap();
                counts.lock().unwrap().push(moved);
            }
        },
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move { server.serve(listener).await });
    let pool = pool(&pki, Config::default());
    let mut t = pool
        .connect("k", addr, &backend_addr.into(), HeaderMap::new())
        .await
        .unwrap();
    let data: Vec<u8> = (0..500_000u32).map(|i| (i % 251) as u8).collect();
    t.write_all(&data).await.unwrap();
    t.shutdown().await.unwrap();
    let mut back = Vec::new();
    t.read_to_end(&mut back).await.unwrap();
    let mut expected = data.clone();
    expected.reverse();
    assert!(back == expected, "reversed bytes differ");
    drop(t);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let counts = counts.lock().unwrap();
    assert_eq!(counts.len(), 1);
    assert_eq!((counts[0].a_to_b, counts[0].b_to_a), (500_000, 500_000));
    task.abort();
}

/// A socket that remembers the largest single write (or `writev`) made on it.
struct WriteSizes {
    inner: TcpStream,
    largest: Arc<std::sync::atomic::AtomicUsize>,
}

impl tokio::io::AsyncRead for WriteSizes {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for WriteSizes {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.largest.fetch_max(buf.len(), Ordering::Relaxed);
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let len = bufs.iter().map(|b| b.len()).sum();
        self.largest.fetch_max(len, Ordering::Relaxed);
        std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A bulk download is written to the socket several TLS records per syscall: with the default
/// `tls_write_buffer` (512 KiB) some writes carry more than 128 KiB, where rustls's own 64 KiB
/// limit would cap every write near 64 KiB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_data_leaves_in_writes_of_several_records() {
    const TOTAL: usize = 8 * 1024 * 1024;
    let pki = Pki::new();
    let server = Server::new(
        Config::default(),
        pki.server_config(),
        |req: InboundConnect| async move {
            let mut tunnel = req.accept().unwrap();
            let chunk = vec![7u8; 256 * 1024];
            for _ in 0..TOTAL / chunk.len() {
                tunnel.write_all(&chunk).await.unwrap();
            }
            tunnel.shutdown().await.unwrap();
        },
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let largest = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let largest2 = largest.clone();
    tokio::spawn(async move {
        let (tcp, peer) = listener.accept().await.unwrap();
        let io = WriteSizes {
            inner: tcp,
            largest: largest2,
        };
        let _ = server.serve_io(io, addr, peer).await;
    });
    let mut tunnel = pool(&pki, Config::default())
        .connect("k", addr, &authority(), HeaderMap::new())
        .await
        .unwrap();
    let mut received = 0;
    let mut buf = vec![0u8; 1024 * 1024];
    loop {
        let n = tunnel.read(&mut buf).await.unwrap();
        if n == 0 {
            break;
        }
        received += n;
    }
    assert_eq!(received, TOTAL);
    let largest = largest.load(Ordering::Relaxed);
    assert!(
        largest > 128 * 1024,
        "the largest write to the socket carried {largest} bytes"
    );
}

/// A server whose windows and frames are small, so a client's first bytes do not all fit in
/// the CONNECT's write.
fn small_windows() -> Config {
    let mut config = Config::default();
    config.stream_window = 16 * 1024;
    config.connection_window = 256 * 1024;
    config.max_frame_size = 16 * 1024;
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_bytes_beyond_the_window_follow_the_response_in_order() {
    let pki = Pki::new();
    let server = EchoServer::start(&pki, small_windows()).await;
    let pool = pool(&pki, Config::default());
    let first: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    let tunnel = pool
        .connect_with_data(
            "k",
            server.addr,
            &authority(),
            HeaderMap::new(),
            bytes::Bytes::from(first.clone()),
        )
        .await
        .unwrap();
    let (mut rd, mut wr) = tokio::io::split(tunnel);
    let writer = async {
        wr.write_all(b" and then the rest").await.unwrap();
        wr.shutdown().await.unwrap();
    };
    let reader = async {
        let mut out = Vec::new();
        rd.read_to_end(&mut out).await.unwrap();
        out
    };
    let ((), out) = tokio::time::timeout(Duration::from_secs(10), async {
        tokio::join!(writer, reader)
    })
    .await
    .expect("the echo");
    let mut want = first;
    want.extend_from_slice(b" and then the rest");
    assert_eq!(out.len(), want.len());
    assert!(out == want, "echoed bytes differ");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_tunnels_drop_their_first_bytes_and_give_the_window_back() {
    let pki = Pki::new();
    let server = EchoServer::start(&pki, small_windows()).await;
    let pool = pool(&pki, Config::default());
    let denied: Authority = "10.0.0.1:401".parse().unwrap();
    // 40 refusals of 16 KiB each: 640 KiB, over twice the server's connection window.
    for _ in 0..40 {
        let connect = pool.connect_with_data(
            "k",
            server.addr,
            &denied,
            HeaderMap::new(),
            bytes::Bytes::from(vec![9u8; 16 * 1024]),
        );
        let err = tokio::time::timeout(Duration::from_secs(5), connect)
            .await
            .expect("an answer")
            .unwrap_err();
        assert_eq!(err.status(), Some(StatusCode::UNAUTHORIZED), "{err}");
    }
    let echoed = tokio::time::timeout(
        Duration::from_secs(5),
        echo_round_trip(&pool, &server, b"still here"),
    )
    .await
    .expect("the connection's window came back");
    assert_eq!(echoed, b"still here");
    assert_eq!(server.accepted.load(Ordering::SeqCst), 1);
}
