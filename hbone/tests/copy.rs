//! Joining a TCP socket and a tunnel: half-close and byte counts, with and without the zero-copy variant.

mod support;

use hbone::{Config, InboundConnect, Server};
use http::HeaderMap;
use std::sync::Arc;
use std::time::Duration;
use support::{Pki, pool};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_joins_tcp_and_tunnel_with_half_close_and_counts() {
    copy_scenario(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_copy_variant_joins_tcp_and_tunnel_the_same_way() {
    copy_scenario(true).await;
}
