//! One stream's state (its response head, the data received and not yet read, its windows,
//! who closed what) and the ways a stream ends: reset by the peer, by us, or dropped.

use super::*;

/// A DATA payload shorter than this, arriving while its stream already holds unread bytes, is
/// copied onto the stream's tail instead of kept as a slice of the read buffer: a slice keeps its
/// whole buffer (up to several hundred KiB) alive, so small frames left unread could hold many
/// times their size, and a stream of tiny frames would cost a queue entry each.
pub(super) const COPY_BELOW: usize = 64 * 1024;

#[derive(Debug)]
pub(super) enum HeadState {
    /// Client: waiting for the response. Server: the request was received.
    Waiting,
    Ready(ResponseHead),
    Taken,
}

#[derive(Debug)]
pub(super) struct Stream {
    pub(super) local: bool,
    pub(super) head: HeadState,
    pub(super) queue: VecDeque<Bytes>,
    /// Small payloads that arrived while `queue` held unread bytes, copied together; they come
    /// after everything in `queue` (see `COPY_BELOW`).
    pub(super) tail: BytesMut,
    /// Bytes in `queue` and `tail`.
    pub(super) queued: usize,
    pub(super) recv_eof: bool,
    pub(super) recv_window: i64,
    pub(super) recv_unacked: u32,
    pub(super) read_waker: Option<Waker>,
    pub(super) send_window: i64,
    pub(super) send_eof: bool,
    pub(super) send_waker: Option<Waker>,
    pub(super) failure: Option<Failure>,
    /// A reset that arrived after the peer's END_STREAM: it stops our sending but leaves what
    /// was received readable (RFC 9113 §8.1: a complete response stands).
    pub(super) send_failure: Option<Failure>,
}

impl Stream {
    pub(super) fn new(local: bool, recv_window: u32, send_window: u32) -> Stream {
        Stream {
            local,
            head: HeadState::Waiting,
            queue: VecDeque::new(),
            tail: BytesMut::new(),
            queued: 0,
            recv_eof: false,
            recv_window: recv_window as i64,
            recv_unacked: 0,
            read_waker: None,
            send_window: send_window as i64,
            send_eof: false,
            send_waker: None,
            failure: None,
            send_failure: None,
        }
    }

    /// Open or half-closed (RFC 9113 §5.1.2): neither reset nor ended both ways.
    pub(super) fn is_open(&self) -> bool {
        self.failure.is_none() && self.send_failure.is_none() && !(self.recv_eof && self.send_eof)
    }

    /// Counts against our limit of concurrent peer streams: every stream still held (its handler
    /// runs: it is in the map until its handle is dropped), except one that ended cleanly both
    /// ways, whose handler is finishing (the peer may open another at once). A reset stream
    /// counts until its handler lets go, whoever reset it: otherwise opening and resetting
    /// ("rapid reset"), or making us reset ("MadeYouReset"), would start handlers without limit.
    pub(super) fn counts_against_limit(&self) -> bool {
        !self.local && (self.failure.is_some() || self.send_failure.is_some() || self.is_open())
    }

    /// Queues received bytes for the reader: in place when the stream has nothing unread or the
    /// payload is large, else copied onto the tail (`COPY_BELOW`).
    pub(super) fn push_data(&mut self, payload: BytesMut) {
        self.queued += payload.len();
        if self.queue.is_empty() && self.tail.is_empty() {
            self.queue.push_back(payload.freeze());
        } else if payload.len() < COPY_BELOW {
            self.tail.extend_from_slice(&payload);
        } else {
            if !self.tail.is_empty() {
                self.queue
                    .push_back(std::mem::take(&mut self.tail).freeze());
            }
            self.queue.push_back(payload.freeze());
        }
    }

    /// The next unread chunk, oldest first.
    pub(super) fn pop_data(&mut self) -> Option<Bytes> {
        let chunk = match self.queue.pop_front() {
            Some(chunk) => chunk,
            None if !self.tail.is_empty() => std::mem::take(&mut self.tail).freeze(),
            None => return None,
        };
        self.queued -= chunk.len();
        Some(chunk)
    }

    pub(super) fn wake(&mut self) {
        if let Some(w) = self.read_waker.take() {
            w.wake();
        }
        if let Some(w) = self.send_waker.take() {
            w.wake();
        }
    }

    pub(super) fn fail(&mut self, failure: Failure) {
        if self.failure.is_none() {
            self.failure = Some(failure);
        }
        self.wake();
    }
}

impl Session {
    pub(super) fn on_reset(&mut self, head: Head, payload: &[u8]) -> Result<(), (Reason, String)> {
        if head.stream == 0 {
            return Err(proto("RST_STREAM on stream 0"));
        }
        if payload.len() != 4 {
            return Err(frame_size("RST_STREAM"));
        }
        let reason = Reason(frame::u32_at(payload, 0));
        let closed = self.is_closed_id(head.stream);
        match self.streams.get_mut(&head.stream) {
            Some(stream) if stream.recv_eof && stream.failure.is_none() => {
                stream.send_failure = Some(Failure::Reset {
                    reason,
                    remote: true,
                });
                stream.wake();
                Ok(())
            }
            Some(stream) => {
                // Reset before its answer: the work it started is wasted (a handler, a dial).
                let premature =
                    stream.failure.is_none() && matches!(stream.head, HeadState::Waiting);
                self.abort_stream(
                    head.stream,
                    Failure::Reset {
                        reason,
                        remote: true,
                    },
                );
                if premature {
                    self.stream_error("streams reset before their answer")?;
                }
                Ok(())
            }
            // A stream that is gone (a reset crossing our END_STREAM or our own reset): nothing
            // to do.
            None if closed => Ok(()),
            None => Err(proto("RST_STREAM on a stream that was never opened")),
        }
    }

    /// Sends RST_STREAM and fails the stream locally.
    pub(super) fn reset_stream(&mut self, id: u32, reason: Reason) {
        frame::put_reset(&mut self.out, id, reason);
        self.abort_stream(
            id,
            Failure::Reset {
                reason,
                remote: false,
            },
        );
    }

    /// Fails a reset stream: what it had received will never be read, so those bytes go back to
    /// the connection window.
    pub(super) fn abort_stream(&mut self, id: u32, failure: Failure) {
        if let Some(stream) = self.streams.get_mut(&id) {
            let bytes = std::mem::take(&mut stream.queued) as u32;
            stream.queue.clear();
            stream.tail = BytesMut::new();
            stream.fail(failure);
            self.release_connection(bytes);
        }
    }

    /// Resets the stream (if it is still open) with `reason`.
    pub(crate) fn reset(&mut self, id: u32, reason: Reason) {
        if self.streams.get(&id).is_some_and(Stream::is_open) && self.failure.is_none() {
            self.reset_stream(id, reason);
        }
    }

    /// The handle of `id` is gone: a stream still open is cancelled, and what it had received
    /// and not read goes back to the connection window.
    pub(crate) fn drop_stream(&mut self, id: u32) {
        self.reset(id, Reason::CANCEL);
        if let Some(stream) = self.streams.remove(&id) {
            self.release_connection(stream.queued as u32);
        }
    }
}
