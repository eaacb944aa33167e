//! DATA both ways and flow control: received data charged to the windows and queued on its
//! stream, WINDOW_UPDATEs given as the reader takes it, the send windows a writer waits on.

use super::*;

/// A WINDOW_UPDATE smaller than this moves so little that it counts against the control-frame
/// allowance (CVE-2019-9511, "data dribble": tiny windows that make us send tiny frames).
pub(super) const SMALL_WINDOW_UPDATE: i64 = 1024;

impl Session {
    pub(super) fn on_data(
        &mut self,
        head: Head,
        mut payload: BytesMut,
    ) -> Result<(), (Reason, String)> {
        if head.stream == 0 {
            return Err(proto("DATA on stream 0"));
        }
        let len = payload.len() as u32;
        self.recv_window -= len as i64;
        if self.recv_window < 0 {
            return Err((
                Reason::FLOW_CONTROL_ERROR,
                "DATA beyond the connection's flow-control window".to_owned(),
            ));
        }
        if head.has(flag::PADDED) {
            let pad = *payload.first().ok_or_else(|| frame_size("padded DATA"))? as usize;
            if pad >= payload.len() {
                return Err(proto("DATA padding longer than the frame"));
            }
            let _ = payload.split_to(1);
            payload.truncate(payload.len() - pad);
        }
        if payload.is_empty() && !head.has(flag::END_STREAM) {
            self.control_frame("empty DATA frames")?;
        }
        let data_len = payload.len() as u32;
        let Some(stream) = self.streams.get_mut(&head.stream) else {
            if !self.is_closed_id(head.stream) {
                return Err(proto("DATA on a stream that was never opened"));
            }
            // A stream we closed or dropped: its bytes go back to the connection window.
            self.release_connection(len);
            return Ok(());
        };
        if stream.recv_eof || stream.failure.is_some() {
            let was_open = stream.failure.is_none();
            self.release_connection(len);
            if was_open {
                self.provoked_reset(head.stream, Reason::STREAM_CLOSED)?;
            }
            return Ok(());
        }
        stream.recv_window -= len as i64;
        if stream.recv_window < 0 {
            self.release_connection(len);
            return self.provoked_reset(head.stream, Reason::FLOW_CONTROL_ERROR);
        }
        if !payload.is_empty() {
            stream.push_data(payload);
        }
        if head.has(flag::END_STREAM) {
            stream.recv_eof = true;
        }
        if let Some(w) = stream.read_waker.take() {
            w.wake();
        }
        // Padding is never read by anyone: give it back now.
        let padding = len - data_len;
        if padding > 0 {
            self.release_stream(head.stream, padding);
            self.release_connection(padding);
        }
        Ok(())
    }

    pub(super) fn on_window_update(
        &mut self,
        head: Head,
        payload: &[u8],
    ) -> Result<(), (Reason, String)> {
        if payload.len() != 4 {
            return Err(frame_size("WINDOW_UPDATE"));
        }
        let increment = (frame::u32_at(payload, 0) & 0x7fff_ffff) as i64;
        if head.stream == 0 {
            if increment == 0 {
                return Err(proto("WINDOW_UPDATE of 0 on the connection"));
            }
            self.send_window += increment;
            if self.send_window > MAX_WINDOW {
                return Err((
                    Reason::FLOW_CONTROL_ERROR,
                    "the connection's send window above 2^31-1".to_owned(),
                ));
            }
            for w in self.conn_send_waiters.drain(..) {
                w.wake();
            }
            if increment < SMALL_WINDOW_UPDATE {
                return self.control_frame("small WINDOW_UPDATE frames");
            }
            return Ok(());
        }
        let Some(stream) = self.streams.get_mut(&head.stream) else {
            return if self.is_closed_id(head.stream) {
                Ok(())
            } else {
                Err(proto("WINDOW_UPDATE on a stream that was never opened"))
            };
        };
        if increment == 0 {
            return self.provoked_reset(head.stream, Reason::PROTOCOL_ERROR);
        }
        stream.send_window += increment;
        if stream.send_window > MAX_WINDOW {
            return self.provoked_reset(head.stream, Reason::FLOW_CONTROL_ERROR);
        }
        if let Some(w) = stream.send_waker.take() {
            w.wake();
        }
        if increment < SMALL_WINDOW_UPDATE {
            return self.control_frame("small WINDOW_UPDATE frames");
        }
        Ok(())
    }

    /// Returns `n` received bytes to the connection window, announcing it when half is used.
    pub(super) fn release_connection(&mut self, n: u32) {
        self.recv_unacked += n;
        if self.recv_unacked >= self.limits.connection_window / 2 {
            frame::put_window_update(&mut self.out, 0, self.recv_unacked);
            self.recv_window += self.recv_unacked as i64;
            self.recv_unacked = 0;
        }
    }

    pub(super) fn release_stream(&mut self, id: u32, n: u32) {
        let half = self.limits.stream_window / 2;
        if let Some(stream) = self.streams.get_mut(&id) {
            stream.recv_unacked += n;
            if stream.recv_unacked >= half && !stream.recv_eof && stream.failure.is_none() {
                frame::put_window_update(&mut self.out, id, stream.recv_unacked);
                stream.recv_window += stream.recv_unacked as i64;
                stream.recv_unacked = 0;
            }
        }
    }

    /// Takes the next received chunk, reopening the windows for it.
    pub(crate) fn poll_recv(
        &mut self,
        id: u32,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Recv, Failure>> {
        let stream = self.streams.get_mut(&id).expect("a live stream handle");
        if let Some(f) = &stream.failure {
            return Poll::Ready(Err(f.clone()));
        }
        if let Some(chunk) = stream.pop_data() {
            let n = chunk.len() as u32;
            self.release_stream(id, n);
            self.release_connection(n);
            return Poll::Ready(Ok(Recv::Data(chunk)));
        }
        if stream.recv_eof {
            return Poll::Ready(Ok(Recv::Eof));
        }
        stream.read_waker = Some(cx.waker().clone());
        Poll::Pending
    }

    /// How many bytes `id` may send now (at least 1: the lower of its window and the
    /// connection's), waiting for window.
    pub(crate) fn poll_send_capacity(
        &mut self,
        id: u32,
        cx: &mut Context<'_>,
    ) -> Poll<Result<usize, Failure>> {
        let stream = self.streams.get_mut(&id).expect("a live stream handle");
        if let Some(f) = stream.failure.as_ref().or(stream.send_failure.as_ref()) {
            return Poll::Ready(Err(f.clone()));
        }
        if stream.send_eof {
            return Poll::Ready(Err(Failure::Io {
                kind: std::io::ErrorKind::BrokenPipe,
                detail: "HBONE tunnel: write after shutdown".to_owned(),
            }));
        }
        if stream.send_window <= 0 {
            stream.send_waker = Some(cx.waker().clone());
            return Poll::Pending;
        }
        if self.send_window <= 0 {
            self.conn_send_waiters.push(cx.waker().clone());
            return Poll::Pending;
        }
        Poll::Ready(Ok(stream.send_window.min(self.send_window) as usize))
    }

    /// The largest DATA payload the peer accepts in one frame.
    pub(crate) fn peer_max_frame(&self) -> usize {
        self.peer.max_frame_size as usize
    }

    /// Charges `len` bytes (within the last capacity) to the windows; the caller sends them as
    /// DATA frames of at most [`Session::peer_max_frame`] each, headed by [`data_head`]. With
    /// `end`, the last of those frames carries END_STREAM: our half of the stream is closed.
    pub(crate) fn take_send(&mut self, id: u32, len: usize, end: bool) {
        let stream = self.streams.get_mut(&id).expect("a live stream handle");
        stream.send_window -= len as i64;
        stream.send_eof |= end;
        self.send_window -= len as i64;
    }

    /// Queues the first of `data` that the windows take now (at most one frame) as a DATA frame
    /// into `out`, right behind whatever is queued (the stream's HEADERS, when called after
    /// [`Session::open`]); returns how many bytes it took.
    pub(crate) fn send_first(&mut self, id: u32, data: &[u8]) -> usize {
        let stream = self.streams.get(&id).expect("a live stream handle");
        let room = stream
            .send_window
            .min(self.send_window)
            .min(self.peer.max_frame_size as i64)
            .max(0) as usize;
        let n = data.len().min(room);
        if n > 0 {
            self.take_send(id, n, false);
            self.out.extend_from_slice(&data_head(id, n, false));
            self.out.extend_from_slice(&data[..n]);
        }
        n
    }

    /// Ends our half of the stream (an empty DATA frame with END_STREAM, into `out`).
    pub(crate) fn send_end(&mut self, id: u32) -> Result<(), Failure> {
        let stream = self.streams.get_mut(&id).expect("a live stream handle");
        if let Some(f) = &stream.failure {
            return Err(f.clone());
        }
        if !stream.send_eof {
            stream.send_eof = true;
            frame::put_frame(&mut self.out, kind::DATA, flag::END_STREAM, id, &[]);
        }
        Ok(())
    }
}

/// The header of a DATA frame of `len` bytes on stream `id`, with END_STREAM if `end`.
pub(crate) fn data_head(id: u32, len: usize, end: bool) -> [u8; HEADER_LEN] {
    Head {
        len: len as u32,
        kind: kind::DATA,
        flags: if end { flag::END_STREAM } else { 0 },
        stream: id,
    }
    .encode()
}
