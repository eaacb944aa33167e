//! A read buffer under TLS that turns rustls's record-sized reads into large socket reads.
//!
//! rustls reads at most one TLS record (about 16 KiB) per call, so a bulk transfer would cost one
//! syscall per record. Reading up to `capacity` bytes at once and serving rustls from memory costs
//! a memcpy but saves most syscalls. The buffer exists only during a burst: the first read after
//! a pause goes straight into the caller's buffer, and only a read that fills it (more is likely
//! waiting) makes the next one go through our buffer. A small message (a request, a reply) thus
//! costs no allocation and no copy, and an idle connection holds no buffer. Writes pass straight
//! through.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// `T` with an optional read buffer; capacity 0 means reads go straight to `T`.
///
/// The buffer is taken only during a burst (a read straight into the caller's buffer filled
/// it); when the socket has nothing more to give and every buffered byte has been handed on, it
/// is freed and the burst is over, so an idle connection holds none.
#[derive(Debug)]
pub(crate) struct ReadBuffer<T> {
    inner: T,
    capacity: usize,
    /// Bytes read from `inner` and not yet handed on.
    buf: BytesMut,
    /// The last read filled the caller's buffer: read through `buf` until the socket runs dry.
    burst: bool,
}

impl<T> ReadBuffer<T> {
    pub(crate) fn new(inner: T, capacity: usize) -> Self {
        ReadBuffer {
            inner,
            capacity,
            buf: BytesMut::new(),
            burst: false,
        }
    }

    /// Lets an unbuffered reader (capacity 0) use a buffer of `capacity` from now on (taken at
    /// the next read that needs it). Called once the TLS handshake has succeeded.
    pub(crate) fn set_capacity(&mut self, capacity: usize) {
        self.capacity = self.capacity.max(capacity);
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for ReadBuffer<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.buf.is_empty() {
            // Empty: large reads (or no buffer), and the first read after a pause, go straight
            // through; within a burst, small reads refill the buffer.
            if out.remaining() >= this.capacity || !this.burst {
                let wanted = out.remaining();
                ready!(Pin::new(&mut this.inner).poll_read(cx, out))?;
                this.burst = wanted > 0 && out.remaining() == 0 && wanted < this.capacity;
                return Poll::Ready(Ok(()));
            }
            // Reuses the allocation it still holds, or takes a new one.
            this.buf.reserve(this.capacity);
            match tokio_util::io::poll_read_buf(Pin::new(&mut this.inner), cx, &mut this.buf) {
                Poll::Pending => {
                    this.buf = BytesMut::new();
                    this.burst = false;
                    return Poll::Pending;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(_)) => {}
            }
        }
        let n = this.buf.len().min(out.remaining());
        out.put_slice(&this.buf[..n]);
        this.buf.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for ReadBuffer<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn delivers_every_byte_in_order_for_any_read_size() {
        for capacity in [0usize, 1, 7, 4096] {
            let (mut far, near) = tokio::io::duplex(1 << 20);
            let data: Vec<u8> = (0..100_000u32).map(|i| (i % 253) as u8).collect();
            far.write_all(&data).await.unwrap();
            drop(far);
            let mut reader = ReadBuffer::new(near, capacity);
            let mut out = Vec::new();
            let mut chunk = [0u8; 1000];
            for size in [1usize, 5000, 3, 999, 16_384].iter().cycle() {
                let size = (*size).min(chunk.len());
                let n = reader.read(&mut chunk[..size]).await.unwrap();
                if n == 0 {
                    break;
                }
                out.extend_from_slice(&chunk[..n]);
            }
            assert_eq!(out, data, "capacity {capacity}");
        }
    }

    #[tokio::test]
    async fn a_small_message_is_read_without_a_buffer_and_a_burst_with_one() {
        let (mut far, near) = tokio::io::duplex(1 << 20);
        let mut reader = ReadBuffer::new(near, 65_536);
        let mut out = [0u8; 4096];

        // A message smaller than the reader's own buffer goes straight into it.
        far.write_all(&[7u8; 1000]).await.unwrap();
        assert_eq!(reader.read(&mut out).await.unwrap(), 1000);
        assert_eq!(reader.buf.capacity(), 0, "a small message took a buffer");

        // A read that fills the reader's buffer starts a burst: the next read takes a large
        // piece into the buffer, and the rest is served from memory.
        far.write_all(&[9u8; 100_000]).await.unwrap();
        assert_eq!(reader.read(&mut out).await.unwrap(), 4096);
        assert_eq!(reader.buf.capacity(), 0);
        assert_eq!(reader.read(&mut out).await.unwrap(), 4096);
        assert_eq!(
            reader.buf.len(),
            65_536 - 4096,
            "the burst was not read in one piece"
        );
    }

    #[tokio::test]
    async fn writes_pass_through() {
        let (far, near) = tokio::io::duplex(1024);
        let mut wrapped = ReadBuffer::new(near, 64);
        wrapped.write_all(b"hello").await.unwrap();
        wrapped.shutdown().await.unwrap();
        let mut far = far;
        let mut got = Vec::new();
        far.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"hello");
    }
}
