//! The connection driven over in-memory pipes: reads, writes, wakeups and the driver's buffers.

use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::io::{AsyncRead, AsyncWriteExt};

use super::*;
use crate::transport::Io;
use crate::wire::frame::{self, flag, kind, setting};
use crate::wire::hpack;

/// A connection on `io` in `role`, its driver running in a task of its own.
fn driven(role: Role, limits: Limits, io: impl Io) -> Connection {
    let conn = Connection::new(role, limits, io);
    let driver = conn.clone();
    tokio::spawn(async move { driver.drive().await });
    conn
}

/// A client connection on `io` whose server, scripted on `theirs`, opens the stream and
/// connection windows to `window`, answers the first CONNECT 200 and reads nothing after;
/// returns the connection, the tunnel, and the server's read half (keep it to keep the
/// connection open).
async fn tunnel_to_scripted_server(
    io: impl Io,
    limits: Limits,
    theirs: tokio::io::DuplexStream,
    window: u32,
) -> (
    Connection,
    crate::Tunnel,
    tokio::io::ReadHalf<tokio::io::DuplexStream>,
) {
    let conn = driven(Role::Client, limits, io);
    let (rd, mut wr) = tokio::io::split(theirs);
    let mut script = BytesMut::new();
    frame::put_settings(&mut script, &[(setting::INITIAL_WINDOW_SIZE, window)]);
    frame::put_window_update(&mut script, 0, window - 65_535);
    frame::put_frame(&mut script, kind::HEADERS, flag::END_HEADERS, 1, &[0x88]);
    wr.write_all(&script).await.unwrap();
    let (head, stream, _) = conn
        .connect("10.0.0.1:80", &HeaderMap::new(), &[])
        .await
        .unwrap();
    assert_eq!(head.status, StatusCode::OK);
    (conn, crate::Tunnel::new(stream, None), rd)
}

#[tokio::test]
async fn a_peer_that_does_not_read_makes_writers_wait_instead_of_queueing() {
    let (ours, theirs) = tokio::io::duplex(64 * 1024);
    let limits = Limits {
        stream_window: 1 << 20,
        connection_window: 1 << 20,
        max_frame_size: 1 << 16,
        max_concurrent_streams: 10,
        max_header_list_size: 8192,
        max_send_buffer: 256 * 1024,
        ..Limits::from_config(&crate::Config::default())
    };
    // A server that opens every window as far as it goes, answers 200, then reads nothing.
    let (conn, mut tunnel, _rd) =
        tunnel_to_scripted_server(ours, limits, theirs, (1 << 31) - 1).await;
    let data = vec![7u8; 8 << 20];
    let write = tokio::time::timeout(
        std::time::Duration::from_millis(500),
        tunnel.write_all(&data),
    )
    .await;
    assert!(write.is_err(), "8 MiB written to a peer that reads nothing");
    let queued = conn.lock().session.out.len();
    assert!(
        queued <= 256 * 1024 + (1 << 16) + HEADER_LEN,
        "{queued} bytes queued"
    );
}

/// A byte stream that counts the writes made to it; a vectored write is one write.
struct CountingWrites<T> {
    inner: T,
    writes: Arc<AtomicUsize>,
}

impl<T: AsyncRead + Unpin> AsyncRead for CountingWrites<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for CountingWrites<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.writes.fetch_add(1, Ordering::Relaxed);
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.writes.fetch_add(1, Ordering::Relaxed);
        let joined: Vec<u8> = bufs.iter().flat_map(|b| b.iter().copied()).collect();
        Pin::new(&mut self.inner).poll_write(cx, &joined)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl<T> CountingWrites<T> {
    /// `inner`, counted, and the count.
    fn wrap(inner: T) -> (Self, Arc<AtomicUsize>) {
        let writes = Arc::new(AtomicUsize::new(0));
        let io = CountingWrites {
            inner,
            writes: writes.clone(),
        };
        (io, writes)
    }
}

impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Io for CountingWrites<T> {
    fn take_apart(self: Box<Self>) -> crate::transport::Apart {
        crate::transport::Apart::Refused(self, io::Error::other("a test stream"))
    }
}

#[tokio::test]
async fn a_large_write_to_a_peer_with_small_frames_is_one_write_to_the_socket() {
    let (ours, theirs) = tokio::io::duplex(4 << 20);
    let (io, writes) = CountingWrites::wrap(ours);
    // A server with the default 16 KiB frames and wide-open windows.
    let limits = Limits::from_config(&crate::Config::default());
    let (_conn, mut tunnel, _rd) = tunnel_to_scripted_server(io, limits, theirs, 1 << 24).await;
    let before = writes.load(Ordering::Relaxed);
    tunnel.write_all(&[7u8; 256 * 1024]).await.unwrap();
    let made = writes.load(Ordering::Relaxed) - before;
    assert_eq!(made, 1, "256 KiB in 16 KiB frames took {made} writes");
}

/// A frame as the tests read it: kind, flags, stream, payload.
type Frame = (u8, u8, u32, Vec<u8>);

/// The frames in what a client (after its preface) or a server wrote.
fn frames(wire: &[u8]) -> Vec<Frame> {
    let mut frames = Vec::new();
    let mut rest = wire.strip_prefix(frame::PREFACE).unwrap_or(wire);
    while rest.len() >= HEADER_LEN {
        let head = frame::Head::parse(rest);
        let len = head.len as usize;
        if rest.len() < HEADER_LEN + len {
            break;
        }
        let payload = rest[HEADER_LEN..HEADER_LEN + len].to_vec();
        frames.push((head.kind, head.flags, head.stream, payload));
        rest = &rest[HEADER_LEN + len..];
    }
    frames
}

/// The DATA frames on stream 1 in what a client wrote: (payload, END_STREAM).
fn data_frames(wire: &[u8]) -> Vec<(Vec<u8>, bool)> {
    frames(wire)
        .into_iter()
        .filter(|(k, _, id, _)| *k == kind::DATA && *id == 1)
        .map(|(_, flags, _, payload)| (payload, flags & flag::END_STREAM != 0))
        .collect()
}

/// Reads what the connection under test writes (a client's or a server's), onto `wire`,
/// until `seen` holds for its frames (within 5 s per read).
async fn read_until(
    rd: &mut (impl AsyncRead + Unpin),
    wire: &mut Vec<u8>,
    seen: impl Fn(&[Frame]) -> bool,
) {
    use tokio::io::AsyncReadExt;
    while !seen(&frames(wire)) {
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(std::time::Duration::from_secs(5), rd.read(&mut chunk))
            .await
            .expect("the connection's frames")
            .unwrap();
        wire.extend_from_slice(&chunk[..n]);
    }
}

/// Reads what the other side writes, onto `wire`, up to its ACK of our SETTINGS (the
/// exchange every connection starts with); returns how many frames that was.
async fn read_past_settings(rd: &mut (impl AsyncRead + Unpin), wire: &mut Vec<u8>) -> usize {
    read_until(rd, wire, |f| {
        f.iter()
            .any(|(k, fl, _, _)| *k == kind::SETTINGS && fl & flag::ACK != 0)
    })
    .await;
    frames(wire).len()
}

#[tokio::test]
async fn first_bytes_leave_with_the_connect_in_one_write() {
    let (ours, theirs) = tokio::io::duplex(1 << 20);
    let (io, writes) = CountingWrites::wrap(ours);
    let conn = driven(
        Role::Client,
        Limits::from_config(&crate::Config::default()),
        io,
    );
    let (mut rd, mut wr) = tokio::io::split(theirs);
    let mut script = BytesMut::new();
    frame::put_settings(&mut script, &[]);
    wr.write_all(&script).await.unwrap();
    let mut wire = Vec::new();
    // The client's preface, SETTINGS, and its ACK of ours.
    let settled = read_past_settings(&mut rd, &mut wire).await;
    let before = writes.load(Ordering::Relaxed);
    let client = conn.clone();
    let connect = tokio::spawn(async move {
        let (head, _stream, sent) = client
            .connect("10.0.0.1:80", &HeaderMap::new(), b"hello, first")
            .await
            .unwrap();
        (head.status, sent)
    });
    read_until(&mut rd, &mut wire, |f| {
        f.iter().any(|(k, ..)| *k == kind::DATA)
    })
    .await;
    let made = writes.load(Ordering::Relaxed) - before;
    let sent = frames(&wire).split_off(settled);
    assert_eq!(sent.len(), 2, "{sent:?}");
    assert_eq!((sent[0].0, sent[0].2), (kind::HEADERS, 1));
    assert_eq!(sent[1], (kind::DATA, 0, 1, b"hello, first".to_vec()));
    assert_eq!(
        made, 1,
        "the CONNECT and the first bytes took {made} writes"
    );
    // Only now does the server answer.
    let mut answer = BytesMut::new();
    frame::put_frame(&mut answer, kind::HEADERS, flag::END_HEADERS, 1, &[0x88]);
    wr.write_all(&answer).await.unwrap();
    assert_eq!(connect.await.unwrap(), (StatusCode::OK, 12));
}

#[tokio::test]
async fn bytes_followed_by_the_sources_end_leave_in_one_frame_and_one_write() {
    let (ours, theirs) = tokio::io::duplex(1 << 20);
    let (io, writes) = CountingWrites::wrap(ours);
    let limits = Limits::from_config(&crate::Config::default());
    let (_conn, mut tunnel, mut rd) = tunnel_to_scripted_server(io, limits, theirs, 1 << 20).await;
    // The app wrote its last bytes and closed before the copy read anything.
    let (mut app, mut app_peer) = tokio::io::duplex(1 << 16);
    app_peer.write_all(b"last words").await.unwrap();
    app_peer.shutdown().await.unwrap();
    let before = writes.load(Ordering::Relaxed);
    let copy = tokio::spawn(async move {
        let _ = crate::copy_tunnel_bidirectional(&mut tunnel, &mut app).await;
    });
    let mut wire = Vec::new();
    read_until(&mut rd, &mut wire, |f| {
        f.iter()
            .any(|(k, fl, id, _)| *k == kind::DATA && *id == 1 && fl & flag::END_STREAM != 0)
    })
    .await;
    copy.abort();
    assert_eq!(data_frames(&wire), vec![(b"last words".to_vec(), true)]);
    let made = writes.load(Ordering::Relaxed) - before;
    assert_eq!(made, 1, "the data and END_STREAM took {made} writes");
}

/// A server connection on `io` whose client, scripted on the returned halves, has sent a
/// CONNECT for stream 1 and `first` with it; returns the connection and the request.
async fn request_from_scripted_client(
    io: impl Io,
    theirs: tokio::io::DuplexStream,
    first: &[u8],
) -> (
    Connection,
    Request,
    tokio::io::ReadHalf<tokio::io::DuplexStream>,
    tokio::io::WriteHalf<tokio::io::DuplexStream>,
) {
    let conn = driven(
        Role::Server,
        Limits::from_config(&crate::Config::default()),
        io,
    );
    let (rd, mut wr) = tokio::io::split(theirs);
    let mut script = BytesMut::from(frame::PREFACE);
    frame::put_settings(&mut script, &[]);
    let mut block = BytesMut::new();
    hpack::encode_connect(&mut block, "10.0.0.2:80", &HeaderMap::new());
    frame::put_frame(&mut script, kind::HEADERS, flag::END_HEADERS, 1, &block);
    if !first.is_empty() {
        frame::put_frame(&mut script, kind::DATA, 0, 1, first);
    }
    wr.write_all(&script).await.unwrap();
    let request = conn.accept().await.expect("the CONNECT");
    (conn, request, rd, wr)
}

#[tokio::test]
async fn the_answer_waits_for_the_tunnels_first_write_within_the_same_turn() {
    let (ours, theirs) = tokio::io::duplex(1 << 20);
    let (io, writes) = CountingWrites::wrap(ours);
    let (_conn, request, mut rd, _wr) = request_from_scripted_client(io, theirs, b"request").await;
    let mut wire = Vec::new();
    // Our SETTINGS and the ACK of the client's.
    let settled = read_past_settings(&mut rd, &mut wire).await;
    let before = writes.load(Ordering::Relaxed);
    // In one turn, as a handler does: answer, hand the CONNECT's bytes on, send the reply.
    let stream = request.stream;
    stream
        .respond(StatusCode::OK, &HeaderMap::new(), false)
        .unwrap();
    let got = std::future::poll_fn(|cx| stream.poll_recv(cx))
        .await
        .unwrap();
    assert_eq!(got.as_deref(), Some(&b"request"[..]));
    assert_eq!(
        writes.load(Ordering::Relaxed),
        before,
        "the answer left alone"
    );
    let sent = std::future::poll_fn(|cx| stream.poll_send(cx, b"reply", false)).await;
    assert_eq!(sent.unwrap(), 5);
    read_until(&mut rd, &mut wire, |f| {
        f.iter().any(|(k, ..)| *k == kind::DATA)
    })
    .await;
    let sent = frames(&wire).split_off(settled);
    assert_eq!(sent.len(), 2, "{sent:?}");
    assert_eq!((sent[0].0, sent[0].2), (kind::HEADERS, 1));
    assert_eq!(sent[1], (kind::DATA, 0, 1, b"reply".to_vec()));
    let made = writes.load(Ordering::Relaxed) - before;
    assert_eq!(made, 1, "the answer and the reply took {made} writes");
}

#[tokio::test]
async fn the_answer_leaves_once_the_handler_waits() {
    let (ours, theirs) = tokio::io::duplex(1 << 20);
    let (_conn, request, mut rd, _wr) = request_from_scripted_client(ours, theirs, b"").await;
    request
        .stream
        .respond(StatusCode::OK, &HeaderMap::new(), false)
        .unwrap();
    // The handler now waits (for its destination); the answer must not wait with it.
    let mut wire = Vec::new();
    read_until(&mut rd, &mut wire, |f| {
        f.iter()
            .any(|(k, _, id, _)| *k == kind::HEADERS && *id == 1)
    })
    .await;
    drop(request.stream);
}

/// Sends all of `data` on `stream`.
async fn send_all(stream: &StreamRef, mut data: &[u8]) {
    while !data.is_empty() {
        let n = std::future::poll_fn(|cx| stream.poll_send(cx, data, false))
            .await
            .unwrap();
        data = &data[n..];
    }
}

/// Receives exactly `n` bytes on `stream`.
async fn recv_exact(stream: &StreamRef, n: usize) -> Vec<u8> {
    let mut got = Vec::new();
    while got.len() < n {
        match std::future::poll_fn(|cx| stream.poll_recv(cx)).await {
            Ok(Some(chunk)) => got.extend_from_slice(&chunk),
            other => panic!("after {} bytes: {other:?}", got.len()),
        }
    }
    got
}

#[tokio::test]
async fn a_tls_connection_moves_with_its_stream_and_goes_on_over_the_same_socket() {
    use crate::tls::{TlsStream, accept, connect, movable_test_configs};
    let cfg = crate::Config {
        movable: true,
        ..crate::Config::default()
    };
    let limits = Limits::from_config(&cfg);
    let sizes = cfg.tls_sizes();
    let (server_tls, client_tls) = movable_test_configs();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    // The server: our HTTP/2 over our TLS, echoing every byte of every stream.
    let server_limits = limits.clone();
    tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let tls = accept(server_tls, tcp, &[], sizes, None).await.unwrap();
        let conn = driven(Role::Server, server_limits, tls);
        while let Some(request) = conn.accept().await {
            tokio::spawn(async move {
                let stream = request.stream;
                stream
                    .respond(StatusCode::OK, &HeaderMap::new(), false)
                    .unwrap();
                while let Ok(Some(chunk)) = std::future::poll_fn(|cx| stream.poll_recv(cx)).await {
                    send_all(&stream, &chunk).await;
                }
            });
        }
    });
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let tls = connect(client_tls, name, tcp, sizes).await.unwrap();
    let conn = driven(Role::Client, limits.clone(), tls);
    let (_, stream, _) = conn.connect("a:1", &HeaderMap::new(), b"").await.unwrap();
    let before: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    send_all(&stream, &before).await;
    assert_eq!(recv_exact(&stream, before.len()).await, before);
    // Echoes in flight at the move: sent, and not yet (all) come back.
    send_all(&stream, &before[..50_000]).await;

    let (socket, state) = conn.take_apart().unwrap();
    assert_eq!(state.session.streams.len(), 1);
    drop(stream);
    let tcp = *socket.downcast::<tokio::net::TcpStream>().unwrap();
    let tls = TlsStream::from_state(tcp, state.tls, sizes).unwrap();
    let (moved, mut streams) =
        Connection::put_together(state.session, state.received, limits, tls).unwrap();
    let driver = moved.clone();
    tokio::spawn(async move { driver.drive().await });
    let stream = streams.pop().unwrap();
    assert_eq!(recv_exact(&stream, 50_000).await, before[..50_000]);
    send_all(&stream, &before[50_000..]).await;
    assert_eq!(recv_exact(&stream, 150_000).await, before[50_000..]);
    // A new stream on the moved connection: ids go on, the server's HPACK state agrees.
    let (_, second, _) = moved.connect("b:2", &HeaderMap::new(), b"").await.unwrap();
    send_all(&second, b"new stream").await;
    assert_eq!(recv_exact(&second, 10).await, b"new stream");
    // The old connection is closed here, and says why.
    assert!(
        conn.connect("c:3", &HeaderMap::new(), b"")
            .await
            .unwrap_err()
            .to_string()
            .contains("moved")
    );
}
