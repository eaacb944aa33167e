//! Certificate material: a chain with its key, and what we read out of certificates.

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::FromDer;

use crate::Error;

/// A certificate chain (leaf first) with the leaf's private key.
#[derive(Debug)]
pub struct Credentials {
    /// The chain, leaf first; the root may be omitted.
    pub chain: Vec<CertificateDer<'static>>,
    /// The leaf's private key.
    pub key: PrivateKeyDer<'static>,
}

impl Clone for Credentials {
    fn clone(&self) -> Self {
        Credentials {
            chain: self.chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

/// The URI SANs of a certificate (for a workload: its SPIFFE id), in certificate order.
pub fn uri_sans(cert: &CertificateDer<'_>) -> Result<Vec<String>, Error> {
    let (_, parsed) = x509_parser::certificate::X509Certificate::from_der(cert.as_ref())
        .map_err(|e| Error::Certificate(e.to_string()))?;
    let Some(san) = parsed
        .subject_alternative_name()
        .map_err(|e| Error::Certificate(format!("bad subjectAltName: {e}")))?
    else {
        return Ok(Vec::new());
    };
    Ok(san
        .value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::URI(uri) => Some((*uri).to_owned()),
            _ => None,
        })
        .collect())
}
