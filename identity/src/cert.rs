//! Certificate material: keys and CSRs for a SPIFFE id, chains, and what we read out of them.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{CertificateParams, KeyPair, SanType};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::FromDer;

use crate::{Error, SpiffeId};

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

/// What we read from one X.509 certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// All URI SANs, in certificate order.
    pub uri_sans: Vec<String>,
    /// Start of validity.
    pub not_before: SystemTime,
    /// End of validity.
    pub not_after: SystemTime,
    /// The DER SubjectPublicKeyInfo, to match a certificate with its key.
    pub spki: Vec<u8>,
    /// Whether the certificate is a CA (basicConstraints cA = true).
    pub is_ca: bool,
    /// The serial number, in decimal.
    pub serial_number: String,
}

impl CertInfo {
    /// Parses one DER certificate.
    pub fn parse(cert: &CertificateDer<'_>) -> Result<Self, Error> {
        let (rest, parsed) = x509_parser::certificate::X509Certificate::from_der(cert.as_ref())
            .map_err(|e| Error::Certificate(e.to_string()))?;
        if !rest.is_empty() {
            return Err(Error::Certificate(format!(
                "{} bytes of trailing data after the certificate",
                rest.len()
            )));
        }
        let uri_sans = parsed
            .subject_alternative_name()
            .map_err(|e| Error::Certificate(format!("bad subjectAltName: {e}")))?
            .map(|san| {
                san.value
                    .general_names
                    .iter()
                    .filter_map(|name| match name {
                        GeneralName::URI(uri) => Some((*uri).to_owned()),
                        _ => None,
                    })
                    .collect()
            })
            .unwrap_or_default();
        let validity = parsed.validity();
        let time = |t: &x509_parser::time::ASN1Time| {
            let secs = t.timestamp();
            if secs >= 0 {
                UNIX_EPOCH + Duration::from_secs(secs as u64)
            } else {
                UNIX_EPOCH
            }
        };
        let is_ca = parsed
            .basic_constraints()
            .ok()
            .flatten()
            .is_some_and(|bc| bc.value.ca);
        Ok(CertInfo {
            uri_sans,
            not_before: time(&validity.not_before),
            not_after: time(&validity.not_after),
            spki: parsed.public_key().raw.to_vec(),
            is_ca,
            serial_number: parsed.serial.to_str_radix(10),
        })
    }

    /// The certificate's SPIFFE id: its only URI SAN, which must be a valid SPIFFE id.
    pub fn spiffe_id(&self) -> Result<SpiffeId, Error> {
        match self.uri_sans.as_slice() {
            [only] => SpiffeId::parse(only).map_err(Error::SpiffeId),
            [] => Err(Error::Certificate("no URI SAN, so no SPIFFE id".into())),
            many => Err(Error::Certificate(format!(
                "{} URI SANs ({many:?}); a SPIFFE certificate has exactly one",
                many.len()
            ))),
        }
    }

    /// Whether `now` is inside the validity window.
    pub fn is_valid_at(&self, now: SystemTime) -> bool {
        self.not_before <= now && now < self.not_after
    }
}

/// The URI SANs of a certificate (for a workload: its SPIFFE id), in certificate order.
pub fn uri_sans(cert: &CertificateDer<'_>) -> Result<Vec<String>, Error> {
    CertInfo::parse(cert).map(|info| info.uri_sans)
}

/// Parses a PEM chain (leaf first) from text; `what` names its source in errors.
pub fn parse_pem_chain(pem: &[u8], what: &str) -> Result<Vec<CertificateDer<'static>>, Error> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Error::Certificate(format!("{what}: malformed PEM: {e}")))?;
    if certs.is_empty() {
        return Err(Error::Certificate(format!("{what}: no CERTIFICATE block")));
    }
    for (i, cert) in certs.iter().enumerate() {
        CertInfo::parse(cert)
            .map_err(|e| Error::Certificate(format!("{what}: certificate {i}: {e}")))?;
    }
    Ok(certs)
}

/// A fresh ECDSA P-256 key and a CSR for `id`: a single URI SAN and an empty subject, as Istio's CA
/// expects.
#[derive(Debug)]
pub struct KeyAndCsr {
    /// The private key (PKCS#8).
    pub key: PrivateKeyDer<'static>,
    /// The CSR, PEM encoded.
    pub csr_pem: String,
    /// The DER SubjectPublicKeyInfo of the key, to check the signed certificate against.
    pub spki: Vec<u8>,
}

impl KeyAndCsr {
    /// Generates the key and the CSR.
    pub fn generate(id: &SpiffeId) -> Result<Self, Error> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(id.as_str().try_into()?)];
        let csr = params.serialize_request(&key)?;
        Ok(KeyAndCsr {
            csr_pem: csr.pem()?,
            spki: key.public_key_der(),
            key: PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        })
    }
}

/// A workload's certificate as handed out by the [`SecretManager`](crate::SecretManager): the
/// identity, chain and key, the validity window, and the same ready for rustls.
#[derive(Clone)]
pub struct WorkloadCert {
    id: SpiffeId,
    credentials: Credentials,
    not_before: SystemTime,
    not_after: SystemTime,
    received_at: SystemTime,
    certified: Arc<rustls::sign::CertifiedKey>,
}

impl std::fmt::Debug for WorkloadCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkloadCert")
            .field("id", &self.id)
            .field("not_before", &crate::fmt_time(self.not_before))
            .field("not_after", &crate::fmt_time(self.not_after))
            .finish_non_exhaustive()
    }
}

impl WorkloadCert {
    /// Wraps a chain and key for `id`; the leaf must carry exactly `id` and the key must load.
    pub fn new(id: SpiffeId, credentials: Credentials) -> Result<Self, Error> {
        let leaf = credentials
            .chain
            .first()
            .ok_or_else(|| Error::Certificate("empty certificate chain".into()))?;
        let info = CertInfo::parse(leaf)?;
        let got = info.spiffe_id()?;
        if got != id {
            return Err(Error::Certificate(format!(
                "the certificate is for {got}, not {id}"
            )));
        }
        let key = crate::tls::provider()
            .key_provider
            .load_private_key(credentials.key.clone_key())?;
        let certified = Arc::new(rustls::sign::CertifiedKey::new(
            credentials.chain.clone(),
            key,
        ));
        Ok(WorkloadCert {
            id,
            credentials,
            not_before: info.not_before,
            not_after: info.not_after,
            received_at: SystemTime::now(),
            certified,
        })
    }

    /// The identity the certificate proves.
    pub fn id(&self) -> &SpiffeId {
        &self.id
    }

    /// Chain (leaf first, without the root) and key.
    pub fn credentials(&self) -> &Credentials {
        &self.credentials
    }

    /// Start of validity of the leaf.
    pub fn not_before(&self) -> SystemTime {
        self.not_before
    }

    /// End of validity of the leaf.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// When this process received the certificate (refresh is planned from here, since CAs
    /// backdate `not_before` for clock skew).
    pub fn received_at(&self) -> SystemTime {
        self.received_at
    }

    /// Whether the leaf is valid at `now`.
    pub fn is_valid_at(&self, now: SystemTime) -> bool {
        self.not_before <= now && now < self.not_after
    }

    /// The chain and key as a rustls `CertifiedKey` (for a server certificate resolver).
    pub fn certified_key(&self) -> Arc<rustls::sign::CertifiedKey> {
        self.certified.clone()
    }
}

/// Body of the `cert_chain` fuzz target, kept here so an ordinary test runs it over the seed
/// corpus: PEM or DER input must never panic the parsers.
#[doc(hidden)]
#[cfg(feature = "fuzzing")]
pub fn fuzz_cert_chain(data: &[u8]) {
    if let Ok(chain) = parse_pem_chain(data, "fuzz input") {
        for cert in &chain {
            let info = CertInfo::parse(cert).expect("parse_pem_chain checked every certificate");
            let _ = info.spiffe_id();
        }
    }
    if let Ok(info) = CertInfo::parse(&CertificateDer::from(data)) {
        let _ = info.spiffe_id();
        let _ = info.is_valid_at(SystemTime::now());
    }
}
