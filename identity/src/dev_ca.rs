//! A development certificate authority: a self-signed root that issues workload certificates.
//!
//! For the embedded default, demos and tests only: the root key lives in memory (and in PEM files
//! if you write them). Production meshes get certificates from istiod's CA.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::RootCertStore;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::pem::pem_block;
use crate::{Credentials, Error};

/// Clock skew tolerated between nodes: certificates are valid from a minute before issuance.
const BACKDATE: Duration = Duration::from_secs(60);

/// A self-signed root CA for one trust domain.
pub struct DevCa {
    trust_domain: String,
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl std::fmt::Debug for DevCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DevCa")
            .field("trust_domain", &self.trust_domain)
            .finish_non_exhaustive()
    }
}

impl DevCa {
    /// Generates a new root (ECDSA P-256, valid for ten years) for `trust_domain`.
    pub fn generate(trust_domain: &str) -> Result<Self, Error> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params
            .distinguished_name
            .push(DnType::OrganizationName, trust_domain);
        params
            .distinguished_name
            .push(DnType::CommonName, "ambient development root CA");
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - BACKDATE;
        params.not_after = now + Duration::from_secs(10 * 365 * 24 * 3600);
        let cert = params.self_signed(&key)?;
        Ok(DevCa {
            trust_domain: trust_domain.to_owned(),
            cert,
            key,
        })
    }

    /// The trust domain this root was made for.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The root certificate.
    pub fn root(&self) -> CertificateDer<'static> {
        self.cert.der().clone()
    }

    /// The root as a rustls trust store.
    pub fn roots(&self) -> Arc<RootCertStore> {
        let mut roots = RootCertStore::empty();
        roots
            .add(self.root())
            .expect("a freshly generated root is a valid trust anchor");
        Arc::new(roots)
    }

    /// Issues a workload certificate whose only SAN is the URI `id`, valid for `ttl`.
    ///
    /// The key is ECDSA P-256, the subject is empty, and the certificate is usable for both TLS
    /// server and client authentication, as Istio's workload certificates are.
    pub fn issue(&self, id: &str, ttl: Duration) -> Result<Credentials, Error> {
        let uri = id
            .to_owned()
            .try_into()
            .map_err(|e: rcgen::Error| Error::Identity {
                id: id.to_owned(),
                reason: e.to_string(),
            })?;
        if !id.starts_with("spiffe://") {
            return Err(Error::Identity {
                id: id.to_owned(),
                reason: "must start with spiffe://".into(),
            });
        }
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.subject_alt_names = vec![SanType::URI(uri)];
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - BACKDATE;
        params.not_after = now + ttl;
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &self.cert, &self.key)?;
        Ok(Credentials {
            chain: vec![cert.der().clone()],
            key: PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        })
    }

    /// Issues a certificate for `id` and writes `cert-chain.pem`, `key.pem` and `root-cert.pem`
    /// into `dir` (created if missing), the file names Istio uses for workload secrets.
    pub fn issue_to_dir(&self, id: &str, ttl: Duration, dir: &Path) -> Result<(), Error> {
        let creds = self.issue(id, ttl)?;
        std::fs::create_dir_all(dir).map_err(|source| Error::Write {
            path: dir.to_owned(),
            source,
        })?;
        let key_pem = pem_block("PRIVATE KEY", creds.key.secret_der());
        write(
            &dir.join("cert-chain.pem"),
            &crate::pem::certs_to_pem(&creds.chain),
        )?;
        write_private(&dir.join("key.pem"), &key_pem)?;
        write(&dir.join("root-cert.pem"), &self.cert.pem())?;
        Ok(())
    }
}

fn write(path: &Path, text: &str) -> Result<(), Error> {
    std::fs::write(path, text).map_err(|source| Error::Write {
        path: path.to_owned(),
        source,
    })
}

/// Writes a private key readable by its owner only.
fn write_private(path: &Path, text: &str) -> Result<(), Error> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let err = |source| Error::Write {
        path: path.to_owned(),
        source,
    };
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(err)?;
    file.write_all(text.as_bytes()).map_err(err)
}
