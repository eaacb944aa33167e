//! Bidirectional copy between two byte streams, with half-close and byte counts.
//!
//! A proxy joins a tunnel and a TCP socket with this. Both directions are driven from one task;
//! when one side reaches EOF its peer's write half is shut down (a TCP FIN, or END_STREAM on a
//! tunnel) and the other direction keeps flowing until it ends too. The counts are returned even
//! when the copy fails, because metrics need them either way.
//!
//! Buffers start small (1 KiB, so ten thousand idle connections cost little) and grow by 4x, up to
//! 256 KiB, each time a read fills the whole buffer, so bulk transfers use few, large writes.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::Tunnel;

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
pub async fn copy_bidirectional<A, B>(a: &mut A, b: &mut B) -> Result<Transferred, CopyError>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    drive(a, b, Half::new(), Half::new()).await
}

/// Like [`copy_bidirectional`] with a [`Tunnel`] on one side (`a`), but without staging copies:
/// received tunnel chunks are written to `stream` as they are, and bytes read from `stream` go
/// into the tunnel in the buffer they were read into. A proxy should prefer this.
pub async fn copy_tunnel_bidirectional<S>(
    tunnel: &mut Tunnel,
    stream: &mut S,
) -> Result<Transferred, CopyError>
where
    S: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    drive(tunnel, stream, FromTunnel::default(), IntoTunnel::default()).await
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

/// Drives both directions from one task until both finish or one fails.
async fn drive<A, B, X, Y>(
    a: &mut A,
    b: &mut B,
    mut a_to_b: X,
    mut b_to_a: Y,
) -> Result<Transferred, CopyError>
where
    A: ?Sized,
    B: ?Sized,
    X: Pump<A, B>,
    Y: Pump<B, A>,
{
    std::future::poll_fn(|cx| {
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
    })
    .await
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

/// Stream -> tunnel: reads into a shared buffer and hands the filled part to the tunnel.
#[derive(Default)]
struct IntoTunnel {
    buf: BytesMut,
    staged: Bytes,
    read_size: usize,
    eof: bool,
    finished: bool,
    amount: u64,
}

/// Reads into the tunnel stay below glibc's mmap threshold, so reclaimed buffers come from the
/// heap instead of fresh mappings.
const MAX_TUNNEL_READ: usize = 64 * 1024;

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
                if self.read_size == 0 {
                    self.read_size = INITIAL_BUFFER;
                }
                self.buf.reserve(self.read_size);
                let n = ready!(tokio_util::io::poll_read_buf(
                    Pin::new(&mut *reader),
                    cx,
                    &mut self.buf
                ))
                .map_err(|e| (Operation::Read, e))?;
                if n == 0 {
                    self.eof = true;
                } else {
                    if n >= self.read_size && self.read_size < MAX_TUNNEL_READ {
                        self.read_size = (self.read_size * 4).min(MAX_TUNNEL_READ);
                    }
                    self.staged = self.buf.split().freeze();
                }
            }
            while !self.staged.is_empty() {
                let n = ready!(tunnel.poll_send_chunk(cx, &mut self.staged))
                    .map_err(|e| (Operation::Write, e))?;
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
