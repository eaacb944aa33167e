//! The mesh's trust roots followed from a file replaced in place: handshakes after the change
//! verify against the new roots without a new configuration or a restart, and a file that has
//! become unusable keeps the roots in use.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::{Failure, handshake};
use identity::roots::TrustRoots;
use identity::{DevCa, SpiffeId, tls};
use rustls::ServerConfig;

const HOUR: Duration = Duration::from_secs(3600);

fn id(sa: &str) -> SpiffeId {
    format!("spiffe://cluster.local/ns/default/sa/{sa}")
        .parse()
        .unwrap()
}

/// Replaces `path` the way a ConfigMap update does: a new file renamed over the old one.
fn replace(path: &Path, text: &str) {
    let fresh = path.with_extension("new");
    std::fs::write(&fresh, text).unwrap();
    std::fs::rename(&fresh, path).unwrap();
}

/// A server presenting `web` (from `ca`) that verifies clients against `roots` as they are now.
fn server(ca: &DevCa, roots: Arc<TrustRoots>) -> ServerConfig {
    let creds = ca.issue(&id("web"), HOUR).unwrap();
    let resolver = tls::single_cert(creds.chain, creds.key).unwrap();
    tls::server_config_following(resolver, roots, "cluster.local").unwrap()
}

/// Whether a client with a `sleep` certificate from `client_ca` is accepted by `server`.
fn accepted(server: &ServerConfig, client_ca: &DevCa, server_ca: &DevCa) -> Result<(), Failure> {
    let creds = client_ca.issue(&id("sleep"), HOUR).unwrap();
    let client =
        tls::client_config(creds.chain, creds.key, server_ca.roots(), vec![id("web")]).unwrap();
    handshake(client, server.clone())
}

/// A scratch directory named after `tag`, a root file in it holding `old`'s root, and two CAs,
/// `old` and `new`.
fn rotation(tag: &str) -> (std::path::PathBuf, std::path::PathBuf, DevCa, DevCa) {
    let dir = std::env::temp_dir().join(format!("identity-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("root-cert.pem");
    let (old, new) = (
        DevCa::generate("cluster.local").unwrap(),
        DevCa::generate("cluster.local").unwrap(),
    );
    std::fs::write(&file, old.root_pem()).unwrap();
    (dir, file, old, new)
}

#[test]
fn a_rotated_root_file_is_used_by_the_next_handshake_and_a_broken_one_is_not() {
    let (dir, file, old, new) = rotation("roots");
    let roots = Arc::new(
        TrustRoots::follow(&file)
            .unwrap()
            .with_check_interval(Duration::ZERO),
    );
    let config = server(&old, roots.clone());
    accepted(&config, &old, &old).unwrap();
    assert!(matches!(
        accepted(&config, &new, &old),
        Err(Failure::Server(_))
    ));

    // Rotation, step one: both roots. The same configuration now accepts either.
    replace(&file, &format!("{}{}", old.root_pem(), new.root_pem()));
    accepted(&config, &old, &old).unwrap();
    accepted(&config, &new, &old).unwrap();
    assert_eq!(roots.current().certs.len(), 2);

    // A half-written file: the roots in use stay (no one is let in, no one is cut off).
    replace(&file, "-----BEGIN CERTIFICATE-----\nMIIB");
    accepted(&config, &new, &old).unwrap();
    accepted(&config, &old, &old).unwrap();
    assert_eq!(roots.current().certs.len(), 2);

    // Step two: the old root is gone, and with it the clients it vouched for.
    replace(&file, new.root_pem());
    accepted(&config, &new, &old).unwrap();
    assert!(matches!(
        accepted(&config, &old, &old),
        Err(Failure::Server(_))
    ));
    assert_eq!(roots.store().len(), 1);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_followed_file_is_looked_at_once_per_interval() {
    let (dir, file, old, new) = rotation("roots-slow");
    let roots = TrustRoots::follow(&file)
        .unwrap()
        .with_check_interval(Duration::from_secs(3600));
    replace(&file, new.root_pem());
    // Not looked at again within the hour: still the old root.
    assert_eq!(roots.current().certs[0], old.root());
    // Fixed roots never change; a missing file is an error at the start.
    let fixed = TrustRoots::fixed(vec![old.root()], Path::new("test")).unwrap();
    assert!(fixed.file().is_none());
    let err = TrustRoots::follow(&dir.join("missing.pem")).unwrap_err();
    assert!(err.to_string().contains("missing.pem"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}
