//! One tunnel as a byte stream: bytes both ways in any sizes, half-close each way, resets, and the first bytes sent with the CONNECT.

mod support;

use hbone::{Authority, Config, InboundConnect, Server};
use http::{HeaderMap, StatusCode};
use proptest::prelude::*;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use support::{EchoServer, Pki, authority, echo_round_trip, init_tracing, pool};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

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

/// A server whose windows and frames are small, so a client's first bytes do not all fit in
/// the CONNECT's write.
fn small_windows() -> Config {
    let mut config = Config::default();
    config.stream_window = 16 * 1024;
    config.connection_window = 256 * 1024;
    config.max_frame_size = 16 * 1024;
    config
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
