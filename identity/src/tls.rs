//! rustls configurations for HBONE: TLS 1.3 only, ALPN `h2`, mutual authentication by SPIFFE id.
//!
//! Workload certificates carry a SPIFFE URI SAN and no DNS or IP names, so the usual hostname
//! check cannot apply. The client verifier checks the chain against the trust roots, then requires
//! the server's SPIFFE id to be one of the identities expected for the destination. The server
//! verifier checks the client chain against the roots, then requires the client's SPIFFE id to be
//! in the server's trust domain. Both reject, never warn, and their errors can be told apart:
//! [`IdentityMismatch`] and [`TrustDomainMismatch`] travel inside
//! `rustls::Error::InvalidCertificate(CertificateError::Other(..))`; an unknown root, an expired
//! certificate and a missing client certificate are rustls's own `UnknownIssuer`, `Expired` and
//! `NoCertificatesPresented`.

use std::sync::{Arc, Mutex};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ParsedCertificate, ResolvesServerCert, WebPkiClientVerifier};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, OtherError,
    RootCertStore, ServerConfig, SignatureScheme,
};

use crate::{CertInfo, Error, SpiffeId};

/// A verifier's three signature methods, checked with its `algorithms` field (the provider's).
macro_rules! signatures_checked_with_own_algorithms {
    () => {
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.algorithms.supported_schemes()
        }
    };
}

/// The ALPN protocol HBONE negotiates.
pub const ALPN_H2: &[u8] = b"h2";

/// The crypto provider used throughout the project: rustls's aws-lc-rs provider, as Istio's
/// ztunnel uses by default.
///
/// Its AES-GCM uses the AVX-512/VAES code paths where the CPU has them, 1.4-1.5x the speed of
/// ring's on the machines we benchmark on, and record encryption is the largest single cost of
/// a bulk transfer through the proxy (BENCHMARKS.md, issue 12 lever 6). Cipher suites in order:
/// TLS 1.3 AES-256-GCM, AES-128-GCM, ChaCha20-Poly1305; key exchange X25519 first (X25519MLKEM768
/// offered last).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// The server presented a SPIFFE id other than the ones expected for the destination.
#[derive(Clone, PartialEq, Eq, thiserror::Error)]
#[error("server identity {presented} is not one of the expected {}", list(.expected))]
pub struct IdentityMismatch {
    /// What the destination may present.
    pub expected: Vec<SpiffeId>,
    /// What it presented (its URI SANs).
    pub presented: String,
}

/// The peer's SPIFFE id belongs to another trust domain.
#[derive(Clone, PartialEq, Eq, thiserror::Error)]
#[error("peer identity {presented} is not in trust domain {expected:?}")]
pub struct TrustDomainMismatch {
    /// Our trust domain.
    pub expected: String,
    /// The peer's identity.
    pub presented: SpiffeId,
}

/// A client configuration that presents `chain`/`key` and accepts a server whose chain verifies
/// against `roots` and whose SPIFFE id is one of `expected`.
///
/// `expected` must not be empty ([`Error::NoExpectedIdentity`]): there is no accept-any mode here.
/// A debugging tool that really means "any identity under these roots" calls
/// [`insecure_client_config_accepting_any_identity`].
pub fn client_config(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    roots: Arc<RootCertStore>,
    expected: Vec<SpiffeId>,
) -> Result<ClientConfig, Error> {
    if expected.is_empty() {
        return Err(Error::NoExpectedIdentity);
    }
    build_client_config(chain, key, roots, Expected::OneOf(expected))
}

/// **Insecure, for debugging tools only**: a client configuration that accepts a server with any
/// SPIFFE identity whose chain verifies against `roots`, so any workload of the mesh can
/// impersonate any destination. Never use it on a data path.
pub fn insecure_client_config_accepting_any_identity(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    roots: Arc<RootCertStore>,
) -> Result<ClientConfig, Error> {
    build_client_config(chain, key, roots, Expected::AnyUnderRoots)
}

fn build_client_config(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    roots: Arc<RootCertStore>,
    expected: Expected,
) -> Result<ClientConfig, Error> {
    if roots.is_empty() {
        return Err(Error::Roots("no trust roots given".into()));
    }
    let provider = provider();
    let verifier = ServerIdVerifier {
        roots,
        expected,
        algorithms: provider.signature_verification_algorithms,
    };
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_auth_cert(chain, key)?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    // HBONE's record layer takes the traffic keys from rustls after the handshake.
    config.enable_secret_extraction = true;
    Ok(config)
}

/// A server configuration that presents `chain`/`key` and requires a client certificate that
/// chains to `roots` and carries a SPIFFE id of `trust_domain`.
pub fn server_config(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    roots: Arc<RootCertStore>,
    trust_domain: &str,
) -> Result<ServerConfig, Error> {
    server_config_with_resolver(single_cert(chain, key)?, roots, trust_domain)
}

/// A resolver that always presents `chain`/`key` (for [`server_config_with_resolver`] and
/// [`server_config_following`]).
pub fn single_cert(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<Arc<dyn ResolvesServerCert>, Error> {
    let key = provider().key_provider.load_private_key(key)?;
    let certified = Arc::new(rustls::sign::CertifiedKey::new(chain, key));
    Ok(Arc::new(rustls::sign::SingleCertAndKey::from(certified)))
}

/// Like [`server_config`], with the certificate chosen for each connection by `resolver` (the
/// proxy serves the destination pod's identity; see [`WatchResolver`] for a rotating one).
pub fn server_config_with_resolver(
    resolver: Arc<dyn ResolvesServerCert>,
    roots: Arc<RootCertStore>,
    trust_domain: &str,
) -> Result<ServerConfig, Error> {
    if roots.is_empty() {
        return Err(Error::Roots("no trust roots given".into()));
    }
    SpiffeId::parse(&format!("spiffe://{trust_domain}"))?;
    let provider = provider();
    let inner = WebPkiClientVerifier::builder_with_provider(roots, provider.clone())
        .build()
        .map_err(|e| Error::Roots(e.to_string()))?;
    let verifier = TrustDomainVerifier {
        inner,
        trust_domain: trust_domain.to_owned(),
    };
    hbone_server_config(provider, Arc::new(verifier), resolver)
}

/// TLS 1.3 only, ALPN `h2`, the traffic keys handed to HBONE's record layer.
fn hbone_server_config(
    provider: Arc<CryptoProvider>,
    verifier: Arc<dyn ClientCertVerifier>,
    resolver: Arc<dyn ResolvesServerCert>,
) -> Result<ServerConfig, Error> {
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    // HBONE's record layer takes the traffic keys from rustls after the handshake.
    config.enable_secret_extraction = true;
    Ok(config)
}

/// Like [`server_config_with_resolver`], with client chains verified against `roots` as they
/// are at each handshake: a followed root file that changes is used by the next handshake,
/// without a new configuration ([`TrustRoots`](crate::roots::TrustRoots)).
pub fn server_config_following(
    resolver: Arc<dyn ResolvesServerCert>,
    roots: Arc<crate::roots::TrustRoots>,
    trust_domain: &str,
) -> Result<ServerConfig, Error> {
    SpiffeId::parse(&format!("spiffe://{trust_domain}"))?;
    let provider = provider();
    let verifier = FollowingVerifier {
        trust_domain: trust_domain.to_owned(),
        built: Mutex::new(None),
        algorithms: provider.signature_verification_algorithms,
        roots,
    };
    // Built once now, so that roots that cannot make a verifier fail here, not at a handshake.
    verifier
        .verifier()
        .map_err(|e| Error::Roots(e.to_string()))?;
    hbone_server_config(provider, Arc::new(verifier), resolver)
}

/// Client verification against the roots as they are now: a [`TrustDomainVerifier`] made of the
/// current roots, made again when they change.
#[derive(Debug)]
struct FollowingVerifier {
    roots: Arc<crate::roots::TrustRoots>,
    trust_domain: String,
    /// The roots the verifier was made of, and the verifier.
    built: Mutex<Option<(Arc<crate::roots::LoadedRoots>, Arc<TrustDomainVerifier>)>>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl FollowingVerifier {
    fn verifier(&self) -> Result<Arc<TrustDomainVerifier>, rustls::Error> {
        let now = self.roots.current();
        let mut built = self.built.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((roots, verifier)) = built.as_ref()
            && Arc::ptr_eq(roots, &now)
        {
            return Ok(verifier.clone());
        }
        let inner = WebPkiClientVerifier::builder_with_provider(now.store.clone(), provider())
            .build()
            .map_err(|e| other(RootsUnusable(e.to_string())))?;
        let verifier = Arc::new(TrustDomainVerifier {
            inner,
            trust_domain: self.trust_domain.clone(),
        });
        *built = Some((now, verifier.clone()));
        Ok(verifier)
    }
}

impl ClientCertVerifier for FollowingVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // No hints: they would be those of roots that may change under the configuration.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.verifier()?
            .verify_client_cert(end_entity, intermediates, now)
    }

    signatures_checked_with_own_algorithms!();
}

/// The roots cannot make a client verifier.
#[derive(Debug)]
struct RootsUnusable(String);

impl std::fmt::Display for RootsUnusable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the mesh's trust roots cannot verify clients: {}",
            self.0
        )
    }
}

impl std::error::Error for RootsUnusable {}

/// The SPIFFE id of a peer from its verified chain (leaf first), as a finished handshake reports
/// it (`peer_certificates()`).
pub fn peer_spiffe_id(chain: &[CertificateDer<'_>]) -> Result<SpiffeId, Error> {
    let leaf = chain
        .first()
        .ok_or_else(|| Error::Certificate("the peer presented no certificate".into()))?;
    CertInfo::parse(leaf)?.spiffe_id()
}

/// The URI SANs of a peer's leaf certificate (the first of `chain`), or an empty list.
pub fn peer_uri_sans(chain: &[CertificateDer<'_>]) -> Vec<String> {
    chain
        .first()
        .and_then(|leaf| crate::uri_sans(leaf).ok())
        .unwrap_or_default()
}

/// A server certificate resolver that serves the latest certificate of a watch channel (such as
/// [`SecretManager::subscribe`](crate::SecretManager::subscribe)). No certificate, or an expired
/// one, means the handshake fails: it never serves an expired certificate.
#[derive(Debug)]
pub struct WatchResolver {
    rx: tokio::sync::watch::Receiver<Option<Arc<crate::WorkloadCert>>>,
}

impl WatchResolver {
    /// Serves whatever `rx` holds at each handshake.
    pub fn new(rx: tokio::sync::watch::Receiver<Option<Arc<crate::WorkloadCert>>>) -> Self {
        WatchResolver { rx }
    }
}

impl ResolvesServerCert for WatchResolver {
    fn resolve(
        &self,
        _hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        let current = self.rx.borrow();
        match current.as_ref() {
            Some(cert) if cert.is_valid_at(std::time::SystemTime::now()) => {
                Some(cert.certified_key())
            }
            Some(cert) => {
                tracing::warn!(id = %cert.id(), "refusing a TLS handshake: the certificate has expired");
                None
            }
            None => None,
        }
    }
}

/// A client configuration presenting a workload's certificate (see [`client_config`]).
pub fn client_config_for(
    cert: &crate::WorkloadCert,
    roots: Arc<RootCertStore>,
    expected: Vec<SpiffeId>,
) -> Result<ClientConfig, Error> {
    let creds = cert.credentials();
    client_config(creds.chain.clone(), creds.key.clone_key(), roots, expected)
}

/// Which server identities a client accepts.
#[derive(Debug)]
enum Expected {
    /// One of these (an empty list accepts nothing).
    OneOf(Vec<SpiffeId>),
    /// Any identity whose chain verifies (debugging tools only).
    AnyUnderRoots,
}

/// Verifies a server's chain against fixed roots, then its SPIFFE id against an expected set.
#[derive(Debug)]
struct ServerIdVerifier {
    roots: Arc<RootCertStore>,
    expected: Expected,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for ServerIdVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.algorithms.all,
        )?;
        if let Expected::OneOf(expected) = &self.expected {
            let sans = crate::uri_sans(end_entity).map_err(other)?;
            if !sans
                .iter()
                .any(|san| expected.iter().any(|id| id.as_str() == san))
            {
                return Err(other(IdentityMismatch {
                    expected: expected.clone(),
                    presented: sans.join(", "),
                }));
            }
        }
        Ok(ServerCertVerified::assertion())
    }

    signatures_checked_with_own_algorithms!();
}

/// WebPKI client verification, then the client's SPIFFE id must be in our trust domain.
#[derive(Debug)]
struct TrustDomainVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    trust_domain: String,
}

impl ClientCertVerifier for TrustDomainVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.inner
            .verify_client_cert(end_entity, intermediates, now)?;
        let id = CertInfo::parse(end_entity)
            .and_then(|info| info.spiffe_id())
            .map_err(other)?;
        if id.trust_domain() != self.trust_domain {
            return Err(other(TrustDomainMismatch {
                expected: self.trust_domain.clone(),
                presented: id,
            }));
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

fn other<E: std::error::Error + Send + Sync + 'static>(e: E) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
}

fn list(ids: &[SpiffeId]) -> String {
    let names: Vec<&str> = ids.iter().map(SpiffeId::as_str).collect();
    format!("[{}]", names.join(", "))
}

// rustls prints the inner error with `Debug`; make that the readable sentence.
impl std::fmt::Debug for IdentityMismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

impl std::fmt::Debug for TrustDomainMismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}
