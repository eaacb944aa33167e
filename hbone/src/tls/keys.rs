//! One direction's record key and sequence number, and rustls's key schedule after the
//! handshake (key updates, session tickets), which moves the keys on.

use std::io;

use aws_lc_rs::aead::{self, LessSafeKey, UnboundKey};
use rustls::ConnectionTrafficSecrets;
use rustls::client::ClientConnectionData;
use rustls::kernel::KernelConnection;
use rustls::server::ServerConnectionData;

use super::aead::{AeadImpl, Cipher, aead_impl};
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

/// rustls's side of the connection after the handshake.
pub(super) enum Kernel {
    Client(KernelConnection<ClientConnectionData>),
    Server(KernelConnection<ServerConnectionData>),
}

impl Kernel {
    pub(super) fn update_tx(&mut self) -> Result<(u64, ConnectionTrafficSecrets), rustls::Error> {
        match self {
            Kernel::Client(k) => k.update_tx_secret(),
            Kernel::Server(k) => k.update_tx_secret(),
        }
    }

    pub(super) fn update_rx(&mut self) -> Result<(u64, ConnectionTrafficSecrets), rustls::Error> {
        match self {
            Kernel::Client(k) => k.update_rx_secret(),
            Kernel::Server(k) => k.update_rx_secret(),
        }
    }

    pub(super) fn confidentiality_limit(&self) -> u64 {
        let suite = match self {
            Kernel::Client(k) => k.negotiated_cipher_suite(),
            Kernel::Server(k) => k.negotiated_cipher_suite(),
        };
        suite
            .tls13()
            .map_or(u64::MAX, |s| s.common.confidentiality_limit)
    }
}
