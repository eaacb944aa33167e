//! One direction's record key and sequence number, and rustls's key schedule after the
//! handshake (key updates, session tickets), which moves the keys on.

use std::io;

use aws_lc_rs::aead::{self, LessSafeKey, UnboundKey};
use rustls::ConnectionTrafficSecrets;
use rustls::client::ClientConnectionData;
use rustls::kernel::KernelConnection;
use rustls::server::ServerConnectionData;

use super::aead::{AeadImpl, Cipher, aead_impl};
use super::schedule::{Suite, TrafficSecret};
use super::*;

/// One direction's key, IV and record sequence number.
pub(super) struct Keys {
    pub(super) cipher: Cipher,
    pub(super) iv: [u8; 12],
    pub(super) seq: u64,
}

impl Keys {
    pub(super) fn new((seq, secrets): (u64, ConnectionTrafficSecrets)) -> io::Result<Keys> {
        Keys::with(aead_impl(), (seq, secrets))
    }

    pub(super) fn with(
        which: AeadImpl,
        (seq, secrets): (u64, ConnectionTrafficSecrets),
    ) -> io::Result<Keys> {
        let (suite, key, iv) = match &secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (Suite::Aes128GcmSha256, key, iv),
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (Suite::Aes256GcmSha384, key, iv),
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
                (Suite::Chacha20Poly1305Sha256, key, iv)
            }
            other => {
                return Err(invalid(format!(
                    "TLS record layer: unsupported traffic secrets {:?}",
                    std::mem::discriminant(other)
                )));
            }
        };
        Keys::from_parts(which, suite, key.as_ref(), iv.as_ref(), seq)
    }

    /// The keys of `secret` (ours, not rustls's: a connection moved into this process), from
    /// record `seq` on.
    pub(super) fn from_secret(secret: &TrafficSecret, seq: u64) -> io::Result<Keys> {
        let (key, iv) = secret.key_iv();
        Keys::from_parts(aead_impl(), secret.suite, &key, &iv, seq)
    }

    fn from_parts(
        which: AeadImpl,
        suite: Suite,
        key: &[u8],
        iv: &[u8],
        seq: u64,
    ) -> io::Result<Keys> {
        let (aws, ring_alg) = match suite {
            Suite::Aes128GcmSha256 => (&aead::AES_128_GCM, &ring::aead::AES_128_GCM),
            Suite::Aes256GcmSha384 => (&aead::AES_256_GCM, &ring::aead::AES_256_GCM),
            Suite::Chacha20Poly1305Sha256 => {
                (&aead::CHACHA20_POLY1305, &ring::aead::CHACHA20_POLY1305)
            }
        };
        let wrong_key = || invalid("TLS record layer: a traffic key of the wrong length");
        let cipher = match which {
            AeadImpl::AwsLc => Cipher::AwsLc(LessSafeKey::new(
                UnboundKey::new(aws, key).map_err(|_| wrong_key())?,
            )),
            AeadImpl::Ring => Cipher::Ring(ring::aead::LessSafeKey::new(
                ring::aead::UnboundKey::new(ring_alg, key).map_err(|_| wrong_key())?,
            )),
        };
        let iv = iv
            .try_into()
            .map_err(|_| invalid("TLS record layer: a traffic IV of the wrong length"))?;
        Ok(Keys { cipher, iv, seq })
    }

    /// The nonce of the next record (RFC 8446 §5.3), counting it.
    pub(super) fn next_nonce(&mut self) -> io::Result<[u8; 12]> {
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

/// rustls's connection after the handshake.
pub(super) enum Rustls {
    Client(KernelConnection<ClientConnectionData>),
    Server(KernelConnection<ServerConnectionData>),
}

/// Both directions' application traffic secrets, ours to derive from.
#[derive(Debug, Clone)]
pub(crate) struct Secrets {
    pub(crate) tx: TrafficSecret,
    pub(crate) rx: TrafficSecret,
}

/// The key schedule after the handshake: rustls's for a connection it handshook (with our copy
/// of the traffic secrets alongside, when they were captured, so the connection can be handed to
/// another process), ours alone for a connection handed to this one.
pub(super) struct Kernel {
    pub(super) rustls: Option<Rustls>,
    pub(super) secrets: Option<Secrets>,
    pub(super) suite: Suite,
}

impl Kernel {
    /// rustls's connection, with our copy of the secrets when captured.
    pub(super) fn rustls(rustls: Rustls, secrets: Option<Secrets>) -> io::Result<Kernel> {
        let suite = match &rustls {
            Rustls::Client(k) => k.negotiated_cipher_suite(),
            Rustls::Server(k) => k.negotiated_cipher_suite(),
        };
        Ok(Kernel {
            rustls: Some(rustls),
            secrets,
            suite: Suite::of(suite)?,
        })
    }

    /// A connection handed over: our schedule only.
    pub(super) fn moved(secrets: Secrets) -> io::Result<Kernel> {
        let suite = secrets.tx.suite;
        if secrets.rx.suite != suite {
            return Err(invalid(
                "TLS: the two directions' secrets are of different suites",
            ));
        }
        Ok(Kernel {
            rustls: None,
            secrets: Some(secrets),
            suite,
        })
    }

    /// Our send key moves on (a KeyUpdate of ours): the next keys, from record 0.
    pub(super) fn update_tx(&mut self) -> io::Result<Keys> {
        self.update(true)
    }

    /// The peer's send key moved on (its KeyUpdate): the next keys, from record 0.
    pub(super) fn update_rx(&mut self) -> io::Result<Keys> {
        self.update(false)
    }

    /// One direction's key moves on: rustls's schedule when it has the connection (our copy of
    /// the secret follows it), else ours.
    fn update(&mut self, tx: bool) -> io::Result<Keys> {
        let ours = self.secrets.as_mut().map(|s| {
            let secret = if tx { &mut s.tx } else { &mut s.rx };
            *secret = secret.next();
            secret.clone()
        });
        let next = match (&mut self.rustls, tx) {
            (Some(Rustls::Client(k)), true) => k.update_tx_secret(),
            (Some(Rustls::Client(k)), false) => k.update_rx_secret(),
            (Some(Rustls::Server(k)), true) => k.update_tx_secret(),
            (Some(Rustls::Server(k)), false) => k.update_rx_secret(),
            (None, _) => {
                let secret = ours.ok_or_else(|| invalid("TLS: no key schedule"))?;
                return Keys::from_secret(&secret, 0);
            }
        };
        Keys::new(next.map_err(tls_error)?)
    }

    pub(super) fn confidentiality_limit(&self) -> u64 {
        self.suite.confidentiality_limit()
    }
}
