//! The crate's error type.

use std::path::PathBuf;

use crate::SpiffeId;

/// Errors of the identity crate. Each names the file, certificate or identity concerned.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A file could not be written.
    #[error("cannot write {}: {source}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A PEM file is malformed or holds nothing of the expected kind.
    #[error("{}: {what}", path.display())]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is wrong, e.g. "no CERTIFICATE block found".
        what: String,
    },
    /// A certificate could not be parsed as X.509.
    #[error("cannot parse certificate: {0}")]
    Certificate(String),
    /// A SPIFFE id is invalid.
    #[error(transparent)]
    SpiffeId(#[from] crate::SpiffeIdError),
    /// A certificate signing request is malformed or its signature does not verify.
    #[error("bad certificate signing request: {0}")]
    Csr(String),
    /// The CA client's settings are unusable.
    #[error("CA client for {address}: {reason}")]
    CaConfig {
        /// The CA address.
        address: String,
        /// What is wrong.
        reason: String,
    },
    /// The CA could not be reached or refused the request.
    #[error("CA {address} did not sign {id}: {code}: {message}")]
    CaRpc {
        /// The CA address.
        address: String,
        /// The identity asked for.
        id: SpiffeId,
        /// The gRPC status code.
        code: String,
        /// The status message.
        message: String,
    },
    /// The CA answered with something we must not use.
    #[error("CA {address} answered for {id} with an unusable certificate: {reason}")]
    CaAnswer {
        /// The CA address.
        address: String,
        /// The identity asked for.
        id: SpiffeId,
        /// What is wrong with the answer.
        reason: String,
    },
    /// No valid certificate is available for an identity (fail closed).
    #[error("no valid certificate for {id}: {reason}")]
    NoCertificate {
        /// The identity.
        id: SpiffeId,
        /// Why: the last CA error, or that the certificate expired.
        reason: String,
    },
    /// An identity is not a valid URI for a certificate SAN.
    #[error("invalid identity {id:?}: {reason}")]
    Identity {
        /// The identity as given.
        id: String,
        /// Why it is invalid.
        reason: String,
    },
    /// Certificate or key generation failed.
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    /// rustls rejected the certificate, key or roots.
    #[error("TLS configuration rejected: {0}")]
    Tls(#[from] rustls::Error),
    /// The trust roots are unusable (for example empty).
    #[error("trust roots unusable: {0}")]
    Roots(String),
    /// A client configuration was asked for with no expected server identity; it would accept
    /// any workload of the mesh as the destination.
    #[error(
        "no expected server identity given: a client must name the SPIFFE ids it accepts (the insecure any-identity configuration is a separate, debugging-only function)"
    )]
    NoExpectedIdentity,
}
