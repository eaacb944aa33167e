//! The HTTP/2 state of one HBONE connection, without I/O: frames in, frames out, and the state
//! of every stream (flow-control windows, received data, who closed what).
//!
//! Received bytes go in through [`Session::recv`]; frames to send collect in [`Session::out`]
//! (the I/O layer writes them before any DATA it sends); DATA frames themselves are written by
//! the I/O layer straight from the caller's buffer, after [`Session::take_send`] has charged the
//! windows. Tasks waiting on a stream are woken from here, so the I/O layer only moves bytes
//! (why the wakers are held here and not by the I/O layer: the README's decisions).
//!
//! Split by concern, as `h2` splits its `proto/`: this file holds the session, what it is made
//! of and how received frames are dispatched and budgeted; `headers` (header blocks, requests and
//! responses), `flow` (DATA and the windows), `streams` (one stream's state and how it ends),
//! `settings` (SETTINGS, PING, GOAWAY).

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

mod flow;
mod headers;
mod moved;
mod settings;
mod streams;
#[cfg(test)]
mod tests;

pub(crate) use flow::data_head;
use headers::Block;
pub use moved::{SessionState, StreamState};
use settings::{PeerSettings, PingState};
use streams::{HeadState, Stream};

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
    /// Keep what a move to another process needs (the peer's HPACK table: `Config::movable`).
    pub(crate) movable: bool,
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
            movable: c.movable,
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

    /// Whether the peer went away: a graceful GOAWAY, or the connection closed or cut under us
    /// (not a protocol error, not a reset of one stream).
    pub(crate) fn is_peer_leaving(&self) -> bool {
        match self {
            Failure::GoAway { remote, .. } => *remote,
            Failure::Io { kind, .. } => matches!(
                kind,
                std::io::ErrorKind::UnexpectedEof
                    | std::io::ErrorKind::ConnectionAborted
                    | std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::BrokenPipe
            ),
            Failure::Reset { .. } | Failure::Protocol { .. } => false,
        }
    }

    /// Whether the peer said it did not process the request (REFUSED_STREAM, or a graceful
    /// GOAWAY that did not cover it): safe to send again elsewhere even on a connection that
    /// carried nothing before.
    pub(crate) fn is_unprocessed(&self) -> bool {
        match self {
            Failure::Reset { reason, remote } => *remote && *reason == Reason::REFUSED_STREAM,
            Failure::GoAway { reason, remote } => *remote && *reason == Reason::NO_ERROR,
            Failure::Io { .. } | Failure::Protocol { .. } => false,
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
    /// We sent a graceful GOAWAY: the streams the peer opened before go on, later ones are
    /// refused.
    going_away: bool,
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
            decoder: if limits.movable {
                hpack::Decoder::movable()
            } else {
                hpack::Decoder::new()
            },
            out,
            incoming: VecDeque::new(),
            accept_waker: None,
            conn_send_waiters: Vec::new(),
            goaway_received: None,
            going_away: false,
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

    /// Goes away gracefully: a GOAWAY (NO_ERROR) naming the last stream the peer opened; the
    /// streams open now go on, later ones are refused with REFUSED_STREAM (never processed, so
    /// the peer may send them again on another connection). Once is enough.
    pub(crate) fn go_away(&mut self) {
        if self.failure.is_none() && !self.going_away {
            frame::put_goaway(&mut self.out, self.last_peer_id, Reason::NO_ERROR);
            self.going_away = true;
        }
    }

    /// The streams still open (those that count against the concurrency limit).
    pub(crate) fn open_streams(&self) -> usize {
        self.streams
            .values()
            .filter(|s| s.counts_against_limit())
            .count()
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
