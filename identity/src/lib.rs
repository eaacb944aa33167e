//! SPIFFE identities for an ambient mesh: validated ids, certificates and CSRs, a development CA,
//! and rustls configurations whose verifiers check SPIFFE ids instead of hostnames.
//!
//! Any Rust proxy that wants SPIFFE mTLS can use it alone: [`SpiffeId`] parses and validates ids
//! exactly per the SPIFFE specification (with Istio's `ns/<ns>/sa/<sa>` helpers); [`DevCa`] issues
//! workload certificates for development and tests; [`tls`] builds TLS 1.3, ALPN `h2` client and
//! server configurations that accept only the expected peer identities.
//!
//! ```
//! use identity::{DevCa, SpiffeId, tls};
//! use std::time::Duration;
//!
//! let web = SpiffeId::istio("cluster.local", "default", "web")?;
//! let sleep: SpiffeId = "spiffe://cluster.local/ns/default/sa/sleep".parse()?;
//! assert_eq!(sleep.service_account(), Some("sleep"));
//!
//! let ca = DevCa::generate("cluster.local")?;
//! let server = ca.issue(&web, Duration::from_secs(3600))?;
//! let client = ca.issue(&sleep, Duration::from_secs(3600))?;
//!
//! // The client accepts only a server that proves `web`; the server only clients of its domain.
//! let client_config = tls::client_config(client.chain, client.key, ca.roots(), vec![web])?;
//! let server_config = tls::server_config(server.chain, server.key, ca.roots(), "cluster.local")?;
//! assert_eq!(client_config.alpn_protocols, vec![b"h2".to_vec()]);
//! assert_eq!(server_config.alpn_protocols, vec![b"h2".to_vec()]);
//! # Ok::<(), identity::Error>(())
//! ```
#![forbid(unsafe_code)]

pub mod ca;
mod cert;
mod dev_ca;
mod error;
pub mod grpc;
pub mod pem;
pub mod roots;
mod secrets;
mod spiffe;
pub mod tls;

#[cfg(feature = "fuzzing")]
pub use cert::fuzz_cert_chain;
pub use cert::{CertInfo, Credentials, KeyAndCsr, WorkloadCert, parse_pem_chain, uri_sans};
pub use dev_ca::{DevCa, DevCaSource};
pub use error::Error;
pub use secrets::{HeldCertificate, SecretManager, SecretManagerConfig};
#[cfg(feature = "fuzzing")]
pub use spiffe::fuzz_spiffe_id;
pub use spiffe::{MAX_ID_LEN, MAX_TRUST_DOMAIN_LEN, SpiffeId, SpiffeIdError, SpiffeIdErrorKind};

/// `t` as an RFC 3339 UTC timestamp (`2026-12-01T20:00:00Z`), for logs and dumps.
pub fn fmt_time(t: std::time::SystemTime) -> String {
    let Ok(d) = t.duration_since(std::time::UNIX_EPOCH) else {
        return "before 1970".to_owned();
    };
    let secs = d.as_secs();
    let (days, rest) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (the proleptic Gregorian calendar).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
}

#[cfg(test)]
mod time_tests {
    #[test]
    fn timestamps_are_rfc3339_utc() {
        let at =
            |s: u64| super::fmt_time(std::time::UNIX_EPOCH + std::time::Duration::from_secs(s));
        assert_eq!(at(0), "1970-01-01T00:00:00Z");
        assert_eq!(at(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(at(1_795_985_999), "2026-11-29T20:59:59Z");
    }
}

/// The README's example, compiled and run as a doctest so it stays true.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
