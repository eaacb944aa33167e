//! Our client against an independent HTTP/2 implementation: the `h2` crate's server, with its
//! own flow control (default 64 KiB windows, so our sender must wait for its WINDOW_UPDATEs) and
//! its own frame sizes. The server direction is covered by the tests that drive our server with
//! `h2`'s client (server.rs) and by the Python peer (ztunnel-bin/tests/interop.rs).

mod support;

use std::sync::Arc;

use bytes::Bytes;
use hbone::{Authority, Config, Pool, StaticTls};
use http::{HeaderMap, Response, StatusCode};
use support::Pki;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Serves every CONNECT with `h2`: answers 200 with an `x-echo` header and echoes the body,
/// releasing flow-control capacity only as it echoes (the default 64 KiB windows).
async fn h2_echo_server(pki: &Pki) -> std::net::SocketAddr {
    support::serve_tls(pki, |tls| async move {
        let mut conn = h2::server::handshake(tls).await.unwrap();
        while let Some(Ok((request, respond))) = conn.accept().await {
            tokio::spawn(echo_stream(request, respond));
        }
    })
    .await
}

/// Answers one CONNECT and echoes its body within `h2`'s flow control.
async fn echo_stream(
    request: http::Request<h2::RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
) {
    assert_eq!(request.method(), http::Method::CONNECT);
    let mut body = request.into_body();
    let response = Response::builder()
        .status(StatusCode::OK)
        .header("x-echo", "1")
        .body(())
        .unwrap();
    let mut send = respond.send_response(response, false).unwrap();
    while let Some(chunk) = body.data().await {
        let mut rest = chunk.unwrap();
        let n = rest.len();
        while !rest.is_empty() {
            send.reserve_capacity(rest.len());
            let cap = std::future::poll_fn(|cx| send.poll_capacity(cx))
                .await
                .unwrap()
                .unwrap();
            let part = rest.split_to(cap.min(rest.len()));
            send.send_data(part, false).unwrap();
        }
        body.flow_control().release_capacity(n).unwrap();
    }
    send.send_data(Bytes::new(), true).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_client_tunnels_bulk_data_through_the_h2_crates_server() {
    let pki = Pki::new();
    let addr = h2_echo_server(&pki).await;
    let pool = Arc::new(Pool::new(Config::default(), StaticTls(pki.client_config())));
    let authority: Authority = "10.0.0.1:8080".parse().unwrap();
    let mut tasks = Vec::new();
    // Four tunnels at once on one connection, each far beyond the 64 KiB windows.
    for seed in 0..4u8 {
        let pool = pool.clone();
        let authority = authority.clone();
        tasks.push(tokio::spawn(async move {
            let data: Vec<u8> = (0..3_000_000u32).map(|i| (i as u8) ^ seed).collect();
            let tunnel = pool
                .connect("k", addr, &authority, HeaderMap::new())
                .await
                .unwrap();
            let (mut rd, mut wr) = tokio::io::split(tunnel);
            let expected = data.clone();
            let writer = tokio::spawn(async move {
                wr.write_all(&data).await.unwrap();
                wr.shutdown().await.unwrap();
                wr
            });
            let mut echoed = Vec::new();
            rd.read_to_end(&mut echoed).await.unwrap();
            let _wr = writer.await.unwrap();
            assert!(echoed == expected, "tunnel {seed}: echo differs");
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    assert_eq!(pool.connection_count(), 1);
}
