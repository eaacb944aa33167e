//! The I/O around a [`Session`]: one lock holds the session and the (TLS) byte stream, so a task
//! that writes to a tunnel frames and encrypts its bytes itself and writes them to the socket in
//! the same turn; no HTTP/2 connection task stands between a tunnel and its socket on the way out.
//!
//! Reading is the driver's job: [`Connection::drive`] (awaited by one task per connection) reads
//! the socket, feeds the session, wakes the streams whose data arrived, and writes what the
//! session queued (SETTINGS and PING answers, WINDOW_UPDATEs) and what a writer could not push
//! because the socket was full. A writer that leaves bytes behind wakes the driver, which then
//! owns the socket's write readiness until they are out.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker, ready};

use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderMap, StatusCode};
use tokio::io::AsyncWrite;

use super::frame::{HEADER_LEN, Reason};
use super::hpack::ResponseHead;
use super::session::{Failure, Incoming, Limits, Recv, Role, Session, data_head};
use crate::tls::MAX_RECORD;
use crate::transport::Io;

/// The smallest read the driver asks the byte stream for.
const READ_MIN: usize = 16 * 1024;
/// An empty read buffer larger than this is freed when the socket has nothing to read, so a
/// quiet connection keeps at most one small read's worth after a burst, or one whole TLS record
/// (a record is read and opened in this buffer).
const READ_KEEP: usize = if READ_MIN > MAX_RECORD {
    READ_MIN
} else {
    MAX_RECORD
};
/// DATA frames one tunnel write may put in a single vectored write.
const MAX_FRAMES_PER_WRITE: usize = 16;
/// Reads per driver turn before it yields to other tasks.
const READS_PER_TURN: usize = 16;

/// One HTTP/2 connection; clones share it.
#[derive(Clone)]
pub(crate) struct Connection {
    shared: Arc<Mutex<State>>,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("wire::Connection")
    }
}

struct State {
    session: Session,
    /// `None` once the driver has finished: the socket is closed.
    io: Option<Box<dyn Io>>,
    rbuf: BytesMut,
    driver: Option<Waker>,
    /// Writers waiting for `out` to drain.
    write_blocked: Vec<Waker>,
}

/// One stream of a [`Connection`]: a tunnel's half of the state.
pub(crate) struct StreamRef {
    conn: Connection,
    id: u32,
}

impl std::fmt::Debug for StreamRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "StreamRef({})", self.id)
    }
}

/// A request the server received, with the stream to answer it on.
pub(crate) struct Request {
    pub(crate) incoming: Incoming,
    pub(crate) stream: StreamRef,
}

impl Connection {
    /// Starts HTTP/2 on `io`: our preface and SETTINGS are sent by the driver's first turn.
    pub(crate) fn new(role: Role, limits: Limits, io: impl Io) -> Connection {
        Connection {
            shared: Arc::new(Mutex::new(State {
                session: Session::new(role, limits),
                io: Some(Box::new(io)),
                rbuf: BytesMut::new(),
                driver: None,
                write_blocked: Vec::new(),
            })),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing in this module panics with the lock held; if something did, the state is still
        // a consistent session, so keep going rather than poisoning every tunnel.
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs the connection until it fails or is closed; returns why it ended. Dropping the
    /// future closes the connection too (its streams fail), as a dropped h2 connection would.
    pub(crate) async fn drive(&self) -> Failure {
        struct CloseOnDrop<'a>(&'a Connection);
        impl Drop for CloseOnDrop<'_> {
            fn drop(&mut self) {
                let mut st = self.0.lock();
                if st.io.is_some() {
                    st.finish(closed());
                }
            }
        }
        let _guard = CloseOnDrop(self);
        std::future::poll_fn(|cx| self.poll_drive(cx)).await
    }

    fn poll_drive(&self, cx: &mut Context<'_>) -> Poll<Failure> {
        let mut guard = self.lock();
        let st = &mut *guard;
        if !st.driver.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            st.driver = Some(cx.waker().clone());
        }
        for _ in 0..READS_PER_TURN {
            let flushed = match st.poll_write_out(cx) {
                Poll::Ready(Ok(())) => {
                    for w in st.write_blocked.drain(..) {
                        w.wake();
                    }
                    true
                }
                Poll::Ready(Err(e)) => return Poll::Ready(st.finish(io_failure(&e))),
                Poll::Pending => false,
            };
            if let Some(f) = st.session.failure() {
                // Best effort for our GOAWAY: one write attempt, then the socket closes.
                let f = f.clone();
                return Poll::Ready(st.finish(f));
            }
            if !flushed && st.session.out_full() {
                // The peer is not reading: stop reading from it until it does.
                return Poll::Pending;
            }
            let Some(io) = st.io.as_mut() else {
                return Poll::Ready(st.finish(closed()));
            };
            let want = st.session.wanted(&st.rbuf);
            match io.poll_read_into(cx, &mut st.rbuf, want) {
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(st.finish(Failure::Io {
                        kind: io::ErrorKind::UnexpectedEof,
                        detail: "the peer closed the connection".to_owned(),
                    }));
                }
                Poll::Ready(Ok(_)) => {
                    // A protocol error fails the session; the next turn sends the GOAWAY.
                    let _ = st.session.recv(&mut st.rbuf, std::time::Instant::now());
                }
                Poll::Ready(Err(e)) => return Poll::Ready(st.finish(io_failure(&e))),
                Poll::Pending => {
                    if st.rbuf.is_empty() && st.rbuf.capacity() > READ_KEEP {
                        st.rbuf = BytesMut::new();
                    }
                    // Frames the session queued while reading (acks, window updates).
                    if !st.session.out.is_empty()
                        && let Poll::Ready(Err(e)) = st.poll_write_out(cx)
                    {
                        return Poll::Ready(st.finish(io_failure(&e)));
                    }
                    return Poll::Pending;
                }
            }
        }
        // Plenty to read: let other tasks (the tunnels reading it) run, then continue.
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    /// Closes the connection with GOAWAY (NO_ERROR); its streams fail and the driver ends.
    pub(crate) fn close(&self) {
        let mut st = self.lock();
        st.session.close(Reason::NO_ERROR);
        st.wake_driver();
    }

    /// Whether the peer's first SETTINGS frame has arrived.
    pub(crate) fn got_settings(&self) -> bool {
        self.lock().session.got_settings()
    }

    /// The peer's limit on our concurrent streams.
    pub(crate) fn peer_max_streams(&self) -> u32 {
        self.lock().session.peer_max_streams()
    }

    /// Whether a new stream may be opened (no failure, no GOAWAY from the peer).
    pub(crate) fn can_open(&self) -> bool {
        self.lock().session.can_open()
    }

    /// Sends a PING and waits for its answer.
    pub(crate) async fn ping(&self) -> Result<(), Failure> {
        {
            let mut st = self.lock();
            st.session.send_ping();
            st.wake_driver();
        }
        std::future::poll_fn(|cx| self.lock().session.poll_pong(cx)).await
    }

    /// Client: sends a CONNECT, with as much of `first` as the windows take right behind it in
    /// the same write, and waits for the response head. Returns how many bytes of `first` went.
    pub(crate) async fn connect(
        &self,
        authority: &str,
        headers: &HeaderMap,
        first: &[u8],
    ) -> Result<(ResponseHead, StreamRef, usize), Failure> {
        let (id, sent) = {
            let mut st = self.lock();
            let id = st.session.open(authority, headers)?;
            let sent = if first.is_empty() {
                0
            } else {
                st.session.send_first(id, first)
            };
            st.push_out();
            (id, sent)
        };
        // From here the stream is ours: dropping this future drops `stream`, which resets it.
        let stream = StreamRef {
            conn: self.clone(),
            id,
        };
        let head = std::future::poll_fn(|cx| self.lock().session.poll_response(id, cx)).await?;
        Ok((head, stream, sent))
    }

    /// Server: the next request, or `None` once the connection has ended.
    pub(crate) async fn accept(&self) -> Option<Request> {
        let incoming = std::future::poll_fn(|cx| self.lock().session.poll_accept(cx)).await?;
        let stream = StreamRef {
            conn: self.clone(),
            id: incoming.id,
        };
        Some(Request { incoming, stream })
    }
}

impl State {
    fn wake_driver(&mut self) {
        if let Some(w) = &self.driver {
            w.wake_by_ref();
        }
    }

    /// Writes `out` and flushes the byte stream.
    fn poll_write_out(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let Some(io) = self.io.as_mut() else {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::NotConnected,
                "the HBONE connection is closed",
            )));
        };
        let out = &mut self.session.out;
        while !out.is_empty() {
            let n = ready!(Pin::new(&mut *io).poll_write(cx, out))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            out.advance(n);
        }
        Pin::new(io).poll_flush(cx)
    }

    /// Writes what the session queued, in the caller's turn; the driver finishes what the socket
    /// does not take now.
    fn push_out(&mut self) {
        match self.poll_write_out(&mut Context::from_waker(Waker::noop())) {
            Poll::Ready(Ok(())) => {}
            Poll::Ready(Err(e)) => {
                self.session.fail(io_failure(&e));
                self.wake_driver();
            }
            Poll::Pending => self.wake_driver(),
        }
    }

    /// Sends DATA frames (`slices`: header, payload, header, ...) in one vectored write when
    /// nothing is queued before them, else after the queue.
    fn write_frames(&mut self, slices: &[io::IoSlice<'_>]) {
        let mut written = 0;
        if self.session.out.is_empty()
            && let Some(io) = self.io.as_mut()
        {
            let mut noop = Context::from_waker(Waker::noop());
            match Pin::new(&mut **io).poll_write_vectored(&mut noop, slices) {
                Poll::Ready(Ok(n)) => written = n,
                Poll::Ready(Err(e)) => {
                    self.session.fail(io_failure(&e));
                    self.wake_driver();
                    return;
                }
                Poll::Pending => {}
            }
        }
        // What the byte stream did not take now goes after it, in order.
        for slice in slices {
            let skip = written.min(slice.len());
            written -= skip;
            self.session.out.extend_from_slice(&slice[skip..]);
        }
        self.push_out();
    }

    /// The result of a write of `n` bytes: the connection's failure if writing failed it.
    fn sent(&self, n: usize) -> Poll<Result<usize, Failure>> {
        match self.session.failure() {
            Some(f) => Poll::Ready(Err(f.clone())),
            None => Poll::Ready(Ok(n)),
        }
    }

    /// The driver is done: close the socket and report why.
    fn finish(&mut self, failure: Failure) -> Failure {
        if self.session.failure().is_none() {
            self.session.fail(failure.clone());
        }
        self.io = None;
        self.rbuf = BytesMut::new();
        for w in self.write_blocked.drain(..) {
            w.wake();
        }
        failure
    }
}

impl StreamRef {
    /// Server: answers the request. `end_stream` refuses it (no tunnel follows): that answer
    /// leaves at once. An acceptance leaves when the caller's task next yields (the driver
    /// writes it), or with the tunnel's first write, whichever comes first: bytes that came with
    /// the CONNECT reach the destination before the answer's write, and the client is not told
    /// any later than it would be after that one write.
    pub(crate) fn respond(
        &self,
        status: StatusCode,
        headers: &HeaderMap,
        end_stream: bool,
    ) -> Result<(), Failure> {
        let mut st = self.conn.lock();
        st.session.respond(self.id, status, headers, end_stream)?;
        if end_stream {
            st.push_out();
        } else {
            st.wake_driver();
        }
        Ok(())
    }

    /// The next chunk of received bytes; `None` at END_STREAM.
    pub(crate) fn poll_recv(&self, cx: &mut Context<'_>) -> Poll<Result<Option<Bytes>, Failure>> {
        let mut st = self.conn.lock();
        let queued = st.session.out.len();
        let chunk = match ready!(st.session.poll_recv(self.id, cx))? {
            Recv::Data(chunk) => Some(chunk),
            Recv::Eof => None,
        };
        if st.session.out.len() > queued {
            // A WINDOW_UPDATE for what we just took (what was queued before, the driver writes).
            st.push_out();
        }
        Poll::Ready(Ok(chunk))
    }

    /// Sends as much of `data` as flow control allows, in up to `MAX_FRAMES_PER_WRITE` DATA
    /// frames; returns how much. With `end`, a call that sends all of `data` ends our half of
    /// the stream with it (END_STREAM on the last frame, in the same write).
    pub(crate) fn poll_send(
        &self,
        cx: &mut Context<'_>,
        data: &[u8],
        end: bool,
    ) -> Poll<Result<usize, Failure>> {
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let mut guard = self.conn.lock();
        let st = &mut *guard;
        let capacity = ready!(st.session.poll_send_capacity(self.id, cx))?;
        if st.session.out_full() {
            st.write_blocked.push(cx.waker().clone());
            st.wake_driver();
            return Poll::Pending;
        }
        // Up to MAX_FRAMES_PER_WRITE frames in one vectored write: a peer with small frames
        // (16 KiB by default) does not cost a syscall per frame.
        // (One frame only while frames already wait for the socket: what queues stays within
        // `max_send_buffer` plus one frame.)
        let frame = st.session.peer_max_frame();
        let frames = if st.session.out.is_empty() {
            MAX_FRAMES_PER_WRITE
        } else {
            1
        };
        let n = capacity.min(data.len()).min(frame.saturating_mul(frames));
        let last = end && n == data.len();
        st.session.take_send(self.id, n, last);
        if n <= frame {
            let head = data_head(self.id, n, last);
            st.write_frames(&[io::IoSlice::new(&head), io::IoSlice::new(&data[..n])]);
            return st.sent(n);
        }
        let count = n.div_ceil(frame);
        let mut heads = [[0u8; HEADER_LEN]; MAX_FRAMES_PER_WRITE];
        for (i, (head, chunk)) in heads.iter_mut().zip(data[..n].chunks(frame)).enumerate() {
            *head = data_head(self.id, chunk.len(), last && i + 1 == count);
        }
        let mut slices = [io::IoSlice::new(&[]); 2 * MAX_FRAMES_PER_WRITE];
        for (i, chunk) in data[..n].chunks(frame).enumerate() {
            slices[2 * i] = io::IoSlice::new(&heads[i]);
            slices[2 * i + 1] = io::IoSlice::new(chunk);
        }
        st.write_frames(&slices[..2 * count]);
        st.sent(n)
    }

    /// Ends our half of the stream (END_STREAM).
    pub(crate) fn send_end(&self) -> Result<(), Failure> {
        let mut st = self.conn.lock();
        st.session.send_end(self.id)?;
        st.push_out();
        Ok(())
    }

    /// Resets the stream with CANCEL.
    pub(crate) fn cancel(&self) {
        let mut st = self.conn.lock();
        st.session.reset(self.id, Reason::CANCEL);
        st.push_out();
    }
}

impl Drop for StreamRef {
    fn drop(&mut self) {
        let mut st = self.conn.lock();
        st.session.drop_stream(self.id);
        if !st.session.out.is_empty() {
            st.push_out();
        }
    }
}

fn io_failure(e: &io::Error) -> Failure {
    Failure::Io {
        // An end of the byte stream that is an error (TLS without `close_notify`) was cut
        // short: an abort, not the peer's clean close (which reads as 0 bytes).
        kind: match e.kind() {
            io::ErrorKind::UnexpectedEof => io::ErrorKind::ConnectionAborted,
            kind => kind,
        },
        detail: format!("HBONE connection I/O failed: {e}"),
    }
}

fn closed() -> Failure {
    Failure::Io {
        kind: io::ErrorKind::NotConnected,
        detail: "the HBONE connection is closed".to_owned(),
    }
}

#[cfg(test)]
mod tests {
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

    impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Io for CountingWrites<T> {}

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
        let (_conn, mut tunnel, mut rd) =
            tunnel_to_scripted_server(io, limits, theirs, 1 << 20).await;
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
        let (_conn, request, mut rd, _wr) =
            request_from_scripted_client(io, theirs, b"request").await;
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
}
