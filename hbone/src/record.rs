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

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use aws_lc_rs::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};
use bytes::{Buf, BytesMut};
use rustls::client::{ClientConnectionData, UnbufferedClientConnection};
use rustls::kernel::KernelConnection;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::server::{ServerConnectionData, UnbufferedServerConnection};
use rustls::unbuffered::{ConnectionState, EncodeError, UnbufferedStatus};
use rustls::{ClientConfig, ConnectionTrafficSecrets, ServerConfig};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

use crate::wire::conn::Io;

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

thread_local! {
    /// The last large write buffer that emptied on this thread, for the next bulk write of any
    /// connection here: a bulk sender empties and refills its buffer thousands of times a second,
    /// and allocating it anew each time took the allocator's large-size path (BENCHMARKS.md,
    /// issue 12, lever 32). A thread keeps at most one; connections keep none while they wait.
    static SPARE_WBUF: std::cell::Cell<Vec<u8>> = const { std::cell::Cell::new(Vec::new()) };
}

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

/// Which implementation of the record AEAD (AES-GCM, ChaCha20-Poly1305) a connection uses.
///
/// Both are correct everywhere; they differ in speed by CPU. aws-lc has an AVX-512 AES-GCM that
/// ring lacks; ring has a VAES-AVX2 AES-GCM that aws-lc lacks, 1.8x the speed of aws-lc's AES-NI
/// code on CPUs with VAES but without AVX-512 (BENCHMARKS.md, issue 12, lever 20). So: aws-lc on
/// x86-64 with AVX-512 VAES and on other architectures, ring on x86-64 without AVX-512.
/// `HBONE_TLS_AEAD=ring` or `=aws-lc` overrides the choice (for measurements).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AeadImpl {
    AwsLc,
    Ring,
}

/// The implementation this process uses, chosen once.
pub(crate) fn aead_impl() -> AeadImpl {
    static CHOICE: std::sync::OnceLock<AeadImpl> = std::sync::OnceLock::new();
    *CHOICE.get_or_init(|| {
        match std::env::var("HBONE_TLS_AEAD").as_deref() {
            Ok("ring") => return AeadImpl::Ring,
            Ok("aws-lc") => return AeadImpl::AwsLc,
            Ok(other) => tracing::warn!(
                value = other,
                "HBONE_TLS_AEAD: expected ring or aws-lc; choosing by CPU"
            ),
            Err(_) => {}
        }
        by_cpu()
    })
}

#[cfg(target_arch = "x86_64")]
fn by_cpu() -> AeadImpl {
    if std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512bw")
        && std::arch::is_x86_feature_detected!("avx512vl")
        && std::arch::is_x86_feature_detected!("vaes")
        && std::arch::is_x86_feature_detected!("vpclmulqdq")
    {
        AeadImpl::AwsLc
    } else {
        AeadImpl::Ring
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn by_cpu() -> AeadImpl {
    AeadImpl::AwsLc
}

/// One direction's AEAD key.
#[expect(
    clippy::large_enum_variant,
    reason = "ring's key holds its AES key schedule inline; one per direction per connection, \
              read on every record, so no box"
)]
enum Cipher {
    AwsLc(LessSafeKey),
    Ring(ring::aead::LessSafeKey),
}

impl Cipher {
    fn seal(
        &self,
        nonce: [u8; 12],
        aad: [u8; HEADER_LEN],
        in_out: &mut [u8],
    ) -> io::Result<[u8; TAG_LEN]> {
        let failed = || invalid("TLS: sealing a record failed");
        let mut out = [0u8; TAG_LEN];
        match self {
            Cipher::AwsLc(k) => {
                let tag = k
                    .seal_in_place_separate_tag(
                        Nonce::assume_unique_for_key(nonce),
                        Aad::from(aad),
                        in_out,
                    )
                    .map_err(|_| failed())?;
                out.copy_from_slice(tag.as_ref());
            }
            Cipher::Ring(k) => {
                let tag = k
                    .seal_in_place_separate_tag(
                        ring::aead::Nonce::assume_unique_for_key(nonce),
                        ring::aead::Aad::from(aad),
                        in_out,
                    )
                    .map_err(|_| failed())?;
                out.copy_from_slice(tag.as_ref());
            }
        }
        Ok(out)
    }

    /// Opens the ciphertext and tag at `buf[src..]`; the plaintext goes to the start of `buf`
    /// (ring moves it there while decrypting; aws-lc opens in place and moves it after).
    fn open_within(
        &self,
        nonce: [u8; 12],
        aad: [u8; HEADER_LEN],
        buf: &mut [u8],
        src: usize,
    ) -> io::Result<usize> {
        let failed = || {
            fatal(
                ALERT_BAD_RECORD_MAC,
                "TLS: a record failed authentication (bad_record_mac)",
            )
        };
        match self {
            Cipher::AwsLc(k) => k
                .open_within(
                    Nonce::assume_unique_for_key(nonce),
                    Aad::from(aad),
                    buf,
                    src..,
                )
                .map(|p| p.len())
                .map_err(|_| failed()),
            Cipher::Ring(k) => k
                .open_within(
                    ring::aead::Nonce::assume_unique_for_key(nonce),
                    ring::aead::Aad::from(aad),
                    buf,
                    src..,
                )
                .map(|p| p.len())
                .map_err(|_| failed()),
        }
    }
}

/// One direction's key, IV and record sequence number.
struct Keys {
    cipher: Cipher,
    iv: [u8; 12],
    seq: u64,
}

impl Keys {
    fn new((seq, secrets): (u64, ConnectionTrafficSecrets)) -> io::Result<Keys> {
        Keys::with(aead_impl(), (seq, secrets))
    }

    fn with(which: AeadImpl, (seq, secrets): (u64, ConnectionTrafficSecrets)) -> io::Result<Keys> {
        let (aws, ring_alg, key, iv) = match &secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => {
                (&aead::AES_128_GCM, &ring::aead::AES_128_GCM, key, iv)
            }
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => {
                (&aead::AES_256_GCM, &ring::aead::AES_256_GCM, key, iv)
            }
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => (
                &aead::CHACHA20_POLY1305,
                &ring::aead::CHACHA20_POLY1305,
                key,
                iv,
            ),
            other => {
                return Err(invalid(format!(
                    "TLS record layer: unsupported traffic secrets {:?}",
                    std::mem::discriminant(other)
                )));
            }
        };
        let wrong_key = || invalid("TLS record layer: a traffic key of the wrong length");
        let cipher = match which {
            AeadImpl::AwsLc => Cipher::AwsLc(LessSafeKey::new(
                UnboundKey::new(aws, key.as_ref()).map_err(|_| wrong_key())?,
            )),
            AeadImpl::Ring => Cipher::Ring(ring::aead::LessSafeKey::new(
                ring::aead::UnboundKey::new(ring_alg, key.as_ref()).map_err(|_| wrong_key())?,
            )),
        };
        let iv = iv
            .as_ref()
            .try_into()
            .map_err(|_| invalid("TLS record layer: a traffic IV of the wrong length"))?;
        Ok(Keys { cipher, iv, seq })
    }

    /// The nonce of the next record (RFC 8446 §5.3), counting it.
    fn next_nonce(&mut self) -> io::Result<[u8; 12]> {
        let mut nonce = self.iv;
        for (n, s) in nonce[4..].iter_mut().zip(self.seq.to_be_bytes()) {
            *n ^= s;
        }
        self.seq = self
            .seq
            .checked_add(1)
            .ok_or_else(|| invalid("TLS record sequence number exhausted"))?;
        Ok(nonce)
    }
}

/// rustls's side of the connection after the handshake.
enum Kernel {
    Client(KernelConnection<ClientConnectionData>),
    Server(KernelConnection<ServerConnectionData>),
}

impl Kernel {
    fn update_tx(&mut self) -> Result<(u64, ConnectionTrafficSecrets), rustls::Error> {
        match self {
            Kernel::Client(k) => k.update_tx_secret(),
            Kernel::Server(k) => k.update_tx_secret(),
        }
    }

    fn update_rx(&mut self) -> Result<(u64, ConnectionTrafficSecrets), rustls::Error> {
        match self {
            Kernel::Client(k) => k.update_rx_secret(),
            Kernel::Server(k) => k.update_rx_secret(),
        }
    }

    fn confidentiality_limit(&self) -> u64 {
        let suite = match self {
            Kernel::Client(k) => k.negotiated_cipher_suite(),
            Kernel::Server(k) => k.negotiated_cipher_suite(),
        };
        suite
            .tls13()
            .map_or(u64::MAX, |s| s.common.confidentiality_limit)
    }
}

/// A TLS 1.3 connection after its handshake: an `AsyncRead + AsyncWrite` byte stream over `T`.
pub(crate) struct TlsStream<T> {
    io: T,
    kernel: Kernel,
    tx: Keys,
    rx: Keys,
    /// Records the send key may protect before it must move on.
    tx_limit: u64,
    /// Received bytes: `rbuf[plain.0..plain.1]` is opened application data not yet read,
    /// `rbuf[rpos..]` is what has not been opened yet.
    rbuf: BytesMut,
    rpos: usize,
    plain: (usize, usize),
    /// Sealed records not yet written, from `wpos`.
    wbuf: Vec<u8>,
    wpos: usize,
    /// Sealed bytes beyond which writes wait for the socket (a write is taken whole if it goes
    /// less than a record over).
    write_limit: usize,
    /// The most one read from the socket asks for, during a burst.
    read_size: usize,
    /// The last read filled the buffer: the next one may ask for `read_size`.
    burst: bool,
    /// The unfinished record at the end of the last `poll_read_into`, split off the reader's
    /// buffer (it still shares that buffer's allocation, so it can rejoin it without a copy).
    pending: BytesMut,
    /// A post-handshake message that continues in the next record.
    handshake: Vec<u8>,
    /// The peer sent `close_notify`.
    read_closed: bool,
    /// A KeyUpdate we sent because the peer asked is still queued (not yet written): a
    /// further request gets no answer of its own (RFC 8446 §4.6.3: one update answers all the
    /// requests made while we were silent; rustls keeps at most one pending too).
    answer_pending: bool,
    /// KeyUpdates received since the last record of data (`MAX_KEY_UPDATES_IN_A_ROW`).
    key_updates_in_a_row: u8,
    /// Empty data records received in a row (`MAX_EMPTY_RECORDS_IN_A_ROW`).
    empty_in_a_row: u8,
    /// We sent `close_notify`.
    write_closed: bool,
    /// Why the stream failed, for every later call.
    failed: Option<(io::ErrorKind, String)>,
    peer_certificates: Arc<[CertificateDer<'static>]>,
    alpn: Option<Vec<u8>>,
    version: Option<rustls::ProtocolVersion>,
}

/// Buffer sizes of a [`TlsStream`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct Sizes {
    /// The most one read from the socket asks for during a burst (at least one record). A read
    /// after a pause asks for one record's worth, so a small message needs no large buffer.
    pub(crate) read_size: usize,
    /// Sealed bytes that may wait for the socket before writes wait (at least two records).
    pub(crate) write_limit: usize,
}

/// What the handshake left for the record layer.
struct Handshaken {
    secrets: rustls::ExtractedSecrets,
    kernel: Kernel,
    /// Records received after the handshake's last message, not yet opened.
    leftover: Vec<u8>,
    /// Application data rustls already opened (it arrived with the handshake's last flight).
    early_plain: Vec<u8>,
    peer_certificates: Arc<[CertificateDer<'static>]>,
    alpn: Option<Vec<u8>>,
    version: Option<rustls::ProtocolVersion>,
}

/// The unbuffered connection types of both sides, for one handshake loop.
trait Unbuffered {
    type Data;
    fn process<'c, 'i>(
        &'c mut self,
        incoming: &'i mut [u8],
    ) -> UnbufferedStatus<'c, 'i, Self::Data>;
    fn common(&self) -> &rustls::CommonState;
}

impl Unbuffered for UnbufferedClientConnection {
    type Data = ClientConnectionData;
    fn process<'c, 'i>(
        &'c mut self,
        incoming: &'i mut [u8],
    ) -> UnbufferedStatus<'c, 'i, ClientConnectionData> {
        self.process_tls_records(incoming)
    }
    fn common(&self) -> &rustls::CommonState {
        self
    }
}

impl Unbuffered for UnbufferedServerConnection {
    type Data = ServerConnectionData;
    fn process<'c, 'i>(
        &'c mut self,
        incoming: &'i mut [u8],
    ) -> UnbufferedStatus<'c, 'i, ServerConnectionData> {
        self.process_tls_records(incoming)
    }
    fn common(&self) -> &rustls::CommonState {
        self
    }
}

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

enum Step {
    /// Ask rustls for its next state.
    Continue,
    /// Send what was encoded (one flight, one write).
    Transmit,
    Read,
    Done,
    Failed(rustls::Error),
}

/// Drives `conn` through the handshake over `io`, starting with `first` (bytes already read).
/// Returns the bytes received after the handshake's last message and any application data
/// rustls opened on the way.
///
/// rustls is given one more record at a time (with those of a message it has begun), and none once
/// the handshake is complete, so it never reads past the handshake's last message: what follows
/// (data, a KeyUpdate, a ticket) is the record layer's. A record not wholly here is given as far
/// as it goes (rustls refuses a bad header at once, and can act on nothing else of it); where the next record starts is counted
/// from the record headers (`given`), never from how much rustls was given, which may end
/// inside a record. (Given all it had, rustls would act on a KeyUpdate that came right behind the
/// peer's Finished: it moves its own key on at once and queues the answer for its next data
/// record, which never comes; the handover drops it, and our records would be sealed with a key
/// the peer never heard of.)
///
/// With `slots`, rustls works on the peer's bytes only while holding one of its permits, and
/// lets go of it before waiting for the peer again: the permits bound the handshakes computed at
/// once, and a peer that sends slowly, or nothing, holds none (slowloris).
async fn handshake<C: Unbuffered, T: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut C,
    io: &mut T,
    first: &[u8],
    slots: Option<&tokio::sync::Semaphore>,
) -> io::Result<(Vec<u8>, Vec<u8>)> {
    let mut incoming = vec![0u8; READ_MIN.max(first.len())];
    incoming[..first.len()].copy_from_slice(first);
    let mut used = first.len();
    let mut permit = None;
    // The end of the records rustls has been given whole (those it has not discarded yet).
    let mut given = 0;
    let mut outgoing: Vec<u8> = Vec::new();
    let mut early_plain = Vec::new();
    loop {
        if permit.is_none()
            && used > 0
            && let Some(slots) = slots
        {
            permit = Some(
                slots
                    .acquire()
                    .await
                    .map_err(|_| io::Error::other("the handshake slots are closed"))?,
            );
        }
        // rustls keeps the records of a message it has not finished (up to `given`, at the
        // front); it gets those and the next record: whole, or what there is of it. Behind a
        // whole one, a record not wholly here is given too (rustls can act on none of it, but
        // refuses a bad header at once, as it does given everything).
        let whole = record_end(&incoming[given..used]).map(|end| given + end);
        let fed = if conn.common().is_handshaking() {
            match whole {
                Some(end) if record_end(&incoming[end..used]).is_some() => end,
                _ => used,
            }
        } else {
            // Done: rustls may still have a flight to send (our Finished, its tickets), but
            // every record left is the record layer's.
            given
        };
        let UnbufferedStatus { mut discard, state } = conn.process(&mut incoming[..fed]);

        let step = match state {
            Err(e) => Step::Failed(e),
            Ok(ConnectionState::EncodeTlsData(mut s)) => {
                let start = outgoing.len();
                outgoing.resize(start + 4096, 0);
                let encoded = match s.encode(&mut outgoing[start..]) {
                    Err(EncodeError::InsufficientSize(need)) => {
                        outgoing.resize(start + need.required_size, 0);
                        s.encode(&mut outgoing[start..])
                    }
                    other => other,
                };
                match encoded {
                    Ok(n) => {
                        outgoing.truncate(start + n);
                        Step::Continue
                    }
                    Err(e) => {
                        outgoing.truncate(start);
                        Step::Failed(rustls::Error::General(format!(
                            "encoding a handshake record: {e}"
                        )))
                    }
                }
            }
            Ok(ConnectionState::TransmitTlsData(s)) => {
                s.done();
                Step::Transmit
            }
            Ok(ConnectionState::BlockedHandshake) => Step::Read,
            Ok(ConnectionState::ReadTraffic(mut r)) => {
                let mut failed = None;
                while let Some(record) = r.next_record() {
                    match record {
                        Ok(record) => {
                            discard += record.discard;
                            early_plain.extend_from_slice(record.payload);
                        }
                        Err(e) => {
                            failed = Some(e);
                            break;
                        }
                    }
                }
                match failed {
                    Some(e) => Step::Failed(e),
                    None => Step::Continue,
                }
            }
            Ok(ConnectionState::WriteTraffic(_)) => Step::Done,
            Ok(ConnectionState::ReadEarlyData(_)) => Step::Failed(rustls::Error::General(
                "early data offered, but not enabled".into(),
            )),
            Ok(ConnectionState::PeerClosed) | Ok(ConnectionState::Closed) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the peer closed the TLS connection during the handshake",
                ));
            }
            Ok(_) => Step::Failed(rustls::Error::General(
                "an unknown state of the TLS handshake".into(),
            )),
        };
        // What rustls holds of what it was given: each call must give it at least that again.
        let held = fed.saturating_sub(discard);
        incoming.copy_within(discard..used, 0);
        used -= discard;
        // rustls discards whole records only, and none it was given a part of.
        if fed > given {
            given = whole.unwrap_or(given);
        }
        given = given.saturating_sub(discard);
        // A server that may send before the client's Finished (no client authentication, half-RTT
        // data allowed) is still waiting for it: the record layer takes over only after the whole
        // handshake.
        let step = match step {
            Step::Done if conn.common().is_handshaking() => Step::Read,
            other => other,
        };
        if matches!(step, Step::Transmit | Step::Read | Step::Done) {
            // About to wait on the socket: the slot goes to the next connection meanwhile.
            permit = None;
        }
        // A flight goes out before we wait for the peer's answer, and before we hand over.
        if matches!(step, Step::Transmit | Step::Read | Step::Done) && !outgoing.is_empty() {
            io.write_all(&outgoing).await?;
            outgoing.clear();
        }
        match step {
            Step::Continue | Step::Transmit => {}
            Step::Read => {
                if record_end(&incoming[given..used]).is_some() {
                    // rustls wants more, and a whole record it has not seen is here.
                    continue;
                }
                if used == incoming.len() {
                    if incoming.len() >= MAX_HANDSHAKE_PENDING + MAX_RECORD {
                        return Err(invalid("a TLS handshake message too long"));
                    }
                    incoming.resize(incoming.len() * 2, 0);
                }
                let n = io.read(&mut incoming[used..]).await?;
                if n == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "tls handshake eof",
                    ));
                }
                used += n;
            }
            Step::Done => {
                incoming.truncate(used);
                return Ok((incoming, early_plain));
            }
            Step::Failed(e) => {
                // Send the alert rustls queued for the peer, best effort. rustls is given again
                // what it holds (given less, it would panic on its own record of how far it got).
                let UnbufferedStatus { state, .. } = conn.process(&mut incoming[..held]);
                if let Ok(ConnectionState::EncodeTlsData(mut s)) = state {
                    let mut alert = vec![0u8; 64];
                    if let Ok(n) = s.encode(&mut alert) {
                        outgoing.extend_from_slice(&alert[..n]);
                    }
                }
                if !outgoing.is_empty() {
                    let _ = io.write_all(&outgoing).await;
                    let _ = io.flush().await;
                }
                return Err(tls_error(e));
            }
        }
    }
}

fn session_facts(
    common: &rustls::CommonState,
) -> (
    Arc<[CertificateDer<'static>]>,
    Option<Vec<u8>>,
    Option<rustls::ProtocolVersion>,
) {
    (
        common.peer_certificates().unwrap_or_default().into(),
        common.alpn_protocol().map(<[u8]>::to_vec),
        common.protocol_version(),
    )
}

/// With secret extraction enabled: the record layer needs the traffic keys. The configuration is
/// copied (its caches and resolvers are shared) only when the caller's lacks it.
fn client_config_with_secrets(config: Arc<ClientConfig>) -> Arc<ClientConfig> {
    if config.enable_secret_extraction {
        return config;
    }
    let mut c = (*config).clone();
    c.enable_secret_extraction = true;
    Arc::new(c)
}

fn server_config_with_secrets(config: Arc<ServerConfig>) -> Arc<ServerConfig> {
    if config.enable_secret_extraction {
        return config;
    }
    let mut c = (*config).clone();
    c.enable_secret_extraction = true;
    Arc::new(c)
}

/// The handshake ended in a version other than TLS 1.3, whose records this layer does not speak.
#[derive(Debug)]
pub(crate) struct NotTls13(pub(crate) Option<rustls::ProtocolVersion>);

impl std::fmt::Display for NotTls13 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "negotiated {:?}, not TLS 1.3", self.0)
    }
}

impl std::error::Error for NotTls13 {}

fn require_tls13(common: &rustls::CommonState) -> io::Result<()> {
    match common.protocol_version() {
        Some(rustls::ProtocolVersion::TLSv1_3) => Ok(()),
        other => Err(io::Error::new(io::ErrorKind::InvalidData, NotTls13(other))),
    }
}

/// Client side: the TLS handshake over `io`, then our record layer.
pub(crate) async fn connect<T: AsyncRead + AsyncWrite + Unpin>(
    config: Arc<ClientConfig>,
    name: ServerName<'static>,
    io: T,
    sizes: Sizes,
) -> io::Result<TlsStream<T>> {
    let conn = UnbufferedClientConnection::new(client_config_with_secrets(config), name)
        .map_err(tls_error)?;
    establish(conn, io, sizes, &[], None, |c| {
        let (secrets, kernel) = c.dangerous_into_kernel_connection()?;
        Ok((secrets, Kernel::Client(kernel)))
    })
    .await
}

/// Server side: the TLS handshake over `io`, whose first bytes (`first`) the caller has read,
/// then our record layer. rustls works on the client's bytes only while it holds one of `slots`
/// (see [`handshake`]).
pub(crate) async fn accept<T: AsyncRead + AsyncWrite + Unpin>(
    config: Arc<ServerConfig>,
    io: T,
    first: &[u8],
    sizes: Sizes,
    slots: Option<&tokio::sync::Semaphore>,
) -> io::Result<TlsStream<T>> {
    let conn =
        UnbufferedServerConnection::new(server_config_with_secrets(config)).map_err(tls_error)?;
    establish(conn, io, sizes, first, slots, |c| {
        let (secrets, kernel) = c.dangerous_into_kernel_connection()?;
        Ok((secrets, Kernel::Server(kernel)))
    })
    .await
}

/// The handshake, then rustls hands the keys (`into_kernel`) to our record layer.
async fn establish<C: Unbuffered, T: AsyncRead + AsyncWrite + Unpin>(
    mut conn: C,
    mut io: T,
    sizes: Sizes,
    first: &[u8],
    slots: Option<&tokio::sync::Semaphore>,
    into_kernel: impl FnOnce(C) -> Result<(rustls::ExtractedSecrets, Kernel), rustls::Error>,
) -> io::Result<TlsStream<T>> {
    let (leftover, early_plain) = handshake(&mut conn, &mut io, first, slots).await?;
    require_tls13(conn.common())?;
    let (peer_certificates, alpn, version) = session_facts(conn.common());
    let (secrets, kernel) = into_kernel(conn).map_err(tls_error)?;
    TlsStream::new(
        io,
        Handshaken {
            secrets,
            kernel,
            leftover,
            early_plain,
            peer_certificates,
            alpn,
            version,
        },
        sizes,
    )
}

impl<T> TlsStream<T> {
    fn new(io: T, h: Handshaken, sizes: Sizes) -> io::Result<TlsStream<T>> {
        let tx_limit = h.kernel.confidentiality_limit();
        // rustls's opened application data first, then the records still to open.
        let mut rbuf = BytesMut::from(&h.early_plain[..]);
        let plain = (0, rbuf.len());
        let rpos = rbuf.len();
        rbuf.extend_from_slice(&h.leftover);
        Ok(TlsStream {
            io,
            tx: Keys::new(h.secrets.tx)?,
            rx: Keys::new(h.secrets.rx)?,
            kernel: h.kernel,
            tx_limit,
            rbuf,
            rpos,
            plain,
            wbuf: Vec::new(),
            wpos: 0,
            write_limit: sizes.write_limit.max(2 * MAX_RECORD),
            read_size: sizes.read_size.max(MAX_RECORD),
            burst: false,
            pending: BytesMut::new(),
            handshake: Vec::new(),
            read_closed: false,
            answer_pending: false,
            key_updates_in_a_row: 0,
            empty_in_a_row: 0,
            write_closed: false,
            failed: None,
            peer_certificates: h.peer_certificates,
            alpn: h.alpn,
            version: h.version,
        })
    }

    /// The certificates the peer presented, its own first.
    pub(crate) fn peer_certificates(&self) -> &Arc<[CertificateDer<'static>]> {
        &self.peer_certificates
    }

    /// The negotiated ALPN protocol.
    pub(crate) fn alpn_protocol(&self) -> Option<&[u8]> {
        self.alpn.as_deref()
    }

    /// The negotiated TLS version.
    pub(crate) fn protocol_version(&self) -> Option<rustls::ProtocolVersion> {
        self.version
    }

    #[cfg(test)]
    fn set_tx_limit(&mut self, limit: u64) {
        self.tx_limit = limit;
    }

    fn fail(&mut self, e: io::Error) -> io::Error {
        if self.failed.is_none() {
            self.failed = Some((e.kind(), e.to_string()));
        }
        e
    }

    fn check_failed(&self) -> io::Result<()> {
        match &self.failed {
            Some((kind, msg)) => Err(io::Error::new(*kind, msg.clone())),
            None => Ok(()),
        }
    }

    /// Seals `parts` (concatenated) as one record of `inner_type` at the end of `wbuf`.
    fn seal_record(&mut self, inner_type: u8, parts: &[&[u8]]) -> io::Result<()> {
        let start = self.begin_record()?;
        for p in parts {
            self.wbuf.extend_from_slice(p);
        }
        self.end_record(start, inner_type)
    }

    /// Starts a record at the end of `wbuf` (moving our key on first if its limit is near);
    /// returns where. Its plaintext follows; [`Self::end_record`] seals it.
    fn begin_record(&mut self) -> io::Result<usize> {
        if self.tx.seq + 1 >= self.tx_limit {
            self.update_tx_key()?;
        }
        Ok(self.push_header())
    }

    /// Appends a record header whose length [`Self::end_record`] fills in; returns where.
    fn push_header(&mut self) -> usize {
        let start = self.wbuf.len();
        self.wbuf.extend_from_slice(&[APPLICATION_DATA, 3, 3, 0, 0]);
        start
    }

    /// Seals the record begun at `start`: its content type, length and tag.
    fn end_record(&mut self, start: usize, inner_type: u8) -> io::Result<()> {
        self.wbuf.push(inner_type);
        let len = self.wbuf.len() - start - HEADER_LEN + TAG_LEN;
        debug_assert!(len <= MAX_CIPHERTEXT);
        self.wbuf[start + 3..start + HEADER_LEN].copy_from_slice(&(len as u16).to_be_bytes());
        let header: [u8; HEADER_LEN] = self.wbuf[start..start + HEADER_LEN]
            .try_into()
            .expect("five bytes");
        let nonce = self.tx.next_nonce()?;
        let tag = self
            .tx
            .cipher
            .seal(nonce, header, &mut self.wbuf[start + HEADER_LEN..])?;
        self.wbuf.extend_from_slice(&tag);
        Ok(())
    }

    /// Sends a KeyUpdate (not requesting one back) and moves our send key on.
    fn update_tx_key(&mut self) -> io::Result<()> {
        // Not `begin_record`: this is what moves the key on when its limit is near.
        let start = self.push_header();
        self.wbuf.extend_from_slice(&[KEY_UPDATE, 0, 0, 1, 0]);
        self.end_record(start, HANDSHAKE)?;
        let next = self.kernel.update_tx().map_err(tls_error)?;
        self.tx = Keys::new(next)?;
        Ok(())
    }

    /// Seals the first `total` bytes of `bufs` (at most all of them) as application data records
    /// of up to 2^14 bytes each, copying them once, into `wbuf`; returns `total`.
    fn seal_data(&mut self, bufs: &[io::IoSlice<'_>], total: usize) -> io::Result<usize> {
        let records = total.div_ceil(MAX_PLAINTEXT);
        let need = total + records * (HEADER_LEN + 1 + TAG_LEN);
        if self.wbuf.capacity() == 0 && need > KEEP {
            self.wbuf = SPARE_WBUF.take();
        }
        self.wbuf.reserve(need);
        let mut taken = 0;
        // The record being filled: where it starts and how much plaintext it holds.
        let mut open: Option<(usize, usize)> = None;
        for buf in bufs {
            let mut rest: &[u8] = buf;
            while !rest.is_empty() && taken < total {
                let (start, filled) = match open {
                    Some(r) => r,
                    None => (self.begin_record()?, 0),
                };
                let n = rest.len().min(MAX_PLAINTEXT - filled).min(total - taken);
                self.wbuf.extend_from_slice(&rest[..n]);
                rest = &rest[n..];
                taken += n;
                open = if filled + n == MAX_PLAINTEXT {
                    self.end_record(start, APPLICATION_DATA)?;
                    None
                } else {
                    Some((start, filled + n))
                };
            }
        }
        if let Some((start, _)) = open {
            self.end_record(start, APPLICATION_DATA)?;
        }
        Ok(taken)
    }

    fn queued(&self) -> usize {
        self.wbuf.len() - self.wpos
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> TlsStream<T> {
    /// Fails the stream for an error met while reading; if the peer broke the protocol, first
    /// sends it the fatal alert that says how (best effort: what the socket takes now), and
    /// nothing more after it.
    fn fail_read(&mut self, e: io::Error) -> io::Error {
        if self.failed.is_none()
            && !self.write_closed
            && let Some(alert) = alert_for(&e)
        {
            self.write_closed = true;
            if self.seal_record(ALERT, &[&[2, alert]]).is_ok() {
                let _ = self.poll_write_queued(&mut Context::from_waker(std::task::Waker::noop()));
            }
        }
        self.fail(e)
    }

    /// Writes sealed records until none are left.
    fn poll_write_queued(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.wpos < self.wbuf.len() {
            let n = match ready!(Pin::new(&mut self.io).poll_write(cx, &self.wbuf[self.wpos..])) {
                Ok(0) => return Poll::Ready(Err(self.fail(io::ErrorKind::WriteZero.into()))),
                Ok(n) => n,
                Err(e) => return Poll::Ready(Err(self.fail(e))),
            };
            self.wpos += n;
        }
        self.wpos = 0;
        self.wbuf.clear();
        self.answer_pending = false;
        if self.wbuf.capacity() > KEEP {
            // Not kept by the connection; the thread's spare (replacing an older one).
            SPARE_WBUF.set(std::mem::take(&mut self.wbuf));
        }
        Poll::Ready(Ok(()))
    }

    /// Opens the record at `rpos` if it is whole, in place; `Ok(false)` if more bytes are needed.
    fn open_next(&mut self) -> io::Result<bool> {
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
    fn open_record(
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
    fn handshake_bytes(&mut self, bytes: &[u8]) -> io::Result<()> {
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
                && let Kernel::Client(k) = &mut self.kernel
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
                    let next = self.kernel.update_rx().map_err(tls_error)?;
                    self.rx = Keys::new(next)?;
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

    fn poll_read_inner(
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
    fn read_room(&self, unfinished: &[u8]) -> usize {
        let record = match unfinished.get(3..5) {
            Some(l) => HEADER_LEN + usize::from(u16::from_be_bytes([l[0], l[1]])),
            None => MAX_RECORD,
        };
        let size = if self.burst { self.read_size } else { READ_MIN };
        record.max(size).saturating_sub(unfinished.len())
    }

    /// Starts sending a KeyUpdate of ours that opening a record queued (the peer asked for it);
    /// the next flush finishes it.
    fn send_key_update(&mut self) -> io::Result<()> {
        if self.queued() > 0
            && let Poll::Ready(Err(e)) =
                self.poll_write_queued(&mut Context::from_waker(std::task::Waker::noop()))
        {
            return Err(e);
        }
        Ok(())
    }

    fn poll_read_into_inner(
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

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncWrite for TlsStream<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[io::IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.check_failed()?;
        if this.write_closed {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "TLS: write after close_notify",
            )));
        }
        if this.queued() >= this.write_limit {
            ready!(this.poll_write_queued(cx))?;
        }
        let room = this.write_limit - this.queued();
        // Less than a record over the limit is sealed too, rather than left for a write of its
        // own: a DATA frame as large as the limit and its 9-byte header (or 16 frames of 16 KiB
        // and their headers) leave in one system call, not a second one for a 9-byte record.
        let offered: usize = bufs.iter().map(|b| b.len()).sum();
        let total = if offered.saturating_sub(room) < MAX_PLAINTEXT {
            offered
        } else {
            room
        };
        let n = this.seal_data(bufs, total).map_err(|e| this.fail(e))?;
        // Out now if the socket takes it; `poll_flush` finishes the rest.
        if let Poll::Ready(Err(e)) = this.poll_write_queued(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(n))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.check_failed()?;
        ready!(this.poll_write_queued(cx))?;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.check_failed()?;
        if !this.write_closed {
            this.seal_record(ALERT, &[&[1, ALERT_CLOSE_NOTIFY]])
                .map_err(|e| this.fail(e))?;
            this.write_closed = true;
        }
        ready!(this.poll_write_queued(cx))?;
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

/// A self-signed certificate (`localhost`, valid until 2126) for the handshakes of the fuzz target
/// and of this module's tests only; it is public and trusts nothing else.
#[cfg(any(test, feature = "fuzzing"))]
const FUZZ_CERT: &[u8] = include_bytes!("fuzz_cert/cert.pem");
#[cfg(any(test, feature = "fuzzing"))]
const FUZZ_KEY: &[u8] = include_bytes!("fuzz_cert/key.pem");

/// A server presenting the certificate above (TLS 1.3, no client authentication: the record layer
/// is the same either way) and a client trusting it that offers what `client` has.
#[cfg(any(test, feature = "fuzzing"))]
fn self_signed_configs(
    client: rustls::crypto::CryptoProvider,
) -> (Arc<ServerConfig>, Arc<ClientConfig>) {
    use rustls::pki_types::PrivateKeyDer;
    use rustls::pki_types::pem::PemObject;
    let cert = CertificateDer::from_pem_slice(FUZZ_CERT).expect("the fuzz certificate");
    let key = PrivateKeyDer::from_pem_slice(FUZZ_KEY).expect("the fuzz key");
    let server = ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .expect("TLS 1.3")
    .with_no_client_auth()
    .with_single_cert(vec![cert.clone()], key)
    .expect("the fuzz certificate and key");
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert).expect("the fuzz certificate as a root");
    let client = ClientConfig::builder_with_provider(Arc::new(client))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .with_root_certificates(roots)
        .with_no_client_auth();
    (Arc::new(server), Arc::new(client))
}

#[cfg(any(test, feature = "fuzzing"))]
fn fuzz_configs() -> (Arc<ServerConfig>, Arc<ClientConfig>) {
    static CONFIGS: std::sync::OnceLock<(Arc<ServerConfig>, Arc<ClientConfig>)> =
        std::sync::OnceLock::new();
    CONFIGS
        .get_or_init(|| self_signed_configs(rustls::crypto::aws_lc_rs::default_provider()))
        .clone()
}

/// The body of the `tls_records` fuzz target: after a real handshake, a hostile peer sends our
/// record layer (client side) what `data` says, and the reader must neither panic nor hang.
///
/// `data[0]` picks the mode: bit 0 clear, the rest goes to the socket as it is (record headers,
/// lengths, content types, bad tags); bit 0 set, the rest is a script of records the peer seals
/// with the right keys (`[inner content type][length][payload]`, so alerts, post-handshake
/// messages, padding and content types are reached past the tag check; a well-formed KeyUpdate
/// also moves the peer's key on). Bit 1 set, the peer ends without `close_notify`. Bit 2 set,
/// the reader takes records opened in its own buffer (`poll_read_into`, as the HTTP/2
/// connection reads), else it reads through `AsyncRead`; both must deliver the same. Returns how
/// many bytes of application data the reader got.
#[cfg(feature = "fuzzing")]
pub fn fuzz_tls_records(data: &[u8]) -> usize {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a Tokio runtime");
    runtime.block_on(async {
        let (server_config, client_config) = fuzz_configs();
        let sizes = crate::Config::default().tls_sizes();
        let (a, b) = tokio::io::duplex(1 << 20);
        let server = tokio::spawn(accept(server_config, b, &[], sizes, None));
        let name = ServerName::try_from("localhost").expect("a DNS name");
        let mut client = connect(client_config, name, a, sizes)
            .await
            .expect("the fuzz handshake");
        let mut peer = server
            .await
            .expect("the server task")
            .expect("the fuzz handshake");
        let (mode, script) = data.split_first().unwrap_or((&0, &[]));
        let writer = async move {
            if mode & 1 == 0 {
                let _ = peer.io.write_all(script).await;
            } else {
                let mut rest = script;
                while let [kind, len, tail @ ..] = rest {
                    let n = usize::from(*len).min(tail.len());
                    let (payload, more) = tail.split_at(n);
                    rest = more;
                    let sealed = if *kind == HANDSHAKE && payload == [KEY_UPDATE, 0, 0, 1, 0] {
                        peer.update_tx_key()
                    } else {
                        peer.seal_record(*kind, &[payload])
                    };
                    if sealed.is_err() || peer.flush().await.is_err() {
                        break;
                    }
                }
            }
            if mode & 2 == 0 {
                let _ = peer.shutdown().await;
            }
        };
        let reader = async {
            let mut got = 0;
            let mut buf = [0u8; 4096];
            let mut opened_here = BytesMut::new();
            loop {
                // Bit 2 of the mode: records opened in the reader's buffer (as the HTTP/2
                // connection reads), else copied out through `AsyncRead`.
                let read = async {
                    if mode & 4 == 0 {
                        client.read(&mut buf).await
                    } else {
                        let n = std::future::poll_fn(|cx| {
                            client.poll_read_into(cx, &mut opened_here, 0)
                        })
                        .await;
                        opened_here.clear();
                        n
                    }
                };
                match tokio::time::timeout(std::time::Duration::from_secs(5), read)
                    .await
                    .expect("the record layer hung on its peer's input")
                {
                    Ok(0) | Err(_) => break,
                    Ok(n) => got += n,
                }
            }
            got
        };
        let ((), got) = tokio::join!(writer, reader);
        // A stream that ended or failed still answers writes and shutdown without panicking.
        let _ = client.write_all(b"after").await;
        let _ = client.shutdown().await;
        got
    })
}

/// How a handshake stood once a hostile client's bytes were all in (see [`fuzz_tls_handshake`]).
#[cfg(feature = "fuzzing")]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeProgress {
    /// The server refused the bytes (an error; an alert may have gone out).
    Refused,
    /// The server answered (its first flight went out) and waits for more.
    Answered,
    /// The server waits for more without having answered.
    Waiting,
}

/// The body of the `tls_handshake` fuzz target: a hostile client sends our server's handshake
/// driver what `data` says, and the driver must get exactly as far as rustls's own (buffered)
/// server given the same bytes at once: refuse what it refuses, answer what it answers, and wait
/// only where it waits (a driver that loses track of where a record starts stalls here, which a
/// client that keeps its connection open sees as a hung handshake). No panic, no hang.
///
/// `data[0]` is the mode: its low 7 bits, when not 0, are the size of the pieces the rest
/// arrives in (the driver runs between pieces); bit 7 set, the first 5 bytes are handed over as
/// already read, as our server does once it has seen a record header. The rest (at most
/// 32 KiB) is the client's bytes: records, plaintext as a ClientHello is, or not.
#[cfg(feature = "fuzzing")]
pub fn fuzz_tls_handshake(data: &[u8]) -> HandshakeProgress {
    use std::task::Waker;
    let (mode, rest) = data.split_first().unwrap_or((&0, &[]));
    let rest = &rest[..rest.len().min(32 * 1024)];
    let (server_config, _) = fuzz_configs();

    // rustls's own server, given everything at once.
    let reference = {
        let mut conn =
            rustls::ServerConnection::new(server_config_with_secrets(server_config.clone()))
                .expect("a rustls server");
        let mut input = rest;
        let mut refused = false;
        while !input.is_empty() && !refused {
            match conn.read_tls(&mut input) {
                Ok(0) => break,
                Ok(_) => refused = conn.process_new_packets().is_err(),
                Err(_) => refused = true,
            }
        }
        match (refused, conn.wants_write()) {
            (true, _) => HandshakeProgress::Refused,
            (false, true) => HandshakeProgress::Answered,
            (false, false) => HandshakeProgress::Waiting,
        }
    };

    // Ours, polled by hand between pieces: everything is in memory, so one poll runs the driver
    // until it needs bytes that are not there.
    let mut cx = Context::from_waker(Waker::noop());
    let (mut client, server_io) = tokio::io::duplex(1 << 20);
    let sizes = crate::Config::default().tls_sizes();
    let (first, rest) = if mode & 0x80 != 0 {
        rest.split_at(rest.len().min(HEADER_LEN))
    } else {
        (&[][..], rest)
    };
    let mut server = Box::pin(accept(server_config, server_io, first, sizes, None));
    let piece = match usize::from(mode & 0x7f) {
        0 => rest.len().max(1),
        n => n,
    };
    let mut outcome = Poll::Pending;
    for chunk in std::iter::once(&[][..]).chain(rest.chunks(piece)) {
        let mut written = 0;
        while written < chunk.len() {
            match Pin::new(&mut client).poll_write(&mut cx, &chunk[written..]) {
                Poll::Ready(Ok(n)) if n > 0 => written += n,
                other => panic!("the in-memory pipe refused a write: {other:?}"),
            }
        }
        outcome = server.as_mut().poll(&mut cx);
        if outcome.is_ready() {
            break;
        }
    }
    let ours = match outcome {
        Poll::Ready(Err(_)) => HandshakeProgress::Refused,
        Poll::Ready(Ok(_)) => panic!("a handshake completed with a fuzzer's bytes"),
        Poll::Pending => {
            let mut answer = [0u8; 1];
            let mut buf = ReadBuf::new(&mut answer);
            match Pin::new(&mut client).poll_read(&mut cx, &mut buf) {
                Poll::Ready(Ok(())) if !buf.filled().is_empty() => HandshakeProgress::Answered,
                _ => HandshakeProgress::Waiting,
            }
        }
    };
    assert_eq!(
        ours,
        reference,
        "our handshake driver and rustls's server disagree on {} bytes in pieces of {piece}",
        rest.len()
    );
    ours
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    use tokio::io::{DuplexStream, duplex};

    fn name() -> ServerName<'static> {
        ServerName::try_from("localhost").unwrap()
    }

    fn sizes() -> Sizes {
        crate::Config::default().tls_sizes()
    }

    /// Our client against a rustls server (tokio-rustls) over an in-memory pipe.
    async fn ours_to_rustls(
        io_ours: DuplexStream,
        io_theirs: DuplexStream,
    ) -> (
        TlsStream<DuplexStream>,
        tokio_rustls::server::TlsStream<DuplexStream>,
    ) {
        let (server, client) = fuzz_configs();
        let theirs = tokio::spawn(tokio_rustls::TlsAcceptor::from(server).accept(io_theirs));
        let ours = connect(client, name(), io_ours, sizes()).await.unwrap();
        (ours, theirs.await.unwrap().unwrap())
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31) ^ seed)
            .collect()
    }

    async fn send_and_check<A, B>(from: &mut A, to: &mut B, data: &[u8])
    where
        A: AsyncWrite + Unpin,
        B: AsyncRead + Unpin,
    {
        let (mut got, written) = tokio::join!(
            async {
                let mut got = vec![0u8; data.len()];
                to.read_exact(&mut got).await.unwrap();
                got
            },
            async {
                from.write_all(data).await.unwrap();
                from.flush().await.unwrap();
            }
        );
        let () = written;
        assert!(got == data, "{} bytes arrived changed", data.len());
        got.clear();
    }

    #[tokio::test]
    async fn data_crosses_both_ways_with_a_rustls_peer_in_records_of_every_size() {
        let (a, b) = duplex(1 << 20);
        let (mut ours, mut theirs) = ours_to_rustls(a, b).await;
        for len in [
            1,
            100,
            MAX_PLAINTEXT - 1,
            MAX_PLAINTEXT,
            MAX_PLAINTEXT + 1,
            300_000,
        ] {
            send_and_check(&mut ours, &mut theirs, &pattern(len, 1)).await;
            send_and_check(&mut theirs, &mut ours, &pattern(len, 2)).await;
        }
        // A vectored write of many slices, larger than one record.
        let parts: Vec<Vec<u8>> = (0..40).map(|i| pattern(1000 + i, i as u8)).collect();
        let slices: Vec<io::IoSlice<'_>> = parts.iter().map(|p| io::IoSlice::new(p)).collect();
        let n = std::future::poll_fn(|cx| Pin::new(&mut ours).poll_write_vectored(cx, &slices))
            .await
            .unwrap();
        let total: usize = parts.iter().map(Vec::len).sum();
        assert_eq!(n, total);
        ours.flush().await.unwrap();
        let mut got = vec![0u8; total];
        theirs.read_exact(&mut got).await.unwrap();
        assert_eq!(got, parts.concat());
    }

    #[tokio::test]
    async fn a_write_less_than_a_record_over_the_limit_is_sealed_whole() {
        let (a, b) = duplex(4 << 20);
        let (mut ours, mut theirs) = ours_to_rustls(a, b).await;
        let limit = ours.write_limit;
        let head = pattern(9, 1);
        let body = pattern(limit, 2);
        async fn write(ours: &mut TlsStream<DuplexStream>, head: &[u8], body: &[u8]) -> usize {
            let slices = [io::IoSlice::new(head), io::IoSlice::new(body)];
            std::future::poll_fn(|cx| Pin::new(&mut *ours).poll_write_vectored(cx, &slices))
                .await
                .unwrap()
        }
        // A frame header and a body of the limit: all of it, in one go.
        let n = write(&mut ours, &head, &body).await;
        assert_eq!(n, limit + 9, "the last 9 bytes were left for another write");
        // A record or more over the limit: up to the limit, as before.
        let over = pattern(limit + MAX_PLAINTEXT, 3);
        let m = write(&mut ours, &head, &over).await;
        assert_eq!(
            m, limit,
            "a write a record over the limit was not held to it"
        );
        ours.flush().await.unwrap();
        let mut got = vec![0u8; n + m];
        theirs.read_exact(&mut got).await.unwrap();
        assert_eq!(&got[..9], &head[..]);
        assert_eq!(&got[9..n], &body[..]);
        assert_eq!(&got[n..n + 9], &head[..]);
        assert_eq!(&got[n + 9..], &over[..m - 9]);
    }

    #[tokio::test]
    async fn a_bulk_writer_reuses_the_threads_spare_buffer_and_a_quiet_connection_keeps_none() {
        let (a, b) = duplex(1 << 20);
        let (mut ours, mut theirs) = ours_to_rustls(a, b).await;
        drop(SPARE_WBUF.take());
        send_and_check(&mut ours, &mut theirs, &pattern(300_000, 1)).await;
        assert_eq!(
            ours.wbuf.capacity(),
            0,
            "a quiet connection kept its write buffer"
        );
        let spare = SPARE_WBUF.take();
        assert!(
            spare.capacity() > KEEP,
            "the emptied buffer was freed, not kept as the spare"
        );
        let at = spare.as_ptr();
        SPARE_WBUF.set(spare);
        send_and_check(&mut ours, &mut theirs, &pattern(300_000, 2)).await;
        assert_eq!(ours.wbuf.capacity(), 0);
        let spare = SPARE_WBUF.take();
        assert_eq!(
            spare.as_ptr(),
            at,
            "the next bulk write allocated a buffer of its own"
        );
    }

    /// Forwards bytes in pieces of at most the given sizes, in turn (what has arrived, if less),
    /// so records arrive split anywhere (inside a header, a body, a tag) and several at once.
    async fn chop(
        mut from: impl AsyncRead + Unpin,
        mut to: impl AsyncWrite + Unpin,
        pieces: &[usize],
    ) {
        let mut buf = vec![0u8; pieces.iter().copied().max().unwrap_or(1)];
        for size in pieces.iter().cycle() {
            match from.read(&mut buf[..*size]).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if to.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            }
        }
        let _ = to.shutdown().await;
    }

    #[tokio::test]
    async fn records_opened_in_the_readers_buffer_arrive_whole_and_in_order() {
        let (ours_io, near) = duplex(1 << 20);
        let (far, theirs_io) = duplex(1 << 20);
        let (mut near_read, mut near_write) = tokio::io::split(near);
        let (far_read, mut far_write) = tokio::io::split(far);
        tokio::spawn(async move {
            let _ = tokio::io::copy(&mut near_read, &mut far_write).await;
            let _ = far_write.shutdown().await;
        });
        tokio::spawn(async move {
            chop(
                far_read,
                &mut near_write,
                &[1, 3, 7, 4096, 5, 16_389, 70_000, 2, 30_000],
            )
            .await;
        });
        let (server, client) = fuzz_configs();
        let theirs = tokio::spawn(tokio_rustls::TlsAcceptor::from(server).accept(theirs_io));
        let mut ours = connect(client, name(), ours_io, sizes()).await.unwrap();
        let mut theirs = theirs.await.unwrap().unwrap();

        let messages: Vec<Vec<u8>> = [
            1,
            100,
            MAX_PLAINTEXT,
            MAX_PLAINTEXT + 1,
            0,
            300_000,
            5,
            77_777,
        ]
        .iter()
        .enumerate()
        .map(|(i, len)| pattern(*len, i as u8))
        .collect();
        let sent = messages.concat();
        let writer = async {
            for (i, m) in messages.iter().enumerate() {
                theirs.write_all(m).await.unwrap();
                theirs.flush().await.unwrap();
                if i == 3 {
                    // A KeyUpdate in the middle (rustls asks for ours back); what follows opens
                    // only with the next key.
                    theirs.get_mut().1.refresh_traffic_keys().unwrap();
                }
            }
            theirs.shutdown().await.unwrap();
            theirs
        };
        let reader = async {
            // The reader keeps part of what it got before each read, as the HTTP/2 layer keeps
            // the start of an unfinished frame: new data is appended after it.
            let (mut taken, mut buf) = (Vec::new(), BytesMut::new());
            let mut reads = 0;
            loop {
                let n = std::future::poll_fn(|cx| ours.poll_read_into(cx, &mut buf, 0))
                    .await
                    .unwrap();
                if n == 0 {
                    break;
                }
                let keep = buf.len() / 3;
                taken.extend_from_slice(&buf.split_to(buf.len() - keep));
                reads += 1;
                if reads % 2 == 0 {
                    // Now and then the reader moves what it keeps to a new buffer: an
                    // unfinished record can no longer rejoin it in place.
                    buf = BytesMut::from(&buf[..]);
                }
            }
            taken.extend_from_slice(&buf);
            taken
        };
        let (_theirs, got) = tokio::join!(writer, reader);
        assert_eq!(got.len(), sent.len());
        assert!(got == sent, "the bytes arrived changed");
        assert!(
            ours.rbuf.is_empty(),
            "{} bytes left unopened",
            ours.rbuf.len()
        );
    }

    #[tokio::test]
    async fn key_updates_from_the_peer_and_our_own_keep_the_stream_going() {
        let (a, b) = duplex(1 << 20);
        let (mut ours, mut theirs) = ours_to_rustls(a, b).await;
        send_and_check(&mut theirs, &mut ours, b"before").await;
        // rustls asks for an update back: our receive key and then our send key move on.
        theirs.get_mut().1.refresh_traffic_keys().unwrap();
        send_and_check(&mut theirs, &mut ours, b"after their update").await;
        assert_eq!(ours.rx.seq, 1, "the receive key was not updated");
        send_and_check(&mut ours, &mut theirs, b"after our answer").await;
        assert_eq!(ours.tx.seq, 1, "the send key was not updated");
        // Our own limit: a KeyUpdate every 3 records, 10 updates in a row.
        ours.set_tx_limit(3);
        for i in 0..20u8 {
            send_and_check(&mut ours, &mut theirs, &pattern(5000, i)).await;
        }
        assert!(ours.tx.seq < 3);
        send_and_check(&mut theirs, &mut ours, b"still both ways").await;
    }

    #[tokio::test]
    async fn our_server_takes_a_rustls_client_and_its_key_updates() {
        let (server, client) = fuzz_configs();
        let (a, b) = duplex(1 << 20);
        let theirs = tokio::spawn(async move {
            tokio_rustls::TlsConnector::from(client)
                .connect(name(), b)
                .await
                .unwrap()
        });
        let mut ours = accept(server, a, &[], sizes(), None).await.unwrap();
        let mut theirs = theirs.await.unwrap();
        assert_eq!(
            ours.protocol_version(),
            Some(rustls::ProtocolVersion::TLSv1_3)
        );
        send_and_check(&mut theirs, &mut ours, &pattern(70_000, 3)).await;
        send_and_check(&mut ours, &mut theirs, &pattern(70_000, 4)).await;
        theirs.get_mut().1.refresh_traffic_keys().unwrap();
        send_and_check(&mut theirs, &mut ours, b"x").await;
        send_and_check(&mut ours, &mut theirs, b"y").await;
        // close_notify both ways: each side reads a clean end of file.
        ours.shutdown().await.unwrap();
        let mut rest = Vec::new();
        theirs.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
        theirs.shutdown().await.unwrap();
        assert_eq!(ours.read(&mut [0u8; 8]).await.unwrap(), 0);
        // Writing after our close_notify is an error, not a silent loss.
        assert!(ours.write_all(b"late").await.is_err());
    }

    #[tokio::test]
    async fn an_end_without_close_notify_is_an_error() {
        let (a, b) = duplex(1 << 20);
        let (mut ours, theirs) = ours_to_rustls(a, b).await;
        drop(theirs);
        let err = ours.read(&mut [0u8; 8]).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof, "{err}");
        // And it stays failed.
        assert!(ours.read(&mut [0u8; 8]).await.is_err());
    }

    /// Forwards bytes; while `corrupt` is set, flips a bit of what passes.
    async fn relay(
        mut from: impl AsyncRead + Unpin,
        mut to: impl AsyncWrite + Unpin,
        corrupt: Arc<AtomicBool>,
    ) {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            if corrupt.load(Ordering::SeqCst) {
                buf[n - 1] ^= 1;
            }
            if to.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    }

    #[tokio::test]
    async fn a_changed_record_fails_the_stream_and_never_reaches_the_reader() {
        let (ours_io, relay_ours) = duplex(1 << 20);
        let (relay_theirs, theirs_io) = duplex(1 << 20);
        let (from_ours, to_ours) = tokio::io::split(relay_ours);
        let (from_theirs, to_theirs) = tokio::io::split(relay_theirs);
        let corrupt = Arc::new(AtomicBool::new(false));
        tokio::spawn(relay(from_theirs, to_ours, corrupt.clone()));
        tokio::spawn(relay(from_ours, to_theirs, Arc::default()));
        let (mut ours, mut theirs) = ours_to_rustls(ours_io, theirs_io).await;
        send_and_check(&mut theirs, &mut ours, b"intact").await;
        corrupt.store(true, Ordering::SeqCst);
        theirs.write_all(b"changed on the way").await.unwrap();
        theirs.flush().await.unwrap();
        let mut buf = [0u8; 64];
        let err = ours.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
        assert!(err.to_string().contains("bad_record_mac"), "{err}");
        assert_eq!(buf, [0u8; 64], "changed bytes reached the reader");
    }

    /// Our client and our server over an in-memory pipe.
    async fn ours_to_ours() -> (TlsStream<DuplexStream>, TlsStream<DuplexStream>) {
        let (server, client) = fuzz_configs();
        let (a, b) = duplex(1 << 20);
        let server = tokio::spawn(accept(server, b, &[], sizes(), None));
        let client = connect(client, name(), a, sizes()).await.unwrap();
        (client, server.await.unwrap().unwrap())
    }

    #[tokio::test]
    async fn a_fatal_alert_from_the_peer_is_named_and_close_notify_is_a_clean_end() {
        let (mut client, mut server) = ours_to_ours().await;
        send_and_check(&mut client, &mut server, &pattern(40_000, 5)).await;
        send_and_check(&mut server, &mut client, &pattern(40_000, 6)).await;
        // bad_certificate (42), as a server that refused a certificate would send it.
        server.seal_record(ALERT, &[&[2, 42]]).unwrap();
        server.flush().await.unwrap();
        let err = client.read(&mut [0u8; 8]).await.unwrap_err();
        assert!(err.to_string().contains("BadCertificate"), "{err}");
        let (mut client, mut server) = ours_to_ours().await;
        client.shutdown().await.unwrap();
        assert_eq!(server.read(&mut [0u8; 8]).await.unwrap(), 0);
        // The other direction still works after one side's close_notify.
        send_and_check(&mut server, &mut client, b"half closed").await;
    }

    #[tokio::test]
    async fn records_that_break_the_rules_are_refused_with_the_reason() {
        for (bytes, reason) in [
            (vec![23, 3, 3, 0x48, 0x01], "at most"),
            (vec![22, 3, 3, 0, 5, 1, 2, 3, 4, 5], "content type 22"),
            (vec![20, 3, 3, 0, 1, 1], "change_cipher_spec"),
            (vec![23, 3, 3, 0, 3, 1, 2, 3], "protected record of 3 bytes"),
        ] {
            let (mut client, mut server) = ours_to_ours().await;
            server.io.write_all(&bytes).await.unwrap();
            let err = client.read(&mut [0u8; 8]).await.unwrap_err();
            assert!(err.to_string().contains(reason), "{bytes:?}: {err}");
            let _ = server.shutdown().await;
        }
    }

    #[test]
    fn both_aead_implementations_open_what_the_other_seals() {
        let secrets = |aes: bool| {
            let key = rustls::crypto::cipher::AeadKey::from([9u8; 32]);
            let iv = rustls::crypto::cipher::Iv::from([3u8; 12]);
            if aes {
                ConnectionTrafficSecrets::Aes256Gcm { key, iv }
            } else {
                ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv }
            }
        };
        for aes in [true, false] {
            for (from, to) in [
                (AeadImpl::Ring, AeadImpl::AwsLc),
                (AeadImpl::AwsLc, AeadImpl::Ring),
            ] {
                let mut sealer = Keys::with(from, (5, secrets(aes))).unwrap();
                let mut opener = Keys::with(to, (5, secrets(aes))).unwrap();
                // Opened in place, and moved down by a header, by a header and a tag, and by
                // a great deal (the plaintext goes to the start while the ciphertext lies later).
                for (len, shift) in [(0, 0), (1, 5), (1000, 21), (MAX_PLAINTEXT, 0), (4097, 5000)] {
                    let plain = pattern(len, len as u8);
                    let mut sealed = plain.clone();
                    let header = [APPLICATION_DATA, 3, 3, 0, 0];
                    let nonce = sealer.next_nonce().unwrap();
                    let tag = sealer.cipher.seal(nonce, header, &mut sealed).unwrap();
                    assert!(
                        len == 0 || sealed != plain,
                        "{from:?} left {len} bytes in the clear"
                    );
                    let mut buf = vec![0xee; shift];
                    buf.extend_from_slice(&sealed);
                    buf.extend_from_slice(&tag);
                    let nonce = opener.next_nonce().unwrap();
                    let n = opener
                        .cipher
                        .open_within(nonce, header, &mut buf, shift)
                        .unwrap();
                    assert_eq!(
                        &buf[..n],
                        &plain[..],
                        "{from:?} -> {to:?}, aes {aes}, {len} moved by {shift}"
                    );
                }
            }
        }
    }

    #[tokio::test]
    async fn handshake_messages_that_span_records_both_ways() {
        // Certificates of 40 KB each (a large extension): each side's Certificate message spans
        // three records, which rustls joins across the records it is given.
        let big = |name: &str| {
            let key = rcgen::KeyPair::generate().unwrap();
            let mut params = rcgen::CertificateParams::new(vec![name.to_owned()]).unwrap();
            params
                .custom_extensions
                .push(rcgen::CustomExtension::from_oid_content(
                    &[1, 3, 6, 1, 4, 1, 99999, 1],
                    vec![0x04; 40_000],
                ));
            let cert = params.self_signed(&key).unwrap();
            let der = rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
            (cert.der().clone(), der)
        };
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let (server_cert, server_key) = big("localhost");
        let (client_cert, client_key) = big("client");
        let mut roots = rustls::RootCertStore::empty();
        roots.add(server_cert.clone()).unwrap();
        let mut client_roots = rustls::RootCertStore::empty();
        client_roots.add(client_cert.clone()).unwrap();
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(client_roots),
            provider.clone(),
        )
        .build()
        .unwrap();
        let server = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_client_cert_verifier(verifier)
            .with_single_cert(vec![server_cert], server_key)
            .unwrap();
        let client = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_client_auth_cert(vec![client_cert], client_key)
            .unwrap();
        // Every round a full handshake, certificates and all.
        let mut client = client;
        client.resumption = rustls::client::Resumption::disabled();
        let (server, client) = (Arc::new(server), Arc::new(client));
        // Pipes of a few sizes: each read ends somewhere inside a record, so rustls is given
        // records in part, and where the next one starts must come from the record headers (a
        // stall once, when the ciphertext under a guessed header read as a short record).
        for (round, pipe) in [1 << 20, 40_000, 20_000, 12_000]
            .into_iter()
            .cycle()
            .take(32)
            .enumerate()
        {
            let (a, b) = duplex(pipe);
            let server = tokio::spawn(accept(server.clone(), b, &[], sizes(), None));
            let handshakes = async {
                let client = connect(client.clone(), name(), a, sizes()).await;
                (client, server.await.unwrap())
            };
            let (client, server) =
                tokio::time::timeout(std::time::Duration::from_secs(5), handshakes)
                    .await
                    .unwrap_or_else(|_| panic!("handshake {round} stalled, pipe of {pipe} bytes"));
            let (mut client, mut server) = (client.unwrap(), server.unwrap());
            assert_eq!(server.peer_certificates().len(), 1);
            send_and_check(&mut client, &mut server, b"through").await;
            send_and_check(&mut server, &mut client, b"and back").await;
        }
    }

    #[tokio::test]
    async fn chacha20_poly1305_with_a_rustls_peer() {
        let mut only_chacha = rustls::crypto::aws_lc_rs::default_provider();
        only_chacha
            .cipher_suites
            .retain(|s| s.suite() == rustls::CipherSuite::TLS13_CHACHA20_POLY1305_SHA256);
        let (server, client) = self_signed_configs(only_chacha);
        let (a, b) = duplex(1 << 20);
        let theirs = tokio::spawn(tokio_rustls::TlsAcceptor::from(server).accept(b));
        let mut ours = connect(client, name(), a, sizes()).await.unwrap();
        let mut theirs = theirs.await.unwrap().unwrap();
        assert_eq!(
            theirs
                .get_ref()
                .1
                .negotiated_cipher_suite()
                .map(|s| s.suite()),
            Some(rustls::CipherSuite::TLS13_CHACHA20_POLY1305_SHA256)
        );
        send_and_check(&mut ours, &mut theirs, &pattern(50_000, 7)).await;
        send_and_check(&mut theirs, &mut ours, &pattern(50_000, 8)).await;
    }
}
