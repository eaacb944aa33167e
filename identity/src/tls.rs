//! rustls configurations for HBONE: TLS 1.3, ALPN `h2`, mutual authentication.
//!
//! Workload certificates carry a SPIFFE URI SAN and no DNS or IP names, so the usual hostname
//! check cannot apply. The client verifier here checks the chain against the trust roots and then
//! requires the server's URI SAN to be one of the identities expected for the destination
//! (rejecting, never warning). The server requires a client chain from the same roots.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, OtherError, RootCertStore, ServerConfig,
    SignatureScheme,
};

use crate::{Error, uri_sans};

/// The ALPN protocol HBONE negotiates.
pub const ALPN_H2: &[u8] = b"h2";

/// The crypto provider used throughout the project (ring).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A client configuration that presents `chain`/`key` and accepts a server whose chain verifies
/// against `roots` and, when `expected_sans` is given, whose certificate carries one of those URI
/// SANs. TLS 1.3 only, ALPN `h2`.
pub fn client_config(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    roots: Arc<RootCertStore>,
    expected_sans: Option<Vec<String>>,
) -> Result<ClientConfig, Error> {
    if roots.is_empty() {
        return Err(Error::Roots("no trust roots given".into()));
    }
    let provider = provider();
    let verifier = SanVerifier {
        roots,
        expected_sans,
        algorithms: provider.signature_verification_algorithms,
    };
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_auth_cert(chain, key)?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(config)
}

/// A server configuration that presents `chain`/`key` and requires a client certificate that
/// chains to `roots`. TLS 1.3 only, ALPN `h2`.
pub fn server_config(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    roots: Arc<RootCertStore>,
) -> Result<ServerConfig, Error> {
    if roots.is_empty() {
        return Err(Error::Roots("no trust roots given".into()));
    }
    let provider = provider();
    let client_verifier = WebPkiClientVerifier::builder_with_provider(roots, provider.clone())
        .build()
        .map_err(|e| Error::Roots(e.to_string()))?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(client_verifier)
        .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(config)
}

/// The URI SANs of a peer's leaf certificate (the first of `chain`), or an empty list.
pub fn peer_uri_sans(chain: &[CertificateDer<'_>]) -> Vec<String> {
    chain
        .first()
        .and_then(|leaf| uri_sans(leaf).ok())
        .unwrap_or_default()
}

/// Verifies a server's chain against fixed roots, then its URI SAN against an expected set.
#[derive(Debug)]
struct SanVerifier {
    roots: Arc<RootCertStore>,
    expected_sans: Option<Vec<String>>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for SanVerifier {
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
        if let Some(expected) = &self.expected_sans {
            let sans = uri_sans(end_entity).map_err(|e| {
                rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
            })?;
            if !sans.iter().any(|san| expected.contains(san)) {
                return Err(rustls::Error::InvalidCertificate(CertificateError::Other(
                    OtherError(Arc::new(SanMismatch {
                        expected: expected.clone(),
                        presented: sans,
                    })),
                )));
            }
        }
        Ok(ServerCertVerified::assertion())
    }

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
}

/// The server proved an identity other than the expected ones.
#[derive(thiserror::Error)]
#[error("server identity {presented:?} is not one of the expected {expected:?}")]
struct SanMismatch {
    expected: Vec<String>,
    presented: Vec<String>,
}

// rustls prints the inner error with `Debug`; make that the readable sentence.
impl std::fmt::Debug for SanMismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DevCa;
    use std::time::Duration;

    const HOUR: Duration = Duration::from_secs(3600);

    /// Runs a TLS handshake in memory and returns the client's error, if any.
    fn handshake(client: ClientConfig, server: ServerConfig) -> Result<(), rustls::Error> {
        let name = ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into());
        let mut c = rustls::ClientConnection::new(Arc::new(client), name)?;
        let mut s = rustls::ServerConnection::new(Arc::new(server))?;
        for _ in 0..10 {
            let mut buf = Vec::new();
            c.write_tls(&mut buf).unwrap();
            s.read_tls(&mut &buf[..]).unwrap();
            s.process_new_packets()?;
            let mut buf = Vec::new();
            s.write_tls(&mut buf).unwrap();
            c.read_tls(&mut &buf[..]).unwrap();
            c.process_new_packets()?;
            if !c.is_handshaking() && !s.is_handshaking() {
                return Ok(());
            }
        }
        panic!("handshake did not finish")
    }

    #[test]
    fn expected_san_passes_and_others_fail() {
        let ca = DevCa::generate("cluster.local").unwrap();
        let web = ca
            .issue("spiffe://cluster.local/ns/default/sa/web", HOUR)
            .unwrap();
        let sleep = ca
            .issue("spiffe://cluster.local/ns/default/sa/sleep", HOUR)
            .unwrap();
        let server = || server_config(web.chain.clone(), web.key.clone_key(), ca.roots()).unwrap();
        let client = |expected: Option<Vec<String>>| {
            client_config(
                sleep.chain.clone(),
                sleep.key.clone_key(),
                ca.roots(),
                expected,
            )
            .unwrap()
        };
        handshake(client(None), server()).unwrap();
        let right = vec!["spiffe://cluster.local/ns/default/sa/web".to_owned()];
        handshake(client(Some(right)), server()).unwrap();
        let wrong = vec!["spiffe://cluster.local/ns/default/sa/db".to_owned()];
        let err = handshake(client(Some(wrong)), server())
            .unwrap_err()
            .to_string();
        assert!(err.contains("sa/web") && err.contains("sa/db"), "{err}");
    }

    #[test]
    fn unknown_root_fails_both_ways() {
        let ca = DevCa::generate("cluster.local").unwrap();
        let other = DevCa::generate("cluster.local").unwrap();
        let web = ca
            .issue("spiffe://cluster.local/ns/default/sa/web", HOUR)
            .unwrap();
        let stranger = other
            .issue("spiffe://cluster.local/ns/default/sa/sleep", HOUR)
            .unwrap();
        // Client trusts only `other`: the server's chain is unknown.
        let client = client_config(
            stranger.chain.clone(),
            stranger.key.clone_key(),
            other.roots(),
            None,
        )
        .unwrap();
        let server = server_config(web.chain.clone(), web.key.clone_key(), ca.roots()).unwrap();
        assert!(handshake(client, server).is_err());
        // Client trusts the server, but the server does not trust the client's root.
        let client = client_config(stranger.chain, stranger.key, ca.roots(), None).unwrap();
        let server = server_config(web.chain, web.key, ca.roots()).unwrap();
        assert!(handshake(client, server).is_err());
    }

    #[test]
    fn empty_roots_are_refused() {
        let ca = DevCa::generate("cluster.local").unwrap();
        let web = ca
            .issue("spiffe://cluster.local/ns/default/sa/web", HOUR)
            .unwrap();
        let empty = Arc::new(RootCertStore::empty());
        assert!(server_config(web.chain.clone(), web.key.clone_key(), empty.clone()).is_err());
        assert!(client_config(web.chain, web.key, empty, None).is_err());
    }

    #[test]
    fn issued_certificate_carries_exactly_the_id() {
        let ca = DevCa::generate("cluster.local").unwrap();
        let creds = ca.issue("spiffe://cluster.local/ns/a/sa/b", HOUR).unwrap();
        assert_eq!(
            uri_sans(&creds.chain[0]).unwrap(),
            vec!["spiffe://cluster.local/ns/a/sa/b"]
        );
        assert!(ca.issue("https://example.com/x", HOUR).is_err());
    }
}
