//! Serving: the computed resources over delta ADS and the Istio CA, on one gRPC listener, kept in
//! step with a directory of manifests.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::convert::Infallible;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use identity::DevCa;
use identity::ca::CaServer;
use tracing::{info, warn};
use xds_client::resources::{ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL, Address, encode_address};
use xds_client::server::{AdsServer, Change};

use crate::auth::{IdentityNodes, NodeAuthorizer, NodeTokens};
use crate::{ComputeConfig, Manifests, compute};

/// The local control plane's state: the ADS server it feeds and the identities it may sign.
#[derive(Clone)]
pub struct LocalControlPlane {
    dir: PathBuf,
    config: ComputeConfig,
    ads: AdsServer,
    /// The node tokens callers authenticate with.
    tokens: Arc<NodeTokens>,
    /// Identities of the pods in the manifests and the nodes they run on: what the CA agrees to
    /// sign, and for whom.
    identities: IdentityNodes,
    /// Keys served last time, per type, to remove what disappears.
    served: Arc<RwLock<BTreeMap<&'static str, HashSet<String>>>>,
    /// The last version of each file that read and parsed, served while a newer one is broken.
    last_good: Arc<Mutex<BTreeMap<PathBuf, Manifests>>>,
    /// The problems of the last reload (shown by [`errors`](Self::errors)).
    errors: Arc<RwLock<Vec<String>>>,
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
    /// Files that could not be read or parsed; each message says whether the file's last good
    /// version is still served (it is, whenever there was one).
    pub errors: Vec<String>,
    /// Workloads, services and policies now served.
    pub counts: (usize, usize, usize),
}

impl LocalControlPlane {
    /// A control plane for the manifests in `dir` (nothing is read until [`reload`](Self::reload)),
    /// serving xDS and the CA to node proxies that present a token of `tokens`.
    pub fn new(dir: &Path, config: ComputeConfig, tokens: Arc<NodeTokens>) -> Self {
        let stream_tokens = tokens.clone();
        LocalControlPlane {
            dir: dir.to_owned(),
            config,
            ads: AdsServer::new(move |c: &xds_client::server::StreamCredentials<'_>| {
                stream_tokens.authenticate_stream(c)
            }),
            tokens,
            identities: Arc::default(),
            served: Arc::default(),
            last_good: Arc::default(),
            errors: Arc::default(),
        }
    }

    /// The problems of the last reload: files that could not be read or parsed, each saying
    /// whether its last good version is still served. Empty when every file loaded.
    pub fn errors(&self) -> Vec<String> {
        self.errors.read().expect("lock").clone()
    }

    /// The ADS server (to serve it, or to inspect it in tests).
    pub fn ads(&self) -> &AdsServer {
        &self.ads
    }

    /// Reads every `*.yaml`/`*.yml` file of the directory, computes the resources and pushes what
    /// changed.
    ///
    /// A file that cannot be read or parsed (a typo, a half-written save) keeps serving its last
    /// good version, so an editing mistake never withdraws a DENY policy or a pod; the error is
    /// logged and kept in [`errors`](Self::errors). Only removing a file withdraws what it held.
    pub fn reload(&self) -> Reload {
        let mut report = Reload::default();
        let mut last_good = self.last_good.lock().expect("lock");
        let present = manifest_files(&self.dir);
        last_good.retain(|path, _| present.contains(path));
        for path in present {
            match load_file(&path, &self.config.root_namespace) {
                Ok(loaded) => {
                    last_good.insert(path, loaded);
                }
                Err(error) => report.errors.push(if last_good.contains_key(&path) {
                    format!("{error}; still serving its last good version")
                } else {
                    format!("{error}; nothing from it is served")
                }),
            }
        }
        let mut manifests = Manifests::default();
        for loaded in last_good.values() {
            manifests.merge(loaded.clone());
        }
        drop(last_good);
        *self.errors.write().expect("lock") = report.errors.clone();
        let computed = match compute(&manifests, &self.config) {
            Ok(c) => c,
            Err(e) => {
                // Cannot happen (each file's policies were checked on their own); keep serving
                // what is served rather than withdraw anything.
                report.errors.push(format!("{e}; nothing changed"));
                warn!(error = %e, "control plane: manifests not applied");
                return report;
            }
        };
        for error in &report.errors {
            warn!(%error, "control plane: bad manifest");
        }
        let mut identities: HashMap<_, BTreeSet<String>> = HashMap::new();
        for w in &computed.workloads {
            let nodes = identities.entry(w.identity.clone()).or_default();
            if !w.node.is_empty() {
                nodes.insert(w.node.clone());
                // Every node that runs a pod gets a token, so its proxy can authenticate.
                if let Err(e) = self.tokens.ensure(&w.node) {
                    report.errors.push(e.to_string());
                }
            }
        }
        *self.identities.write().expect("lock") = identities;
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
        self.publish(addresses, policies);
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

    /// Pushes the new resources as one change set (so clients get policies before the workloads
    /// that name them, see `xds_client::resources::push_order`), and withdraws vanished policies
    /// only after the workloads that named them have changed.
    fn publish(&self, addresses: Vec<(String, Vec<u8>)>, policies: Vec<(String, Vec<u8>)>) {
        let mut served = self.served.write().expect("lock");
        let mut changes = Vec::new();
        let mut withdrawn_policies = Vec::new();
        for (type_url, resources) in [
            (AUTHORIZATION_TYPE_URL, policies),
            (ADDRESS_TYPE_URL, addresses),
        ] {
            let keys: HashSet<String> = resources.iter().map(|(k, _)| k.clone()).collect();
            let before = served.entry(type_url).or_default();
            let gone = before.difference(&keys).map(|name| Change::Remove {
                type_url: type_url.to_owned(),
                name: name.clone(),
            });
            if type_url == AUTHORIZATION_TYPE_URL {
                withdrawn_policies.extend(gone);
            } else {
                changes.extend(gone);
            }
            // Unchanged content keeps its version (a content hash), so it pushes nothing.
            changes.extend(resources.into_iter().map(|(name, body)| Change::Set {
                type_url: type_url.to_owned(),
                name,
                body,
            }));
            *before = keys;
        }
        self.ads.apply(changes);
        self.ads.apply(withdrawn_policies);
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

    /// The CA service: signs, for a node proxy that presents its node's token, the identities of
    /// the pods on that node (see [`NodeAuthorizer`]).
    pub fn ca_service(&self, ca: Arc<DevCa>, max_lifetime: Duration) -> CaService {
        CaServer::new(
            ca,
            NodeAuthorizer::new(self.tokens.clone(), self.identities.clone()),
            max_lifetime,
        )
        .into_service()
    }

    /// The node tokens (the local mesh hands each node's proxy its file).
    pub fn tokens(&self) -> &Arc<NodeTokens> {
        &self.tokens
    }
}

/// The gRPC CA service of the local control plane.
pub type CaService =
    identity::ca::proto::istio_certificate_service_server::IstioCertificateServiceServer<
        CaServer<NodeAuthorizer>,
    >;

/// Reads and parses one manifest file, its AuthorizationPolicies included.
fn load_file(path: &Path, root_namespace: &str) -> Result<Manifests, String> {
    let name = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| format!("{name}: cannot read: {e}"))?;
    let mut manifests = Manifests::default();
    manifests.add(&text, &name).map_err(|e| e.to_string())?;
    for doc in &manifests.policy_documents {
        authz::parse_policies(doc, &name, root_namespace).map_err(|e| e.to_string())?;
    }
    Ok(manifests)
}

/// The manifest files at `path`: the file itself, or the `*.yaml` / `*.yml` files of a directory,
/// sorted (empty when the directory cannot be read).
pub fn manifest_files(path: &Path) -> Vec<PathBuf> {
    if path.is_file() {
        return vec![path.to_owned()];
    }
    let dir = path;
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

/// Names, sizes and modification times of the manifest files at `path` (see
/// [`manifest_files`]): compare two to see whether anything changed.
pub fn fingerprint(path: &Path) -> Vec<(PathBuf, u64, Option<SystemTime>)> {
    manifest_files(path)
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
