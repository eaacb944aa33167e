//! Serving: the computed resources over delta ADS and the Istio CA, on one gRPC listener, kept in
//! step with a directory of manifests.

use std::collections::{BTreeMap, HashSet};
use std::convert::Infallible;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use identity::ca::{CaServer, SignRequest};
use identity::{DevCa, SpiffeId};
use tracing::{info, warn};
use xds_client::resources::{ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL, Address, encode_address};
use xds_client::server::AdsServer;

use crate::{ComputeConfig, Manifests, compute};

/// The local control plane's state: the ADS server it feeds and the identities it may sign.
#[derive(Clone)]
pub struct LocalControlPlane {
    dir: PathBuf,
    config: ComputeConfig,
    ads: AdsServer,
    /// Identities of the pods in the manifests: what the CA agrees to sign.
    known: Arc<RwLock<HashSet<SpiffeId>>>,
    /// Keys served last time, per type, to remove what disappears.
    served: Arc<RwLock<BTreeMap<&'static str, HashSet<String>>>>,
}

impl std::fmt::Debug for LocalControlPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalControlPlane")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

/// What one reload found.
#[derive(Debug, Default)]
pub struct Reload {
    /// Files that could not be used (reported, skipped).
    pub errors: Vec<String>,
    /// Workloads, services and policies now served.
    pub counts: (usize, usize, usize),
}

impl LocalControlPlane {
    /// A control plane for the manifests in `dir` (nothing is read until [`reload`](Self::reload)).
    pub fn new(dir: &Path, config: ComputeConfig) -> Self {
        LocalControlPlane {
            dir: dir.to_owned(),
            config,
            ads: AdsServer::new(),
            known: Arc::default(),
            served: Arc::default(),
        }
    }

    /// The ADS server (to serve it, or to inspect it in tests).
    pub fn ads(&self) -> &AdsServer {
        &self.ads
    }

    /// Reads every `*.yaml`/`*.yml` file of the directory, computes the resources and pushes what
    /// changed. A bad file is reported and skipped; the rest keeps being served.
    pub fn reload(&self) -> Reload {
        let mut report = Reload::default();
        let mut manifests = Manifests::default();
        for path in manifest_files(&self.dir) {
            let name = path.display().to_string();
            let text = match std::fs::read_to_string(&path) {
                Ok(t) => t,
                Err(e) => {
                    report.errors.push(format!("{name}: {e}"));
                    continue;
                }
            };
            // Load each file into a scratch copy first, so a bad file leaves no half.
            let mut attempt = manifests.clone();
            match attempt.add(&text, &name) {
                Ok(()) => manifests = attempt,
                Err(e) => report.errors.push(e.to_string()),
            }
        }
        // Policies are translated together; a bad one would reject them all, so check each file
        // on its own first and drop the files that fail.
        let mut good_policies = Vec::new();
        for doc in manifests.policy_documents.drain(..) {
            match authz::parse_policies(&doc, "AuthorizationPolicy", &self.config.root_namespace) {
                Ok(_) => good_policies.push(doc),
                Err(e) => report.errors.push(e.to_string()),
            }
        }
        manifests.policy_documents = good_policies;
        let computed = match compute(&manifests, &self.config) {
            Ok(c) => c,
            Err(e) => {
                report.errors.push(e.to_string());
                return report;
            }
        };
        for error in &report.errors {
            warn!(%error, "control plane: skipped a manifest");
        }
        *self.known.write().expect("lock") = computed
            .workloads
            .iter()
            .map(|w| w.identity.clone())
            .collect();
        let mut addresses: Vec<(String, Vec<u8>)> = Vec::new();
        for w in &computed.workloads {
            let a = Address::Workload(w.clone());
            addresses.push((a.key(), encode_address(&a)));
        }
        for s in &computed.services {
            let a = Address::Service(s.clone());
            addresses.push((a.key(), encode_address(&a)));
        }
        let policies: Vec<(String, Vec<u8>)> = computed
            .policies
            .iter()
            .map(|p| {
                (
                    p.key(),
                    prost::Message::encode_to_vec(&authz::proto::to_proto(p)),
                )
            })
            .collect();
        self.publish(ADDRESS_TYPE_URL, addresses);
        self.publish(AUTHORIZATION_TYPE_URL, policies);
        report.counts = (
            computed.workloads.len(),
            computed.services.len(),
            computed.policies.len(),
        );
        info!(
            workloads = report.counts.0,
            services = report.counts.1,
            policies = report.counts.2,
            errors = report.errors.len(),
            "control plane: manifests loaded"
        );
        report
    }

    fn publish(&self, type_url: &'static str, resources: Vec<(String, Vec<u8>)>) {
        let keys: HashSet<String> = resources.iter().map(|(k, _)| k.clone()).collect();
        for (key, body) in resources {
            // Unchanged content keeps its version (a content hash), so this pushes nothing.
            self.ads.set(type_url, &key, body);
        }
        let mut served = self.served.write().expect("lock");
        let before = served.entry(type_url).or_default();
        for gone in before.difference(&keys) {
            self.ads.remove(type_url, gone);
        }
        *before = keys;
    }

    /// Reloads whenever a manifest file changes (checked every `interval`), forever.
    pub async fn watch(self, interval: Duration) {
        let mut last = fingerprint(&self.dir);
        loop {
            tokio::time::sleep(interval).await;
            let now = fingerprint(&self.dir);
            if now != last {
                last = now;
                self.reload();
            }
        }
    }

    /// The CA service, signing only identities of pods in the manifests.
    pub fn ca_service(&self, ca: Arc<DevCa>, max_lifetime: Duration) -> CaService {
        CaServer::new(ca, KnownIdentities(self.known.clone()), max_lifetime).into_service()
    }
}

/// The gRPC CA service of the local control plane.
pub type CaService =
    identity::ca::proto::istio_certificate_service_server::IstioCertificateServiceServer<
        CaServer<KnownIdentities>,
    >;

/// Signs only identities that some pod in the manifests has.
#[derive(Debug, Clone)]
pub struct KnownIdentities(Arc<RwLock<HashSet<SpiffeId>>>);

impl identity::ca::Authorizer for KnownIdentities {
    fn authorize(&self, req: &SignRequest<'_>) -> Result<(), String> {
        if req.bearer_token.is_none() {
            tracing::debug!(id = %req.requested, "CA: no bearer token (accepted: local mode)");
        }
        if self.0.read().expect("lock").contains(req.requested) {
            Ok(())
        } else {
            Err("no pod in the manifests has this identity".to_owned())
        }
    }
}

/// The `*.yaml` / `*.yml` files of `dir`, sorted.
fn manifest_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.is_file() && matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml"))
        })
        .collect();
    files.sort();
    files
}

/// Names, sizes and modification times of the manifest files.
fn fingerprint(dir: &Path) -> Vec<(PathBuf, u64, Option<SystemTime>)> {
    manifest_files(dir)
        .into_iter()
        .map(|p| {
            let meta = std::fs::metadata(&p).ok();
            let len = meta.as_ref().map_or(0, |m| m.len());
            let modified = meta.and_then(|m| m.modified().ok());
            (p, len, modified)
        })
        .collect()
}

/// Two gRPC services on one listener: requests for the ADS service go to `ads`, the rest to
/// `other` (tonic's router would need axum; this is all the routing we need).
#[derive(Clone)]
pub struct TwoServices<A, B> {
    ads: A,
    other: B,
}

impl<A, B> TwoServices<A, B> {
    /// Routes by the gRPC path.
    pub fn new(ads: A, other: B) -> Self {
        TwoServices { ads, other }
    }
}

type Request = http::Request<tonic::body::Body>;
type Response = http::Response<tonic::body::Body>;

impl<A, B> tower::Service<Request> for TwoServices<A, B>
where
    A: tower::Service<Request, Response = Response, Error = Infallible> + Clone + Send + 'static,
    A::Future: Send + 'static,
    B: tower::Service<Request, Response = Response, Error = Infallible> + Clone + Send + 'static,
    B::Future: Send + 'static,
{
    type Response = Response;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request) -> Self::Future {
        if request
            .uri()
            .path()
            .starts_with("/envoy.service.discovery.v3.AggregatedDiscoveryService/")
        {
            let mut ads = self.ads.clone();
            Box::pin(async move { ads.call(request).await })
        } else {
            let mut other = self.other.clone();
            Box::pin(async move { other.call(request).await })
        }
    }
}
