//! A development certificate authority: a self-signed root that issues workload certificates.
//!
//! For the embedded default, demos, tests and the local mesh: the root key lives in memory and,
//! with [`DevCa::init`], in PEM files (`root-cert.pem`, `root-key.pem`, readable by the owner
//! only). Production meshes get certificates from istiod's CA.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use x509_parser::prelude::FromDer;

use crate::pem::pem_block;
use crate::{Credentials, Error, SpiffeId};

/// Clock skew tolerated between nodes: certificates are valid from a minute before issuance.
const BACKDATE: Duration = Duration::from_secs(60);
/// Validity of a generated root.
const ROOT_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// File names inside a CA directory.
const ROOT_CERT: &str = "root-cert.pem";
const ROOT_KEY: &str = "root-key.pem";

/// A self-signed root CA for one trust domain.
pub struct DevCa {
    trust_domain: String,
    /// The root as issued (what clients trust).
    root_der: CertificateDer<'static>,
    root_pem: String,
    /// rcgen's view of the root, for signing (same key and subject as `root_der`).
    signer: rcgen::Certificate,
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
        validate_trust_domain(trust_domain)?;
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params
            .distinguished_name
            .push(DnType::OrganizationName, trust_domain);
        // A random suffix keeps two development roots apart, so a peer holding the wrong one
        // reports an unknown issuer rather than a bad signature.
        let tag: String = key.public_key_raw()[1..5]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        params.distinguished_name.push(
            DnType::CommonName,
            format!("ambient development root CA {tag}"),
        );
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - BACKDATE;
        params.not_after = now + ROOT_LIFETIME;
        let cert = params.self_signed(&key)?;
        Ok(DevCa {
            trust_domain: trust_domain.to_owned(),
            root_der: cert.der().clone(),
            root_pem: cert.pem(),
            signer: cert,
            key,
        })
    }

    /// Generates a root and writes it to `dir` (`root-cert.pem`, and `root-key.pem` with mode
    /// 0600). Refuses to overwrite an existing root.
    pub fn init(dir: &Path, trust_domain: &str) -> Result<Self, Error> {
        let cert_path = dir.join(ROOT_CERT);
        if cert_path.exists() {
            return Err(Error::Write {
                path: cert_path,
                source: std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    "a CA already exists here; remove it first to make a new one",
                ),
            });
        }
        let ca = Self::generate(trust_domain)?;
        create_dir(dir)?;
        write_private(&dir.join(ROOT_KEY), &ca.key.serialize_pem())?;
        write(&cert_path, &ca.root_pem)?;
        Ok(ca)
    }

    /// Loads a root written by [`DevCa::init`] (or any CA certificate and key in PEM).
    pub fn load(dir: &Path) -> Result<Self, Error> {
        let cert_path = dir.join(ROOT_CERT);
        let key_path = dir.join(ROOT_KEY);
        let root_pem = read(&cert_path)?;
        let key_pem = read(&key_path)?;
        let bad = |path: &Path, what: String| Error::Pem {
            path: path.to_owned(),
            what,
        };
        let key = KeyPair::from_pem(&key_pem).map_err(|e| bad(&key_path, e.to_string()))?;
        let root_der = crate::pem::read_certs(&cert_path)?.remove(0);
        let info = crate::CertInfo::parse(&root_der)?;
        if !info.is_ca {
            return Err(bad(&cert_path, "the certificate is not a CA".into()));
        }
        if info.spki != key.public_key_der() {
            return Err(bad(
                &key_path,
                format!("the key does not belong to {}", cert_path.display()),
            ));
        }
        let params = CertificateParams::from_ca_cert_pem(&root_pem)
            .map_err(|e| bad(&cert_path, e.to_string()))?;
        let trust_domain = params
            .distinguished_name
            .get(&DnType::OrganizationName)
            .and_then(dn_text)
            .ok_or_else(|| {
                bad(
                    &cert_path,
                    "the root has no O= naming its trust domain".into(),
                )
            })?;
        validate_trust_domain(&trust_domain)?;
        // rcgen signs with a certificate object; rebuilding one from the loaded root's subject
        // and key yields identical issuer fields, so issued chains verify against `root_der`.
        let signer = params.self_signed(&key)?;
        Ok(DevCa {
            trust_domain,
            root_der,
            root_pem,
            signer,
            key,
        })
    }

    /// The trust domain this root was made for (its subject's O).
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The root certificate.
    pub fn root(&self) -> CertificateDer<'static> {
        self.root_der.clone()
    }

    /// The root certificate in PEM.
    pub fn root_pem(&self) -> &str {
        &self.root_pem
    }

    /// The root as a rustls trust store.
    pub fn roots(&self) -> Arc<RootCertStore> {
        let mut roots = RootCertStore::empty();
        roots
            .add(self.root())
            .expect("a generated or loaded CA certificate is a valid trust anchor");
        Arc::new(roots)
    }

    /// The root as fixed [`TrustRoots`](crate::roots::TrustRoots).
    pub fn trust_roots(&self) -> crate::roots::TrustRoots {
        crate::roots::TrustRoots::fixed(vec![self.root()], Path::new("the CA's root"))
            .expect("a generated or loaded CA certificate is a valid trust anchor")
    }

    /// Issues a workload certificate (new P-256 key) whose only SAN is `id`, valid for `ttl`.
    pub fn issue(&self, id: &SpiffeId, ttl: Duration) -> Result<Credentials, Error> {
        let key = KeyPair::generate()?;
        let cert = self
            .leaf_params(id, ttl)?
            .signed_by(&key, &self.signer, &self.key)?;
        Ok(Credentials {
            chain: vec![cert.der().clone()],
            key: PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        })
    }

    /// Issues a TLS server certificate for DNS names and IP addresses (for serving the CA or a
    /// control plane over TLS), valid for `ttl`.
    pub fn issue_server(&self, names: &[&str], ttl: Duration) -> Result<Credentials, Error> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.subject_alt_names = names
            .iter()
            .map(|name| match name.parse::<std::net::IpAddr>() {
                Ok(ip) => Ok(SanType::IpAddress(ip)),
                Err(_) => (*name).try_into().map(SanType::DnsName),
            })
            .collect::<Result<_, rcgen::Error>>()?;
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(
            DnType::CommonName,
            names.first().copied().unwrap_or("server"),
        );
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - BACKDATE;
        params.not_after = now + ttl;
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &self.signer, &self.key)?;
        Ok(Credentials {
            chain: vec![cert.der().clone()],
            key: PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        })
    }

    /// Signs a PEM CSR for `id`, valid for `ttl`. The CSR's signature must verify (proof that the
    /// requester holds the key); its requested names are ignored: the certificate carries exactly
    /// `id`. Returns the chain, leaf first, root last.
    pub fn sign_csr(
        &self,
        csr_pem: &str,
        id: &SpiffeId,
        ttl: Duration,
    ) -> Result<Vec<CertificateDer<'static>>, Error> {
        verify_csr_signature(csr_pem)?;
        let mut csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| Error::Csr(e.to_string()))?;
        csr.params = self.leaf_params(id, ttl)?;
        let cert = csr.signed_by(&self.signer, &self.key)?;
        Ok(vec![cert.der().clone(), self.root()])
    }

    /// Like [`DevCa::sign_csr`], but with an explicit validity window (tests use it to make
    /// certificates that are already expired).
    pub fn sign_csr_valid_between(
        &self,
        csr_pem: &str,
        id: &SpiffeId,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<Vec<CertificateDer<'static>>, Error> {
        verify_csr_signature(csr_pem)?;
        let mut csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| Error::Csr(e.to_string()))?;
        let mut params = self.leaf_params(id, Duration::ZERO)?;
        params.not_before = not_before.into();
        params.not_after = not_after.into();
        csr.params = params;
        let cert = csr.signed_by(&self.signer, &self.key)?;
        Ok(vec![cert.der().clone(), self.root()])
    }

    /// Issues a certificate for `id` and writes `cert-chain.pem`, `key.pem` and `root-cert.pem`
    /// into `dir` (created if missing), the file names Istio uses for workload secrets.
    pub fn issue_to_dir(&self, id: &SpiffeId, ttl: Duration, dir: &Path) -> Result<(), Error> {
        let creds = self.issue(id, ttl)?;
        create_dir(dir)?;
        let key_pem = pem_block("PRIVATE KEY", creds.key.secret_der());
        write(
            &dir.join("cert-chain.pem"),
            &crate::pem::certs_to_pem(&creds.chain),
        )?;
        write_private(&dir.join("key.pem"), &key_pem)?;
        write(&dir.join("root-cert.pem"), &self.root_pem)?;
        Ok(())
    }

    /// Parameters of a workload leaf: URI SAN only, empty subject, server+client auth, backdated
    /// by a minute for clock skew.
    fn leaf_params(&self, id: &SpiffeId, ttl: Duration) -> Result<CertificateParams, Error> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.subject_alt_names = vec![SanType::URI(id.as_str().try_into()?)];
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
        Ok(params)
    }
}

/// Checks a PEM CSR's self-signature.
fn verify_csr_signature(csr_pem: &str) -> Result<(), Error> {
    let der = rustls::pki_types::CertificateSigningRequestDer::from_pem_slice(csr_pem.as_bytes())
        .map_err(|e| Error::Csr(format!("malformed PEM: {e}")))?;
    let (_, csr) =
        x509_parser::certification_request::X509CertificationRequest::from_der(der.as_ref())
            .map_err(|e| Error::Csr(e.to_string()))?;
    csr.verify_signature()
        .map_err(|e| Error::Csr(format!("signature does not verify: {e}")))
}

fn dn_text(value: &rcgen::DnValue) -> Option<String> {
    match value {
        rcgen::DnValue::Utf8String(s) => Some(s.clone()),
        rcgen::DnValue::PrintableString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

fn validate_trust_domain(trust_domain: &str) -> Result<(), Error> {
    SpiffeId::parse(&format!("spiffe://{trust_domain}"))
        .map(|_| ())
        .map_err(Error::SpiffeId)
}

fn read(path: &Path) -> Result<String, Error> {
    std::fs::read_to_string(path).map_err(|source| Error::Read {
        path: path.to_owned(),
        source,
    })
}

fn create_dir(dir: &Path) -> Result<(), Error> {
    std::fs::create_dir_all(dir).map_err(|source| Error::Write {
        path: dir.to_owned(),
        source,
    })
}

fn write(path: &Path, text: &str) -> Result<(), Error> {
    std::fs::write(path, text).map_err(|source| Error::Write {
        path: path.to_owned(),
        source,
    })
}

/// Writes a private key readable by its owner only.
fn write_private(path: &Path, text: &str) -> Result<(), Error> {
    common::fs::write_private(path, text).map_err(|source| Error::Write {
        path: path.to_owned(),
        source,
    })
}

/// A [`CertificateSource`](crate::ca::CertificateSource) that issues from a [`DevCa`] in
/// process, with a fixed lifetime: a proxy's `--ca-dir` (every local pod gets its certificate
/// without a CA server), tests. Each fetch is a new key and certificate.
#[derive(Debug, Clone)]
pub struct DevCaSource {
    ca: Arc<DevCa>,
    ttl: Duration,
}

impl DevCaSource {
    /// Issues from `ca`, each certificate valid for `ttl`.
    pub fn new(ca: Arc<DevCa>, ttl: Duration) -> Self {
        DevCaSource { ca, ttl }
    }
}

impl crate::ca::CertificateSource for DevCaSource {
    fn fetch(&self, id: &SpiffeId) -> crate::ca::FetchFuture<'_> {
        let issued = if id.trust_domain() != self.ca.trust_domain() {
            Err(Error::Certificate(format!(
                "the development CA signs trust domain {:?}, not {id}",
                self.ca.trust_domain()
            )))
        } else {
            self.ca
                .issue(id, self.ttl)
                .and_then(|creds| crate::WorkloadCert::new(id.clone(), creds))
        };
        Box::pin(std::future::ready(issued))
    }
}
