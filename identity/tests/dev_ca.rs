//! The development CA: files on disk, CSR signing, and what issued certificates contain.

mod common;

use std::time::{Duration, SystemTime};

use identity::pem::pem_block;
use identity::{CertInfo, DevCa, KeyAndCsr, SpiffeId};
use rustls::pki_types::CertificateSigningRequestDer;
use rustls::pki_types::pem::PemObject;

const HOUR: Duration = Duration::from_secs(3600);

struct TempDir(std::path::PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("identity-devca-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn id(text: &str) -> SpiffeId {
    text.parse().unwrap()
}

#[test]
fn init_then_load_issues_chains_that_verify_against_the_original_root() {
    let dir = TempDir::new("load");
    let created = DevCa::init(&dir.0, "mesh.example").unwrap();
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(dir.0.join("root-key.pem"))
            .unwrap()
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600, "the root key must be private");
    assert!(
        DevCa::init(&dir.0, "mesh.example").is_err(),
        "init must not overwrite a CA"
    );

    let loaded = DevCa::load(&dir.0).unwrap();
    assert_eq!(loaded.trust_domain(), "mesh.example");
    assert_eq!(loaded.root(), created.root());
    // A certificate from the loaded CA must be accepted by a peer that trusts the root on disk.
    let web = id("spiffe://mesh.example/ns/default/sa/web");
    let creds = loaded.issue(&web, HOUR).unwrap();
    let server =
        identity::tls::server_config(creds.chain, creds.key, created.roots(), "mesh.example")
            .unwrap();
    let client_creds = created
        .issue(&id("spiffe://mesh.example/ns/default/sa/sleep"), HOUR)
        .unwrap();
    let client = identity::tls::client_config(
        client_creds.chain,
        client_creds.key,
        created.roots(),
        vec![web],
    )
    .unwrap();
    common::handshake(client, server).unwrap();
}

#[test]
fn load_reports_missing_and_mismatched_files() {
    let dir = TempDir::new("bad");
    let err = DevCa::load(&dir.0).unwrap_err().to_string();
    assert!(err.contains("root-cert.pem"), "{err}");
    DevCa::init(&dir.0, "cluster.local").unwrap();
    // Swap in another CA's key: the pair no longer matches.
    let other = TempDir::new("other");
    DevCa::init(&other.0, "cluster.local").unwrap();
    std::fs::copy(other.0.join("root-key.pem"), dir.0.join("root-key.pem")).unwrap();
    let err = DevCa::load(&dir.0).unwrap_err().to_string();
    assert!(
        err.contains("root-key.pem") && err.contains("does not belong"),
        "{err}"
    );
}

#[test]
fn csr_signing_puts_exactly_the_granted_identity_on_the_csr_key() {
    let ca = DevCa::generate("cluster.local").unwrap();
    let asked = id("spiffe://cluster.local/ns/default/sa/sleep");
    let csr = KeyAndCsr::generate(&asked).unwrap();
    assert!(
        csr.csr_pem
            .starts_with("-----BEGIN CERTIFICATE REQUEST-----")
    );
    let chain = ca.sign_csr(&csr.csr_pem, &asked, HOUR).unwrap();
    assert_eq!(chain.len(), 2, "leaf and root");
    assert_eq!(chain[1], ca.root());
    let leaf = CertInfo::parse(&chain[0]).unwrap();
    assert_eq!(leaf.spiffe_id().unwrap(), asked);
    assert_eq!(leaf.spki, csr.spki, "the leaf certifies the CSR's key");
    assert!(!leaf.is_ca);
    let now = SystemTime::now();
    assert!(leaf.is_valid_at(now));
    assert!(leaf.not_after <= now + HOUR + Duration::from_secs(5));
    // The CA decides the identity, whatever the CSR asked for.
    let granted = id("spiffe://cluster.local/ns/other/sa/x");
    let chain = ca.sign_csr(&csr.csr_pem, &granted, HOUR).unwrap();
    assert_eq!(
        CertInfo::parse(&chain[0]).unwrap().uri_sans,
        vec![granted.as_str()]
    );
}

#[test]
fn tampered_or_malformed_csrs_are_refused() {
    let ca = DevCa::generate("cluster.local").unwrap();
    let asked = id("spiffe://cluster.local/ns/default/sa/sleep");
    assert!(ca.sign_csr("not a csr", &asked, HOUR).is_err());
    // Flip one bit inside the DER: the signature (or the structure) no longer checks out.
    let csr = KeyAndCsr::generate(&asked).unwrap();
    let mut der = CertificateSigningRequestDer::from_pem_slice(csr.csr_pem.as_bytes())
        .unwrap()
        .as_ref()
        .to_vec();
    let at = der.len() - 20;
    der[at] ^= 0x01;
    let tampered = pem_block("CERTIFICATE REQUEST", &der);
    let err = ca.sign_csr(&tampered, &asked, HOUR).unwrap_err();
    assert!(matches!(err, identity::Error::Csr(_)), "{err}");
}
