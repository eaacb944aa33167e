//! Tunables shared by the HBONE client pool and server.
//!
//! The defaults are tuned for throughput on a LAN (see BENCHMARKS.md at the repository root for
//! the measurements behind them); every value can be changed per pool or per server.

use std::time::Duration;

pub use crate::wire::budget::Allowance;

/// HTTP/2 and connection-management settings for a [`Pool`](crate::Pool) or a
/// [`Server`](crate::Server).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Config {
    /// Initial flow-control window of each stream (SETTINGS_INITIAL_WINDOW_SIZE), in bytes.
    pub stream_window: u32,
    /// Flow-control window of the whole connection, in bytes.
    pub connection_window: u32,
    /// Largest DATA frame payload we accept (SETTINGS_MAX_FRAME_SIZE), 16 KiB to 16 MiB - 1.
    pub max_frame_size: u32,
    /// Bytes of frames one connection may queue for a socket that is not taking them (beyond
    /// the TLS records queued, `tls_write_buffer`) before its tunnels' writes wait and it stops
    /// reading from the peer. Bounds what a peer that does not read can make us hold.
    pub max_send_buffer: usize,
    /// Client: at most this many tunnels share one connection, even if the peer allows more.
    /// Server: the SETTINGS_MAX_CONCURRENT_STREAMS it advertises.
    pub max_concurrent_streams: u32,
    /// Bytes read from the socket per syscall during a burst, below TLS (at least one TLS record,
    /// ~16 KiB). A read after a pause asks for one record's worth, so a small message needs no
    /// large buffer, and a buffer larger than one record is freed when it empties.
    pub read_buffer: usize,
    /// Bytes of sealed TLS records that may wait for the socket before writes wait (at least two
    /// records). Each write to the socket carries what is queued, several records in one write;
    /// a write that would leave less than one record's worth over the limit is taken whole (so a
    /// DATA frame of this size and its header leave together).
    pub tls_write_buffer: usize,
    /// How often to send an HTTP/2 PING on a connection; `None` disables keepalive.
    pub keepalive_interval: Option<Duration>,
    /// How long to wait for the PING's answer before the connection is declared dead.
    pub keepalive_timeout: Duration,
    /// Client: a pooled connection with no open tunnel is closed after this long.
    pub idle_timeout: Duration,
    /// Client: limit on the TCP connect plus the TLS handshake of a new connection.
    /// Server: limit on the TLS handshake of an accepted connection, including the time it waits
    /// for one of the `max_concurrent_handshakes` slots.
    pub tls_handshake_timeout: Duration,
    /// Limit on the HTTP/2 handshake after TLS. Client: the connection preface, the server's
    /// SETTINGS and the first PING round trip. Server: the client's connection preface.
    pub h2_handshake_timeout: Duration,
    /// Client: how long a CONNECT may wait for the server's answer (including a wait for a stream
    /// slot the server has not granted yet). A server that answers PINGs but never the CONNECT
    /// fails the call after this long, and the stream slot is freed.
    pub connect_timeout: Duration,
    /// Largest header list (SETTINGS_MAX_HEADER_LIST_SIZE, bytes as HTTP/2 counts them) accepted
    /// in a CONNECT request (server) or its response (client). HBONE needs a few hundred bytes;
    /// a request over the limit is refused before the handler sees it.
    pub max_header_list_size: u32,
    /// Server: at most this many connections compute their TLS handshake at once; the others wait
    /// (within `tls_handshake_timeout`) for a slot. A connection holds a slot only while rustls
    /// works on bytes it sent, never while we wait for its next bytes, so silent or slow clients
    /// take none. Bounds the CPU a flood of new connections can take.
    pub max_concurrent_handshakes: usize,
    /// Part of the misbehaviour budget (both sides): streams that end badly because of the peer.
    /// Each costs one: a stream the peer resets before it was answered, a stream we reset
    /// because the peer broke the rules on it (flow control, a WINDOW_UPDATE of 0, DATA after
    /// its end), a stream we refuse (over the stream limit, malformed, headers too large). Past
    /// it, GOAWAY ENHANCE_YOUR_CALM and the connection closes ("rapid reset", CVE-2023-44487;
    /// "MadeYouReset", CVE-2025-8671).
    pub stream_error_allowance: Allowance,
    /// Part of the misbehaviour budget (both sides): frames that cost us work and move nothing
    /// forward. Each costs one: PING, SETTINGS, PRIORITY, a frame of an unknown type,
    /// RST_STREAM or WINDOW_UPDATE for a stream that is gone, a WINDOW_UPDATE of less than
    /// 1 KiB, a second GOAWAY, an empty DATA frame without END_STREAM, an empty HEADERS frame
    /// that does not end its header block (CVE-2019-9512, -9513, -9515, -9518). Past it,
    /// GOAWAY ENHANCE_YOUR_CALM.
    pub control_frame_allowance: Allowance,
    /// Connections keep what moving them to another process needs (`handoff`): a copy of the
    /// peer's HPACK dynamic table (up to 4 KiB per connection whose peer indexes headers). The
    /// TLS configuration must also log its secrets to `handoff::traffic_secret_log`.
    pub movable: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            stream_window: 4 * 1024 * 1024,
            connection_window: 16 * 1024 * 1024,
            max_frame_size: 256 * 1024,
            max_send_buffer: 1024 * 1024,
            max_concurrent_streams: 100,
            read_buffer: 64 * 1024,
            tls_write_buffer: 512 * 1024,
            keepalive_interval: Some(Duration::from_secs(10)),
            keepalive_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            tls_handshake_timeout: Duration::from_secs(10),
            h2_handshake_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(10),
            max_header_list_size: 8 * 1024,
            max_concurrent_handshakes: 256,
            stream_error_allowance: Allowance::new(200, 20),
            control_frame_allowance: Allowance::new(1000, 100),
            movable: false,
        }
    }
}

impl Config {
    /// The buffer sizes of our TLS record layer: reads of up to `read_buffer` during a burst,
    /// `tls_write_buffer` of sealed records queued for the socket.
    pub(crate) fn tls_sizes(&self) -> crate::tls::Sizes {
        crate::tls::Sizes {
            read_size: self.read_buffer,
            write_limit: self.tls_write_buffer,
        }
    }
}
