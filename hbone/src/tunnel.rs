//! One tunneled TCP connection: an HTTP/2 stream seen as `AsyncRead + AsyncWrite`.
//!
//! Mapping (see SPEC.md): DATA payload is the byte stream; END_STREAM is a half-close
//! (`poll_shutdown` sends it, and reading it is EOF); RST_STREAM or a lost connection is an I/O
//! error with kind `ConnectionReset`. Dropping a tunnel that was not shut down both ways resets the
//! stream, so the peer sees an abort, never a clean close.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::wire::conn::StreamRef;
use crate::wire::session::Failure;

/// A tunneled connection. Obtained from [`Pool::connect`](crate::Pool::connect) on the client and
/// from [`InboundConnect::accept`](crate::InboundConnect::accept) on the server.
#[derive(Debug)]
pub struct Tunnel {
    stream: StreamRef,
    /// Received bytes not yet handed to the reader.
    pending: Bytes,
    read_eof: bool,
    write_closed: bool,
    /// Keeps a pooled connection's stream count until the tunnel is gone.
    _slot: Option<StreamSlot>,
}

impl Tunnel {
    pub(crate) fn new(stream: StreamRef, slot: Option<StreamSlot>) -> Self {
        Tunnel {
            stream,
            pending: Bytes::new(),
            read_eof: false,
            write_closed: false,
            _slot: slot,
        }
    }

    /// A tunnel of a moved connection, as the other process left it: whether the peer's end was
    /// read and whether ours was sent (and, on a pooled connection, its stream slot).
    pub(crate) fn moved(
        stream: StreamRef,
        read_eof: bool,
        write_closed: bool,
        slot: Option<StreamSlot>,
    ) -> Self {
        Tunnel {
            stream,
            pending: Bytes::new(),
            read_eof,
            write_closed,
            _slot: slot,
        }
    }

    /// The HTTP/2 stream's id.
    pub(crate) fn stream_id(&self) -> u32 {
        self.stream.id()
    }

    /// Whether the peer's end (END_STREAM) has been read.
    pub(crate) fn read_eof(&self) -> bool {
        self.read_eof
    }

    /// Received bytes a reader has not taken yet, taken.
    pub(crate) fn take_pending(&mut self) -> Bytes {
        std::mem::take(&mut self.pending)
    }

    /// A copy loop's registration with the connection's mover.
    pub(crate) fn watch(&self) -> crate::moving::Watch {
        self.stream.watch()
    }

    /// Aborts the tunnel: sends RST_STREAM with CANCEL so the peer sees an error, not a close.
    pub fn abort(self) {
        self.stream.cancel();
    }

    /// Sends `data`; the same as `write_all` followed by nothing else.
    ///
    /// Waits for flow-control capacity, so it never buffers more than the peer allows.
    pub async fn send_bytes(&mut self, mut data: Bytes) -> io::Result<()> {
        while !data.is_empty() {
            std::future::poll_fn(|cx| self.poll_send_chunk(cx, &mut data)).await?;
        }
        Ok(())
    }

    /// Takes the next chunk of received bytes without copying; `None` at END_STREAM.
    pub fn poll_recv_chunk(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Option<Bytes>>> {
        if !self.pending.is_empty() {
            return Poll::Ready(Ok(Some(std::mem::take(&mut self.pending))));
        }
        loop {
            if self.read_eof {
                return Poll::Ready(Ok(None));
            }
            match ready!(self.stream.poll_recv(cx)).map_err(failure_to_io)? {
                Some(chunk) if !chunk.is_empty() => return Poll::Ready(Ok(Some(chunk))),
                Some(_) => {}
                None => self.read_eof = true,
            }
        }
    }

    /// Sends as much of `data` as flow control allows now (up to 16 DATA frames), advancing `data`;
    /// returns the bytes sent (at least one, unless `data` is empty).
    pub fn poll_send_chunk(
        &mut self,
        cx: &mut Context<'_>,
        data: &mut Bytes,
    ) -> Poll<io::Result<usize>> {
        let n = ready!(self.poll_send(cx, data))?;
        data.advance(n);
        Poll::Ready(Ok(n))
    }

    /// Like [`Tunnel::poll_send_chunk`], for the last bytes of the stream: the call that sends
    /// the rest of `data` also ends the tunnel's write half (END_STREAM on the last DATA frame,
    /// the same write, as [`AsyncWrite::poll_shutdown`] would after it). Once `data` is empty,
    /// the write half is closed; an empty `data` closes it at once.
    pub fn poll_send_last(
        &mut self,
        cx: &mut Context<'_>,
        data: &mut Bytes,
    ) -> Poll<io::Result<usize>> {
        if data.is_empty() {
            ready!(Pin::new(&mut *self).poll_shutdown(cx))?;
            return Poll::Ready(Ok(0));
        }
        let n = ready!(self.poll_send_inner(cx, data, true))?;
        data.advance(n);
        if data.is_empty() {
            self.write_closed = true;
        }
        Poll::Ready(Ok(n))
    }

    fn poll_send(&mut self, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        self.poll_send_inner(cx, data, false)
    }

    fn poll_send_inner(
        &mut self,
        cx: &mut Context<'_>,
        data: &[u8],
        end: bool,
    ) -> Poll<io::Result<usize>> {
        if self.write_closed {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "HBONE tunnel: write after shutdown",
            )));
        }
        self.stream.poll_send(cx, data, end).map_err(failure_to_io)
    }
}

impl AsyncRead for Tunnel {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if !this.pending.is_empty() {
                let n = this.pending.len().min(buf.remaining());
                buf.put_slice(&this.pending[..n]);
                this.pending.advance(n);
                if this.pending.is_empty() {
                    // Do not pin the HTTP/2 read buffer the chunk was cut from.
                    this.pending = Bytes::new();
                }
                return Poll::Ready(Ok(()));
            }
            if this.read_eof {
                return Poll::Ready(Ok(()));
            }
            // The window is reopened as the chunk is taken: it now sits in our buffer, which is
            // bounded by one frame.
            match ready!(this.stream.poll_recv(cx)).map_err(failure_to_io)? {
                Some(chunk) => this.pending = chunk,
                None => this.read_eof = true,
            }
        }
    }
}

impl AsyncWrite for Tunnel {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().poll_send(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Each write is framed and written to the connection at once; what the socket could not
        // take, the connection's driver writes as soon as it can.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.write_closed {
            this.write_closed = true;
            this.stream.send_end().map_err(failure_to_io)?;
        }
        Poll::Ready(Ok(()))
    }
}

/// Converts a stream's failure into the I/O error a tunnel user sees: as the module docs say, a
/// reset or a lost connection is `ConnectionReset`; writing after our own shutdown is
/// `BrokenPipe`.
pub(crate) fn failure_to_io(f: Failure) -> io::Error {
    match f {
        Failure::Io {
            kind: io::ErrorKind::BrokenPipe,
            detail,
        } => io::Error::new(io::ErrorKind::BrokenPipe, detail),
        other => io::Error::new(
            io::ErrorKind::ConnectionReset,
            format!("HBONE tunnel: {other}"),
        ),
    }
}

/// A stream slot of a pooled client connection, given back when the tunnel holding it is gone.
/// The pool implements it; a tunnel knows only that it holds one.
pub(crate) trait Slot: Send + Sync + std::fmt::Debug {
    /// Gives the slot back to its connection.
    fn release(&self);
}

/// Holds a [`Slot`] for as long as a tunnel lives.
#[derive(Debug)]
pub(crate) struct StreamSlot(Arc<dyn Slot>);

impl StreamSlot {
    /// Holds `slot` (already taken from its connection) until this is dropped.
    pub(crate) fn new(slot: Arc<dyn Slot>) -> StreamSlot {
        StreamSlot(slot)
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.0.release();
    }
}
