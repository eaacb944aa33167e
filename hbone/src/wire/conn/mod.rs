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
    /// The copy loops of this connection's tunnels, for a move to another process.
    mover: Arc<crate::moving::Mover>,
    /// Taken apart for another process.
    moved: bool,
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
                mover: Arc::default(),
                moved: false,
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

    /// Goes away gracefully (see `Session::go_away`): its streams go on, new ones are refused.
    pub(crate) fn go_away(&self) {
        let mut st = self.lock();
        st.session.go_away();
        st.wake_driver();
    }

    /// The streams still open.
    pub(crate) fn open_streams(&self) -> usize {
        self.lock().session.open_streams()
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
    /// The stream's id.
    pub(crate) fn id(&self) -> u32 {
        self.id
    }

    /// A copy loop's registration with the connection's mover.
    pub(crate) fn watch(&self) -> crate::moving::Watch {
        crate::moving::Watch::new(self.conn.lock().mover.clone(), self.id)
    }

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

mod moved;
#[cfg(test)]
mod tests;

pub use moved::ConnectionState;
pub(crate) use moved::Moved;
