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
pub mod pem;
mod secrets;
mod spiffe;
pub mod tls;

pub use cert::{
    CertInfo, Credentials, KeyAndCsr, WorkloadCert, fuzz_cert_chain, parse_pem_chain, uri_sans,
};
pub use dev_ca::DevCa;
pub use error::Error;
pub use secrets::{SecretManager, SecretManagerConfig};
pub use spiffe::{
    MAX_ID_LEN, MAX_TRUST_DOMAIN_LEN, SpiffeId, SpiffeIdError, SpiffeIdErrorKind, fuzz_spiffe_id,
};

/// Formats a time as seconds since the Unix epoch, for messages (no calendar dependency).
pub(crate) fn fmt_time(t: std::time::SystemTime) -> String {
    match t.duration_since(std::time::UNIX_EPOCH) {
        Ok(d) => format!("unix:{}", d.as_secs()),
        Err(_) => "before 1970".to_owned(),
    }
}
