//! Reading certificates and keys from PEM files, with errors that name the file.

use std::path::Path;

use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::Error;

/// Reads every `CERTIFICATE` block of a PEM file, in order (a chain: leaf first).
pub fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, Error> {
    parse_certs(&read(path)?, path)
}

/// Every `CERTIFICATE` block of PEM text, in order; errors name `source` (the file, or where
/// the text was given).
pub fn parse_certs(data: &[u8], source: &Path) -> Result<Vec<CertificateDer<'static>>, Error> {
    let certs = CertificateDer::pem_slice_iter(data)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Error::Pem {
            path: source.to_owned(),
            what: format!("malformed PEM: {e}"),
        })?;
    if certs.is_empty() {
        return Err(Error::Pem {
            path: source.to_owned(),
            what: "no CERTIFICATE block found".into(),
        });
    }
    Ok(certs)
}

/// Reads the first private key (PKCS#8, SEC1 or PKCS#1) of a PEM file.
pub fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, Error> {
    let data = read(path)?;
    PrivateKeyDer::from_pem_slice(&data).map_err(|e| Error::Pem {
        path: path.to_owned(),
        what: format!("no usable private key: {e}"),
    })
}

/// Reads trust roots: every certificate of a PEM file.
pub fn read_roots(path: &Path) -> Result<RootCertStore, Error> {
    parse_roots(&read(path)?, path)
}

/// Trust roots from PEM text: every certificate in it; errors name `source`.
pub fn parse_roots(data: &[u8], source: &Path) -> Result<RootCertStore, Error> {
    root_store(parse_certs(data, source)?, source)
}

/// A trust store of `certs`; errors name `source` (where they came from).
pub fn root_store(
    certs: Vec<CertificateDer<'static>>,
    source: &Path,
) -> Result<RootCertStore, Error> {
    let mut roots = RootCertStore::empty();
    for (i, cert) in certs.into_iter().enumerate() {
        roots.add(cert).map_err(|e| Error::Pem {
            path: source.to_owned(),
            what: format!("certificate {i} is not a usable trust root: {e}"),
        })?;
    }
    Ok(roots)
}

/// Encodes DER certificates as PEM `CERTIFICATE` blocks.
pub fn certs_to_pem(certs: &[CertificateDer<'_>]) -> String {
    certs
        .iter()
        .map(|c| pem_block("CERTIFICATE", c.as_ref()))
        .collect()
}

/// Encodes a private key as a PEM `PRIVATE KEY` (PKCS#8) block, or the matching block for SEC1
/// and PKCS#1 keys.
pub fn key_to_pem(key: &PrivateKeyDer<'_>) -> String {
    let label = match key {
        PrivateKeyDer::Sec1(_) => "EC PRIVATE KEY",
        PrivateKeyDer::Pkcs1(_) => "RSA PRIVATE KEY",
        _ => "PRIVATE KEY",
    };
    pem_block(label, key.secret_der())
}

/// Encodes one DER blob as a PEM block with the given label (e.g. `CERTIFICATE REQUEST`).
pub fn pem_block(label: &str, der: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut b64 = String::with_capacity(der.len().div_ceil(3) * 4);
    for chunk in der.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, b)| acc | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..4 {
            if i <= chunk.len() {
                b64.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                b64.push('=');
            }
        }
    }
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

fn read(path: &Path) -> Result<Vec<u8>, Error> {
    std::fs::read(path).map_err(|source| Error::Read {
        path: path.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pem_block_round_trips_through_the_parser() {
        for len in [0usize, 1, 2, 3, 4, 47, 48, 49, 300] {
            let der: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
            let text = pem_block("CERTIFICATE", &der);
            let parsed: Vec<_> = CertificateDer::pem_slice_iter(text.as_bytes())
                .collect::<Result<_, _>>()
                .unwrap();
            if len == 0 {
                assert!(parsed.is_empty() || parsed[0].as_ref().is_empty());
            } else {
                assert_eq!(parsed[0].as_ref(), &der[..], "length {len}");
            }
        }
    }

    #[test]
    fn errors_name_the_file() {
        let dir = std::env::temp_dir().join(format!("identity-pem-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "nothing here\n").unwrap();
        let err = read_certs(&empty).unwrap_err().to_string();
        assert!(
            err.contains("empty.pem") && err.contains("no CERTIFICATE"),
            "{err}"
        );
        let err = read_key(&empty).unwrap_err().to_string();
        assert!(err.contains("empty.pem"), "{err}");
        let err = read_certs(&dir.join("missing.pem"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing.pem"), "{err}");
        // PEM given as text: errors name where it was given.
        let err = parse_roots(b"nothing here", Path::new("CA_ROOT_CA"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("CA_ROOT_CA") && err.contains("no CERTIFICATE"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
