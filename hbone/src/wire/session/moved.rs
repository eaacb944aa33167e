//! A session taken apart between two frames, and put together again in another process: the
//! state a handoff carries ([`SessionState`]) and its checks.
//!
//! What moves: the settings both ends advertised (the peer holds us to ours, so the new process
//! keeps them, whatever its own configuration says), both connection windows and every stream's,
//! the stream ids used so far, the peer's HPACK dynamic table (it refers to its entries), frames
//! queued and not yet written, the GOAWAYs either end sent, our PING awaiting its ACK, and per
//! stream what was received and not yet read and who has ended it. What must have settled first
//! (else the session is not taken apart; the caller tries again a moment later): the preface and
//! the peer's first SETTINGS, a header block in the middle of its frames, a CONNECT not yet
//! answered or handed to the application, a stream being reset, and the session's own failure.

use super::*;

/// The most streams a moved session may carry.
const MAX_MOVED_STREAMS: usize = 10_000;

/// One stream of a moved session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamState {
    /// Its id.
    pub id: u32,
    /// Received and not yet read, in order.
    pub unread: Vec<u8>,
    /// The peer ended its side (END_STREAM); `unread` may still hold data.
    pub recv_eof: bool,
    /// What the peer may still send on it.
    pub recv_window: i64,
    /// Bytes read and not yet granted back to the peer (a WINDOW_UPDATE's worth waits).
    pub recv_unacked: u32,
    /// What we may still send on it.
    pub send_window: i64,
    /// We ended our side.
    pub send_eof: bool,
}

/// An HTTP/2 connection between two frames: what another process needs to go on with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionState {
    /// We are the client.
    pub client: bool,
    /// The SETTINGS we advertised: SETTINGS_INITIAL_WINDOW_SIZE.
    pub stream_window: u32,
    /// Our connection window's size (the initial 65,535 plus what we granted at the start).
    pub connection_window: u32,
    /// SETTINGS_MAX_FRAME_SIZE.
    pub max_frame_size: u32,
    /// SETTINGS_MAX_CONCURRENT_STREAMS (a server's).
    pub max_concurrent_streams: u32,
    /// SETTINGS_MAX_HEADER_LIST_SIZE.
    pub max_header_list_size: u32,
    /// The peer's SETTINGS_INITIAL_WINDOW_SIZE.
    pub peer_initial_window: u32,
    /// The peer's SETTINGS_MAX_FRAME_SIZE.
    pub peer_max_frame_size: u32,
    /// The peer's SETTINGS_MAX_CONCURRENT_STREAMS.
    pub peer_max_concurrent_streams: u32,
    /// The id our next stream gets.
    pub next_local_id: u32,
    /// The highest id the peer has opened.
    pub last_peer_id: u32,
    /// What we may still send on the connection.
    pub send_window: i64,
    /// What the peer may still send on the connection.
    pub recv_window: i64,
    /// Bytes read and not yet granted back on the connection.
    pub recv_unacked: u32,
    /// The peer's HPACK dynamic table: its size limit and entries (name, value), oldest first.
    pub hpack_table_size: u32,
    /// Its entries.
    pub hpack_entries: Vec<(Vec<u8>, Vec<u8>)>,
    /// Whole frames queued and not yet written.
    pub unsent: Vec<u8>,
    /// The last stream id of the peer's GOAWAY, if it sent one.
    pub goaway_received: Option<u32>,
    /// We sent a graceful GOAWAY.
    pub going_away: bool,
    /// The payload of our PING awaiting its ACK.
    pub ping_outstanding: Option<[u8; 8]>,
    /// The open streams.
    pub streams: Vec<StreamState>,
}

impl Session {
    /// The session between two frames, for another process; `Err` names what has not settled.
    pub(crate) fn state(&self) -> Result<SessionState, String> {
        if self.preface_left > 0 || !self.got_settings {
            return Err("the connection's preface and SETTINGS are not yet through".into());
        }
        if let Some(f) = &self.failure {
            return Err(format!("the connection has failed: {f}"));
        }
        if self.block.is_some() {
            return Err("a header block is in the middle of its frames".into());
        }
        if !self.incoming.is_empty() {
            return Err("a CONNECT is not yet handed to the application".into());
        }
        let Some((table_size, entries)) = self.decoder.table() else {
            return Err(
                "the peer's HPACK table was not copied (the connection was not made movable)"
                    .into(),
            );
        };
        let mut streams = Vec::with_capacity(self.streams.len());
        for (id, s) in &self.streams {
            if s.failure.is_some() || s.send_failure.is_some() {
                return Err(format!("stream {id} is being reset"));
            }
            if !matches!(s.head, HeadState::Taken) {
                return Err(format!("stream {id} has not been answered"));
            }
            let mut unread = Vec::with_capacity(s.queued);
            for chunk in &s.queue {
                unread.extend_from_slice(chunk);
            }
            unread.extend_from_slice(&s.tail);
            streams.push(StreamState {
                id: *id,
                unread,
                recv_eof: s.recv_eof,
                recv_window: s.recv_window,
                recv_unacked: s.recv_unacked,
                send_window: s.send_window,
                send_eof: s.send_eof,
            });
        }
        streams.sort_by_key(|s| s.id);
        Ok(SessionState {
            client: self.role == Role::Client,
            stream_window: self.limits.stream_window,
            connection_window: self.limits.connection_window,
            max_frame_size: self.limits.max_frame_size,
            max_concurrent_streams: self.limits.max_concurrent_streams,
            max_header_list_size: self.limits.max_header_list_size,
            peer_initial_window: self.peer.initial_window,
            peer_max_frame_size: self.peer.max_frame_size,
            peer_max_concurrent_streams: self.peer.max_concurrent_streams,
            next_local_id: self.next_local_id,
            last_peer_id: self.last_peer_id,
            send_window: self.send_window,
            recv_window: self.recv_window,
            recv_unacked: self.recv_unacked,
            hpack_table_size: u32::try_from(table_size).unwrap_or(u32::MAX),
            hpack_entries: entries,
            unsent: self.out.to_vec(),
            goaway_received: self.goaway_received,
            going_away: self.going_away,
            ping_outstanding: self.ping.outstanding,
            streams,
        })
    }

    /// A session handed over by another process, going on under `limits` for what is ours alone
    /// (the send buffer, the misbehaviour allowances) and the moved state for what the peer was
    /// told. Every field is checked against the protocol's ranges and against itself.
    pub(crate) fn from_state(state: SessionState, limits: Limits) -> Result<Session, String> {
        let role = if state.client {
            Role::Client
        } else {
            Role::Server
        };
        let window = |what: &str, w: i64| {
            if (-MAX_WINDOW..=MAX_WINDOW).contains(&w) {
                Ok(())
            } else {
                Err(format!("a moved session's {what} window of {w}"))
            }
        };
        for (what, value) in [
            ("stream", state.stream_window),
            ("connection", state.connection_window),
            ("peer's initial", state.peer_initial_window),
        ] {
            window(what, i64::from(value))?;
        }
        for (what, size) in [
            ("our", state.max_frame_size),
            ("the peer's", state.peer_max_frame_size),
        ] {
            if !(DEFAULT_MAX_FRAME..(1 << 24)).contains(&size) {
                return Err(format!("{what} SETTINGS_MAX_FRAME_SIZE of {size}"));
            }
        }
        window("send", state.send_window)?;
        window("receive", state.recv_window)?;
        if state.streams.len() > MAX_MOVED_STREAMS {
            return Err(format!(
                "a moved session of {} streams, more than {MAX_MOVED_STREAMS}",
                state.streams.len()
            ));
        }
        if state.unsent.len() > limits.max_send_buffer + MAX_MOVED_FRAMES_SLACK {
            return Err(format!(
                "a moved session with {} bytes of frames unsent, more than {}",
                state.unsent.len(),
                limits.max_send_buffer + MAX_MOVED_FRAMES_SLACK
            ));
        }
        // A client's streams are odd (a server opens none, and keeps the id it started with).
        if state.client && state.next_local_id.is_multiple_of(2) {
            return Err(format!(
                "a moved session's next stream id {} is not one this end opens",
                state.next_local_id
            ));
        }
        let decoder =
            hpack::Decoder::with_table(state.hpack_table_size as usize, state.hpack_entries)?;
        let limits = Limits {
            stream_window: state.stream_window,
            connection_window: state.connection_window,
            max_frame_size: state.max_frame_size,
            max_concurrent_streams: state.max_concurrent_streams,
            max_header_list_size: state.max_header_list_size,
            ..limits
        };
        let mut session = Session::new(role, limits);
        session.out = BytesMut::from(&state.unsent[..]);
        session.preface_left = 0;
        session.got_settings = true;
        session.peer = PeerSettings {
            initial_window: state.peer_initial_window,
            max_frame_size: state.peer_max_frame_size,
            max_concurrent_streams: state.peer_max_concurrent_streams,
        };
        session.next_local_id = state.next_local_id;
        session.last_peer_id = state.last_peer_id;
        session.send_window = state.send_window;
        session.recv_window = state.recv_window;
        session.recv_unacked = state.recv_unacked;
        session.decoder = decoder;
        session.goaway_received = state.goaway_received;
        session.going_away = state.going_away;
        session.ping.outstanding = state.ping_outstanding;
        let mut unread_total = 0i64;
        for s in state.streams {
            let ours = s.id % 2 == if state.client { 1 } else { 0 };
            if s.id == 0
                || (ours && s.id >= state.next_local_id)
                || (!ours && s.id > state.last_peer_id)
            {
                return Err(format!(
                    "a moved session's stream {} was never opened",
                    s.id
                ));
            }
            window("stream's send", s.send_window)?;
            window("stream's receive", s.recv_window)?;
            // Every byte the peer may send is still allowed, unread, or read and not yet granted
            // back: anything else would leave the peer's idea of the window and ours apart.
            if s.recv_window + s.unread.len() as i64 + i64::from(s.recv_unacked)
                != i64::from(state.stream_window)
            {
                return Err(format!(
                    "a moved session's stream {} window does not add up: {} allowed + {} unread + {} not granted back != {}",
                    s.id,
                    s.recv_window,
                    s.unread.len(),
                    s.recv_unacked,
                    state.stream_window
                ));
            }
            unread_total += s.unread.len() as i64;
            let mut stream = Stream::new(ours, 0, 0);
            stream.head = HeadState::Taken;
            stream.queued = s.unread.len();
            if !s.unread.is_empty() {
                stream.queue.push_back(Bytes::from(s.unread));
            }
            stream.recv_eof = s.recv_eof;
            stream.recv_window = s.recv_window;
            stream.recv_unacked = s.recv_unacked;
            stream.send_window = s.send_window;
            stream.send_eof = s.send_eof;
            if session.streams.insert(s.id, stream).is_some() {
                return Err(format!("a moved session names stream {} twice", s.id));
            }
        }
        if state.recv_window + unread_total + i64::from(state.recv_unacked)
            != i64::from(state.connection_window)
        {
            return Err(format!(
                "a moved session's connection window does not add up: {} allowed + {unread_total} unread + {} not granted back != {}",
                state.recv_window, state.recv_unacked, state.connection_window
            ));
        }
        Ok(session)
    }
}

/// Frames beyond the send buffer's limit a session may hold unsent (what crossed it).
const MAX_MOVED_FRAMES_SLACK: usize = 1 << 20;
