//! A read buffer under TLS that turns rustls's record-sized reads into large socket reads.
//!
//! rustls reads at most one TLS record (about 16 KiB) per call, so a bulk transfer would cost one
//! syscall per record. Reading up to `capacity` bytes at once and serving rustls from memory costs
//! a memcpy but saves most syscalls. Writes pass straight through.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// `T` with an optional read buffer; capacity 0 means reads go straight to `T`.
#[derive(Debug)]
pub(crate) struct ReadBuffer<T> {
    inner: T,
    buf: Box<[u8]>,
    start: usize,
    end: usize,
}

impl<T> ReadBuffer<T> {
    pub(crate) fn new(inner: T, capacity: usize) -> Self {
        ReadBuffer {
            inner,
            buf: vec![0; capacity].into_boxed_slice(),
            start: 0,
            end: 0,
        }
    }

    /// Gives an unbuffered reader (capacity 0) its buffer, keeping any bytes already held. The
    /// server calls this once the TLS handshake has succeeded.
    pub(crate) fn allocate(&mut self, capacity: usize) {
        if capacity <= self.buf.len() {
            return;
        }
        let mut buf = vec![0; capacity].into_boxed_slice();
        let held = self.end - self.start;
        buf[..held].copy_from_slice(&self.buf[self.start..self.end]);
        self.buf = buf;
        self.start = 0;
        self.end = held;
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for ReadBuffer<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.start == this.end {
            // Empty: large reads (or no buffer) go straight through, small ones refill.
            if out.remaining() >= this.buf.len() {
                return Pin::new(&mut this.inner).poll_read(cx, out);
            }
            let mut fill = ReadBuf::new(&mut this.buf);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut fill))?;
            this.start = 0;
            this.end = fill.filled().len();
        }
        let n = (this.end - this.start).min(out.remaining());
        out.put_slice(&this.buf[this.start..this.start + n]);
        this.start += n;
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
