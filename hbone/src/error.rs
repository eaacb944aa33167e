//! The crate's error type: every variant says which side failed, against which peer, and why.

use std::net::SocketAddr;
use std::time::Duration;

use crate::wire::session::Failure;

/// A boxed error from caller-supplied code (a [`Dialer`](crate::Dialer) or a TLS source).
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Errors of the HBONE client and server.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The client could not open a TCP connection to the peer.
    #[error("HBONE client: TCP connect to {peer} failed: {source}")]
    Connect {
        /// The address dialed.
        peer: SocketAddr,
        /// The socket error.
        #[source]
        source: std::io::Error,
    },
    /// A connection handed over by another process could not be taken on (its state did not
    /// check out, or its socket could not be used); it is closed.
    #[error(
        "HBONE {side}: a connection with {peer} handed over by another process was refused: {reason}"
    )]
    Adopt {
        /// Which end we are.
        side: Side,
        /// The other end (unspecified when the socket did not say).
        peer: SocketAddr,
        /// What was wrong with it.
        reason: String,
    },
    /// The TLS handshake failed (bad certificate, unknown root, wrong identity, ...).
    #[error("HBONE {side}: TLS handshake with {peer} failed: {source}")]
    Tls {
        /// Which end we are.
        side: Side,
        /// The other end.
        peer: SocketAddr,
        /// The TLS error as reported by rustls.
        #[source]
        source: std::io::Error,
    },
    /// TLS succeeded but the peer did not negotiate ALPN `h2`.
    #[error(
        "HBONE {side}: {peer} did not negotiate ALPN \"h2\" (negotiated {negotiated}); HBONE requires HTTP/2 over TLS"
    )]
    Alpn {
        /// Which end we are.
        side: Side,
        /// The other end.
        peer: SocketAddr,
        /// What was negotiated instead, for the message.
        negotiated: String,
    },
    /// The handshake settled on a TLS version older than 1.3.
    #[error("HBONE {side}: {peer} negotiated {version}; HBONE requires TLS 1.3")]
    TlsVersion {
        /// Which end we are.
        side: Side,
        /// The other end.
        peer: SocketAddr,
        /// The negotiated version, for the message.
        version: String,
    },
    /// The server presented no certificate chain we could read, or a client sent none.
    #[error("HBONE {side}: {peer} presented no certificate")]
    NoPeerCertificate {
        /// Which end we are.
        side: Side,
        /// The other end.
        peer: SocketAddr,
    },
    /// A handshake stage (TCP + TLS, or HTTP/2) did not finish in time.
    #[error(
        "HBONE {side}: {stage} handshake with {peer} did not finish within {after:?}; the peer is stalled or overloaded"
    )]
    HandshakeTimeout {
        /// Which end we are.
        side: Side,
        /// The other end.
        peer: SocketAddr,
        /// Which handshake stalled.
        stage: Stage,
        /// The configured limit (`Config::tls_handshake_timeout` or `h2_handshake_timeout`).
        after: Duration,
    },
    /// The server allows no concurrent streams (SETTINGS_MAX_CONCURRENT_STREAMS = 0), so no
    /// tunnel can be opened over a new connection to it.
    #[error(
        "HBONE client: {peer} allows 0 concurrent streams (SETTINGS_MAX_CONCURRENT_STREAMS = 0); no tunnel can be opened to it"
    )]
    NoStreamCapacity {
        /// The server.
        peer: SocketAddr,
    },
    /// The server did not answer a CONNECT within `Config::connect_timeout`; the stream was reset.
    #[error("HBONE client: {peer} did not answer CONNECT {authority} within {after:?}")]
    ConnectTimeout {
        /// The server.
        peer: SocketAddr,
        /// The authority asked for.
        authority: String,
        /// The configured limit.
        after: Duration,
    },
    /// The accepted socket's addresses could not be read (it was reset before we looked at it).
    #[error("HBONE server: cannot read the {which} address of an accepted connection: {source}")]
    SocketAddress {
        /// "peer" or "local".
        which: &'static str,
        /// The socket error.
        #[source]
        source: std::io::Error,
    },
    /// The HTTP/2 connection preface or SETTINGS exchange failed.
    #[error("HBONE {side}: HTTP/2 handshake with {peer} failed: {source}")]
    H2Handshake {
        /// Which end we are.
        side: Side,
        /// The other end.
        peer: SocketAddr,
        /// The HTTP/2 error.
        #[source]
        source: Http2Error,
    },
    /// Caller-supplied code (the dialer's TLS config lookup) failed.
    #[error("HBONE client: no TLS configuration for the connection to {peer}: {source}")]
    TlsConfig {
        /// The peer we were about to dial.
        peer: SocketAddr,
        /// The caller's error.
        #[source]
        source: BoxError,
    },
    /// The server answered the CONNECT with a status other than 200.
    #[error("HBONE client: {peer} refused CONNECT {authority} with HTTP {status}")]
    Status {
        /// The server.
        peer: SocketAddr,
        /// The authority asked for.
        authority: String,
        /// The status the server answered.
        status: http::StatusCode,
    },
    /// The CONNECT stream failed before it was established (reset, connection lost).
    #[error("HBONE client: CONNECT {authority} to {peer} failed: {source}")]
    Stream {
        /// The server.
        peer: SocketAddr,
        /// The authority asked for.
        authority: String,
        /// The HTTP/2 error.
        #[source]
        source: Http2Error,
    },
    /// The tunnel was accepted, but the client's first bytes that did not go with the CONNECT
    /// could not be sent after it ([`crate::Pool::connect_with_data`]).
    #[error(
        "HBONE client: sending the first bytes on CONNECT {authority} to {peer} failed: {source}"
    )]
    FirstBytes {
        /// The server.
        peer: SocketAddr,
        /// The authority asked for.
        authority: String,
        /// Why the stream could not carry them.
        #[source]
        source: std::io::Error,
    },
    /// Another task's dial for the same pool key, which this call waited for, failed.
    #[error("HBONE client: connection to {peer} failed: {reason}")]
    SharedDial {
        /// The peer that was dialed.
        peer: SocketAddr,
        /// The dialing task's error, with its causes.
        reason: String,
    },
    /// The peer did not answer a keepalive PING in time; the connection was closed.
    #[error(
        "HBONE {side}: {peer} did not answer a keepalive PING within {after:?}; connection closed"
    )]
    KeepaliveTimeout {
        /// Which end we are.
        side: Side,
        /// The other end.
        peer: SocketAddr,
        /// The configured limit.
        after: Duration,
    },
    /// The HTTP/2 connection failed after it was established.
    #[error("HBONE {side}: connection with {peer} failed: {source}")]
    Connection {
        /// Which end we are.
        side: Side,
        /// The other end.
        peer: SocketAddr,
        /// The HTTP/2 error.
        #[source]
        source: Http2Error,
    },
    /// The connection closed right after it was established, before it could be used.
    #[error("HBONE {side}: connection with {peer} closed before it could be used")]
    ConnectionLost {
        /// Which end we are.
        side: Side,
        /// The other end.
        peer: SocketAddr,
    },
}

/// Which handshake of a new HBONE connection an error concerns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Stage {
    /// TCP connect (client) and the TLS handshake.
    Tls,
    /// The HTTP/2 preface and SETTINGS (and, on the client, the first PING round trip).
    Http2,
}

impl std::fmt::Display for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Stage::Tls => "TLS",
            Stage::Http2 => "HTTP/2",
        })
    }
}

/// Which end of an HBONE connection reports an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The end that dials and sends CONNECT.
    Client,
    /// The end that accepts and answers CONNECT.
    Server,
}

impl std::fmt::Display for Side {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Side::Client => "client",
            Side::Server => "server",
        })
    }
}

impl Error {
    /// The HTTP status a server answered, if this is a refused CONNECT.
    pub fn status(&self) -> Option<http::StatusCode> {
        match self {
            Error::Status { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// An HTTP/2 failure on an HBONE connection or stream: a reset, a GOAWAY, a protocol violation,
/// or the socket failing. Opaque; ask it with the `is_*` methods.
#[derive(Debug, Clone)]
pub struct Http2Error(pub(crate) Failure);

impl Http2Error {
    /// The stream was reset (RST_STREAM), by the peer or by us.
    pub fn is_reset(&self) -> bool {
        matches!(self.0, Failure::Reset { .. })
    }

    /// The connection is going away (GOAWAY), or the stream was beyond the peer's GOAWAY.
    pub fn is_go_away(&self) -> bool {
        matches!(self.0, Failure::GoAway { .. })
    }

    /// The peer broke the HTTP/2 protocol (we closed the connection with GOAWAY).
    pub fn is_protocol(&self) -> bool {
        matches!(self.0, Failure::Protocol { .. })
    }

    /// The socket failed or was closed.
    pub fn is_io(&self) -> bool {
        matches!(self.0, Failure::Io { .. })
    }

    /// The HTTP/2 error code of a reset, GOAWAY or protocol error (RFC 9113 §7).
    pub fn code(&self) -> Option<u32> {
        match &self.0 {
            Failure::Reset { reason, .. }
            | Failure::GoAway { reason, .. }
            | Failure::Protocol { reason, .. } => Some(reason.0),
            Failure::Io { .. } => None,
        }
    }
}

impl std::fmt::Display for Http2Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for Http2Error {}

impl From<Failure> for Http2Error {
    fn from(f: Failure) -> Self {
        Http2Error(f)
    }
}
