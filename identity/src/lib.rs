//! SPIFFE identities for an ambient mesh: certificate files, a development CA, and rustls
//! configurations whose verifiers check SPIFFE URI SANs.
//!
//! What is here today: PEM loading with errors that name the file, reading URI SANs, a development
//! CA that issues workload certificates, and client/server rustls configurations for HBONE
//! (TLS 1.3, ALPN `h2`, client certificates required, server identity checked by URI SAN instead
//! of hostname). Still to come (see the issue tracker): a validated `SpiffeId` type, the Istio CA
//! client and server, and the rotating secret manager.
//!
//! ```
//! use identity::{DevCa, tls};
//! use std::time::Duration;
//!
//! let ca = DevCa::generate("cluster.local")?;
//! let server = ca.issue("spiffe://cluster.local/ns/default/sa/web", Duration::from_secs(3600))?;
//! let client = ca.issue("spiffe://cluster.local/ns/default/sa/sleep", Duration::from_secs(3600))?;
//! let roots = ca.roots();
//!
//! // The client accepts only a server that proves the `web` identity.
//! let expected = vec!["spiffe://cluster.local/ns/default/sa/web".to_owned()];
//! let client_config = tls::client_config(client.chain, client.key, roots.clone(), Some(expected))?;
//! let server_config = tls::server_config(server.chain, server.key, roots)?;
//! assert_eq!(client_config.alpn_protocols, vec![b"h2".to_vec()]);
//! assert_eq!(server_config.alpn_protocols, vec![b"h2".to_vec()]);
//! # Ok::<(), identity::Error>(())
//! ```
#![forbid(unsafe_code)]

mod cert;
mod dev_ca;
mod error;
pub mod pem;
pub mod tls;

pub use cert::{Credentials, uri_sans};
pub use dev_ca::DevCa;
pub use error::Error;
