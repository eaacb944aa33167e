//! mTLS between two rustls endpoints built by `identity::tls`, handshaking in memory: the right
//! identity passes, and each kind of wrong peer fails with an error that says which kind it is.

mod common;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use common::{Failure, handshake};
use identity::tls::{self, IdentityMismatch, TrustDomainMismatch, WatchResolver};
use identity::{Credentials, DevCa, KeyAndCsr, SpiffeId};
use rustls::pki_types::ServerName;
use rustls::{CertificateError, ClientConfig, ServerConfig};

const HOUR: Duration = Duration::from_secs(3600);

fn id(text: &str) -> SpiffeId {
    text.parse().unwrap()
}

fn other_error<T: std::error::Error + 'static>(e: &rustls::Error) -> Option<&T> {
    match e {
        rustls::Error::InvalidCertificate(CertificateError::Other(other)) => other.0.downcast_ref(),
        _ => None,
    }
}

struct Mesh {
    ca: DevCa,
    web: SpiffeId,
    web_creds: Credentials,
    sleep_creds: Credentials,
}

fn mesh() -> Mesh {
    let ca = DevCa::generate("cluster.local").unwrap();
    let web = id("spiffe://cluster.local/ns/default/sa/web");
    let web_creds = ca.issue(&web, HOUR).unwrap();
    let sleep_creds = ca
        .issue(&id("spiffe://cluster.local/ns/default/sa/sleep"), HOUR)
        .unwrap();
    Mesh {
        ca,
        web,
        web_creds,
        sleep_creds,
    }
}

fn server(m: &Mesh, creds: &Credentials) -> ServerConfig {
    tls::server_config(
        creds.chain.clone(),
        creds.key.clone_key(),
        m.ca.roots(),
        "cluster.local",
    )
    .unwrap()
}

fn client(m: &Mesh, creds: &Credentials, expected: Vec<SpiffeId>) -> ClientConfig {
    tls::client_config(
        creds.chain.clone(),
        creds.key.clone_key(),
        m.ca.roots(),
        expected,
    )
    .unwrap()
}

#[test]
fn right_identity_passes() {
    let m = mesh();
    handshake(
        client(&m, &m.sleep_creds, vec![m.web.clone()]),
        server(&m, &m.web_creds),
    )
    .unwrap();
    // Any of several expected identities will do.
    let several = vec![
        id("spiffe://cluster.local/ns/default/sa/other"),
        m.web.clone(),
    ];
    handshake(
        client(&m, &m.sleep_creds, several),
        server(&m, &m.web_creds),
    )
    .unwrap();
}

#[test]
fn no_accept_any_mode_without_asking_for_it_by_name() {
    let m = mesh();
    // An empty expected set is refused when the configuration is built...
    let err = tls::client_config(
        m.sleep_creds.chain.clone(),
        m.sleep_creds.key.clone_key(),
        m.ca.roots(),
        Vec::new(),
    )
    .unwrap_err();
    assert!(matches!(err, identity::Error::NoExpectedIdentity), "{err}");
    // ...and the debugging configuration, asked for by its own name, accepts any identity
    // under the roots (and still nothing outside them).
    let any = tls::insecure_client_config_accepting_any_identity(
        m.sleep_creds.chain.clone(),
        m.sleep_creds.key.clone_key(),
        m.ca.roots(),
    )
    .unwrap();
    handshake(any, server(&m, &m.web_creds)).unwrap();
    let foreign = DevCa::generate("cluster.local").unwrap();
    let any_foreign = tls::insecure_client_config_accepting_any_identity(
        m.sleep_creds.chain.clone(),
        m.sleep_creds.key.clone_key(),
        foreign.roots(),
    )
    .unwrap();
    assert!(handshake(any_foreign, server(&m, &m.web_creds)).is_err());
}

#[test]
fn wrong_server_identity_is_an_identity_mismatch() {
    let m = mesh();
    let expected = vec![id("spiffe://cluster.local/ns/default/sa/db")];
    let Err(Failure::Client(e)) = handshake(
        client(&m, &m.sleep_creds, expected),
        server(&m, &m.web_creds),
    ) else {
        panic!("the client accepted the wrong server");
    };
    let mismatch: &IdentityMismatch = other_error(&e).unwrap_or_else(|| panic!("{e:?}"));
    assert_eq!(mismatch.presented, m.web.as_str());
    assert!(e.to_string().contains("sa/db"), "{e}");
}

#[test]
fn client_from_another_trust_domain_is_a_trust_domain_mismatch() {
    let m = mesh();
    // Same root, but the client's identity names another trust domain.
    let stranger =
        m.ca.issue(&id("spiffe://evil.example/ns/default/sa/sleep"), HOUR)
            .unwrap();
    let Err(Failure::Server(e)) = handshake(
        client(&m, &stranger, vec![m.web.clone()]),
        server(&m, &m.web_creds),
    ) else {
        panic!("the server accepted a client of another trust domain");
    };
    let mismatch: &TrustDomainMismatch = other_error(&e).unwrap_or_else(|| panic!("{e:?}"));
    assert_eq!(mismatch.expected, "cluster.local");
    assert_eq!(mismatch.presented.trust_domain(), "evil.example");
}

#[test]
fn unknown_root_is_unknown_issuer_on_either_side() {
    let m = mesh();
    let other = DevCa::generate("cluster.local").unwrap();
    let foreign = other.issue(&m.web, HOUR).unwrap();
    // The client does not know the server's root.
    let Err(Failure::Client(e)) = handshake(
        client(&m, &m.sleep_creds, vec![m.web.clone()]),
        server(&m, &foreign),
    ) else {
        panic!("the client accepted an unknown root");
    };
    assert!(
        matches!(
            e,
            rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer)
        ),
        "{e:?}"
    );
    // The server does not know the client's root.
    let foreign_client = other
        .issue(&id("spiffe://cluster.local/ns/default/sa/sleep"), HOUR)
        .unwrap();
    let Err(Failure::Server(e)) = handshake(
        client(&m, &foreign_client, vec![m.web.clone()]),
        server(&m, &m.web_creds),
    ) else {
        panic!("the server accepted an unknown root");
    };
    assert!(
        matches!(
            e,
            rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer)
        ),
        "{e:?}"
    );
}

#[test]
fn expired_certificate_is_expired() {
    let m = mesh();
    let csr = KeyAndCsr::generate(&m.web).unwrap();
    let past = SystemTime::now() - 2 * HOUR;
    let chain =
        m.ca.sign_csr_valid_between(&csr.csr_pem, &m.web, past, past + HOUR)
            .unwrap();
    let expired = Credentials {
        chain: vec![chain[0].clone()],
        key: csr.key,
    };
    let Err(Failure::Client(e)) = handshake(
        client(&m, &m.sleep_creds, vec![m.web.clone()]),
        server(&m, &expired),
    ) else {
        panic!("the client accepted an expired server certificate");
    };
    assert!(
        matches!(
            e,
            rustls::Error::InvalidCertificate(
                CertificateError::Expired | CertificateError::ExpiredContext { .. }
            )
        ),
        "{e:?}"
    );
}

/// Accepts any server: lets a test observe the server's verdict on a client without a certificate.
#[derive(Debug)]
struct AcceptAnyServer(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AcceptAnyServer {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &rustls::pki_types::CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &rustls::pki_types::CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[test]
fn missing_client_certificate_is_refused() {
    let m = mesh();
    let mut no_cert = ClientConfig::builder_with_provider(tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnyServer(tls::provider())))
        .with_no_client_auth();
    no_cert.alpn_protocols = vec![b"h2".to_vec()];
    match handshake(no_cert, server(&m, &m.web_creds)) {
        Err(Failure::Server(rustls::Error::NoCertificatesPresented)) => {}
        other => panic!("expected NoCertificatesPresented from the server, got {other:?}"),
    }
}

#[test]
fn resolver_serves_the_current_certificate_and_fails_closed_without_one() {
    let m = mesh();
    let (tx, rx) = tokio::sync::watch::channel(None);
    let config = tls::server_config_with_resolver(
        Arc::new(WatchResolver::new(rx)),
        m.ca.roots(),
        "cluster.local",
    )
    .unwrap();
    // No certificate yet: the handshake fails (on the server side).
    assert!(
        handshake(
            client(&m, &m.sleep_creds, vec![m.web.clone()]),
            config.clone()
        )
        .is_err()
    );
    // Publish one: the same server configuration now works.
    let cert = identity::WorkloadCert::new(m.web.clone(), m.web_creds.clone()).unwrap();
    tx.send(Some(Arc::new(cert))).unwrap();
    handshake(client(&m, &m.sleep_creds, vec![m.web.clone()]), config).unwrap();
}

#[test]
fn peer_spiffe_id_reads_the_leaf() {
    let m = mesh();
    assert_eq!(tls::peer_spiffe_id(&m.web_creds.chain).unwrap(), m.web);
    assert!(tls::peer_spiffe_id(&[]).is_err());
    assert!(
        tls::peer_spiffe_id(&[m.ca.root()]).is_err(),
        "a root has no SPIFFE id"
    );
}
