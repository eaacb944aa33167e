//! One tunneled TCP connection: an HTTP/2 stream seen as `AsyncRead + AsyncWrite`.
//!
//! Mapping (see SPEC.md): DATA payload is the byte stream; END_STREAM is a half-close
//! (`poll_shutdown` sends it, and reading it is EOF); RST_STREAM or a lost connection is an I/O
//! error with kind `ConnectionReset`. Dropping a tunnel that was not shut down both ways resets the
//! stream, so the peer sees an abort, never a clean close.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes, BytesMut};
use h2::{RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::pool::StreamSlot;

/// Smallest staging allocation for writes.
const WRITE_CHUNK: usize = 16 * 1024;
/// Writes smaller than this are copied into a chunk of their own size instead of the staging
/// buffer, so a tunnel that exchanged a few small messages holds no buffer while it waits.
const SMALL_WRITE: usize = 4 * 1024;

/// A tunneled connection. Obtained from [`Pool::connect`](crate::Pool::connect) on the client and
/// from [`InboundConnect::accept`](crate::InboundConnect::accept) on the server.
#[derive(Debug)]
pub struct Tunnel {
    send: SendStream<Bytes>,
    recv: RecvStream,
    /// Received bytes not yet handed to the reader.
    pending: Bytes,
    /// Staging for written bytes; its allocation is reused once h2 has sent the previous chunk.
    write_buf: BytesMut,
    read_eof: bool,
    write_closed: bool,
    /// Keeps a pooled connection's stream count until the tunnel is gone.
    _slot: Option<StreamSlot>,
}

impl Tunnel {
    pub(crate) fn new(send: SendStream<Bytes>, recv: RecvStream, slot: Option<StreamSlot>) -> Self {
        Tunnel {
            send,
            recv,
            pending: Bytes::new(),
            write_buf: BytesMut::new(),
            read_eof: false,
            write_closed: false,
            _slot: slot,
        }
    }

    /// Aborts the tunnel: sends RST_STREAM with CANCEL so the peer sees an error, not a close.
    pub fn abort(mut self) {
        self.send.send_reset(h2::Reason::CANCEL);
    }

    /// Sends `data` without copying it; the same as `write_all` followed by nothing else.
    ///
    /// Waits for flow-control capacity, so it never buffers more than the configured send buffer.
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
            match ready!(self.recv.poll_data(cx)) {
                Some(Ok(chunk)) => {
                    let _ = self.recv.flow_control().release_capacity(chunk.len());
                    if !chunk.is_empty() {
                        return Poll::Ready(Ok(Some(chunk)));
                    }
                }
                Some(Err(e)) => return Poll::Ready(Err(h2_to_io(e))),
                None => self.read_eof = true,
            }
        }
    }

    /// Sends as much of `data` as flow control allows now, without copying; returns the bytes
    /// sent (at least one, unless `data` is empty).
    pub fn poll_send_chunk(
        &mut self,
        cx: &mut Context<'_>,
        data: &mut Bytes,
    ) -> Poll<io::Result<usize>> {
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let n = ready!(self.poll_send_capacity(cx, data.len()))?.min(data.len());
        let chunk = data.split_to(n);
        self.send.send_data(chunk, false).map_err(h2_to_io)?;
        Poll::Ready(Ok(n))
    }

    /// Waits until the stream may send at least one byte; returns how many it may send now.
    fn poll_send_capacity(&mut self, cx: &mut Context<'_>, want: usize) -> Poll<io::Result<usize>> {
        if self.write_closed {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "HBONE tunnel: write after shutdown",
            )));
        }
        loop {
            let available = self.send.capacity();
            if available > 0 {
                return Poll::Ready(Ok(available));
            }
            self.send.reserve_capacity(want);
            match ready!(self.send.poll_capacity(cx)) {
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Poll::Ready(Err(h2_to_io(e))),
                None => {
                    // The stream can no longer send: the peer reset it or the connection is gone.
                    let reason = match self.send.poll_reset(cx) {
                        Poll::Ready(Ok(reason)) => format!("peer reset the stream ({reason})"),
                        Poll::Ready(Err(e)) => e.to_string(),
                        Poll::Pending => "stream closed".to_owned(),
                    };
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::ConnectionReset,
                        format!("HBONE tunnel: {reason}"),
                    )));
                }
            }
        }
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
            match ready!(this.recv.poll_data(cx)) {
                Some(Ok(chunk)) => {
                    // The chunk now sits in our buffer, which is bounded by one frame, so the
                    // window can be reopened at once; this halves WINDOW_UPDATE latency.
                    let _ = this.recv.flow_control().release_capacity(chunk.len());
                    this.pending = chunk;
                }
                Some(Err(e)) => return Poll::Ready(Err(h2_to_io(e))),
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
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let this = self.get_mut();
        let n = ready!(this.poll_send_capacity(cx, buf.len()))?.min(buf.len());
        let chunk = if n < SMALL_WRITE {
            // A small message gets a chunk of its own size: an idle tunnel keeps nothing.
            Bytes::copy_from_slice(&buf[..n])
        } else {
            // `reserve` reclaims the previous allocation when h2 has dropped the last chunk, so
            // bulk writes do not allocate (and page-fault) a fresh buffer every time.
            this.write_buf.reserve(n.max(WRITE_CHUNK));
            this.write_buf.extend_from_slice(&buf[..n]);
            this.write_buf.split().freeze()
        };
        this.send.send_data(chunk, false).map_err(h2_to_io)?;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // The connection task writes queued frames as soon as it can; there is nothing to push.
        // A writer flushes when it pauses: let the staging buffer go until it writes again.
        self.get_mut().write_buf = BytesMut::new();
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.write_closed {
            this.write_closed = true;
            this.send.send_data(Bytes::new(), true).map_err(h2_to_io)?;
        }
        Poll::Ready(Ok(()))
    }
}

/// Converts an HTTP/2 error into the I/O error a tunnel user sees.
pub(crate) fn h2_to_io(e: h2::Error) -> io::Error {
    if e.is_io() {
        return e
            .into_io()
            .unwrap_or_else(|| io::Error::other("HBONE: I/O error"));
    }
    let kind = if e.is_reset() || e.is_go_away() {
        io::ErrorKind::ConnectionReset
    } else {
        io::ErrorKind::Other
    };
    io::Error::new(kind, format!("HBONE tunnel: {e}"))
}
