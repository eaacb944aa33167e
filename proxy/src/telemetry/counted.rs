//! A stream whose bytes count into a metrics series as they move, so a scrape during a long
//! transfer sees the bytes so far; the data path wraps each connection's sockets in it.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::metrics::{Flow, Series};

/// A stream whose bytes are counted into a series as they move.
#[derive(Debug)]
pub struct Counted<S> {
    inner: S,
    series: Arc<Series>,
    reads: Flow,
}

/// Its descriptor is the stream's (a connection moving to another process takes a duplicate).
impl<S: std::os::fd::AsFd> std::os::fd::AsFd for Counted<S> {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.inner.as_fd()
    }
}

impl<S> Counted<S> {
    /// Counts `inner`'s reads as `reads` into `series`, its writes as the other direction.
    pub(super) fn new(inner: S, series: Arc<Series>, reads: Flow) -> Counted<S> {
        Counted {
            inner,
            series,
            reads,
        }
    }

    /// The stream counted.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Counts `n` bytes read from the stream before it was wrapped (the client's first bytes,
    /// sent along with the CONNECT).
    pub fn count_read(&self, n: usize) {
        if n > 0 {
            self.add(self.reads, n);
        }
    }

    fn add(&self, flow: Flow, n: usize) {
        let counter = match flow {
            Flow::Received => &self.series.received,
            Flow::Sent => &self.series.sent,
        };
        counter.fetch_add(n as u64, Ordering::Relaxed);
    }

    fn writes(&self) -> Flow {
        match self.reads {
            Flow::Received => Flow::Sent,
            Flow::Sent => Flow::Received,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            self.add(self.reads, n);
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &polled {
            self.add(self.writes(), *n);
        }
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = &polled {
            self.add(self.writes(), *n);
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
