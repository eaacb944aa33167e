//! A TLS connection taken apart between two reads and writes, and put together again in another
//! process: the state a handoff carries ([`TlsState`]) and its checks.
//!
//! What moves: both directions' application traffic secrets and record sequence numbers (the new
//! process goes on with our key schedule, [`super::schedule`]), what was received and not yet
//! read (opened plaintext, then records not yet opened, from a record's start), a post-handshake
//! message that continues in the next record, sealed bytes not yet written, whether each side
//! has closed, and what the handshake established (the peer's certificates, ALPN). What does not:
//! rustls's state for session tickets (a moved client connection ignores tickets: it will not be
//! resumed), and a connection whose secrets were not captured (its configuration did not log
//! them to [`super::traffic_secret_log`]) or that has failed.

use std::io;
use std::sync::Arc;

use bytes::BytesMut;
use rustls::pki_types::CertificateDer;
use zeroize::Zeroizing;

use super::keys::{Kernel, Keys, Secrets};
use super::schedule::{Suite, TrafficSecret};
use super::*;

/// The most peer certificates a moved connection may carry (a chain of a few).
const MAX_PEER_CERTIFICATES: usize = 16;
/// The most bytes of all of them.
const MAX_PEER_CERTIFICATE_BYTES: usize = 64 * 1024;

/// A connection that could not be taken apart, handed back whole, and why.
pub(crate) type Refused<T> = Box<(TlsStream<T>, io::Error)>;

/// A TLS 1.3 connection after its handshake, between two reads and writes: what another process
/// needs to go on with it over the same socket.
#[derive(Clone, PartialEq, Eq)]
pub struct TlsState {
    /// The cipher suite's IANA number (0x1301, 0x1302 or 0x1303).
    pub suite: u16,
    /// Our current application traffic secret (its length the suite's hash length).
    pub tx_secret: Zeroizing<Vec<u8>>,
    /// The sequence number of the next record we seal.
    pub tx_seq: u64,
    /// The peer's current application traffic secret.
    pub rx_secret: Zeroizing<Vec<u8>>,
    /// The sequence number of the next record we open.
    pub rx_seq: u64,
    /// Opened application data not yet read.
    pub plaintext: Vec<u8>,
    /// Received bytes not yet opened, from a record's first byte.
    pub ciphertext: Vec<u8>,
    /// A post-handshake message begun in an opened record, continuing in the next.
    pub handshake: Vec<u8>,
    /// Sealed records not yet written to the socket.
    pub unsent: Vec<u8>,
    /// The peer sent `close_notify`.
    pub read_closed: bool,
    /// We sent `close_notify` (it may still be in `unsent`).
    pub write_closed: bool,
    /// A KeyUpdate answering the peer's request is in `unsent`.
    pub answer_pending: bool,
    /// The peer's certificates (DER), its own first.
    pub peer_certificates: Vec<Vec<u8>>,
    /// The negotiated ALPN protocol.
    pub alpn: Option<Vec<u8>>,
}

impl std::fmt::Debug for TlsState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the secrets.
        f.debug_struct("TlsState")
            .field("suite", &format_args!("{:#06x}", self.suite))
            .field("tx_seq", &self.tx_seq)
            .field("rx_seq", &self.rx_seq)
            .field("plaintext", &self.plaintext.len())
            .field("ciphertext", &self.ciphertext.len())
            .field("handshake", &self.handshake.len())
            .field("unsent", &self.unsent.len())
            .field("read_closed", &self.read_closed)
            .field("write_closed", &self.write_closed)
            .field("peer_certificates", &self.peer_certificates.len())
            .finish_non_exhaustive()
    }
}

/// Moving a connection to another process.
impl<T> TlsStream<T> {
    /// Takes the connection apart for another process. Refused (the connection handed back
    /// whole) when it cannot be moved: its secrets were not captured, or it has failed.
    pub(crate) fn into_state(self) -> Result<(T, TlsState), Refused<T>> {
        if let Some((kind, why)) = &self.failed {
            let e = io::Error::new(*kind, format!("a failed TLS connection cannot move: {why}"));
            return Err(Box::new((self, e)));
        }
        let Some(secrets) = self.kernel.secrets.clone() else {
            let e = invalid(
                "this TLS connection's secrets were not captured (its configuration does not log them to hbone's traffic_secret_log): it cannot move",
            );
            return Err(Box::new((self, e)));
        };
        let mut ciphertext = self.rbuf[self.rpos..].to_vec();
        ciphertext.extend_from_slice(&self.pending);
        let state = TlsState {
            suite: self.kernel.suite.iana(),
            tx_secret: Zeroizing::new(secrets.tx.bytes().to_vec()),
            tx_seq: self.tx.seq,
            rx_secret: Zeroizing::new(secrets.rx.bytes().to_vec()),
            rx_seq: self.rx.seq,
            plaintext: self.rbuf[self.plain.0..self.plain.1].to_vec(),
            ciphertext,
            handshake: self.handshake.clone(),
            unsent: self.wbuf[self.wpos..].to_vec(),
            read_closed: self.read_closed,
            write_closed: self.write_closed,
            answer_pending: self.answer_pending,
            peer_certificates: self.peer_certificates.iter().map(|c| c.to_vec()).collect(),
            alpn: self.alpn.clone(),
        };
        Ok((self.io, state))
    }

    /// Puts a connection handed over by another process together again over `io` (the same
    /// socket). Every field is checked: a secret of the wrong length, a suite this layer does
    /// not speak, buffers larger than a connection ever holds, ciphertext that does not start
    /// with a record header, are refused with the reason.
    pub(crate) fn from_state(io: T, state: TlsState, sizes: Sizes) -> io::Result<TlsStream<T>> {
        let suite = Suite::from_iana(state.suite)?;
        let secrets = Secrets {
            tx: TrafficSecret::new(suite, state.tx_secret.to_vec())?,
            rx: TrafficSecret::new(suite, state.rx_secret.to_vec())?,
        };
        let read_size = sizes.read_size.max(MAX_RECORD);
        let write_limit = sizes.write_limit.max(2 * MAX_RECORD);
        let too_long = |what: &str, len: usize, max: usize| {
            invalid(format!(
                "a moved TLS connection's {what} is {len} bytes, more than {max}"
            ))
        };
        // What a connection can hold: a read's worth beyond an unfinished record, opened or not.
        let received_max = read_size + MAX_RECORD;
        if state.plaintext.len() + state.ciphertext.len() > received_max {
            return Err(too_long(
                "received data",
                state.plaintext.len() + state.ciphertext.len(),
                received_max,
            ));
        }
        if state.handshake.len() > MAX_HANDSHAKE_PENDING {
            return Err(too_long(
                "pending handshake message",
                state.handshake.len(),
                MAX_HANDSHAKE_PENDING,
            ));
        }
        // A write is taken whole when it goes less than a record over the limit; the records of
        // a KeyUpdate and close_notify may follow it.
        let unsent_max = write_limit + 2 * MAX_RECORD;
        if state.unsent.len() > unsent_max {
            return Err(too_long("unsent data", state.unsent.len(), unsent_max));
        }
        if let Some(header) = state
            .ciphertext
            .get(..HEADER_LEN.min(state.ciphertext.len()))
            && !header.is_empty()
            && header[0] != APPLICATION_DATA
        {
            return Err(invalid(format!(
                "a moved TLS connection's unopened data starts with content type {}, not a protected record",
                header[0]
            )));
        }
        if state.peer_certificates.len() > MAX_PEER_CERTIFICATES
            || state.peer_certificates.iter().map(Vec::len).sum::<usize>()
                > MAX_PEER_CERTIFICATE_BYTES
        {
            return Err(invalid(format!(
                "a moved TLS connection's peer presented {} certificates, {} bytes: more than a chain",
                state.peer_certificates.len(),
                state.peer_certificates.iter().map(Vec::len).sum::<usize>()
            )));
        }
        if state.answer_pending && state.unsent.is_empty() {
            return Err(invalid(
                "a moved TLS connection's KeyUpdate answer is pending, but nothing is unsent",
            ));
        }
        let tx = Keys::from_secret(&secrets.tx, state.tx_seq)?;
        let rx = Keys::from_secret(&secrets.rx, state.rx_seq)?;
        let kernel = Kernel::moved(secrets)?;
        let tx_limit = kernel.confidentiality_limit();
        let mut rbuf = BytesMut::with_capacity(state.plaintext.len() + state.ciphertext.len());
        rbuf.extend_from_slice(&state.plaintext);
        let plain = (0, rbuf.len());
        let rpos = rbuf.len();
        rbuf.extend_from_slice(&state.ciphertext);
        let peer_certificates: Arc<[CertificateDer<'static>]> = state
            .peer_certificates
            .into_iter()
            .map(CertificateDer::from)
            .collect();
        Ok(TlsStream {
            io,
            tx,
            rx,
            kernel,
            tx_limit,
            rbuf,
            rpos,
            plain,
            wbuf: state.unsent,
            wpos: 0,
            write_limit,
            read_size,
            burst: false,
            pending: BytesMut::new(),
            handshake: state.handshake,
            read_closed: state.read_closed,
            answer_pending: state.answer_pending,
            key_updates_in_a_row: 0,
            empty_in_a_row: 0,
            write_closed: state.write_closed,
            failed: None,
            peer_certificates,
            alpn: state.alpn,
            version: Some(rustls::ProtocolVersion::TLSv1_3),
        })
    }
}
