//! The server: what it refuses (and with which status), what it hands the handler, and what bounds it keeps against slow or hostile clients.

mod support;

use hbone::{Authority, Config, Error, InboundConnect, Pool, Server, StaticTls};
use http::{HeaderMap, HeaderValue, Method, Request, StatusCode};
use rustls_pki_types::ServerName;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use support::{EchoServer, Pki, authority, echo, echo_round_trip, pool, round_trip};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Opens a raw HTTP/2 connection (bypassing the pool's request building) to send bad requests.
async fn raw_h2(pki: &Pki, addr: SocketAddr) -> h2::client::SendRequest<bytes::Bytes> {
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

fn pool_for_default(pki: &Pki) -> Pool<&'static str, StaticTls> {
    pool(pki, Config::default())
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

/// Serves `listener` with `server`, each connection in a task of its own (so stopping the
/// accept loop leaves the connections), until the returned task is aborted.
fn accept_loop(
    server: Server<fn(InboundConnect) -> EchoFuture>,
    listener: TcpListener,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let server = server.clone();
            tokio::spawn(async move {
                let _ = server.serve_connection(tcp).await;
            });
        }
    })
}

type EchoFuture = std::pin::Pin<Box<dyn Future<Output = ()> + Send>>;

fn boxed_echo(req: InboundConnect) -> EchoFuture {
    Box::pin(echo(req))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_going_away_lets_its_tunnels_finish_while_new_ones_go_to_its_successor() {
    // A server being replaced (a rolling update): told to go away, it stops taking tunnels on
    // its connections; the client opens a new connection (to the successor now listening) for
    // each new tunnel, none refused, while the tunnel the old one carries goes on to its end;
    // then the old connection closes.
    let pki = Pki::new();
    let handler: fn(InboundConnect) -> EchoFuture = boxed_echo;
    let old = Server::new(Config::default(), pki.server_config(), handler);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let old_accepting = accept_loop(old.clone(), listener);
    let pool = pool_for_default(&pki);
    let mut held = pool
        .connect("k", addr, &authority(), HeaderMap::new())
        .await
        .unwrap();
    held.write_all(b"before").await.unwrap();
    let mut buf = [0u8; 6];
    held.read_exact(&mut buf).await.unwrap();
    assert_eq!(pool.connection_count(), 1);

    old.go_away();
    old_accepting.abort();
    let _ = old_accepting.await;
    let new = Server::new(Config::default(), pki.server_config(), handler);
    let new_listener = TcpListener::bind(addr).await.unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let counted = accepted.clone();
    let _new_accepting = tokio::spawn(async move {
        loop {
            let (tcp, _) = new_listener.accept().await.unwrap();
            counted.fetch_add(1, Ordering::SeqCst);
            let new = new.clone();
            tokio::spawn(async move {
                let _ = new.serve_connection(tcp).await;
            });
        }
    });
    for _ in 0..20 {
        assert_eq!(round_trip(&pool, addr).await, b"hi");
    }
    // Every new tunnel went to the successor, over one connection.
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
    // The old connection counts as long as it carries the held tunnel, unless a CONNECT raced
    // its GOAWAY and was refused (retried on the new connection): the pool then stops counting
    // it, though the held tunnel goes on (below).
    let count = pool.connection_count();
    assert!(
        (1..=2).contains(&count),
        "old (held tunnel) and new: {count}"
    );
    held.write_all(b"after!").await.unwrap();
    held.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"after!");
    held.shutdown().await.unwrap();
    let mut rest = Vec::new();
    held.read_to_end(&mut rest).await.unwrap();
    drop(held);
    // Its last tunnel done, the old connection closes; the new one serves on.
    let start = Instant::now();
    while pool.connection_count() > 1 {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "the connection that went away is still open"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(round_trip(&pool, addr).await, b"hi");
}
