//! The read side of [`super::TlsStream`]: records opened in place, in our buffer or in the
//! reader's ([`crate::transport::Io::poll_read_into`]), alerts, post-handshake messages, and
//! `AsyncRead`.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::transport::Io;

use super::keys::Rustls;
use super::*;

impl<T: AsyncRead + AsyncWrite + Unpin> TlsStream<T> {
    /// Opens the record at `rpos` if it is whole, in place; `Ok(false)` if more bytes are needed.
    pub(super) fn open_next(&mut self) -> io::Result<bool> {
        let mut buf = std::mem::take(&mut self.rbuf);
        let body = self.rpos + HEADER_LEN;
        let opened = self.open_record(&mut buf, self.rpos, body);
        self.rbuf = buf;
        let Some((end, data)) = opened? else {
            return Ok(false);
        };
        self.rpos = end;
        if data > 0 {
            self.plain = (body, body + data);
        }
        Ok(true)
    }

    /// Opens the record whose header is at `buf[r..]` if it is whole, writing its plaintext to
    /// `buf[w..]` (`w` at most the record's body, so the plaintext never overtakes the
    /// ciphertext). Returns `None` if more bytes are needed, else where the record ends and how
    /// many bytes of application data it put at `w` (0 for an alert or a handshake message, which
    /// are handled here).
    pub(super) fn open_record(
        &mut self,
        buf: &mut [u8],
        r: usize,
        w: usize,
    ) -> io::Result<Option<(usize, usize)>> {
        let avail = &buf[r..];
        if avail.len() < HEADER_LEN {
            return Ok(None);
        }
        let header: [u8; HEADER_LEN] = avail[..HEADER_LEN].try_into().expect("five bytes");
        let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
        match header[0] {
            APPLICATION_DATA => {}
            CHANGE_CIPHER_SPEC => {
                return Err(fatal(
                    ALERT_UNEXPECTED_MESSAGE,
                    "TLS: a change_cipher_spec record after the handshake",
                ));
            }
            t => {
                return Err(fatal(
                    ALERT_UNEXPECTED_MESSAGE,
                    format!(
                        "TLS: a record of content type {t} where only protected records may come"
                    ),
                ));
            }
        }
        if len > MAX_CIPHERTEXT {
            return Err(fatal(
                ALERT_RECORD_OVERFLOW,
                format!("TLS: a record of {len} bytes (at most {MAX_CIPHERTEXT}): record_overflow"),
            ));
        }
        if len < TAG_LEN + 1 {
            return Err(fatal(
                ALERT_BAD_RECORD_MAC,
                format!("TLS: a protected record of {len} bytes"),
            ));
        }
        if avail.len() < HEADER_LEN + len {
            return Ok(None);
        }
        let body = r + HEADER_LEN;
        let end = body + len;
        let nonce = self.rx.next_nonce()?;
        let opened_len = self
            .rx
            .cipher
            .open_within(nonce, header, &mut buf[w..end], body - w)?;
        let opened = &buf[w..w + opened_len];
        let Some(last) = opened.iter().rposition(|b| *b != 0) else {
            return Err(fatal(
                ALERT_UNEXPECTED_MESSAGE,
                "TLS: a record without a content type",
            ));
        };
        if last > MAX_PLAINTEXT {
            return Err(fatal(
                ALERT_RECORD_OVERFLOW,
                format!(
                    "TLS: a record of {last} bytes of plaintext (at most {MAX_PLAINTEXT}): record_overflow"
                ),
            ));
        }
        let content = &opened[..last];
        match opened[last] {
            APPLICATION_DATA => {
                if !self.handshake.is_empty() {
                    return Err(fatal(
                        ALERT_UNEXPECTED_MESSAGE,
                        "TLS: application data inside a split handshake message",
                    ));
                }
                if last == 0 {
                    self.empty_in_a_row += 1;
                    if self.empty_in_a_row > MAX_EMPTY_RECORDS_IN_A_ROW {
                        return Err(fatal(
                            ALERT_UNEXPECTED_MESSAGE,
                            format!(
                                "TLS: more than {MAX_EMPTY_RECORDS_IN_A_ROW} empty records in a row"
                            ),
                        ));
                    }
                } else {
                    self.empty_in_a_row = 0;
                    self.key_updates_in_a_row = 0;
                }
                return Ok(Some((end, last)));
            }
            ALERT => match content {
                [_, ALERT_CLOSE_NOTIFY] => self.read_closed = true,
                [_, ALERT_USER_CANCELED] => {}
                [_, desc] => {
                    return Err(tls_error(rustls::Error::AlertReceived(
                        rustls::AlertDescription::from(*desc),
                    )));
                }
                _ => return Err(fatal(ALERT_DECODE_ERROR, "TLS: a malformed alert")),
            },
            HANDSHAKE => {
                let msg = content.to_vec();
                self.handshake_bytes(&msg)?;
            }
            t => {
                return Err(fatal(
                    ALERT_UNEXPECTED_MESSAGE,
                    format!("TLS: a protected record of content type {t}"),
                ));
            }
        }
        Ok(Some((end, 0)))
    }

    /// Post-handshake messages: session tickets and key updates.
    pub(super) fn handshake_bytes(&mut self, bytes: &[u8]) -> io::Result<()> {
        if self.handshake.len() + bytes.len() > MAX_HANDSHAKE_PENDING {
            return Err(fatal(
                ALERT_UNEXPECTED_MESSAGE,
                "TLS: a post-handshake message too long",
            ));
        }
        if bytes.is_empty() {
            return Err(fatal(
                ALERT_UNEXPECTED_MESSAGE,
                "TLS: an empty handshake record",
            ));
        }
        self.handshake.extend_from_slice(bytes);
        loop {
            let [kind, a, b, c, ..] = self.handshake[..] else {
                return Ok(());
            };
            let len = u32::from_be_bytes([0, a, b, c]) as usize;
            if self.handshake.len() < 4 + len {
                return Ok(());
            }
            let rest = self.handshake.split_off(4 + len);
            let msg = std::mem::replace(&mut self.handshake, rest);
            let payload = &msg[4..];
            if kind == NEW_SESSION_TICKET
                && let Some(Rustls::Client(k)) = &mut self.kernel.rustls
            {
                k.handle_new_session_ticket(payload)
                    .map_err(|e| fatal(ALERT_DECODE_ERROR, format!("TLS: {e}")))?;
                continue;
            }
            match kind {
                KEY_UPDATE => {
                    // A key update ends its record (RFC 8446 §5.1).
                    if !self.handshake.is_empty() {
                        return Err(fatal(
                            ALERT_UNEXPECTED_MESSAGE,
                            "TLS: a KeyUpdate not at the end of its record",
                        ));
                    }
                    let requested = match payload {
                        [0] => false,
                        [1] => true,
                        [_] => {
                            return Err(fatal(
                                ALERT_ILLEGAL_PARAMETER,
                                "TLS: a KeyUpdate asking neither yes nor no",
                            ));
                        }
                        _ => return Err(fatal(ALERT_DECODE_ERROR, "TLS: a malformed KeyUpdate")),
                    };
                    self.key_updates_in_a_row += 1;
                    if self.key_updates_in_a_row > MAX_KEY_UPDATES_IN_A_ROW {
                        return Err(fatal(
                            ALERT_UNEXPECTED_MESSAGE,
                            format!(
                                "TLS: more than {MAX_KEY_UPDATES_IN_A_ROW} KeyUpdates without data between them"
                            ),
                        ));
                    }
                    self.rx = self.kernel.update_rx()?;
                    if requested && !self.write_closed && !self.answer_pending {
                        self.update_tx_key()?;
                        self.answer_pending = true;
                    }
                }
                kind => {
                    return Err(fatal(
                        ALERT_UNEXPECTED_MESSAGE,
                        format!("TLS: an unexpected post-handshake message of type {kind}"),
                    ));
                }
            }
        }
    }

    pub(super) fn poll_read_inner(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.pending.is_empty() {
            // An unfinished record left by `poll_read_into`.
            self.rbuf.extend_from_slice(&self.pending);
            self.pending = BytesMut::new();
        }
        loop {
            if self.plain.0 < self.plain.1 {
                let n = (self.plain.1 - self.plain.0).min(buf.remaining());
                buf.put_slice(&self.rbuf[self.plain.0..self.plain.0 + n]);
                self.plain.0 += n;
                return Poll::Ready(Ok(()));
            }
            if self.read_closed {
                return Poll::Ready(Ok(()));
            }
            if self.open_next()? {
                self.send_key_update()?;
                continue;
            }
            // Keep only the record in progress, at the front.
            if self.rpos > 0 {
                self.rbuf.advance(self.rpos);
                self.rpos = 0;
                self.plain = (0, 0);
            }
            if self.rbuf.is_empty() && self.rbuf.capacity() > KEEP {
                self.rbuf = BytesMut::new();
            }
            self.rbuf.reserve(self.read_room(&self.rbuf));
            let asked = self.rbuf.capacity() - self.rbuf.len();
            let n = ready!(tokio_util::io::poll_read_buf(
                Pin::new(&mut self.io),
                cx,
                &mut self.rbuf
            ))?;
            self.burst = n == asked;
            if n == 0 {
                return Poll::Ready(Err(eof_without_close_notify()));
            }
        }
    }

    /// How much the next socket read should have room for after `unfinished` (the start of a
    /// record): the rest of that record (or of the longest one while its header is missing), and
    /// at least one small read, or `read_size` during a burst.
    pub(super) fn read_room(&self, unfinished: &[u8]) -> usize {
        let record = match unfinished.get(3..5) {
            Some(l) => HEADER_LEN + usize::from(u16::from_be_bytes([l[0], l[1]])),
            None => MAX_RECORD,
        };
        let size = if self.burst { self.read_size } else { READ_MIN };
        record.max(size).saturating_sub(unfinished.len())
    }

    pub(super) fn poll_read_into_inner(
        &mut self,
        cx: &mut Context<'_>,
        dst: &mut BytesMut,
        want: usize,
    ) -> Poll<io::Result<usize>> {
        loop {
            // Opened earlier (with the handshake, or by `poll_read`): that goes first.
            if self.plain.0 < self.plain.1 {
                let n = self.plain.1 - self.plain.0;
                dst.extend_from_slice(&self.rbuf[self.plain.0..self.plain.1]);
                self.plain.0 = self.plain.1;
                return Poll::Ready(Ok(n));
            }
            if self.read_closed {
                return Poll::Ready(Ok(0));
            }
            if self.open_next()? {
                self.send_key_update()?;
                continue;
            }
            // At most part of one record is left in `rbuf` (from the handshake, or `poll_read`):
            // it joins the unfinished record of the last call (there is none then).
            if self.rpos < self.rbuf.len() {
                self.pending.extend_from_slice(&self.rbuf[self.rpos..]);
            }
            if !self.rbuf.is_empty() {
                self.rbuf = BytesMut::new();
                self.rpos = 0;
                self.plain = (0, 0);
            }
            // The unfinished record goes back behind `dst`'s end, where the last call split it
            // off: unless the reader moved `dst` since, that joins them without a copy.
            let base = dst.len();
            if !self.pending.is_empty() {
                dst.unsplit(std::mem::take(&mut self.pending));
            }
            let room = self.read_room(&dst[base..]);
            if dst.capacity() - dst.len() < room && !dst.try_reclaim(room) {
                // A new buffer for the next few reads and the rest of the reader's frame, with
                // only what is still unread copied over: `reserve` would grow the old
                // allocation, copying all of it, read or not.
                // The frame's rest arrives in records of 22 bytes more each (header, type,
                // tag); counted as if they were as small as 512 bytes.
                let frame = want + want / 512 * 22;
                let ahead = if self.burst {
                    (frame + room).max(READS_PER_BUFFER * room)
                } else {
                    frame + room
                };
                let mut fresh = BytesMut::with_capacity(dst.len() + ahead);
                fresh.extend_from_slice(dst);
                *dst = fresh;
            }
            let asked = dst.capacity() - dst.len();
            let n = match tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, dst) {
                Poll::Ready(Ok(n)) if n > 0 => n,
                other => {
                    if dst.len() > base {
                        self.pending = dst.split_off(base);
                    }
                    ready!(other)?;
                    return Poll::Ready(Err(eof_without_close_notify()));
                }
            };
            self.burst = n == asked;
            let (mut r, mut w) = (base, base);
            while !self.read_closed {
                match self.open_record(dst, r, w) {
                    Ok(Some((end, data))) => {
                        r = end;
                        w += data;
                    }
                    Ok(None) => break,
                    Err(e) => {
                        // What opened before the bad record is delivered; the error comes with
                        // the next call.
                        dst.truncate(w);
                        let e = self.fail_read(e);
                        return Poll::Ready(if w > base { Ok(w - base) } else { Err(e) });
                    }
                }
            }
            // The unfinished record moves down to follow the plaintext, and is split off there
            // (keeping the buffer's room after it for the next read).
            let unfinished = dst.len() - r;
            if unfinished > 0 {
                dst.copy_within(r.., w);
                dst.truncate(w + unfinished);
                self.pending = dst.split_off(w);
            } else {
                dst.truncate(w);
            }
            self.send_key_update()?;
            if w > base {
                return Poll::Ready(Ok(w - base));
            }
            // Only part of a record, an alert or a handshake message: read on.
        }
    }
}

/// Reads from the socket and appends the application data of every whole record to the
/// reader's buffer, opened where it arrived: the plaintext moves down over the record headers and
/// tags while it is decrypted (ring) or just after (aws-lc), so the bytes read are not copied
/// again; only the part of a record that a read leaves unfinished waits here for the next one.
/// `want` (the rest of the reader's frame) sizes a new buffer so the frame fits whole. `Ok(0)` is
/// the end of the stream (`close_notify`).
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Io for TlsStream<T> {
    fn poll_read_into(
        &mut self,
        cx: &mut Context<'_>,
        dst: &mut BytesMut,
        want: usize,
    ) -> Poll<io::Result<usize>> {
        self.check_failed()?;
        match self.poll_read_into_inner(cx, dst, want) {
            Poll::Ready(Err(e)) => Poll::Ready(Err(self.fail_read(e))),
            other => other,
        }
    }

    fn take_apart(self: Box<Self>) -> crate::transport::Apart {
        match (*self).into_state() {
            Ok((io, state)) => crate::transport::Apart::Moved(Box::new(io), Box::new(state)),
            Err(refused) => {
                let (stream, e) = *refused;
                crate::transport::Apart::Refused(Box::new(stream), e)
            }
        }
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncRead for TlsStream<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.check_failed()?;
        match this.poll_read_inner(cx, buf) {
            Poll::Ready(Err(e)) => Poll::Ready(Err(this.fail_read(e))),
            other => other,
        }
    }
}
