//! The record AEAD (AES-GCM, ChaCha20-Poly1305) and which implementation of it this CPU runs
//! fastest: aws-lc's or ring's. Seals and opens one record's body in place.

use std::io;

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce};

use super::*;

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
pub(super) fn by_cpu() -> AeadImpl {
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
pub(super) fn by_cpu() -> AeadImpl {
    AeadImpl::AwsLc
}

/// One direction's AEAD key.
#[expect(
    clippy::large_enum_variant,
    reason = "ring's key holds its AES key schedule inline; one per direction per connection, \
              read on every record, so no box"
)]
pub(super) enum Cipher {
    AwsLc(LessSafeKey),
    Ring(ring::aead::LessSafeKey),
}

impl Cipher {
    pub(super) fn seal(
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
    pub(super) fn open_within(
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
