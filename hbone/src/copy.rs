//! Bidirectional copy between two byte streams, with half-close and byte counts.
//!
//! A proxy joins a tunnel and a TCP socket with this. Both directions are driven from one task;
//! when one side reaches EOF its peer's write half is shut down (a TCP FIN, or END_STREAM on a
//! tunnel) and the other direction keeps flowing until it ends too. The counts are returned even
//! when the copy fails, because metrics need them either way.
//!
//! A connection that waits for data holds no copy buffer: buffers are taken when bytes arrive and
//! given back when the flow pauses. A bulk transfer's buffer grows (by 4x, each time a read fills
//! it) so it moves data in few, large writes.

use std::future::Future;
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::Tunnel;
use crate::moving::{Copied, CopyState, MovedPlain, MovedTunnel, PlainMover, Step, Watch};

const INITIAL_BUFFER: usize = 1024;
const MAX_BUFFER: usize = 256 * 1024;

/// Bytes moved in each direction.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Transferred {
    /// Bytes read from `a` and written to `b`.
    pub a_to_b: u64,
    /// Bytes read from `b` and written to `a`.
    pub b_to_a: u64,
}

/// A direction of the copy, for errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// From `a` to `b`.
    AToB,
    /// From `b` to `a`.
    BToA,
}

/// Which operation failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    /// Reading from the source of the direction.
    Read,
    /// Writing, flushing or shutting down the destination of the direction.
    Write,
}

/// A failed copy: what failed and how much had been moved until then.
#[derive(Debug, thiserror::Error)]
#[error("copy failed while {} ({direction:?}) after {} bytes a->b and {} bytes b->a: {source}",
    match .operation { Operation::Read => "reading", Operation::Write => "writing" },
    .transferred.a_to_b, .transferred.b_to_a)]
pub struct CopyError {
    /// The direction that failed.
    pub direction: Direction,
    /// Whether its read or its write failed.
    pub operation: Operation,
    /// Bytes moved before the failure.
    pub transferred: Transferred,
    /// The I/O error.
    #[source]
    pub source: io::Error,
}

/// Copies `a -> b` and `b -> a` until both directions reach EOF, propagating half-closes.
///
/// The future holds only the two streams' references and the copy's own state (a few hundred
/// bytes), so a proxy that keeps many idle connections keeps little per connection.
pub fn copy_bidirectional<'a, A, B>(
    a: &'a mut A,
    b: &'a mut B,
) -> impl Future<Output = Result<Transferred, CopyError>> + 'a
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    drive(a, b, Half::new(), Half::new())
}

/// Like [`copy_bidirectional`] with a [`Tunnel`] on one side (`a`), but without staging copies:
/// received tunnel chunks are written to `stream` as they are, and bytes read from `stream` go
/// into the tunnel in the buffer they were read into. When `stream` ends right behind its last
/// bytes (a FIN that came with them), they leave with END_STREAM in one DATA frame and one
/// write, so the peer wakes once. A proxy should prefer this.
pub fn copy_tunnel_bidirectional<'a, S>(
    tunnel: &'a mut Tunnel,
    stream: &'a mut S,
) -> impl Future<Output = Result<Transferred, CopyError>> + 'a
where
    S: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    drive(tunnel, stream, FromTunnel::default(), IntoTunnel::default())
}

/// One direction of a copy: moves bytes from `R` to `W` and counts them.
trait Pump<R: ?Sized, W: ?Sized> {
    /// Ready(Ok) once EOF was read and the destination shut down.
    fn poll(
        &mut self,
        cx: &mut Context<'_>,
        from: &mut R,
        to: &mut W,
    ) -> Poll<Result<(), (Operation, io::Error)>>;

    /// Bytes moved so far.
    fn amount(&self) -> u64;
}

/// Drives both directions from one task until both finish or one fails. A plain closure, not an
/// `async fn`: that would store the pumps twice (as arguments and as locals).
fn drive<'a, A, B, X, Y>(
    a: &'a mut A,
    b: &'a mut B,
    mut a_to_b: X,
    mut b_to_a: Y,
) -> impl Future<Output = Result<Transferred, CopyError>> + 'a
where
    A: ?Sized,
    B: ?Sized,
    X: Pump<A, B> + 'a,
    Y: Pump<B, A> + 'a,
{
    std::future::poll_fn(move |cx| poll_both(cx, &mut *a, &mut *b, &mut a_to_b, &mut b_to_a))
}

/// One step of both directions: Ready once both have finished or one has failed.
fn poll_both<A, B, X, Y>(
    cx: &mut Context<'_>,
    a: &mut A,
    b: &mut B,
    a_to_b: &mut X,
    b_to_a: &mut Y,
) -> Poll<Result<Transferred, CopyError>>
where
    A: ?Sized,
    B: ?Sized,
    X: Pump<A, B>,
    Y: Pump<B, A>,
{
    let ab = a_to_b.poll(cx, &mut *a, &mut *b);
    let ba = match ab {
        Poll::Ready(Err(_)) => Poll::Pending,
        _ => b_to_a.poll(cx, &mut *b, &mut *a),
    };
    let transferred = Transferred {
        a_to_b: a_to_b.amount(),
        b_to_a: b_to_a.amount(),
    };
    let failed = |direction, (operation, source)| {
        Poll::Ready(Err(CopyError {
            direction,
            operation,
            transferred,
            source,
        }))
    };
    match (ab, ba) {
        (Poll::Ready(Err(e)), _) => failed(Direction::AToB, e),
        (_, Poll::Ready(Err(e))) => failed(Direction::BToA, e),
        (Poll::Ready(Ok(())), Poll::Ready(Ok(()))) => Poll::Ready(Ok(transferred)),
        _ => Poll::Pending,
    }
}

/// [`copy_tunnel_bidirectional`] for a connection that may move to another process (see
/// [`crate::handoff`]): when it moves, the copy stops between two steps, hands its state, a
/// duplicate of `stream`'s descriptor and `memo` to the move, and ends with
/// [`Copied::Moved`]. `resumed` goes on with a copy that another process handed over (from
/// [`AdoptedTunnel`](crate::handoff::AdoptedTunnel)). On a connection that never moves this
/// is the same copy, one atomic load per step dearer.
pub fn copy_tunnel_movable<'a, S>(
    tunnel: &'a mut Tunnel,
    stream: &'a mut S,
    memo: Vec<u8>,
    resumed: Option<CopyState>,
) -> impl Future<Output = Result<Copied, CopyError>> + 'a
where
    S: AsyncRead + AsyncWrite + AsFd + Unpin + ?Sized,
{
    let (mut from, mut into) = match resumed {
        None => (FromTunnel::default(), IntoTunnel::default()),
        Some(state) => (
            FromTunnel {
                chunk: Bytes::from(state.to_app),
                eof: state.to_app_eof,
                finished: state.to_app_done,
                needs_flush: false,
                amount: state.transferred.a_to_b,
            },
            IntoTunnel {
                staged: Bytes::from(state.from_app),
                eof: state.from_app_eof,
                finished: state.from_app_done,
                amount: state.transferred.b_to_a,
                ..IntoTunnel::default()
            },
        ),
    };
    let mut watch = tunnel.watch();
    let mut memo = Some(memo);
    std::future::poll_fn(move |cx| {
        match watch.step(cx.waker(), into.read_error.is_none()) {
            Step::Copy => {}
            Step::Wait => return Poll::Pending,
            Step::HandOver => {
                let transferred = Transferred {
                    a_to_b: from.amount,
                    b_to_a: into.amount,
                };
                let app = stream
                    .as_fd()
                    .try_clone_to_owned()
                    .map_err(|source| CopyError {
                        direction: Direction::AToB,
                        operation: Operation::Write,
                        transferred,
                        source,
                    })?;
                let mut to_app = std::mem::take(&mut from.chunk).to_vec();
                to_app.extend_from_slice(&tunnel.take_pending());
                watch.hand_over(MovedTunnel {
                    stream_id: tunnel.stream_id(),
                    app,
                    copy: CopyState {
                        to_app,
                        to_app_eof: from.eof || tunnel.read_eof(),
                        to_app_done: from.finished,
                        from_app: std::mem::take(&mut into.staged).to_vec(),
                        from_app_eof: into.eof,
                        from_app_done: into.finished,
                        transferred,
                    },
                    memo: memo.take().unwrap_or_default(),
                });
                return Poll::Ready(Ok(Copied::Moved(transferred)));
            }
        }
        let step = poll_both(cx, &mut *tunnel, &mut *stream, &mut from, &mut into);
        if step.is_pending() && watch.phase_changed() {
            // A move began while this step ran: its wake-up may have come before our waker was
            // registered where it looked; step again to see it.
            cx.waker().wake_by_ref();
        }
        step.map(|r| r.map(Copied::Done))
    })
}

/// [`copy_bidirectional`] for two sockets whose copy may move to another process (a proxy's
/// passthrough or plaintext connection; see [`crate::handoff`]): when `mover` hands it off
/// ([`PlainMover::hand_off`]), the copy stops between two steps, hands its state, duplicates of
/// both sockets' descriptors and `memo` over, and ends with [`Copied::Moved`]. `resumed` goes on
/// with a copy another process handed over ([`MovedPlain::copy`]).
pub fn copy_movable<'a, A, B>(
    a: &'a mut A,
    b: &'a mut B,
    mover: &PlainMover,
    memo: Vec<u8>,
    resumed: Option<CopyState>,
) -> impl Future<Output = Result<Copied, CopyError>> + 'a
where
    A: AsyncRead + AsyncWrite + AsFd + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + AsFd + Unpin + ?Sized,
{
    let (mut ab, mut ba) = match resumed {
        None => (Half::new(), Half::new()),
        Some(s) => (
            Half::resumed(s.to_app, s.to_app_eof, s.to_app_done, s.transferred.a_to_b),
            Half::resumed(
                s.from_app,
                s.from_app_eof,
                s.from_app_done,
                s.transferred.b_to_a,
            ),
        ),
    };
    let mut watch = Watch::new(mover.0.clone(), 0);
    let mut memo = Some(memo);
    std::future::poll_fn(move |cx| {
        match watch.step(cx.waker(), true) {
            Step::Copy => {}
            Step::Wait => return Poll::Pending,
            Step::HandOver => {
                let transferred = Transferred {
                    a_to_b: ab.amount,
                    b_to_a: ba.amount,
                };
                let duplicate = |fd: BorrowedFd<'_>, direction| {
                    fd.try_clone_to_owned().map_err(|source| CopyError {
                        direction,
                        operation: Operation::Write,
                        transferred,
                        source,
                    })
                };
                let a_fd = duplicate(a.as_fd(), Direction::BToA)?;
                let b_fd = duplicate(b.as_fd(), Direction::AToB)?;
                watch.hand_over(MovedPlain {
                    a: a_fd,
                    b: b_fd,
                    copy: CopyState {
                        to_app: ab.held(),
                        to_app_eof: ab.read_eof,
                        to_app_done: ab.finished,
                        from_app: ba.held(),
                        from_app_eof: ba.read_eof,
                        from_app_done: ba.finished,
                        transferred,
                    },
                    memo: memo.take().unwrap_or_default(),
                });
                return Poll::Ready(Ok(Copied::Moved(transferred)));
            }
        }
        let step = poll_both(cx, &mut *a, &mut *b, &mut ab, &mut ba);
        if step.is_pending() && watch.phase_changed() {
            cx.waker().wake_by_ref();
        }
        step.map(|r| r.map(Copied::Done))
    })
}

/// Tunnel -> stream: writes each received chunk as is.
#[derive(Default)]
struct FromTunnel {
    chunk: Bytes,
    eof: bool,
    finished: bool,
    needs_flush: bool,
    amount: u64,
}

impl<W: AsyncWrite + Unpin + ?Sized> Pump<Tunnel, W> for FromTunnel {
    fn amount(&self) -> u64 {
        self.amount
    }

    fn poll(
        &mut self,
        cx: &mut Context<'_>,
        tunnel: &mut Tunnel,
        writer: &mut W,
    ) -> Poll<Result<(), (Operation, io::Error)>> {
        if self.finished {
            return Poll::Ready(Ok(()));
        }
        loop {
            if self.chunk.is_empty() && !self.eof {
                match tunnel.poll_recv_chunk(cx) {
                    Poll::Pending => {
                        if self.needs_flush {
                            ready!(Pin::new(&mut *writer).poll_flush(cx))
                                .map_err(|e| (Operation::Write, e))?;
                            self.needs_flush = false;
                        }
                        return Poll::Pending;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err((Operation::Read, e))),
                    Poll::Ready(Ok(None)) => self.eof = true,
                    Poll::Ready(Ok(Some(chunk))) => self.chunk = chunk,
                }
            }
            while !self.chunk.is_empty() {
                let n = ready!(Pin::new(&mut *writer).poll_write(cx, &self.chunk))
                    .map_err(|e| (Operation::Write, e))?;
                if n == 0 {
                    return Poll::Ready(Err((Operation::Write, write_zero())));
                }
                self.chunk.advance(n);
                self.amount += n as u64;
                self.needs_flush = true;
            }
            // An emptied chunk still pins the HTTP/2 read buffer it was cut from; let it go, so
            // an idle connection holds none of it.
            self.chunk = Bytes::new();
            if self.eof {
                ready!(Pin::new(&mut *writer).poll_flush(cx)).map_err(|e| (Operation::Write, e))?;
                ready!(Pin::new(&mut *writer).poll_shutdown(cx))
                    .map_err(|e| (Operation::Write, e))?;
                self.finished = true;
                return Poll::Ready(Ok(()));
            }
        }
    }
}

/// Stream -> tunnel. Small reads go through a buffer on the stack and are copied into a chunk of
/// exactly their size, so a connection that waits for data holds no buffer at all; once a read
/// fills the stack buffer the flow is bulk, and reads go straight into a heap buffer (its filled
/// part is handed to the tunnel without a copy). The heap buffer is dropped again when the
/// source runs dry after a read that did not fill it.
#[derive(Default)]
struct IntoTunnel {
    buf: BytesMut,
    staged: Bytes,
    /// 0: small reads (on the stack); otherwise the size of each read into `buf`.
    read_size: usize,
    /// Whether the last heap read filled `read_size` (the source is still ahead of us).
    last_read_full: bool,
    /// Whether the last read returned less than it asked for: the socket was drained then.
    last_read_short: bool,
    /// An error the end-of-stream check after a read met; the next read reports it.
    read_error: Option<io::Error>,
    eof: bool,
    finished: bool,
    amount: u64,
}

/// Size of the stack buffer for small reads; a read that fills it switches to heap reads.
const STACK_READ: usize = 16 * 1024;
/// Size of the heap reads of a bulk flow: large, so that a bulk transfer costs few reads here,
/// few big DATA frames (up to the peer's SETTINGS_MAX_FRAME_SIZE: 256 KiB by default in this
/// crate, 1 MiB in the `ztunnel` binary and Istio's), few writes to the TLS socket (a read's
/// frames leave in one, see `Config::tls_write_buffer`) and so few wake-ups of the far side.
/// 512 KiB: against 256 KiB, the sending side's CPU per byte fell by a tenth (BENCHMARKS.md,
/// lever 36); 1 MiB was slower (the buffers of a flow no longer stay in a core's cache).
const MAX_TUNNEL_READ: usize = 512 * 1024;

impl IntoTunnel {
    /// Reads the next bytes into `staged`; Ready(Ok(false)) at EOF.
    fn poll_fill<R: AsyncRead + Unpin + ?Sized>(
        &mut self,
        cx: &mut Context<'_>,
        reader: &mut R,
    ) -> Poll<io::Result<bool>> {
        if let Some(e) = self.read_error.take() {
            return Poll::Ready(Err(e));
        }
        if self.read_size == 0 {
            let mut stack = [std::mem::MaybeUninit::<u8>::uninit(); STACK_READ];
            let mut read_buf = ReadBuf::uninit(&mut stack);
            ready!(Pin::new(&mut *reader).poll_read(cx, &mut read_buf))?;
            let filled = read_buf.filled();
            if filled.len() == STACK_READ {
                self.read_size = MAX_TUNNEL_READ;
                self.last_read_full = true;
            }
            self.last_read_short = filled.len() < STACK_READ;
            self.staged = Bytes::copy_from_slice(filled);
            return Poll::Ready(Ok(!filled.is_empty()));
        }
        // `staged` (sent by now) still shares the last read's allocation: let go of it first,
        // so that `reserve` takes that allocation back instead of asking for a new one.
        self.staged = Bytes::new();
        self.buf.reserve(self.read_size);
        let n = match tokio_util::io::poll_read_buf(Pin::new(&mut *reader), cx, &mut self.buf) {
            Poll::Pending => {
                if !self.last_read_full {
                    // Nothing to read and the last read did not fill the buffer: the burst is
                    // over, so free the buffer until data flows again.
                    self.buf = BytesMut::new();
                    self.read_size = 0;
                }
                return Poll::Pending;
            }
            Poll::Ready(n) => n?,
        };
        self.last_read_full = n >= self.read_size;
        self.last_read_short = !self.last_read_full;
        self.staged = self.buf.split().freeze();
        Poll::Ready(Ok(n > 0))
    }

    /// After a short read: whether the source has ended too (its FIN came with the data), so
    /// that the data and END_STREAM leave in one frame and one write, and the peer wakes once.
    /// tokio takes a short read as the socket drained, so this makes no system call unless the
    /// socket has reported its end. Bytes that arrived meanwhile join `staged`; an error is
    /// kept for the next read, after `staged` is sent.
    fn poll_peek_end<R: AsyncRead + Unpin + ?Sized>(
        &mut self,
        cx: &mut Context<'_>,
        reader: &mut R,
    ) {
        let mut stack = [std::mem::MaybeUninit::<u8>::uninit(); PEEK_READ];
        let mut read_buf = ReadBuf::uninit(&mut stack);
        match Pin::new(&mut *reader).poll_read(cx, &mut read_buf) {
            Poll::Pending => {}
            Poll::Ready(Ok(())) if read_buf.filled().is_empty() => self.eof = true,
            Poll::Ready(Ok(())) => {
                let more = read_buf.filled();
                let mut joined = BytesMut::with_capacity(self.staged.len() + more.len());
                joined.extend_from_slice(&self.staged);
                joined.extend_from_slice(more);
                self.staged = joined.freeze();
            }
            Poll::Ready(Err(e)) => self.read_error = Some(e),
        }
    }
}

/// The read that checks for the end of the source after a short read; more bytes than this
/// are left for the next ordinary read.
const PEEK_READ: usize = 4 * 1024;

impl<R: AsyncRead + Unpin + ?Sized> Pump<R, Tunnel> for IntoTunnel {
    fn amount(&self) -> u64 {
        self.amount
    }

    fn poll(
        &mut self,
        cx: &mut Context<'_>,
        reader: &mut R,
        tunnel: &mut Tunnel,
    ) -> Poll<Result<(), (Operation, io::Error)>> {
        if self.finished {
            return Poll::Ready(Ok(()));
        }
        loop {
            if self.staged.is_empty() && !self.eof {
                let more = ready!(self.poll_fill(cx, reader)).map_err(|e| (Operation::Read, e))?;
                self.eof = !more;
                if more && self.last_read_short {
                    self.poll_peek_end(cx, reader);
                }
            }
            while !self.staged.is_empty() {
                let sent = if self.eof {
                    tunnel.poll_send_last(cx, &mut self.staged)
                } else {
                    tunnel.poll_send_chunk(cx, &mut self.staged)
                };
                let n = ready!(sent).map_err(|e| (Operation::Write, e))?;
                self.amount += n as u64;
            }
            if self.eof {
                ready!(Pin::new(&mut *tunnel).poll_shutdown(cx))
                    .map_err(|e| (Operation::Write, e))?;
                self.finished = true;
                self.buf = BytesMut::new();
                return Poll::Ready(Ok(()));
            }
        }
    }
}

fn write_zero() -> io::Error {
    io::Error::new(io::ErrorKind::WriteZero, "destination accepted no bytes")
}

/// One direction's state.
struct Half {
    buf: Vec<u8>,
    start: usize,
    end: usize,
    read_eof: bool,
    finished: bool,
    needs_flush: bool,
    amount: u64,
}

impl Half {
    fn new() -> Self {
        Half {
            buf: Vec::new(),
            start: 0,
            end: 0,
            read_eof: false,
            finished: false,
            needs_flush: false,
            amount: 0,
        }
    }

    /// A direction as another process left it: `held` read and not yet written.
    fn resumed(held: Vec<u8>, read_eof: bool, finished: bool, amount: u64) -> Self {
        let end = held.len();
        Half {
            buf: held,
            start: 0,
            end,
            read_eof,
            finished,
            needs_flush: false,
            amount,
        }
    }

    /// The bytes read and not yet written.
    fn held(&self) -> Vec<u8> {
        self.buf[self.start..self.end].to_vec()
    }
}

impl<R, W> Pump<R, W> for Half
where
    R: AsyncRead + Unpin + ?Sized,
    W: AsyncWrite + Unpin + ?Sized,
{
    fn amount(&self) -> u64 {
        self.amount
    }

    fn poll(
        &mut self,
        cx: &mut Context<'_>,
        reader: &mut R,
        writer: &mut W,
    ) -> Poll<Result<(), (Operation, io::Error)>> {
        if self.finished {
            return Poll::Ready(Ok(()));
        }
        loop {
            if self.start == self.end && !self.read_eof {
                if self.buf.is_empty() {
                    self.buf = vec![0; INITIAL_BUFFER];
                }
                let mut read_buf = ReadBuf::new(&mut self.buf);
                match Pin::new(&mut *reader).poll_read(cx, &mut read_buf) {
                    Poll::Pending => {
                        if self.buf.len() == INITIAL_BUFFER {
                            // Not a bulk flow, and it paused: hold no buffer while it waits.
                            self.buf = Vec::new();
                        }
                        if self.needs_flush {
                            ready!(Pin::new(&mut *writer).poll_flush(cx))
                                .map_err(|e| (Operation::Write, e))?;
                            self.needs_flush = false;
                        }
                        return Poll::Pending;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err((Operation::Read, e))),
                    Poll::Ready(Ok(())) => {
                        let n = read_buf.filled().len();
                        if n == 0 {
                            self.read_eof = true;
                        } else {
                            self.start = 0;
                            self.end = n;
                        }
                    }
                }
            }
            while self.start < self.end {
                let n =
                    ready!(Pin::new(&mut *writer).poll_write(cx, &self.buf[self.start..self.end]))
                        .map_err(|e| (Operation::Write, e))?;
                if n == 0 {
                    return Poll::Ready(Err((Operation::Write, write_zero())));
                }
                self.start += n;
                self.amount += n as u64;
                self.needs_flush = true;
            }
            // Everything read has been written; grow if the last read filled the buffer.
            if self.end == self.buf.len() && self.buf.len() < MAX_BUFFER {
                let grown = (self.buf.len() * 4).min(MAX_BUFFER);
                self.buf.resize(grown, 0);
            }
            self.start = 0;
            self.end = 0;
            if self.read_eof {
                ready!(Pin::new(&mut *writer).poll_flush(cx)).map_err(|e| (Operation::Write, e))?;
                ready!(Pin::new(&mut *writer).poll_shutdown(cx))
                    .map_err(|e| (Operation::Write, e))?;
                self.finished = true;
                self.buf = Vec::new();
                return Poll::Ready(Ok(()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;

    /// Hands out its chunks one read at a time, then is pending (an open, quiet connection).
    struct Script(VecDeque<Vec<u8>>);

    impl AsyncRead for Script {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            match self.0.front_mut() {
                None => Poll::Pending,
                Some(chunk) => {
                    let n = chunk.len().min(buf.remaining());
                    buf.put_slice(&chunk[..n]);
                    chunk.drain(..n);
                    if chunk.is_empty() {
                        self.0.pop_front();
                    }
                    Poll::Ready(Ok(()))
                }
            }
        }
    }

    fn fill(pump: &mut IntoTunnel, reader: &mut Script) -> Poll<usize> {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        match pump.poll_fill(&mut cx, reader) {
            Poll::Ready(Ok(true)) => Poll::Ready(std::mem::take(&mut pump.staged).len()),
            Poll::Ready(other) => panic!("unexpected {other:?}"),
            Poll::Pending => Poll::Pending,
        }
    }

    #[test]
    fn a_quiet_connection_holds_no_read_buffer() {
        let mut pump = IntoTunnel::default();
        let mut reader = Script(VecDeque::from([b"x".to_vec()]));
        assert_eq!(fill(&mut pump, &mut reader), Poll::Ready(1));
        assert_eq!(fill(&mut pump, &mut reader), Poll::Pending);
        assert_eq!(pump.buf.capacity(), 0, "a small read left a buffer behind");
    }

    #[test]
    fn a_bulk_flow_reads_into_a_heap_buffer_and_frees_it_when_it_pauses() {
        let mut pump = IntoTunnel::default();
        let mut reader = Script(VecDeque::from([
            vec![1; STACK_READ],
            vec![2; MAX_TUNNEL_READ],
            vec![3; 100],
        ]));
        assert_eq!(fill(&mut pump, &mut reader), Poll::Ready(STACK_READ));
        assert_eq!(
            pump.read_size, MAX_TUNNEL_READ,
            "a full read is a bulk flow"
        );
        assert_eq!(fill(&mut pump, &mut reader), Poll::Ready(MAX_TUNNEL_READ));
        assert_eq!(fill(&mut pump, &mut reader), Poll::Ready(100));
        assert!(pump.buf.capacity() > 0);
        assert_eq!(fill(&mut pump, &mut reader), Poll::Pending);
        assert_eq!(pump.buf.capacity(), 0, "the paused flow kept its buffer");
        assert_eq!(pump.read_size, 0);
    }

    #[test]
    fn a_bulk_flow_reads_into_the_same_buffer_while_it_lasts() {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut pump = IntoTunnel::default();
        let mut reader = Script(VecDeque::from([
            vec![1; STACK_READ],
            vec![2; 3 * MAX_TUNNEL_READ],
        ]));
        let mut starts = Vec::new();
        for _ in 0..4 {
            assert!(matches!(
                pump.poll_fill(&mut cx, &mut reader),
                Poll::Ready(Ok(true))
            ));
            starts.push(pump.staged.as_ptr());
            // Sent, as `poll_send_chunk` leaves it: the handle stays, empty.
            let n = pump.staged.len();
            pump.staged.advance(n);
        }
        // starts[0] is the stack read's copy; the three heap reads share one allocation.
        assert_eq!(
            starts[1], starts[2],
            "the second read allocated a new buffer"
        );
        assert_eq!(
            starts[2], starts[3],
            "the third read allocated a new buffer"
        );
    }

    #[test]
    fn a_bulk_flow_moves_half_a_mebibyte_per_read() {
        let mut pump = IntoTunnel::default();
        let mut reader = Script(VecDeque::from([
            vec![1; STACK_READ],
            vec![2; 2 * 1024 * 1024],
        ]));
        assert_eq!(fill(&mut pump, &mut reader), Poll::Ready(STACK_READ));
        assert_eq!(fill(&mut pump, &mut reader), Poll::Ready(512 * 1024));
        assert_eq!(fill(&mut pump, &mut reader), Poll::Ready(512 * 1024));
    }

    /// Reads `data` once, then fails with a reset once, then reads as ended (as a TCP socket
    /// does after reporting a reset).
    struct ThenReset(Option<&'static [u8]>, bool);

    impl AsyncRead for ThenReset {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            if let Some(data) = self.0.take() {
                buf.put_slice(data);
                return Poll::Ready(Ok(()));
            }
            if std::mem::replace(&mut self.1, false) {
                return Poll::Ready(Err(io::ErrorKind::ConnectionReset.into()));
            }
            Poll::Ready(Ok(()))
        }
    }

    #[test]
    fn a_reset_right_after_the_last_bytes_fails_the_next_read_not_the_bytes() {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut pump = IntoTunnel::default();
        let mut reader = ThenReset(Some(b"bye"), true);
        assert!(matches!(
            pump.poll_fill(&mut cx, &mut reader),
            Poll::Ready(Ok(true))
        ));
        assert!(pump.last_read_short);
        pump.poll_peek_end(&mut cx, &mut reader);
        assert!(!pump.eof, "a reset is not the end of the stream");
        assert_eq!(&pump.staged[..], b"bye");
        pump.staged = Bytes::new();
        match pump.poll_fill(&mut cx, &mut reader) {
            Poll::Ready(Err(e)) => assert_eq!(e.kind(), io::ErrorKind::ConnectionReset),
            other => panic!("the reset was lost: {other:?}"),
        }
    }
}
