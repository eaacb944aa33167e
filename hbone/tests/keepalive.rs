//! Keepalive: a peer that stops answering, or dies, fails its streams within the keepalive, on either side.

mod support;

use hbone::{Config, InboundConnect, Server};
use http::HeaderMap;
use std::sync::Arc;
use std::time::Duration;
use support::{EchoServer, Pki, authority, init_tracing, pool};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

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
