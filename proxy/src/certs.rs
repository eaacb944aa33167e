//! Where the proxy's workload certificates come from: the [`Certificates`] a data path asks (the
//! current certificate of an identity, the mesh's roots, a watch of one identity as it rotates),
//! fed by a [`identity::SecretManager`] ([`Managed`], from a CA or an in-process development CA)
//! or by fixed files ([`StaticCert`], dedicated mode). Both proxy modes and the binary use it.

use std::future::Future;
use std::sync::Arc;
use std::time::SystemTime;

use identity::roots::TrustRoots;
use identity::{SpiffeId, WorkloadCert};
use rustls::RootCertStore;

/// Where the proxy gets workload certificates (a [`identity::SecretManager`] fed by a CA, fixed
/// files, or an in-process development CA) and the mesh's trust roots.
pub trait Certificates: Send + Sync + 'static {
    /// The current certificate of `id` (never an expired one).
    fn get(
        &self,
        id: &SpiffeId,
    ) -> impl Future<Output = Result<Arc<WorkloadCert>, identity::Error>> + Send;
    /// The mesh's trust roots (followed from their file, where they come from one).
    fn trust_roots(&self) -> &Arc<TrustRoots>;
    /// The roots peers' chains must verify against now.
    fn roots(&self) -> Arc<RootCertStore> {
        self.trust_roots().store()
    }
    /// Follows the certificates of `id` (starting a fetch if it is new): what a server presenting
    /// that identity serves at each handshake (`None` or an expired certificate: no handshake).
    fn watch(&self, id: &SpiffeId) -> CertWatch;
    /// Stops refreshing `id` (its last local pod is gone). Nothing by default.
    fn forget(&self, id: &SpiffeId) {
        let _ = id;
    }
}

/// The current certificate of one identity, as it rotates.
pub type CertWatch = tokio::sync::watch::Receiver<Option<Arc<WorkloadCert>>>;

/// Certificates from a [`identity::SecretManager`] (fetched once, rotated before expiry).
#[derive(Debug, Clone)]
pub struct Managed {
    /// The secret manager.
    pub manager: identity::SecretManager,
    /// The mesh's roots.
    pub roots: Arc<TrustRoots>,
}

impl Managed {
    /// Every identity held, with its chain (or why there is none) and the current roots, for
    /// `/config_dump`.
    pub fn dump(&self) -> Vec<crate::config_dump::CertificateDump> {
        let roots = self.roots.current();
        self.manager
            .held()
            .into_iter()
            .map(|held| crate::config_dump::CertificateDump {
                identity: held.id.to_string(),
                chain: held
                    .cert
                    .map(|c| c.credentials().chain.clone())
                    .unwrap_or_default(),
                roots: roots.certs.clone(),
                error: held.last_error,
            })
            .collect()
    }
}

impl Certificates for Managed {
    fn get(
        &self,
        id: &SpiffeId,
    ) -> impl Future<Output = Result<Arc<WorkloadCert>, identity::Error>> + Send {
        self.manager.get(id)
    }

    fn trust_roots(&self) -> &Arc<TrustRoots> {
        &self.roots
    }

    fn watch(&self, id: &SpiffeId) -> CertWatch {
        self.manager.subscribe(id)
    }

    fn forget(&self, id: &SpiffeId) {
        self.manager.forget(id);
    }
}

/// One fixed certificate (from files) and the trust roots.
#[derive(Debug, Clone)]
pub struct StaticCert {
    /// The workload's certificate.
    pub cert: Arc<WorkloadCert>,
    /// The mesh's roots.
    pub roots: Arc<TrustRoots>,
}

impl StaticCert {
    /// The one certificate, with the current roots, for `/config_dump`.
    pub fn dump(&self) -> Vec<crate::config_dump::CertificateDump> {
        vec![crate::config_dump::CertificateDump {
            identity: self.cert.id().to_string(),
            chain: self.cert.credentials().chain.clone(),
            roots: self.roots.current().certs.clone(),
            error: None,
        }]
    }
}

impl Certificates for StaticCert {
    fn get(
        &self,
        id: &SpiffeId,
    ) -> impl Future<Output = Result<Arc<WorkloadCert>, identity::Error>> + Send {
        let result = if self.cert.id() != id {
            Err(identity::Error::NoCertificate {
                id: id.clone(),
                reason: format!(
                    "this proxy only holds the certificate of {}",
                    self.cert.id()
                ),
            })
        } else if !self.cert.is_valid_at(SystemTime::now()) {
            Err(identity::Error::NoCertificate {
                id: id.clone(),
                reason: "the certificate file has expired".into(),
            })
        } else {
            Ok(self.cert.clone())
        };
        std::future::ready(result)
    }

    fn trust_roots(&self) -> &Arc<TrustRoots> {
        &self.roots
    }

    fn watch(&self, id: &SpiffeId) -> CertWatch {
        let held = (self.cert.id() == id).then(|| self.cert.clone());
        tokio::sync::watch::channel(held).1
    }
}
