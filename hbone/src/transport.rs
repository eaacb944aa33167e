//! The byte stream an HTTP/2 connection runs on (TLS over TCP in production, an in-memory pipe
//! in tests), with the one read our TLS layer does better than `AsyncRead`: records opened in the
//! reader's own buffer. Below both `tls` and `wire`, so neither imports the other for it.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite};

/// The smallest read asked of a plain byte stream.
const READ_MIN: usize = 16 * 1024;

/// A byte stream a connection runs on (in production, TLS over TCP).
pub(crate) trait Io: AsyncRead + AsyncWrite + Send + Unpin + 'static {
    /// Appends what the stream has to `buf`; `Ok(0)` at its end. `want` is how many more bytes
    /// the frame at the front of `buf` needs (0 if none is begun).
    fn poll_read_into(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut BytesMut,
        want: usize,
    ) -> Poll<io::Result<usize>> {
        buf.reserve(want.max(READ_MIN));
        tokio_util::io::poll_read_buf(Pin::new(self), cx, buf)
    }

    /// Takes the stream apart for another process (see [`crate::handoff`]): what it runs on and
    /// its TLS state, or the stream back whole with why it cannot move.
    fn take_apart(self: Box<Self>) -> Apart;
}

/// A byte stream taken apart, or not.
pub(crate) enum Apart {
    /// What the stream ran on (a `tokio::net::TcpStream` in production), and its TLS state.
    Moved(Box<dyn std::any::Any + Send>, Box<crate::tls::TlsState>),
    /// It cannot move; here it is, unchanged.
    Refused(Box<dyn Io>, io::Error),
}

/// An in-memory pipe (tests and the fuzz targets).
impl Io for tokio::io::DuplexStream {
    fn take_apart(self: Box<Self>) -> Apart {
        Apart::Refused(
            self,
            io::Error::other("a plain byte stream has no TLS state to move"),
        )
    }
}
