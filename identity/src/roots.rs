//! The mesh's trust roots, fixed or followed from a file that is replaced in place (Istio's
//! `istio-ca-root-cert` ConfigMap, mounted at `/var/run/secrets/istio/root-cert.pem`, changes
//! when the mesh's root is rotated).
//!
//! [`TrustRoots::current`] is what every new handshake uses. For a followed file it looks at
//! the file (its device, inode, size and modification time, which a ConfigMap's symlink swap
//! changes) at most once per check interval, one second by default, and reads it again only
//! when that changed: so peers under the new root are accepted by connections made after the
//! file changed, without a restart. A file that has become unreadable or holds no usable root
//! keeps the roots in use (logged, naming the file): a half-written file never withdraws trust
//! from the whole mesh, nor grants it.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use rustls::RootCertStore;
use rustls::pki_types::CertificateDer;
use tracing::{info, warn};

use crate::Error;

/// One set of roots: the certificates and the store made of them.
#[derive(Debug)]
pub struct LoadedRoots {
    /// The root certificates, in file order.
    pub certs: Vec<CertificateDer<'static>>,
    /// The store handshakes verify against.
    pub store: Arc<RootCertStore>,
    stamp: Option<FileStamp>,
}

/// What tells a replaced file from the one read.
#[derive(Debug, Clone, PartialEq, Eq)]
struct FileStamp {
    dev: u64,
    ino: u64,
    len: u64,
    modified: Option<SystemTime>,
}

impl FileStamp {
    fn of(path: &Path) -> std::io::Result<Self> {
        let m = std::fs::metadata(path)?;
        Ok(FileStamp {
            dev: m.dev(),
            ino: m.ino(),
            len: m.len(),
            modified: m.modified().ok(),
        })
    }
}

/// The mesh's trust roots (see the module documentation).
#[derive(Debug)]
pub struct TrustRoots {
    file: Option<PathBuf>,
    loaded: RwLock<Arc<LoadedRoots>>,
    /// When the file was last looked at.
    checked: Mutex<Instant>,
    check_every: Duration,
}

impl TrustRoots {
    /// Roots that never change; `source` names where they came from in errors.
    pub fn fixed(certs: Vec<CertificateDer<'static>>, source: &Path) -> Result<Self, Error> {
        let store = Arc::new(crate::pem::root_store(certs.clone(), source)?);
        Ok(TrustRoots {
            file: None,
            loaded: RwLock::new(Arc::new(LoadedRoots {
                certs,
                store,
                stamp: None,
            })),
            checked: Mutex::new(Instant::now()),
            check_every: Duration::MAX,
        })
    }

    /// Roots read from `path` now (an error if it holds none), and again whenever it changes.
    pub fn follow(path: &Path) -> Result<Self, Error> {
        let loaded = load(path)?;
        Ok(TrustRoots {
            file: Some(path.to_owned()),
            loaded: RwLock::new(Arc::new(loaded)),
            checked: Mutex::new(Instant::now()),
            check_every: Duration::from_secs(1),
        })
    }

    /// Looks at the file at most once per `every` (default one second; tests use zero).
    pub fn with_check_interval(mut self, every: Duration) -> Self {
        if self.file.is_some() {
            self.check_every = every;
        }
        self
    }

    /// The file followed, if any.
    pub fn file(&self) -> Option<&Path> {
        self.file.as_deref()
    }

    /// The roots to use now.
    pub fn current(&self) -> Arc<LoadedRoots> {
        if let Some(path) = &self.file {
            self.refresh(path);
        }
        self.loaded
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The store to verify against now.
    pub fn store(&self) -> Arc<RootCertStore> {
        self.current().store.clone()
    }

    fn refresh(&self, path: &Path) {
        {
            let mut checked = self.checked.lock().unwrap_or_else(|p| p.into_inner());
            if checked.elapsed() < self.check_every {
                return;
            }
            *checked = Instant::now();
        }
        let held = self
            .loaded
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        match FileStamp::of(path) {
            Ok(stamp) if Some(&stamp) == held.stamp.as_ref() => {}
            Ok(_) => match load(path) {
                Ok(fresh) => {
                    info!(
                        file = %path.display(), roots = fresh.certs.len(),
                        "mesh trust roots changed: new handshakes use the file's roots"
                    );
                    *self.loaded.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(fresh);
                }
                Err(e) => warn!(
                    file = %path.display(), error = %e,
                    "mesh trust roots file changed but is not usable: the roots in use stay"
                ),
            },
            Err(e) => warn!(
                file = %path.display(), error = %e,
                "mesh trust roots file cannot be read: the roots in use stay"
            ),
        }
    }
}

fn load(path: &Path) -> Result<LoadedRoots, Error> {
    // The stamp first: a file replaced while being read is read again at the next check.
    let stamp = FileStamp::of(path).map_err(|e| Error::Pem {
        path: path.to_owned(),
        what: e.to_string(),
    })?;
    let certs = crate::pem::read_certs(path)?;
    let store = Arc::new(crate::pem::root_store(certs.clone(), path)?);
    Ok(LoadedRoots {
        certs,
        store,
        stamp: Some(stamp),
    })
}
