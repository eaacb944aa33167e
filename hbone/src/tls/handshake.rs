//! The TLS 1.3 handshake, done by rustls (its unbuffered API) and driven here one record at a
//! time, then handed to our record layer ([`super::TlsStream`]) with the keys rustls extracted.

use std::io;
use std::sync::Arc;

use rustls::client::{ClientConnectionData, UnbufferedClientConnection};
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::server::{ServerConnectionData, UnbufferedServerConnection};
use rustls::unbuffered::{ConnectionState, EncodeError, UnbufferedStatus};
use rustls::{ClientConfig, ServerConfig};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::capture::{Captured, Capturing};
use super::keys::{Kernel, Rustls};
use super::schedule::Suite;
use super::*;

/// What the handshake left for the record layer.
pub(super) struct Handshaken {
    pub(super) secrets: rustls::ExtractedSecrets,
    pub(super) kernel: Kernel,
    /// Records received after the handshake's last message, not yet opened.
    pub(super) leftover: Vec<u8>,
    /// Application data rustls already opened (it arrived with the handshake's last flight).
    pub(super) early_plain: Vec<u8>,
    pub(super) peer_certificates: Arc<[CertificateDer<'static>]>,
    pub(super) alpn: Option<Vec<u8>>,
    pub(super) version: Option<rustls::ProtocolVersion>,
}

/// The unbuffered connection types of both sides, for one handshake loop.
pub(super) trait Unbuffered {
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

pub(super) enum Step {
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
pub(super) async fn handshake<C: Unbuffered, T: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut C,
    io: &mut T,
    first: &[u8],
    slots: Option<&tokio::sync::Semaphore>,
) -> io::Result<(Vec<u8>, Vec<u8>, Captured)> {
    let mut captured = Captured::default();
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
        // What rustls derives meanwhile (the application traffic secrets, with a configuration
        // that logs them to us) is this handshake's; the capture ends before the next await.
        let capturing = Capturing::begin(&mut captured);
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
        drop(capturing);
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
                return Ok((incoming, early_plain, captured));
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

pub(super) fn session_facts(
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
pub(super) fn client_config_with_secrets(config: Arc<ClientConfig>) -> Arc<ClientConfig> {
    if config.enable_secret_extraction {
        return config;
    }
    let mut c = (*config).clone();
    c.enable_secret_extraction = true;
    Arc::new(c)
}

pub(super) fn server_config_with_secrets(config: Arc<ServerConfig>) -> Arc<ServerConfig> {
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

pub(super) fn require_tls13(common: &rustls::CommonState) -> io::Result<()> {
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
        let (secrets, kernel) = c.dangerous_into_kernel_connection().map_err(tls_error)?;
        Ok((secrets, Rustls::Client(kernel)))
    })
    .await
}

/// Server side: the TLS handshake over `io`, whose first bytes (`first`) the caller has read,
/// then our record layer. rustls works on the client's bytes only while it holds one of `slots`
/// (see [`handshake()`]).
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
        let (secrets, kernel) = c.dangerous_into_kernel_connection().map_err(tls_error)?;
        Ok((secrets, Rustls::Server(kernel)))
    })
    .await
}

/// The handshake, then rustls hands the keys (`into_kernel`) to our record layer.
pub(super) async fn establish<C: Unbuffered, T: AsyncRead + AsyncWrite + Unpin>(
    mut conn: C,
    mut io: T,
    sizes: Sizes,
    first: &[u8],
    slots: Option<&tokio::sync::Semaphore>,
    into_kernel: impl FnOnce(C) -> io::Result<(rustls::ExtractedSecrets, Rustls)>,
) -> io::Result<TlsStream<T>> {
    let (leftover, early_plain, captured) = handshake(&mut conn, &mut io, first, slots).await?;
    require_tls13(conn.common())?;
    let (peer_certificates, alpn, version) = session_facts(conn.common());
    let suite = conn
        .common()
        .negotiated_cipher_suite()
        .ok_or_else(|| invalid("TLS: the handshake ended without a cipher suite"))?;
    let (secrets, rustls) = into_kernel(conn)?;
    let ours = captured.into_secrets(matches!(rustls, Rustls::Client(_)), Suite::of(suite)?)?;
    let kernel = Kernel::rustls(rustls, ours)?;
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
