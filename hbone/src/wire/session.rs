//! The HTTP/2 state of one HBONE connection, without I/O: frames in, frames out, and the state
//! of every stream (flow-control windows, received data, who closed what).
//!
//! Received bytes go in through [`Session::recv`]; frames to send collect in [`Session::out`]
//! (the I/O layer writes them before any DATA it sends); DATA frames themselves are written by
//! the I/O layer straight from the caller's buffer, after [`Session::take_send`] has charged the
//! windows. Tasks waiting on a stream are woken from here, so the I/O layer only moves bytes.

use std::collections::{HashMap, VecDeque};
use std::task::{Context, Poll, Waker};
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, StatusCode};

use super::budget::{Allowance, Bucket};
use super::frame::{
    self, DEFAULT_MAX_FRAME, DEFAULT_WINDOW, HEADER_LEN, Head, MAX_WINDOW, Reason, flag, kind,
    setting,
};
use super::hpack::{self, HeadError, RequestHead, ResponseHead};

/// Which end of the connection we are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    Client,
    Server,
}

/// What we advertise and enforce.
#[derive(Debug, Clone)]
pub(crate) struct Limits {
    pub(crate) stream_window: u32,
    pub(crate) connection_window: u32,
    pub(crate) max_frame_size: u32,
    /// Server: SETTINGS_MAX_CONCURRENT_STREAMS. Client: ignored (the server opens none).
    pub(crate) max_concurrent_streams: u32,
    pub(crate) max_header_list_size: u32,
    /// Bytes of frames queued for a socket that is not taking them before writers wait.
    pub(crate) max_send_buffer: usize,
    /// Streams that may end badly because of the peer (see `Config::stream_error_allowance`).
    pub(crate) stream_errors: Allowance,
    /// Frames without progress the peer may send (see `Config::control_frame_allowance`).
    pub(crate) control_frames: Allowance,
}

impl Limits {
    pub(crate) fn from_config(c: &crate::Config) -> Limits {
        Limits {
            stream_window: c.stream_window.clamp(DEFAULT_WINDOW, MAX_WINDOW as u32),
            connection_window: c.connection_window.clamp(DEFAULT_WINDOW, MAX_WINDOW as u32),
            max_frame_size: c.max_frame_size.clamp(DEFAULT_MAX_FRAME, (1 << 24) - 1),
            max_concurrent_streams: c.max_concurrent_streams,
            max_header_list_size: c.max_header_list_size,
            max_send_buffer: c.max_send_buffer.max(16 * 1024),
            stream_errors: c.stream_error_allowance,
            control_frames: c.control_frame_allowance,
        }
    }

    /// The largest encoded header block (HEADERS plus CONTINUATION payloads) we read: four
    /// times the largest header list we accept (a list's encoded form is seldom larger than its
    /// size as HTTP/2 counts it), and at least one default frame. A HEADERS or CONTINUATION
    /// frame that would go past it is refused as soon as its frame header arrives.
    pub(crate) fn block_cap(&self) -> usize {
        (self.max_header_list_size as usize)
            .saturating_mul(hpack::ABUSE_FACTOR as usize)
            .max(DEFAULT_MAX_FRAME as usize)
    }

    /// CONTINUATION frames one header block may take: as many as the block cap needs at the
    /// peer's smallest frame size, a quarter more for poorly packed frames, and at least 5, as
    /// `h2` computes it (CVE-2024-27316: a block of endless, empty CONTINUATION frames).
    pub(crate) fn max_continuations(&self) -> usize {
        let frames = (self.max_header_list_size as usize / DEFAULT_MAX_FRAME as usize).max(1);
        (frames + frames / 4).max(5)
    }
}

/// A DATA payload shorter than this, arriving while its stream already holds unread bytes, is
/// copied onto the stream's tail instead of kept as a slice of the read buffer: a slice keeps its
/// whole buffer (up to several hundred KiB) alive, so small frames left unread could hold many
/// times their size, and a stream of tiny frames would cost a queue entry each.
const COPY_BELOW: usize = 64 * 1024;

/// A WINDOW_UPDATE smaller than this moves so little that it counts against the control-frame
/// allowance (CVE-2019-9511, "data dribble": tiny windows that make us send tiny frames).
const SMALL_WINDOW_UPDATE: i64 = 1024;

/// Why a stream or the whole connection stopped working.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Failure {
    /// RST_STREAM, sent by the peer (`remote`) or by us.
    Reset { reason: Reason, remote: bool },
    /// The peer's GOAWAY did not cover this stream, or it closed the connection with one.
    GoAway { reason: Reason, remote: bool },
    /// The peer broke the protocol; we sent GOAWAY with `reason`.
    Protocol { reason: Reason, detail: String },
    /// The socket failed or reached end of file.
    Io {
        kind: std::io::ErrorKind,
        detail: String,
    },
}

impl Failure {
    /// Whether the request surely never reached a handler, so it may be sent again elsewhere.
    pub(crate) fn is_retryable(&self) -> bool {
        match self {
            Failure::Reset { reason, remote } => *remote && *reason == Reason::REFUSED_STREAM,
            Failure::GoAway { .. } | Failure::Io { .. } => true,
            Failure::Protocol { .. } => false,
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Reset {
                reason,
                remote: true,
            } => write!(f, "peer reset the stream ({reason})"),
            Failure::Reset {
                reason,
                remote: false,
            } => write!(f, "stream reset ({reason})"),
            Failure::GoAway {
                reason,
                remote: true,
            } => {
                write!(f, "peer is closing the connection (GOAWAY {reason})")
            }
            Failure::GoAway {
                reason,
                remote: false,
            } => {
                write!(f, "connection closed (GOAWAY {reason})")
            }
            Failure::Protocol { reason, detail } => {
                write!(f, "peer broke HTTP/2 ({detail}); sent GOAWAY {reason}")
            }
            Failure::Io { detail, .. } => f.write_str(detail),
        }
    }
}

/// A CONNECT the server has received and not yet handed out.
#[derive(Debug)]
pub(crate) struct Incoming {
    pub(crate) id: u32,
    pub(crate) head: RequestHead,
}

/// What became of an incoming request that failed the header checks.
#[derive(Debug)]
enum Refusal {
    Reset(Reason),
    Status(StatusCode),
}

#[derive(Debug)]
enum HeadState {
    /// Client: waiting for the response. Server: the request was received.
    Waiting,
    Ready(ResponseHead),
    Taken,
}

#[derive(Debug)]
struct Stream {
    local: bool,
    head: HeadState,
    queue: VecDeque<Bytes>,
    /// Small payloads that arrived while `queue` held unread bytes, copied together; they come
    /// after everything in `queue` (see `COPY_BELOW`).
    tail: BytesMut,
    /// Bytes in `queue` and `tail`.
    queued: usize,
    recv_eof: bool,
    recv_window: i64,
    recv_unacked: u32,
    read_waker: Option<Waker>,
    send_window: i64,
    send_eof: bool,
    send_waker: Option<Waker>,
    failure: Option<Failure>,
    /// A reset that arrived after the peer's END_STREAM: it stops our sending but leaves what
    /// was received readable (RFC 9113 §8.1: a complete response stands).
    send_failure: Option<Failure>,
}

impl Stream {
    fn new(local: bool, recv_window: u32, send_window: u32) -> Stream {
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
    fn is_open(&self) -> bool {
        self.failure.is_none() && self.send_failure.is_none() && !(self.recv_eof && self.send_eof)
    }

    /// Counts against our limit of concurrent peer streams: every stream still held (its handler
    /// runs: it is in the map until its handle is dropped), except one that ended cleanly both
    /// ways, whose handler is finishing (the peer may open another at once). A reset stream
    /// counts until its handler lets go, whoever reset it: otherwise opening and resetting
    /// ("rapid reset"), or making us reset ("MadeYouReset"), would start handlers without limit.
    fn counts_against_limit(&self) -> bool {
        !self.local && (self.failure.is_some() || self.send_failure.is_some() || self.is_open())
    }

    /// Queues received bytes for the reader: in place when the stream has nothing unread or the
    /// payload is large, else copied onto the tail (`COPY_BELOW`).
    fn push_data(&mut self, payload: BytesMut) {
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
    fn pop_data(&mut self) -> Option<Bytes> {
        let chunk = match self.queue.pop_front() {
            Some(chunk) => chunk,
            None if !self.tail.is_empty() => std::mem::take(&mut self.tail).freeze(),
            None => return None,
        };
        self.queued -= chunk.len();
        Some(chunk)
    }

    fn wake(&mut self) {
        if let Some(w) = self.read_waker.take() {
            w.wake();
        }
        if let Some(w) = self.send_waker.take() {
            w.wake();
        }
    }

    fn fail(&mut self, failure: Failure) {
        if self.failure.is_none() {
            self.failure = Some(failure);
        }
        self.wake();
    }
}

/// A header block being received over HEADERS + CONTINUATION frames.
#[derive(Debug)]
struct Block {
    stream: u32,
    end_stream: bool,
    bytes: Vec<u8>,
    /// CONTINUATION frames received so far.
    continuations: usize,
}

/// The peer's SETTINGS that matter to us.
#[derive(Debug)]
struct PeerSettings {
    initial_window: u32,
    max_frame_size: u32,
    max_concurrent_streams: u32,
}

#[derive(Debug, Default)]
struct PingState {
    /// Payload of our PING awaiting its ACK.
    outstanding: Option<[u8; 8]>,
    answered: bool,
    waker: Option<Waker>,
    next: u64,
}

/// One connection's HTTP/2 state.
#[derive(Debug)]
pub(crate) struct Session {
    role: Role,
    limits: Limits,
    peer: PeerSettings,
    /// Server: bytes of the client preface still to check.
    preface_left: usize,
    got_settings: bool,
    /// Keyed with foldhash: SipHash was ~5% of a round trip's instructions. The peer cannot
    /// flood it: it holds at most the concurrency limit of open streams plus those whose
    /// handles are still held.
    streams: HashMap<u32, Stream, foldhash::quality::RandomState>,
    next_local_id: u32,
    last_peer_id: u32,
    send_window: i64,
    recv_window: i64,
    recv_unacked: u32,
    block: Option<Block>,
    decoder: hpack::Decoder,
    /// Frames to send before anything else.
    pub(crate) out: BytesMut,
    incoming: VecDeque<Incoming>,
    accept_waker: Option<Waker>,
    /// Streams waiting for connection-level send window.
    conn_send_waiters: Vec<Waker>,
    goaway_received: Option<u32>,
    failure: Option<Failure>,
    ping: PingState,
    /// The misbehaviour budget (`Limits::stream_errors`, `Limits::control_frames`).
    stream_errors: Bucket,
    control_frames: Bucket,
    /// The time `recv` was called with, for the budget.
    now: Instant,
    /// Requests refused as malformed (RFC 9113 §8.1.1) so far: where `h2` ends the whole
    /// connection instead, the differential fuzz target stops comparing.
    malformed: u32,
}

/// A stream's receive state as the handle sees it.
pub(crate) enum Recv {
    Data(Bytes),
    Eof,
}

impl Session {
    /// A new session; its SETTINGS (and the client preface) are already in `out`.
    pub(crate) fn new(role: Role, limits: Limits) -> Session {
        let mut out = BytesMut::with_capacity(128);
        let mut settings = vec![
            (setting::INITIAL_WINDOW_SIZE, limits.stream_window),
            (setting::MAX_FRAME_SIZE, limits.max_frame_size),
            (setting::MAX_HEADER_LIST_SIZE, limits.max_header_list_size),
        ];
        match role {
            Role::Client => {
                out.extend_from_slice(frame::PREFACE);
                settings.push((setting::ENABLE_PUSH, 0));
            }
            Role::Server => {
                settings.push((
                    setting::MAX_CONCURRENT_STREAMS,
                    limits.max_concurrent_streams,
                ));
            }
        }
        frame::put_settings(&mut out, &settings);
        if limits.connection_window > DEFAULT_WINDOW {
            frame::put_window_update(&mut out, 0, limits.connection_window - DEFAULT_WINDOW);
        }
        Session {
            role,
            peer: PeerSettings {
                initial_window: DEFAULT_WINDOW,
                max_frame_size: DEFAULT_MAX_FRAME,
                max_concurrent_streams: u32::MAX,
            },
            preface_left: if role == Role::Server {
                frame::PREFACE.len()
            } else {
                0
            },
            got_settings: false,
            streams: HashMap::default(),
            next_local_id: 1,
            last_peer_id: 0,
            send_window: DEFAULT_WINDOW as i64,
            recv_window: limits.connection_window as i64,
            recv_unacked: 0,
            block: None,
            decoder: hpack::Decoder::new(),
            out,
            incoming: VecDeque::new(),
            accept_waker: None,
            conn_send_waiters: Vec::new(),
            goaway_received: None,
            failure: None,
            ping: PingState::default(),
            stream_errors: Bucket::new(limits.stream_errors),
            control_frames: Bucket::new(limits.control_frames),
            now: Instant::now(),
            malformed: 0,
            limits,
        }
    }

    /// The connection's failure, once it has failed.
    pub(crate) fn failure(&self) -> Option<&Failure> {
        self.failure.as_ref()
    }

    /// Whether `out` holds more than a socket that is not taking it may make us queue.
    pub(crate) fn out_full(&self) -> bool {
        self.out.len() > self.limits.max_send_buffer
    }

    /// How many requests were refused as malformed.
    #[cfg(feature = "fuzzing")]
    pub(crate) fn malformed(&self) -> u32 {
        self.malformed
    }

    /// Whether the peer's first SETTINGS frame has arrived.
    pub(crate) fn got_settings(&self) -> bool {
        self.got_settings
    }

    /// How many streams we may have open at once (the peer's SETTINGS_MAX_CONCURRENT_STREAMS).
    pub(crate) fn peer_max_streams(&self) -> u32 {
        self.peer.max_concurrent_streams
    }

    /// Whether new streams may be opened on this connection.
    pub(crate) fn can_open(&self) -> bool {
        self.failure.is_none() && self.goaway_received.is_none() && self.next_local_id < (1 << 31)
    }

    /// Fails the connection (an I/O error, end of file, or a local close): every stream and
    /// every waiter sees `failure`.
    pub(crate) fn fail(&mut self, failure: Failure) {
        if self.failure.is_none() {
            self.failure = Some(failure.clone());
        }
        for s in self.streams.values_mut() {
            s.fail(failure.clone());
        }
        for w in self.conn_send_waiters.drain(..) {
            w.wake();
        }
        if let Some(w) = self.accept_waker.take() {
            w.wake();
        }
        if let Some(w) = self.ping.waker.take() {
            w.wake();
        }
    }

    /// Closes the connection from our side with GOAWAY (`reason`) and fails every stream.
    pub(crate) fn close(&mut self, reason: Reason) {
        if self.failure.is_none() {
            frame::put_goaway(&mut self.out, self.last_peer_id, reason);
            self.fail(Failure::GoAway {
                reason,
                remote: false,
            });
        }
    }

    /// Consumes every whole frame at the front of `buf`, received at `now`. On a protocol error
    /// (or a misbehaviour budget spent) the GOAWAY is in `out`, the session has failed, and the
    /// error is returned.
    pub(crate) fn recv(&mut self, buf: &mut BytesMut, now: Instant) -> Result<(), Failure> {
        if let Some(f) = &self.failure {
            buf.clear();
            return Err(f.clone());
        }
        self.now = now;
        match self.recv_frames(buf) {
            Ok(()) => Ok(()),
            Err((reason, detail)) => {
                buf.clear();
                frame::put_goaway(&mut self.out, self.last_peer_id, reason);
                let failure = Failure::Protocol { reason, detail };
                self.fail(failure.clone());
                Err(failure)
            }
        }
    }

    /// How many more bytes the frame at the front of `buf` needs (0 if one is complete or no
    /// header is there yet), so the reader can size its next read.
    pub(crate) fn wanted(&self, buf: &[u8]) -> usize {
        if self.preface_left > 0 || buf.len() < HEADER_LEN {
            return 0;
        }
        let total = HEADER_LEN + Head::parse(buf).len as usize;
        total.saturating_sub(buf.len())
    }

    fn recv_frames(&mut self, buf: &mut BytesMut) -> Result<(), (Reason, String)> {
        if self.preface_left > 0 {
            let at = frame::PREFACE.len() - self.preface_left;
            let n = self.preface_left.min(buf.len());
            if buf[..n] != frame::PREFACE[at..at + n] {
                return Err((
                    Reason::PROTOCOL_ERROR,
                    "the client did not send the HTTP/2 connection preface".to_owned(),
                ));
            }
            let _ = buf.split_to(n);
            self.preface_left -= n;
            if self.preface_left > 0 {
                return Ok(());
            }
        }
        while buf.len() >= HEADER_LEN {
            let head = Head::parse(buf);
            if head.len > self.limits.max_frame_size {
                return Err((
                    Reason::FRAME_SIZE_ERROR,
                    format!(
                        "a frame of {} bytes, over our SETTINGS_MAX_FRAME_SIZE of {}",
                        head.len, self.limits.max_frame_size
                    ),
                ));
            }
            if matches!(head.kind, kind::HEADERS | kind::CONTINUATION) {
                // Refused on its frame header: a block that big is never read.
                let so_far = self.block.as_ref().map_or(0, |b| b.bytes.len());
                let cap = self.limits.block_cap();
                if so_far + head.len as usize > cap {
                    return Err((
                        Reason::ENHANCE_YOUR_CALM,
                        format!("a header block of more than {cap} bytes"),
                    ));
                }
            }
            let total = HEADER_LEN + head.len as usize;
            if buf.len() < total {
                break;
            }
            let mut frame = buf.split_to(total);
            let payload = frame.split_off(HEADER_LEN);
            self.on_frame(head, payload)?;
        }
        Ok(())
    }

    fn on_frame(&mut self, head: Head, payload: BytesMut) -> Result<(), (Reason, String)> {
        if !self.got_settings && (head.kind != kind::SETTINGS || head.has(flag::ACK)) {
            return Err(proto("the first frame was not SETTINGS"));
        }
        if let Some(block) = &self.block
            && (head.kind != kind::CONTINUATION || head.stream != block.stream)
        {
            return Err(proto("a header block was interrupted by another frame"));
        }
        match head.kind {
            kind::DATA => self.on_data(head, payload),
            kind::HEADERS => self.on_headers(head, payload),
            kind::CONTINUATION => self.on_continuation(head, &payload),
            kind::PRIORITY => {
                if head.stream == 0 {
                    return Err(proto("PRIORITY on stream 0"));
                }
                if payload.len() != 5 {
                    return Err(frame_size("PRIORITY"));
                }
                // Priorities are not used (RFC 9113 §5.3.2): nothing to do, which is the cost.
                self.control_frame("PRIORITY frames")
            }
            kind::RST_STREAM => self.on_reset(head, &payload),
            kind::SETTINGS => self.on_settings(head, &payload),
            kind::PUSH_PROMISE => Err(proto("PUSH_PROMISE (push is disabled)")),
            kind::PING => self.on_ping(head, &payload),
            kind::GOAWAY => self.on_goaway(head, &payload),
            kind::WINDOW_UPDATE => self.on_window_update(head, &payload),
            // Unknown frame types are ignored (RFC 9113 §4.1), within the budget.
            _ => self.control_frame("frames of unknown types"),
        }
    }

    /// Whether `id` names a stream that existed and is gone (as opposed to one never opened).
    fn is_closed_id(&self, id: u32) -> bool {
        let local = (id % 2 == 1) == (self.role == Role::Client);
        if local {
            id < self.next_local_id
        } else {
            id <= self.last_peer_id
        }
    }

    /// Charges one frame without progress to the peer's allowance; past it, ENHANCE_YOUR_CALM.
    fn control_frame(&mut self, what: &str) -> Result<(), (Reason, String)> {
        let spent = !self.control_frames.take(self.now);
        calm_if(
            spent,
            self.limits.control_frames,
            what,
            "frames without progress",
        )
    }

    /// Charges one stream that ended badly because of the peer; past the allowance,
    /// ENHANCE_YOUR_CALM.
    fn stream_error(&mut self, what: &str) -> Result<(), (Reason, String)> {
        let spent = !self.stream_errors.take(self.now);
        calm_if(
            spent,
            self.limits.stream_errors,
            what,
            "streams ended by the peer's doing",
        )
    }

    /// Resets a stream because the peer broke the rules on it, charging the peer for it.
    fn provoked_reset(&mut self, id: u32, reason: Reason) -> Result<(), (Reason, String)> {
        self.reset_stream(id, reason);
        self.stream_error("streams reset for breaking the rules")
    }

    fn on_data(&mut self, head: Head, mut payload: BytesMut) -> Result<(), (Reason, String)> {
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

    fn on_headers(&mut self, head: Head, payload: BytesMut) -> Result<(), (Reason, String)> {
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

    fn on_continuation(&mut self, head: Head, payload: &[u8]) -> Result<(), (Reason, String)> {
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
    fn on_block(
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
        let held = self
            .streams
            .values()
            .filter(|s| s.counts_against_limit())
            .count();
        // A peer that sent GOAWAY is closing the connection: it opens no more streams here (h2
        // stops handing them out too; found by the differential fuzz target).
        if self.failure.is_some()
            || self.goaway_received.is_some()
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
    fn refuse(&mut self, id: u32, refusal: Refusal) -> Result<(), (Reason, String)> {
        match refusal {
            Refusal::Reset(reason) => frame::put_reset(&mut self.out, id, reason),
            Refusal::Status(status) => self.put_head(id, true, |out| {
                hpack::encode_response(out, status, &HeaderMap::new())
            }),
        }
        self.stream_error("refused streams")
    }

    fn on_response(
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

    fn on_reset(&mut self, head: Head, payload: &[u8]) -> Result<(), (Reason, String)> {
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

    fn on_settings(&mut self, head: Head, payload: &[u8]) -> Result<(), (Reason, String)> {
        if head.stream != 0 {
            return Err(proto("SETTINGS on a stream"));
        }
        if head.has(flag::ACK) {
            return if payload.is_empty() {
                Ok(())
            } else {
                Err(frame_size("SETTINGS ACK with a payload"))
            };
        }
        let values = frame::parse_settings(payload).ok_or_else(|| frame_size("SETTINGS"))?;
        for (id, value) in values {
            match id {
                setting::ENABLE_PUSH if value > 1 || (value == 1 && self.role == Role::Client) => {
                    return Err(proto("SETTINGS_ENABLE_PUSH from a server, or above 1"));
                }
                // RFC 8441 §3: any value but 0 or 1 is a connection error (h2 checks it too).
                setting::ENABLE_CONNECT_PROTOCOL if value > 1 => {
                    return Err(proto("SETTINGS_ENABLE_CONNECT_PROTOCOL above 1"));
                }
                setting::MAX_CONCURRENT_STREAMS => self.peer.max_concurrent_streams = value,
                setting::INITIAL_WINDOW_SIZE => {
                    if value as i64 > MAX_WINDOW {
                        return Err((
                            Reason::FLOW_CONTROL_ERROR,
                            format!("SETTINGS_INITIAL_WINDOW_SIZE of {value}"),
                        ));
                    }
                    let delta = value as i64 - self.peer.initial_window as i64;
                    self.peer.initial_window = value;
                    for stream in self.streams.values_mut() {
                        stream.send_window += delta;
                        if stream.send_window > MAX_WINDOW {
                            return Err((
                                Reason::FLOW_CONTROL_ERROR,
                                "SETTINGS_INITIAL_WINDOW_SIZE overflows a stream window".to_owned(),
                            ));
                        }
                        if delta > 0
                            && let Some(w) = stream.send_waker.take()
                        {
                            w.wake();
                        }
                    }
                }
                setting::MAX_FRAME_SIZE => {
                    if !(DEFAULT_MAX_FRAME..(1 << 24)).contains(&value) {
                        return Err(proto("SETTINGS_MAX_FRAME_SIZE out of range"));
                    }
                    self.peer.max_frame_size = value;
                }
                // HEADER_TABLE_SIZE: our encoder uses no dynamic table; MAX_HEADER_LIST_SIZE:
                // our heads are a few hundred bytes. Unknown settings are ignored (§6.5.2).
                _ => {}
            }
        }
        self.got_settings = true;
        frame::put_frame(&mut self.out, kind::SETTINGS, flag::ACK, 0, &[]);
        self.control_frame("SETTINGS frames")
    }

    fn on_ping(&mut self, head: Head, payload: &[u8]) -> Result<(), (Reason, String)> {
        if head.stream != 0 {
            return Err(proto("PING on a stream"));
        }
        let data: [u8; 8] = payload.try_into().map_err(|_| frame_size("PING"))?;
        if !head.has(flag::ACK) {
            frame::put_frame(&mut self.out, kind::PING, flag::ACK, 0, &data);
            return self.control_frame("PING frames");
        }
        if self.ping.outstanding == Some(data) {
            self.ping.outstanding = None;
            self.ping.answered = true;
            if let Some(w) = self.ping.waker.take() {
                w.wake();
            }
            return Ok(());
        }
        self.control_frame("unsolicited PING answers")
    }

    fn on_goaway(&mut self, head: Head, payload: &[u8]) -> Result<(), (Reason, String)> {
        if head.stream != 0 {
            return Err(proto("GOAWAY on a stream"));
        }
        if payload.len() < 8 {
            return Err(frame_size("GOAWAY"));
        }
        let last = frame::u32_at(payload, 0) & 0x7fff_ffff;
        let reason = Reason(frame::u32_at(payload, 4));
        let again = self.goaway_received.is_some();
        let last = self.goaway_received.map_or(last, |prev| prev.min(last));
        self.goaway_received = Some(last);
        for (id, stream) in &mut self.streams {
            if stream.local && *id > last {
                stream.fail(Failure::GoAway {
                    reason,
                    remote: true,
                });
            }
        }
        if reason != Reason::NO_ERROR {
            tracing::debug!(%reason, last_stream = last, "HBONE: the peer sent GOAWAY");
        }
        if again {
            return self.control_frame("GOAWAY frames");
        }
        Ok(())
    }

    fn on_window_update(&mut self, head: Head, payload: &[u8]) -> Result<(), (Reason, String)> {
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

    /// Sends RST_STREAM and fails the stream locally.
    fn reset_stream(&mut self, id: u32, reason: Reason) {
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
    fn abort_stream(&mut self, id: u32, failure: Failure) {
        if let Some(stream) = self.streams.get_mut(&id) {
            let bytes = std::mem::take(&mut stream.queued) as u32;
            stream.queue.clear();
            stream.tail = BytesMut::new();
            stream.fail(failure);
            self.release_connection(bytes);
        }
    }

    /// Returns `n` received bytes to the connection window, announcing it when half is used.
    fn release_connection(&mut self, n: u32) {
        self.recv_unacked += n;
        if self.recv_unacked >= self.limits.connection_window / 2 {
            frame::put_window_update(&mut self.out, 0, self.recv_unacked);
            self.recv_window += self.recv_unacked as i64;
            self.recv_unacked = 0;
        }
    }

    fn release_stream(&mut self, id: u32, n: u32) {
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

    /// Writes a header block for `id` as HEADERS and CONTINUATION frames.
    fn put_head(&mut self, id: u32, end_stream: bool, encode: impl FnOnce(&mut BytesMut)) {
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

    // ----- the client's side of a stream -----

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

    // ----- the server's side -----

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

    // ----- both sides: data -----

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

    // ----- keepalive -----

    /// Sends a PING (into `out`) unless one is outstanding.
    pub(crate) fn send_ping(&mut self) {
        if self.ping.outstanding.is_none() {
            self.ping.next += 1;
            let data = self.ping.next.to_be_bytes();
            self.ping.outstanding = Some(data);
            self.ping.answered = false;
            frame::put_frame(&mut self.out, kind::PING, 0, 0, &data);
        }
    }

    /// Waits for the answer to the PING last sent.
    pub(crate) fn poll_pong(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Failure>> {
        if self.ping.answered {
            self.ping.answered = false;
            return Poll::Ready(Ok(()));
        }
        if let Some(f) = &self.failure {
            return Poll::Ready(Err(f.clone()));
        }
        self.ping.waker = Some(cx.waker().clone());
        Poll::Pending
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

/// ENHANCE_YOUR_CALM, naming what the peer did too much of, if it `spent` its `allowance`.
fn calm_if(
    spent: bool,
    allowance: Allowance,
    what: &str,
    kind: &str,
) -> Result<(), (Reason, String)> {
    if !spent {
        return Ok(());
    }
    Err((
        Reason::ENHANCE_YOUR_CALM,
        format!(
            "too many {what} and other {kind} (allowance: {} at once, {} a second)",
            allowance.burst, allowance.per_second
        ),
    ))
}

/// The connection error a header block's decoding ended in.
fn head_error(e: HeadError) -> (Reason, String) {
    let reason = match e {
        HeadError::Abusive(_) => Reason::ENHANCE_YOUR_CALM,
        HeadError::Compression(_) => Reason::COMPRESSION_ERROR,
        HeadError::TooLarge(_) | HeadError::Malformed(_) => Reason::PROTOCOL_ERROR,
    };
    (reason, e.to_string())
}

fn proto(what: &str) -> (Reason, String) {
    (Reason::PROTOCOL_ERROR, what.to_owned())
}

fn frame_size(what: &str) -> (Reason, String) {
    (
        Reason::FRAME_SIZE_ERROR,
        format!("{what} frame of the wrong length"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            stream_window: 1 << 20,
            connection_window: 4 << 20,
            max_frame_size: 1 << 16,
            max_concurrent_streams: 2,
            max_header_list_size: 8192,
            max_send_buffer: 1 << 20,
            ..Limits::from_config(&crate::Config::default())
        }
    }

    /// Moves everything each side queued to the other until neither has anything to say.
    fn pump(a: &mut Session, b: &mut Session) {
        loop {
            if a.out.is_empty() && b.out.is_empty() {
                return;
            }
            let mut ab = a.out.split();
            let _ = b.recv(&mut ab, Instant::now());
            let mut ba = b.out.split();
            let _ = a.recv(&mut ba, Instant::now());
        }
    }

    fn pair() -> (Session, Session) {
        let mut client = Session::new(Role::Client, limits());
        let mut server = Session::new(Role::Server, limits());
        pump(&mut client, &mut server);
        assert!(client.got_settings() && server.got_settings());
        (client, server)
    }

    fn cx() -> Context<'static> {
        Context::from_waker(Waker::noop())
    }

    fn accept(server: &mut Session) -> Incoming {
        match server.poll_accept(&mut cx()) {
            Poll::Ready(Some(incoming)) => incoming,
            other => panic!("no request: {other:?}"),
        }
    }

    /// Opens a stream and has the server accept it with 200.
    fn tunnel(client: &mut Session, server: &mut Session) -> u32 {
        let id = client.open("a:1", &HeaderMap::new()).unwrap();
        pump(client, server);
        assert_eq!(accept(server).id, id);
        server
            .respond(id, StatusCode::OK, &HeaderMap::new(), false)
            .unwrap();
        id
    }

    fn send(s: &mut Session, id: u32, data: &[u8]) {
        let n = match s.poll_send_capacity(id, &mut cx()) {
            Poll::Ready(Ok(n)) => n,
            other => panic!("no capacity: {other:?}"),
        };
        assert!(n >= data.len());
        s.take_send(id, data.len(), false);
        s.out.extend_from_slice(&data_head(id, data.len(), false));
        s.out.extend_from_slice(data);
    }

    fn recv_all(s: &mut Session, id: u32) -> (Vec<u8>, bool) {
        let mut got = Vec::new();
        loop {
            match s.poll_recv(id, &mut cx()) {
                Poll::Ready(Ok(Recv::Data(d))) => got.extend_from_slice(&d),
                Poll::Ready(Ok(Recv::Eof)) => return (got, true),
                Poll::Pending => return (got, false),
                Poll::Ready(Err(f)) => panic!("stream failed: {f}"),
            }
        }
    }

    #[test]
    fn a_tunnel_opens_carries_bytes_both_ways_and_closes() {
        let (mut client, mut server) = pair();
        let id = client.open("10.0.0.7:80", &HeaderMap::new()).unwrap();
        pump(&mut client, &mut server);
        let req = accept(&mut server);
        assert_eq!(
            (req.id, req.head.authority.as_deref()),
            (id, Some("10.0.0.7:80"))
        );
        server
            .respond(id, StatusCode::OK, &HeaderMap::new(), false)
            .unwrap();
        send(&mut client, id, b"ping");
        client.send_end(id).unwrap();
        pump(&mut client, &mut server);
        match client.poll_response(id, &mut cx()) {
            Poll::Ready(Ok(head)) => assert_eq!(head.status, StatusCode::OK),
            other => panic!("{other:?}"),
        }
        assert_eq!(recv_all(&mut server, id), (b"ping".to_vec(), true));
        send(&mut server, id, b"pong");
        server.send_end(id).unwrap();
        pump(&mut client, &mut server);
        assert_eq!(recv_all(&mut client, id), (b"pong".to_vec(), true));
        // Closed both ways: dropping the handles sends nothing.
        client.drop_stream(id);
        server.drop_stream(id);
        assert!(client.out.is_empty() && server.out.is_empty());
    }

    #[test]
    fn dropping_an_open_stream_cancels_it_and_returns_its_window() {
        let (mut client, mut server) = pair();
        let id = tunnel(&mut client, &mut server);
        send(&mut server, id, &[1; 1000]);
        pump(&mut client, &mut server);
        client.drop_stream(id);
        pump(&mut client, &mut server);
        assert!(matches!(
            server.poll_recv(id, &mut cx()),
            Poll::Ready(Err(Failure::Reset {
                reason: Reason::CANCEL,
                remote: true
            }))
        ));
        assert_eq!(client.recv_unacked, 1000, "the dropped bytes count as read");
    }

    #[test]
    fn a_reset_after_end_stream_leaves_the_received_bytes_readable() {
        let (mut client, mut server) = pair();
        let id = tunnel(&mut client, &mut server);
        send(&mut server, id, b"all of it");
        server.send_end(id).unwrap();
        server.drop_stream(id); // the client never ended its side: CANCEL
        pump(&mut client, &mut server);
        let _ = client.poll_response(id, &mut cx());
        assert_eq!(recv_all(&mut client, id), (b"all of it".to_vec(), true));
        assert!(matches!(
            client.poll_send_capacity(id, &mut cx()),
            Poll::Ready(Err(Failure::Reset {
                reason: Reason::CANCEL,
                remote: true
            }))
        ));
    }

    #[test]
    fn data_beyond_the_stream_window_resets_only_that_stream() {
        let (mut client, mut server) = pair();
        let id = tunnel(&mut client, &mut server);
        // Ignore the window: 17 frames of 64 KiB against a 1 MiB window.
        for _ in 0..17 {
            let head = Head {
                len: 1 << 16,
                kind: kind::DATA,
                flags: 0,
                stream: id,
            };
            server.out.extend_from_slice(&head.encode());
            server.out.extend_from_slice(&[0; 1 << 16]);
        }
        pump(&mut client, &mut server);
        assert!(client.failure().is_none(), "the connection survives");
        assert!(matches!(
            client.poll_recv(id, &mut cx()),
            Poll::Ready(Err(Failure::Reset {
                reason: Reason::FLOW_CONTROL_ERROR,
                remote: false
            }))
        ));
    }

    #[test]
    fn the_server_refuses_streams_beyond_its_limit() {
        let (mut client, mut server) = pair();
        // The client thinks it may open 3 (its view of the limit is bypassed here).
        client.peer.max_concurrent_streams = 3;
        let ids: Vec<u32> = (0..3)
            .map(|_| client.open("a:1", &HeaderMap::new()).unwrap())
            .collect();
        pump(&mut client, &mut server);
        accept(&mut server);
        accept(&mut server);
        assert!(server.poll_accept(&mut cx()).is_pending());
        assert!(matches!(
            client.poll_response(ids[2], &mut cx()),
            Poll::Ready(Err(f)) if f.is_retryable()
        ));
    }

    #[test]
    fn streams_reset_by_the_client_count_until_their_handlers_let_go() {
        let (mut client, mut server) = pair();
        client.peer.max_concurrent_streams = u32::MAX;
        // "Rapid reset": open and reset at once, again and again.
        let mut accepted = Vec::new();
        for _ in 0..5 {
            let id = client.open("a:1", &HeaderMap::new()).unwrap();
            client.reset(id, Reason::CANCEL);
            client.drop_stream(id);
            pump(&mut client, &mut server);
            if let Poll::Ready(Some(incoming)) = server.poll_accept(&mut cx()) {
                accepted.push(incoming.id);
            }
        }
        assert_eq!(accepted.len(), 2, "the limit is 2 handlers at a time");
        // Once the handlers are done with them, new streams are served again.
        for id in accepted {
            server.drop_stream(id);
        }
        let id = client.open("a:1", &HeaderMap::new()).unwrap();
        pump(&mut client, &mut server);
        assert_eq!(accept(&mut server).id, id);
    }

    #[test]
    fn a_client_respects_the_servers_stream_limit() {
        let (mut client, _server) = pair();
        client.open("a:1", &HeaderMap::new()).unwrap();
        client.open("a:1", &HeaderMap::new()).unwrap();
        assert!(client.open("a:1", &HeaderMap::new()).is_err());
    }

    #[test]
    fn goaway_fails_the_streams_it_does_not_cover_as_retryable() {
        let (mut client, mut server) = pair();
        let first = client.open("a:1", &HeaderMap::new()).unwrap();
        pump(&mut client, &mut server);
        accept(&mut server);
        let second = client.open("a:1", &HeaderMap::new()).unwrap();
        frame::put_goaway(&mut server.out, first, Reason::NO_ERROR);
        pump(&mut client, &mut server);
        assert!(!client.can_open());
        assert!(client.poll_response(first, &mut cx()).is_pending());
        assert!(matches!(
            client.poll_response(second, &mut cx()),
            Poll::Ready(Err(f)) if f.is_retryable()
        ));
    }

    #[test]
    fn a_client_that_sent_goaway_opens_no_more_streams() {
        let (mut client, mut server) = pair();
        let first = client.open("a:1", &HeaderMap::new()).unwrap();
        frame::put_goaway(&mut client.out, 0, Reason::NO_ERROR);
        pump(&mut client, &mut server);
        assert_eq!(accept(&mut server).id, first);
        // Past its own GOAWAY (our session would not send it; a hostile client does).
        let late = client.next_local_id;
        client.next_local_id += 2;
        let mut block = BytesMut::new();
        hpack::encode_connect(&mut block, "a:1", &HeaderMap::new());
        frame::put_frame(
            &mut client.out,
            kind::HEADERS,
            flag::END_HEADERS,
            late,
            &block,
        );
        pump(&mut client, &mut server);
        assert!(
            server.poll_accept(&mut cx()).is_pending(),
            "a stream after GOAWAY"
        );
    }

    #[test]
    fn pings_are_answered_and_matched() {
        let (mut client, mut server) = pair();
        client.send_ping();
        assert!(client.poll_pong(&mut cx()).is_pending());
        pump(&mut client, &mut server);
        assert!(matches!(client.poll_pong(&mut cx()), Poll::Ready(Ok(()))));
    }

    #[test]
    fn a_header_block_may_span_continuation_frames() {
        let (mut client, mut server) = pair();
        client.peer.max_frame_size = 16; // forces CONTINUATION frames
        let headers: HeaderMap = [(
            http::header::FORWARDED,
            "for=10.0.0.1;by=x".parse().unwrap(),
        )]
        .into_iter()
        .collect();
        let id = client
            .open("web.default.svc.cluster.local:80", &headers)
            .unwrap();
        pump(&mut client, &mut server);
        let req = accept(&mut server);
        assert_eq!(req.id, id);
        assert_eq!(req.head.headers, headers);
    }

    #[test]
    fn protocol_errors_close_the_connection_with_goaway() {
        let cases: &[(&[u8], Reason)] = &[
            // A frame interrupting a header block.
            (
                &[0, 0, 1, 1, 0, 0, 0, 0, 1, 0x82, 0, 0, 0, 6, 0, 0, 0, 0, 0],
                Reason::PROTOCOL_ERROR,
            ),
            // DATA on a stream never opened.
            (&[0, 0, 1, 0, 0, 0, 0, 0, 9, 0], Reason::PROTOCOL_ERROR),
            // A PING of the wrong length.
            (&[0, 0, 1, 6, 0, 0, 0, 0, 0, 0], Reason::FRAME_SIZE_ERROR),
            // A frame above our SETTINGS_MAX_FRAME_SIZE.
            (&[0x01, 0, 1, 0, 0, 0, 0, 0, 1], Reason::FRAME_SIZE_ERROR),
            // A WINDOW_UPDATE of 0 on the connection.
            (
                &[0, 0, 4, 8, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                Reason::PROTOCOL_ERROR,
            ),
            // SETTINGS_ENABLE_CONNECT_PROTOCOL of 2 (found by the differential fuzz target).
            (
                &[0, 0, 6, 4, 0, 0, 0, 0, 0, 0, 8, 0, 0, 0, 2],
                Reason::PROTOCOL_ERROR,
            ),
        ];
        for (bytes, reason) in cases {
            let (_client, mut server) = pair();
            let err = server
                .recv(&mut BytesMut::from(*bytes), Instant::now())
                .unwrap_err();
            assert!(
                matches!(&err, Failure::Protocol { reason: r, .. } if r == reason),
                "{bytes:?}: {err}"
            );
            let goaway = Head::parse(&server.out);
            assert_eq!(goaway.kind, kind::GOAWAY, "{bytes:?}");
            assert_eq!(frame::u32_at(&server.out, HEADER_LEN + 4), reason.0);
        }
    }

    #[test]
    fn the_server_checks_the_preface_and_the_first_frame() {
        let mut server = Session::new(Role::Server, limits());
        let err = server
            .recv(
                &mut BytesMut::from(&b"GET / HTTP/1.1\r\n"[..]),
                Instant::now(),
            )
            .unwrap_err();
        assert!(err.to_string().contains("preface"), "{err}");
        let mut server = Session::new(Role::Server, limits());
        let mut bytes = BytesMut::from(frame::PREFACE);
        frame::put_frame(&mut bytes, kind::PING, 0, 0, &[0; 8]);
        let err = server.recv(&mut bytes, Instant::now()).unwrap_err();
        assert!(err.to_string().contains("first frame"), "{err}");
    }

    #[test]
    fn small_frames_left_unread_are_copied_together_in_order() {
        let (mut client, mut server) = pair();
        let id = tunnel(&mut client, &mut server);
        // A first frame, then 10,000 one-byte frames and a large one, none of them read yet.
        let mut sent = Vec::new();
        let mut frame_of = |s: &mut Session, data: &[u8]| {
            send(s, id, data);
            sent.extend_from_slice(data);
        };
        frame_of(&mut client, b"first");
        for i in 0..10_000u32 {
            frame_of(&mut client, &[(i % 251) as u8]);
        }
        frame_of(&mut client, &[9u8; COPY_BELOW]);
        frame_of(&mut client, b"last");
        pump(&mut client, &mut server);
        let stream = &server.streams[&id];
        // The first in place, the small ones in one copy, the large one in place, then "last".
        assert_eq!(stream.queue.len(), 3, "queue entries for 10,003 frames");
        assert_eq!(stream.tail.len(), 4);
        assert_eq!(stream.queued, sent.len());
        let (got, _) = recv_all(&mut server, id);
        assert_eq!(got, sent, "the bytes arrived changed or out of order");
        assert_eq!(server.streams[&id].queued, 0);
    }

    #[test]
    fn padding_is_stripped_and_returned_at_once() {
        let (mut client, mut server) = pair();
        let id = tunnel(&mut client, &mut server);
        let mut payload = vec![3u8];
        payload.extend_from_slice(b"abc");
        payload.extend_from_slice(&[0; 3]);
        frame::put_frame(&mut client.out, kind::DATA, flag::PADDED, id, &payload);
        pump(&mut client, &mut server);
        assert_eq!(recv_all(&mut server, id).0, b"abc");
        // All 7 bytes of the frame count as consumed: 3 read, 4 of padding returned unread.
        assert_eq!(server.streams[&id].recv_unacked, 7);
    }
}
