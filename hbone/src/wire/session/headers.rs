//! Header blocks: HEADERS and CONTINUATION received (each block decoded within the limit,
//! whatever stream it names), requests checked and accepted or refused, responses matched, and
//! the heads we send (a client's CONNECT, a server's answer).

use super::*;

/// What became of an incoming request that failed the header checks.
#[derive(Debug)]
pub(super) enum Refusal {
    Reset(Reason),
    Status(StatusCode),
}

/// A header block being received over HEADERS + CONTINUATION frames.
#[derive(Debug)]
pub(super) struct Block {
    pub(super) stream: u32,
    pub(super) end_stream: bool,
    pub(super) bytes: Vec<u8>,
    /// CONTINUATION frames received so far.
    pub(super) continuations: usize,
}

impl Session {
    pub(super) fn on_headers(
        &mut self,
        head: Head,
        payload: BytesMut,
    ) -> Result<(), (Reason, String)> {
        if head.stream == 0 {
            return Err(proto("HEADERS on stream 0"));
        }
        let mut fragment = &payload[..];
        let mut pad = 0;
        if head.has(flag::PADDED) {
            pad = *fragment
                .first()
                .ok_or_else(|| frame_size("padded HEADERS"))? as usize;
            fragment = &fragment[1..];
        }
        if head.has(flag::PRIORITY) {
            if fragment.len() < 5 {
                return Err(frame_size("HEADERS with priority"));
            }
            fragment = &fragment[5..];
        }
        if pad > fragment.len() {
            return Err(proto("HEADERS padding longer than the frame"));
        }
        let fragment = &fragment[..fragment.len() - pad];
        let end_stream = head.has(flag::END_STREAM);
        if head.has(flag::END_HEADERS) {
            return self.on_block(head.stream, end_stream, fragment);
        }
        if fragment.is_empty() {
            self.control_frame("empty HEADERS frames")?;
        }
        self.block = Some(Block {
            stream: head.stream,
            end_stream,
            bytes: fragment.to_vec(),
            continuations: 0,
        });
        Ok(())
    }

    pub(super) fn on_continuation(
        &mut self,
        head: Head,
        payload: &[u8],
    ) -> Result<(), (Reason, String)> {
        let max = self.limits.max_continuations();
        let Some(block) = &mut self.block else {
            return Err(proto("CONTINUATION without HEADERS"));
        };
        // The block's size was checked against the cap on each frame header (`recv_frames`);
        // this bounds the frames, empty ones included.
        block.continuations += 1;
        if block.continuations > max && !head.has(flag::END_HEADERS) {
            return Err((
                Reason::ENHANCE_YOUR_CALM,
                format!("a header block of more than {max} CONTINUATION frames"),
            ));
        }
        block.bytes.extend_from_slice(payload);
        if !head.has(flag::END_HEADERS) {
            return Ok(());
        }
        let block = self.block.take().expect("checked above");
        self.on_block(block.stream, block.end_stream, &block.bytes)
    }

    /// A complete header block: a request (server), a response (client), or trailers. Every
    /// block is decoded within the header list limit, whatever stream it names, or not at all
    /// when it ends the connection anyway.
    pub(super) fn on_block(
        &mut self,
        id: u32,
        end_stream: bool,
        block: &[u8],
    ) -> Result<(), (Reason, String)> {
        let limit = self.limits.max_header_list_size;
        if let Some(stream) = self.streams.get(&id) {
            let response_due =
                self.role == Role::Client && matches!(stream.head, HeadState::Waiting);
            if response_due {
                return self.on_response(id, end_stream, block);
            }
            // Trailers: must end the stream and carry no pseudo-headers.
            return match self.decoder.trailers(block, limit) {
                Err(e @ (HeadError::Compression(_) | HeadError::Abusive(_))) => Err(head_error(e)),
                Err(_) => self.provoked_reset(id, Reason::PROTOCOL_ERROR),
                Ok(()) if !end_stream => self.provoked_reset(id, Reason::PROTOCOL_ERROR),
                Ok(()) => {
                    let stream = self.streams.get_mut(&id).expect("looked up above");
                    if stream.recv_eof || stream.failure.is_some() {
                        let was_open = stream.failure.is_none();
                        if was_open {
                            return self.provoked_reset(id, Reason::STREAM_CLOSED);
                        }
                    } else {
                        stream.recv_eof = true;
                        if let Some(w) = stream.read_waker.take() {
                            w.wake();
                        }
                    }
                    Ok(())
                }
            };
        }
        let peer_initiated = (id % 2 == 1) == (self.role == Role::Server);
        if !peer_initiated {
            if self.role == Role::Client && id.is_multiple_of(2) {
                return Err(proto("HEADERS on a server-initiated stream"));
            }
            if !self.is_closed_id(id) {
                return Err(proto("HEADERS on a stream that was never opened"));
            }
            // A response to a stream we have dropped: decoded for the table, within the limit,
            // then ignored.
            return match self.decoder.discard(block, limit) {
                Err(e) => Err(head_error(e)),
                Ok(()) => Ok(()),
            };
        }
        if id <= self.last_peer_id {
            // Not decoded: the connection ends. A new stream's id must be above every id the
            // peer used before (RFC 9113 §5.1.1); this one is closed, or was skipped.
            return Err((
                Reason::PROTOCOL_ERROR,
                format!(
                    "HEADERS on stream {id}, not above the last stream the client opened ({})",
                    self.last_peer_id
                ),
            ));
        }
        self.last_peer_id = id;
        let head = match self.decoder.request(block, limit) {
            Err(e @ (HeadError::Compression(_) | HeadError::Abusive(_))) => {
                return Err(head_error(e));
            }
            Err(e) => {
                tracing::debug!(stream = id, error = %e, "HBONE server: refusing a request");
                let refusal = match e {
                    HeadError::TooLarge(_) => {
                        Refusal::Status(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE)
                    }
                    _ => {
                        self.malformed += 1;
                        Refusal::Reset(Reason::PROTOCOL_ERROR)
                    }
                };
                return self.refuse(id, refusal);
            }
            Ok(head) => head,
        };
        if end_stream && head.method == b"CONNECT" {
            // A CONNECT that ends its stream at once is malformed (RFC 9113 §8.5).
            return self.refuse(id, Refusal::Reset(Reason::PROTOCOL_ERROR));
        }
        let held = self.open_streams();
        // A peer that sent GOAWAY is closing the connection: it opens no more streams here (h2
        // stops handing them out too; found by the differential fuzz target). After our own
        // graceful GOAWAY, a stream the peer opened before it heard it is refused unprocessed.
        if self.failure.is_some()
            || self.goaway_received.is_some()
            || self.going_away
            || held >= self.limits.max_concurrent_streams as usize
        {
            return self.refuse(id, Refusal::Reset(Reason::REFUSED_STREAM));
        }
        let mut stream = Stream::new(false, self.limits.stream_window, self.peer.initial_window);
        stream.recv_eof = end_stream;
        self.streams.insert(id, stream);
        self.incoming.push_back(Incoming { id, head });
        if let Some(w) = self.accept_waker.take() {
            w.wake();
        }
        Ok(())
    }

    /// Refuses a request the handler never sees, charging the peer for it.
    pub(super) fn refuse(&mut self, id: u32, refusal: Refusal) -> Result<(), (Reason, String)> {
        match refusal {
            Refusal::Reset(reason) => frame::put_reset(&mut self.out, id, reason),
            Refusal::Status(status) => self.put_head(id, true, |out| {
                hpack::encode_response(out, status, &HeaderMap::new())
            }),
        }
        self.stream_error("refused streams")
    }

    pub(super) fn on_response(
        &mut self,
        id: u32,
        end_stream: bool,
        block: &[u8],
    ) -> Result<(), (Reason, String)> {
        let head = match self
            .decoder
            .response(block, self.limits.max_header_list_size)
        {
            Err(e @ (HeadError::Compression(_) | HeadError::Abusive(_))) => {
                return Err(head_error(e));
            }
            Err(e) => {
                tracing::debug!(stream = id, error = %e, "HBONE client: refusing a response");
                return self.provoked_reset(id, Reason::PROTOCOL_ERROR);
            }
            Ok(head) => head,
        };
        let stream = self.streams.get_mut(&id).expect("the caller looked it up");
        if head.status.is_informational() {
            if end_stream {
                return self.provoked_reset(id, Reason::PROTOCOL_ERROR);
            }
            return self.control_frame("informational responses");
        }
        stream.head = HeadState::Ready(head);
        stream.recv_eof |= end_stream;
        if let Some(w) = stream.read_waker.take() {
            w.wake();
        }
        Ok(())
    }

    /// Writes a header block for `id` as HEADERS and CONTINUATION frames.
    pub(super) fn put_head(
        &mut self,
        id: u32,
        end_stream: bool,
        encode: impl FnOnce(&mut BytesMut),
    ) {
        let start = self.out.len();
        self.out.extend_from_slice(&[0; HEADER_LEN]);
        encode(&mut self.out);
        let block = self.out.split_off(start + HEADER_LEN);
        self.out.truncate(start);
        let max = self.peer.max_frame_size as usize;
        let mut chunks = block.chunks(max).peekable();
        let mut first = true;
        loop {
            let chunk = chunks.next().unwrap_or(&[]);
            let last = chunks.peek().is_none();
            let mut flags = if last { flag::END_HEADERS } else { 0 };
            let kind = if first {
                if end_stream {
                    flags |= flag::END_STREAM;
                }
                kind::HEADERS
            } else {
                kind::CONTINUATION
            };
            frame::put_frame(&mut self.out, kind, flags, id, chunk);
            first = false;
            if last {
                break;
            }
        }
    }
}

// ----- the client's side of a stream -----

impl Session {
    /// Opens a stream with a CONNECT to `authority`; its HEADERS frame is in `out`.
    pub(crate) fn open(&mut self, authority: &str, headers: &HeaderMap) -> Result<u32, Failure> {
        debug_assert_eq!(self.role, Role::Client);
        if let Some(f) = &self.failure {
            return Err(f.clone());
        }
        if !self.can_open() {
            return Err(Failure::GoAway {
                reason: Reason::NO_ERROR,
                remote: self.goaway_received.is_some(),
            });
        }
        let open = self
            .streams
            .values()
            .filter(|s| s.local && s.is_open())
            .count();
        if open >= self.peer.max_concurrent_streams as usize {
            return Err(Failure::Reset {
                reason: Reason::REFUSED_STREAM,
                remote: false,
            });
        }
        let id = self.next_local_id;
        self.next_local_id += 2;
        self.put_head(id, false, |out| {
            hpack::encode_connect(out, authority, headers)
        });
        let stream = Stream::new(true, self.limits.stream_window, self.peer.initial_window);
        self.streams.insert(id, stream);
        Ok(id)
    }

    /// Waits for the response head of a stream we opened.
    pub(crate) fn poll_response(
        &mut self,
        id: u32,
        cx: &mut Context<'_>,
    ) -> Poll<Result<ResponseHead, Failure>> {
        let stream = self.streams.get_mut(&id).expect("a live stream handle");
        if let HeadState::Ready(_) = stream.head {
            let HeadState::Ready(head) = std::mem::replace(&mut stream.head, HeadState::Taken)
            else {
                unreachable!()
            };
            return Poll::Ready(Ok(head));
        }
        if let Some(f) = &stream.failure {
            return Poll::Ready(Err(f.clone()));
        }
        stream.read_waker = Some(cx.waker().clone());
        Poll::Pending
    }
}

// ----- the server's side -----

impl Session {
    /// The next CONNECT received, or `None` once the connection has failed.
    pub(crate) fn poll_accept(&mut self, cx: &mut Context<'_>) -> Poll<Option<Incoming>> {
        if let Some(incoming) = self.incoming.pop_front() {
            return Poll::Ready(Some(incoming));
        }
        if self.failure.is_some() {
            return Poll::Ready(None);
        }
        self.accept_waker = Some(cx.waker().clone());
        Poll::Pending
    }

    /// Answers a request; `end_stream` for a refusal.
    pub(crate) fn respond(
        &mut self,
        id: u32,
        status: StatusCode,
        headers: &HeaderMap,
        end_stream: bool,
    ) -> Result<(), Failure> {
        let stream = self.streams.get_mut(&id).expect("a live stream handle");
        if let Some(f) = &stream.failure {
            return Err(f.clone());
        }
        stream.head = HeadState::Taken;
        if end_stream {
            stream.send_eof = true;
        }
        self.put_head(id, end_stream, |out| {
            hpack::encode_response(out, status, headers)
        });
        Ok(())
    }
}
