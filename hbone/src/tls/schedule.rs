//! The TLS 1.3 key schedule after the handshake, ours (RFC 8446 §7.1 to §7.3): from an
//! application traffic secret, its record key and IV, and the next secret a `KeyUpdate` moves
//! to. rustls keeps this schedule for a connection it handshook; a connection moved into this
//! process from another one has no rustls state, only the secrets and sequence numbers it was
//! handed, and goes on with this.

use std::io;

use aws_lc_rs::hkdf;
use zeroize::Zeroizing;

use super::invalid;

/// A TLS 1.3 cipher suite the record layer speaks, by its IANA number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Suite {
    /// `TLS_AES_128_GCM_SHA256` (0x1301).
    Aes128GcmSha256,
    /// `TLS_AES_256_GCM_SHA384` (0x1302).
    Aes256GcmSha384,
    /// `TLS_CHACHA20_POLY1305_SHA256` (0x1303).
    Chacha20Poly1305Sha256,
}

impl Suite {
    /// The suite of IANA number `n`; an error names a number this layer does not speak.
    pub(crate) fn from_iana(n: u16) -> io::Result<Suite> {
        match n {
            0x1301 => Ok(Suite::Aes128GcmSha256),
            0x1302 => Ok(Suite::Aes256GcmSha384),
            0x1303 => Ok(Suite::Chacha20Poly1305Sha256),
            other => Err(invalid(format!(
                "TLS cipher suite {other:#06x} is not one of TLS 1.3's three this layer speaks"
            ))),
        }
    }

    /// The IANA number.
    pub(crate) fn iana(self) -> u16 {
        match self {
            Suite::Aes128GcmSha256 => 0x1301,
            Suite::Aes256GcmSha384 => 0x1302,
            Suite::Chacha20Poly1305Sha256 => 0x1303,
        }
    }

    /// The suite rustls negotiated.
    pub(crate) fn of(suite: rustls::SupportedCipherSuite) -> io::Result<Suite> {
        Suite::from_iana(u16::from(suite.suite()))
    }

    fn hkdf(self) -> hkdf::Algorithm {
        match self {
            Suite::Aes256GcmSha384 => hkdf::HKDF_SHA384,
            _ => hkdf::HKDF_SHA256,
        }
    }

    /// The hash's length: a traffic secret's.
    pub(crate) fn secret_len(self) -> usize {
        match self {
            Suite::Aes256GcmSha384 => 48,
            _ => 32,
        }
    }

    fn key_len(self) -> usize {
        match self {
            Suite::Aes128GcmSha256 => 16,
            _ => 32,
        }
    }

    /// How many records one key may seal (RFC 8446 §5.5; the numbers rustls uses).
    pub(crate) fn confidentiality_limit(self) -> u64 {
        match self {
            Suite::Chacha20Poly1305Sha256 => u64::MAX,
            _ => 1 << 23,
        }
    }
}

/// One direction's application traffic secret.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct TrafficSecret {
    pub(crate) suite: Suite,
    secret: Zeroizing<Vec<u8>>,
}

impl std::fmt::Debug for TrafficSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the secret itself.
        write!(
            f,
            "TrafficSecret({:?}, {} bytes)",
            self.suite,
            self.secret.len()
        )
    }
}

impl TrafficSecret {
    /// `secret` of `suite`; an error when its length is not the suite's hash length.
    pub(crate) fn new(suite: Suite, secret: Vec<u8>) -> io::Result<TrafficSecret> {
        if secret.len() != suite.secret_len() {
            return Err(invalid(format!(
                "a {:?} traffic secret is {} bytes, not {}",
                suite,
                suite.secret_len(),
                secret.len()
            )));
        }
        Ok(TrafficSecret {
            suite,
            secret: Zeroizing::new(secret),
        })
    }

    /// The secret's bytes (for a handoff to another process, and nothing else).
    pub(crate) fn bytes(&self) -> &[u8] {
        &self.secret
    }

    /// The secret after a `KeyUpdate`: `HKDF-Expand-Label(secret, "traffic upd", "", Hash.length)`.
    pub(crate) fn next(&self) -> TrafficSecret {
        TrafficSecret {
            suite: self.suite,
            secret: Zeroizing::new(expand_label(
                self.suite,
                &self.secret,
                b"traffic upd",
                self.secret.len(),
            )),
        }
    }

    /// The record key and IV of this secret (`"key"` and `"iv"`).
    pub(crate) fn key_iv(&self) -> (Zeroizing<Vec<u8>>, [u8; 12]) {
        let key = Zeroizing::new(expand_label(
            self.suite,
            &self.secret,
            b"key",
            self.suite.key_len(),
        ));
        let mut iv = [0u8; 12];
        iv.copy_from_slice(&expand_label(self.suite, &self.secret, b"iv", 12));
        (key, iv)
    }
}

/// `HKDF-Expand-Label(secret, label, "", len)` (RFC 8446 §7.1).
fn expand_label(suite: Suite, secret: &[u8], label: &[u8], len: usize) -> Vec<u8> {
    struct Len(usize);
    impl hkdf::KeyType for Len {
        fn len(&self) -> usize {
            self.0
        }
    }
    let length = u16::try_from(len)
        .expect("a TLS label's output fits in u16")
        .to_be_bytes();
    let prefix = b"tls13 ";
    let label_len = [u8::try_from(prefix.len() + label.len()).expect("a short label")];
    let context_len = [0u8];
    let info: [&[u8]; 5] = [&length, &label_len, prefix, label, &context_len];
    let prk = hkdf::Prk::new_less_safe(suite.hkdf(), secret);
    let mut out = vec![0u8; len];
    prk.expand(&info, Len(len))
        .and_then(|okm| okm.fill(&mut out))
        .expect("HKDF-Expand of at most 255 hash lengths");
    out
}
