//! A TLS 1.3 connection after its handshake: its state, the write side (records sealed in our
//! own buffer, key updates of ours) and `AsyncWrite`. The read side is in `read.rs`.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::BytesMut;
use rustls::pki_types::CertificateDer;
use tokio::io::{AsyncRead, AsyncWrite};

use super::handshake::Handshaken;
use super::keys::{Kernel, Keys};
use super::*;

thread_local! {
    /// The last large write buffer that emptied on this thread, for the next bulk write of any
    /// connection here: a bulk sender empties and refills its buffer thousands of times a second,
    /// and allocating it anew each time took the allocator's large-size path (BENCHMARKS.md,
    /// issue 12, lever 32). A thread keeps at most one; connections keep none while they wait.
    pub(super) static SPARE_WBUF: std::cell::Cell<Vec<u8>> = const { std::cell::Cell::new(Vec::new()) };
}

/// A TLS 1.3 connection after its handshake: an `AsyncRead + AsyncWrite` byte stream over `T`.
pub(crate) struct TlsStream<T> {
    pub(super) io: T,
    pub(super) kernel: Kernel,
    pub(super) tx: Keys,
    pub(super) rx: Keys,
    /// Records the send key may protect before it must move on.
    pub(super) tx_limit: u64,
    /// Received bytes: `rbuf[plain.0..plain.1]` is opened application data not yet read,
    /// `rbuf[rpos..]` is what has not been opened yet.
    pub(super) rbuf: BytesMut,
    pub(super) rpos: usize,
    pub(super) plain: (usize, usize),
    /// Sealed records not yet written, from `wpos`.
    pub(super) wbuf: Vec<u8>,
    pub(super) wpos: usize,
    /// Sealed bytes beyond which writes wait for the socket (a write is taken whole if it goes
    /// less than a record over).
    pub(super) write_limit: usize,
    /// The most one read from the socket asks for, during a burst.
    pub(super) read_size: usize,
    /// The last read filled the buffer: the next one may ask for `read_size`.
    pub(super) burst: bool,
    /// The unfinished record at the end of the last `poll_read_into`, split off the reader's
    /// buffer (it still shares that buffer's allocation, so it can rejoin it without a copy).
    pub(super) pending: BytesMut,
    /// A post-handshake message that continues in the next record.
    pub(super) handshake: Vec<u8>,
    /// The peer sent `close_notify`.
    pub(super) read_closed: bool,
    /// A KeyUpdate we sent because the peer asked is still queued (not yet written): a
    /// further request gets no answer of its own (RFC 8446 §4.6.3: one update answers all the
    /// requests made while we were silent; rustls keeps at most one pending too).
    pub(super) answer_pending: bool,
    /// KeyUpdates received since the last record of data (`MAX_KEY_UPDATES_IN_A_ROW`).
    pub(super) key_updates_in_a_row: u8,
    /// Empty data records received in a row (`MAX_EMPTY_RECORDS_IN_A_ROW`).
    pub(super) empty_in_a_row: u8,
    /// We sent `close_notify`.
    pub(super) write_closed: bool,
    /// Why the stream failed, for every later call.
    pub(super) failed: Option<(io::ErrorKind, String)>,
    pub(super) peer_certificates: Arc<[CertificateDer<'static>]>,
    pub(super) alpn: Option<Vec<u8>>,
    pub(super) version: Option<rustls::ProtocolVersion>,
}

/// Buffer sizes of a [`TlsStream`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct Sizes {
    /// The most one read from the socket asks for during a burst (at least one record). A read
    /// after a pause asks for one record's worth, so a small message needs no large buffer.
    pub(crate) read_size: usize,
    /// Sealed bytes that may wait for the socket before writes wait (at least two records).
    pub(crate) write_limit: usize,
}

impl<T> TlsStream<T> {
    pub(super) fn new(io: T, h: Handshaken, sizes: Sizes) -> io::Result<TlsStream<T>> {
        let tx_limit = h.kernel.confidentiality_limit();
        // rustls's opened application data first, then the records still to open.
        let mut rbuf = BytesMut::from(&h.early_plain[..]);
        let plain = (0, rbuf.len());
        let rpos = rbuf.len();
        rbuf.extend_from_slice(&h.leftover);
        Ok(TlsStream {
            io,
            tx: Keys::new(h.secrets.tx)?,
            rx: Keys::new(h.secrets.rx)?,
            kernel: h.kernel,
            tx_limit,
            rbuf,
            rpos,
            plain,
            wbuf: Vec::new(),
            wpos: 0,
            write_limit: sizes.write_limit.max(2 * MAX_RECORD),
            read_size: sizes.read_size.max(MAX_RECORD),
            burst: false,
            pending: BytesMut::new(),
            handshake: Vec::new(),
            read_closed: false,
            answer_pending: false,
            key_updates_in_a_row: 0,
            empty_in_a_row: 0,
            write_closed: false,
            failed: None,
            peer_certificates: h.peer_certificates,
            alpn: h.alpn,
            version: h.version,
        })
    }

    /// The certificates the peer presented, its own first.
    pub(crate) fn peer_certificates(&self) -> &Arc<[CertificateDer<'static>]> {
        &self.peer_certificates
    }

    /// The negotiated ALPN protocol.
    pub(crate) fn alpn_protocol(&self) -> Option<&[u8]> {
        self.alpn.as_deref()
    }

    /// The negotiated TLS version.
    pub(crate) fn protocol_version(&self) -> Option<rustls::ProtocolVersion> {
        self.version
    }

    #[cfg(test)]
    pub(super) fn set_tx_limit(&mut self, limit: u64) {
        self.tx_limit = limit;
    }

    pub(super) fn fail(&mut self, e: io::Error) -> io::Error {
        if self.failed.is_none() {
            self.failed = Some((e.kind(), e.to_string()));
        }
        e
    }

    pub(super) fn check_failed(&self) -> io::Result<()> {
        match &self.failed {
            Some((kind, msg)) => Err(io::Error::new(*kind, msg.clone())),
            None => Ok(()),
        }
    }

    /// Seals `parts` (concatenated) as one record of `inner_type` at the end of `wbuf`.
    pub(super) fn seal_record(&mut self, inner_type: u8, parts: &[&[u8]]) -> io::Result<()> {
        let start = self.begin_record()?;
        for p in parts {
            self.wbuf.extend_from_slice(p);
        }
        self.end_record(start, inner_type)
    }

    /// Starts a record at the end of `wbuf` (moving our key on first if its limit is near);
    /// returns where. Its plaintext follows; [`Self::end_record`] seals it.
    pub(super) fn begin_record(&mut self) -> io::Result<usize> {
        if self.tx.seq + 1 >= self.tx_limit {
            self.update_tx_key()?;
        }
        Ok(self.push_header())
    }

    /// Appends a record header whose length [`Self::end_record`] fills in; returns where.
    pub(super) fn push_header(&mut self) -> usize {
        let start = self.wbuf.len();
        self.wbuf.extend_from_slice(&[APPLICATION_DATA, 3, 3, 0, 0]);
        start
    }

    /// Seals the record begun at `start`: its content type, length and tag.
    pub(super) fn end_record(&mut self, start: usize, inner_type: u8) -> io::Result<()> {
        self.wbuf.push(inner_type);
        let len = self.wbuf.len() - start - HEADER_LEN + TAG_LEN;
        debug_assert!(len <= MAX_CIPHERTEXT);
        self.wbuf[start + 3..start + HEADER_LEN].copy_from_slice(&(len as u16).to_be_bytes());
        let header: [u8; HEADER_LEN] = self.wbuf[start..start + HEADER_LEN]
            .try_into()
            .expect("five bytes");
        let nonce = self.tx.next_nonce()?;
        let tag = self
            .tx
            .cipher
            .seal(nonce, header, &mut self.wbuf[start + HEADER_LEN..])?;
        self.wbuf.extend_from_slice(&tag);
        Ok(())
    }

    /// Sends a KeyUpdate (not requesting one back) and moves our send key on.
    pub(super) fn update_tx_key(&mut self) -> io::Result<()> {
        // Not `begin_record`: this is what moves the key on when its limit is near.
        let start = self.push_header();
        self.wbuf.extend_from_slice(&[KEY_UPDATE, 0, 0, 1, 0]);
        self.end_record(start, HANDSHAKE)?;
        self.tx = self.kernel.update_tx()?;
        Ok(())
    }

    /// Seals the first `total` bytes of `bufs` (at most all of them) as application data records
    /// of up to 2^14 bytes each, copying them once, into `wbuf`; returns `total`.
    pub(super) fn seal_data(
        &mut self,
        bufs: &[io::IoSlice<'_>],
        total: usize,
    ) -> io::Result<usize> {
        let records = total.div_ceil(MAX_PLAINTEXT);
        let need = total + records * (HEADER_LEN + 1 + TAG_LEN);
        if self.wbuf.capacity() == 0 && need > KEEP {
            self.wbuf = SPARE_WBUF.take();
        }
        self.wbuf.reserve(need);
        let mut taken = 0;
        // The record being filled: where it starts and how much plaintext it holds.
        let mut open: Option<(usize, usize)> = None;
        for buf in bufs {
            let mut rest: &[u8] = buf;
            while !rest.is_empty() && taken < total {
                let (start, filled) = match open {
                    Some(r) => r,
                    None => (self.begin_record()?, 0),
                };
                let n = rest.len().min(MAX_PLAINTEXT - filled).min(total - taken);
                self.wbuf.extend_from_slice(&rest[..n]);
                rest = &rest[n..];
                taken += n;
                open = if filled + n == MAX_PLAINTEXT {
                    self.end_record(start, APPLICATION_DATA)?;
                    None
                } else {
                    Some((start, filled + n))
                };
            }
        }
        if let Some((start, _)) = open {
            self.end_record(start, APPLICATION_DATA)?;
        }
        Ok(taken)
    }

    pub(super) fn queued(&self) -> usize {
        self.wbuf.len() - self.wpos
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> TlsStream<T> {
    /// Fails the stream for an error met while reading; if the peer broke the protocol, first
    /// sends it the fatal alert that says how (best effort: what the socket takes now), and
    /// nothing more after it.
    pub(super) fn fail_read(&mut self, e: io::Error) -> io::Error {
        if self.failed.is_none()
            && !self.write_closed
            && let Some(alert) = alert_for(&e)
        {
            self.write_closed = true;
            if self.seal_record(ALERT, &[&[2, alert]]).is_ok() {
                let _ = self.poll_write_queued(&mut Context::from_waker(std::task::Waker::noop()));
            }
        }
        self.fail(e)
    }

    /// Writes sealed records until none are left.
    pub(super) fn poll_write_queued(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.wpos < self.wbuf.len() {
            let n = match ready!(Pin::new(&mut self.io).poll_write(cx, &self.wbuf[self.wpos..])) {
                Ok(0) => return Poll::Ready(Err(self.fail(io::ErrorKind::WriteZero.into()))),
                Ok(n) => n,
                Err(e) => return Poll::Ready(Err(self.fail(e))),
            };
            self.wpos += n;
        }
        self.wpos = 0;
        self.wbuf.clear();
        self.answer_pending = false;
        if self.wbuf.capacity() > KEEP {
            // Not kept by the connection; the thread's spare (replacing an older one).
            SPARE_WBUF.set(std::mem::take(&mut self.wbuf));
        }
        Poll::Ready(Ok(()))
    }

    /// Starts sending a KeyUpdate of ours that opening a record queued (the peer asked for it);
    /// the next flush finishes it.
    pub(super) fn send_key_update(&mut self) -> io::Result<()> {
        if self.queued() > 0
            && let Poll::Ready(Err(e)) =
                self.poll_write_queued(&mut Context::from_waker(std::task::Waker::noop()))
        {
            return Err(e);
        }
        Ok(())
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncWrite for TlsStream<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[io::IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.check_failed()?;
        if this.write_closed {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "TLS: write after close_notify",
            )));
        }
        if this.queued() >= this.write_limit {
            ready!(this.poll_write_queued(cx))?;
        }
        let room = this.write_limit - this.queued();
        // Less than a record over the limit is sealed too, rather than left for a write of its
        // own: a DATA frame as large as the limit and its 9-byte header (or 16 frames of 16 KiB
        // and their headers) leave in one system call, not a second one for a 9-byte record.
        let offered: usize = bufs.iter().map(|b| b.len()).sum();
        let total = if offered.saturating_sub(room) < MAX_PLAINTEXT {
            offered
        } else {
            room
        };
        let n = this.seal_data(bufs, total).map_err(|e| this.fail(e))?;
        // Out now if the socket takes it; `poll_flush` finishes the rest.
        if let Poll::Ready(Err(e)) = this.poll_write_queued(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(n))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.check_failed()?;
        ready!(this.poll_write_queued(cx))?;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.check_failed()?;
        if !this.write_closed {
            this.seal_record(ALERT, &[&[1, ALERT_CLOSE_NOTIFY]])
                .map_err(|e| this.fail(e))?;
            this.write_closed = true;
        }
        ready!(this.poll_write_queued(cx))?;
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}
