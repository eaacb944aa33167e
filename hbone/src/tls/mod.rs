//! Our TLS 1.3 record layer. rustls does the handshake (its unbuffered API) and keeps the key
//! schedule afterwards (`rustls::kernel::KernelConnection`: key updates, session tickets); we seal
//! and open the application records ourselves, in place in our own buffers.
//!
//! Why: through `tokio-rustls` every received byte was copied three times in user space (into
//! rustls's deframer, into its plaintext queue, into the caller's buffer) and every record went
//! through rustls's general message machinery. Here the HTTP/2 connection's reads go straight
//! into its own frame buffer and each record is opened where it lies, its plaintext moved down
//! over the record headers and tags while it is decrypted (ring) or just after (aws-lc):
//! `Io::poll_read_into`; only the part of a record that a read leaves unfinished is
//! copied. A write is copied once into the record buffer and sealed there (BENCHMARKS.md,
//! issue 12, levers 19 and 21). `AsyncRead` works too, with one copy to the caller's buffer.
//!
//! What the layer does after the handshake, per RFC 8446:
//! - application data records (inner type 23), with padding stripped, up to 2^14 bytes each;
//! - alerts: `close_notify` ends the stream (reads return end of file), `user_canceled` is
//!   ignored, any other alert fails the stream with its description;
//! - post-handshake messages: `NewSessionTicket` (client side; rustls stores it for resumption),
//!   `KeyUpdate` (the receive key moves on; when the peer asks, we answer with our own);
//! - our send key moves on (a `KeyUpdate` of ours) before the suite's confidentiality limit;
//! - `shutdown` sends `close_notify` before the TCP FIN; a connection that ends without one is an
//!   error (`UnexpectedEof`), as it was with rustls.
//!
//! Anything else (a record too long, a bad tag, an unknown content type, a plaintext record after
//! the handshake, a handshake message we do not expect) fails the stream with `InvalidData`, after
//! the fatal alert RFC 8446 §6 names for it is sent (best effort: what the socket takes at once).
//! As rustls does, a peer may have at most one KeyUpdate answer of ours pending and may send at
//! most 32 KeyUpdates, or 32 empty records, in a row without data between them.
//!
//! Files: `aead` (the AEAD and which implementation this CPU runs fastest), `keys` (one
//! direction's key and sequence number; rustls's key schedule), `handshake` (rustls driven one
//! record at a time, then the handover), `stream` (the connection after the handshake and its
//! write side), `read` (its read side), `fuzz` (the fuzz targets' bodies).

use std::io;

mod aead;
mod capture;
#[cfg(any(test, feature = "fuzzing"))]
mod fuzz;
mod handshake;
mod keys;
mod moved;
mod read;
mod schedule;
mod stream;
#[cfg(test)]
mod tests;

pub use capture::traffic_secret_log;

/// The test certificate's configurations, logging their secrets so connections can move.
#[cfg(test)]
pub(crate) fn movable_test_configs() -> (
    std::sync::Arc<rustls::ServerConfig>,
    std::sync::Arc<rustls::ClientConfig>,
) {
    let (server, client) = fuzz::fuzz_configs();
    let mut server = (*server).clone();
    server.key_log = traffic_secret_log();
    let mut client = (*client).clone();
    client.key_log = traffic_secret_log();
    (std::sync::Arc::new(server), std::sync::Arc::new(client))
}
#[cfg(feature = "fuzzing")]
pub use fuzz::{HandshakeProgress, fuzz_tls_handshake, fuzz_tls_records};
pub(crate) use handshake::{NotTls13, accept, connect};
pub use moved::TlsState;
pub(crate) use stream::{Sizes, TlsStream};

const HEADER_LEN: usize = 5;
const TAG_LEN: usize = 16;
/// The largest plaintext of one record (RFC 8446 §5.1).
const MAX_PLAINTEXT: usize = 1 << 14;
/// The largest protected record body: plaintext, content type, padding and tag (RFC 8446 §5.2).
const MAX_CIPHERTEXT: usize = MAX_PLAINTEXT + 256;
/// A whole record at most.
pub(crate) const MAX_RECORD: usize = HEADER_LEN + MAX_CIPHERTEXT;
/// The smallest read asked of the socket.
const READ_MIN: usize = 16 * 1024;
/// Reads that a new buffer of `poll_read_into` has room for during a burst: what is left unread
/// when a buffer fills (the start of the next frame and record) is copied to the next one.
const READS_PER_BUFFER: usize = 4;
/// Buffers larger than this are freed when they empty, so a quiet connection keeps little.
const KEEP: usize = MAX_RECORD;
/// Post-handshake messages may span records; more than this pending is refused.
const MAX_HANDSHAKE_PENDING: usize = 64 * 1024;

const CHANGE_CIPHER_SPEC: u8 = 20;
const ALERT: u8 = 21;
const HANDSHAKE: u8 = 22;
const APPLICATION_DATA: u8 = 23;

const NEW_SESSION_TICKET: u8 = 4;
const KEY_UPDATE: u8 = 24;

const ALERT_CLOSE_NOTIFY: u8 = 0;
const ALERT_USER_CANCELED: u8 = 90;

/// The fatal alerts we send (RFC 8446 §6.2).
const ALERT_UNEXPECTED_MESSAGE: u8 = 10;
const ALERT_BAD_RECORD_MAC: u8 = 20;
const ALERT_RECORD_OVERFLOW: u8 = 22;
const ALERT_ILLEGAL_PARAMETER: u8 = 47;
const ALERT_DECODE_ERROR: u8 = 50;

/// KeyUpdates the peer may send between two records of data, as rustls (and BoringSSL) allow: a
/// KeyUpdate costs a key derivation each, and nothing else moves meanwhile.
const MAX_KEY_UPDATES_IN_A_ROW: u8 = 32;
/// Empty data records the peer may send in a row, as rustls allows.
const MAX_EMPTY_RECORDS_IN_A_ROW: u8 = 32;

/// A rustls error as the I/O error tokio-rustls gave (kind `InvalidData`, the rustls error inside).
fn tls_error(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

fn eof_without_close_notify() -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        "peer closed connection without sending TLS close_notify",
    )
}

fn invalid(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// The peer broke the record protocol: we answer with a fatal `alert` before closing, as RFC
/// 8446 §5.2 and §6 require (and rustls does).
#[derive(Debug)]
struct Fatal {
    alert: u8,
    what: String,
}

impl std::fmt::Display for Fatal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.what)
    }
}

impl std::error::Error for Fatal {}

fn fatal(alert: u8, what: impl Into<String>) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        Fatal {
            alert,
            what: what.into(),
        },
    )
}

/// The alert a read error calls for, if it is one of the peer's making.
fn alert_for(e: &io::Error) -> Option<u8> {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<Fatal>())
        .map(|f| f.alert)
}

/// Where the first whole record of `buf` ends, if it holds one.
fn record_end(buf: &[u8]) -> Option<usize> {
    let header = buf.get(..HEADER_LEN)?;
    let end = HEADER_LEN + usize::from(u16::from_be_bytes([header[3], header[4]]));
    (end <= buf.len()).then_some(end)
}
