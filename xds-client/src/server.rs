//! A small delta-ADS server: the local control plane's transport and the client's test peer.
//!
//! It keeps versioned resources per type, tracks each stream's subscriptions and what it has sent
//! (seeded from `initial_resource_versions` on reconnect), answers every initial request of a
//! type (even with nothing, since clients gate readiness on it), pushes only what changed, and
//! logs every ACK and NACK.
//!
//! Every stream is authenticated first by an [`Authenticator`] (there is no default: a server
//! that accepts anyone says so with [`InsecureAcceptAny`]). Within one push, and in the answers
//! to a new stream's first requests, `istio.security.Authorization` goes before
//! `istio.workload.Address` (see [`crate::resources::push_order`]), so a client never holds a
//! workload naming a policy it has not been sent. What the server remembers of its clients is
//! bounded: ACK/NACK counters and the last [`ACK_LOG`] records.

use std::collections::VecDeque;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, watch};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tracing::{debug, info, warn};

use crate::proto::discovery::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use crate::proto::discovery::{DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource};

/// One change for [`AdsServer::apply`].
#[derive(Debug, Clone)]
pub enum Change {
    /// Add or replace a resource (its encoded message, without the `Any` wrapper).
    Set {
        /// The resource type.
        type_url: String,
        /// The resource name.
        name: String,
        /// The encoded message.
        body: Vec<u8>,
    },
    /// Remove a resource.
    Remove {
        /// The resource type.
        type_url: String,
        /// The resource name.
        name: String,
    },
}

/// A versioned resource body (the encoded message, without the `Any` wrapper).
#[derive(Debug, Clone)]
struct Versioned {
    version: String,
    body: Vec<u8>,
}

impl Versioned {
    /// The wire form of this resource under `name`.
    fn resource(&self, type_url: &str, name: &str) -> Resource {
        Resource {
            name: name.to_owned(),
            version: self.version.clone(),
            resource: Some(prost_types::Any {
                type_url: type_url.to_owned(),
                value: self.body.clone(),
            }),
            aliases: Vec::new(),
            ttl: None,
            cache_control: None,
        }
    }
}

/// What a client said about a response: ACK (no error) or NACK.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AckRecord {
    /// The resource type.
    pub type_url: String,
    /// The nonce acknowledged.
    pub nonce: String,
    /// The NACK message, `None` for an ACK.
    pub error: Option<String>,
}

/// What a stream presented, for an [`Authenticator`] to judge.
#[derive(Debug)]
#[non_exhaustive]
pub struct StreamCredentials<'a> {
    /// The bearer token of the `authorization` header, without `Bearer `.
    pub bearer_token: Option<&'a str>,
    /// The `clusterid` header: the cluster the client says it is in (Istio's ztunnel sends its
    /// `ISTIO_META_CLUSTER_ID`; istiod refuses a cluster it does not serve).
    pub cluster_id: Option<&'a str>,
    /// The client's address, when known.
    pub remote_addr: Option<std::net::SocketAddr>,
}

/// Decides which streams the server serves.
pub trait Authenticator: Send + Sync + 'static {
    /// `Ok(who)` (a name for the logs, such as a node) or `Err(reason)`: the stream is refused
    /// with `UNAUTHENTICATED` and the reason.
    fn authenticate(&self, credentials: &StreamCredentials<'_>) -> Result<String, String>;

    /// Decides on the node the client says it is (the `node` of its first request; `None` when
    /// it sent none), once its stream is authenticated as `who`, the same credentials at hand:
    /// `Err(reason)` ends the stream with `PERMISSION_DENIED` before anything is sent (istiod
    /// refuses a proxy whose node id names another namespace than its token). Accepts any by
    /// default.
    fn admit_node(
        &self,
        who: &str,
        credentials: &StreamCredentials<'_>,
        node: Option<&crate::proto::discovery::Node>,
    ) -> Result<(), String> {
        let _ = (who, credentials, node);
        Ok(())
    }
}

impl<F> Authenticator for F
where
    F: Fn(&StreamCredentials<'_>) -> Result<String, String> + Send + Sync + 'static,
{
    fn authenticate(&self, credentials: &StreamCredentials<'_>) -> Result<String, String> {
        self(credentials)
    }
}

/// **Insecure, for tests and demos**: serves every stream, authenticated or not.
#[derive(Debug, Clone, Copy)]
pub struct InsecureAcceptAny;

impl Authenticator for InsecureAcceptAny {
    fn authenticate(&self, _credentials: &StreamCredentials<'_>) -> Result<String, String> {
        Ok("anyone (InsecureAcceptAny)".to_owned())
    }
}

/// How many recent ACK/NACK records the server keeps (counters keep the totals).
pub const ACK_LOG: usize = 1024;

/// The largest request the server accepts (a reconnecting client lists every resource it holds
/// in `initial_resource_versions`).
pub const MAX_REQUEST_BYTES: usize = 64 * 1024 * 1024;

/// The server. Cheap to clone; clones share resources and streams.
#[derive(Clone)]
pub struct AdsServer {
    state: Arc<State>,
    authenticator: Arc<dyn Authenticator>,
}

impl std::fmt::Debug for AdsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdsServer").finish_non_exhaustive()
    }
}

#[derive(Default)]
struct State {
    acks_total: AtomicU64,
    nacks_total: AtomicU64,
    resources: Mutex<HashMap<String, BTreeMap<String, Versioned>>>,
    /// Bumped on every change; streams watch it.
    generation: Mutex<Option<watch::Sender<u64>>>,
    /// Recent changes, `(generation, type, name)`, oldest first, so streams diff only what
    /// changed; bounded, and a stream that fell behind it diffs everything.
    log: Mutex<VecDeque<(u64, String, String)>>,
    next_nonce: AtomicU64,
    /// The last `ACK_LOG` ACKs and NACKs.
    acks: Mutex<VecDeque<AckRecord>>,
}

impl AdsServer {
    /// An empty server that serves the streams `authenticator` accepts.
    pub fn new(authenticator: impl Authenticator) -> Self {
        AdsServer {
            state: Arc::default(),
            authenticator: Arc::new(authenticator),
        }
    }

    /// Adds or replaces a resource; connected clients that want it receive it. The version is a
    /// hash of the content, so a restarted server agrees with what clients already hold and
    /// resends only what really changed.
    pub fn set(&self, type_url: &str, name: &str, body: Vec<u8>) {
        self.apply([Change::Set {
            type_url: type_url.to_owned(),
            name: name.to_owned(),
            body,
        }]);
    }

    /// Removes a resource; clients that hold it are told.
    pub fn remove(&self, type_url: &str, name: &str) {
        self.apply([Change::Remove {
            type_url: type_url.to_owned(),
            name: name.to_owned(),
        }]);
    }

    /// Applies several changes as one: streams see all of them in the same push (one response
    /// per type, in [`push_order`](crate::resources::push_order)), never a part.
    pub fn apply(&self, changes: impl IntoIterator<Item = Change>) {
        let mut touched = Vec::new();
        {
            let mut resources = self.state.resources.lock().expect("lock");
            for change in changes {
                match change {
                    Change::Set {
                        type_url,
                        name,
                        body,
                    } => {
                        let version = content_version(&body);
                        resources
                            .entry(type_url.clone())
                            .or_default()
                            .insert(name.clone(), Versioned { version, body });
                        touched.push((type_url, name));
                    }
                    Change::Remove { type_url, name } => {
                        if resources
                            .get_mut(&type_url)
                            .and_then(|m| m.remove(&name))
                            .is_some()
                        {
                            touched.push((type_url, name));
                        }
                    }
                }
            }
        }
        if !touched.is_empty() {
            self.changed(touched);
        }
    }

    /// The most recent ACKs and NACKs (at most [`ACK_LOG`]), oldest first.
    pub fn acks(&self) -> Vec<AckRecord> {
        self.state
            .acks
            .lock()
            .expect("lock")
            .iter()
            .cloned()
            .collect()
    }

    /// How many ACKs and NACKs the server has received in all: `(acks, nacks)`.
    pub fn ack_counts(&self) -> (u64, u64) {
        (
            self.state.acks_total.load(Ordering::Relaxed),
            self.state.nacks_total.load(Ordering::Relaxed),
        )
    }

    /// The names of the resources of `type_url` the server holds, sorted.
    pub fn resource_names(&self, type_url: &str) -> Vec<String> {
        self.state
            .resources
            .lock()
            .expect("lock")
            .get(type_url)
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// The gRPC service, to add to a tonic server (requests up to [`MAX_REQUEST_BYTES`]).
    pub fn service(&self) -> AggregatedDiscoveryServiceServer<AdsServer> {
        AggregatedDiscoveryServiceServer::new(self.clone())
            .max_decoding_message_size(MAX_REQUEST_BYTES)
            .max_encoding_message_size(usize::MAX)
    }

    fn changed(&self, touched: Vec<(String, String)>) {
        let mut generation = self.state.generation.lock().expect("lock");
        let tx = generation.get_or_insert_with(|| watch::channel(0).0);
        let next = *tx.borrow() + 1;
        {
            let mut log = self.state.log.lock().expect("lock");
            log.extend(
                touched
                    .into_iter()
                    .map(|(type_url, name)| (next, type_url, name)),
            );
            while log.len() > CHANGE_LOG {
                log.pop_front();
            }
        }
        tx.send_replace(next);
    }

    /// The names changed after generation `since`, per type; `None` when the log no longer
    /// reaches back that far.
    fn changes_since(&self, since: u64) -> Option<HashMap<String, HashSet<String>>> {
        let log = self.state.log.lock().expect("lock");
        if log.front().is_some_and(|(g, _, _)| *g > since + 1) {
            return None;
        }
        let mut out: HashMap<String, HashSet<String>> = HashMap::new();
        for (_, type_url, name) in log.iter().filter(|(g, _, _)| *g > since) {
            out.entry(type_url.clone())
                .or_default()
                .insert(name.clone());
        }
        Some(out)
    }

    fn watch_changes(&self) -> watch::Receiver<u64> {
        let mut generation = self.state.generation.lock().expect("lock");
        generation
            .get_or_insert_with(|| watch::channel(0).0)
            .subscribe()
    }
}

/// How many recent changes the server remembers for incremental pushes.
const CHANGE_LOG: usize = 100_000;

/// One stream's view of one type.
#[derive(Default)]
struct TypeState {
    wildcard: bool,
    names: HashSet<String>,
    /// What the client holds, by name -> version.
    sent: HashMap<String, String>,
}

type ResponseStream =
    Pin<Box<dyn Stream<Item = Result<DeltaDiscoveryResponse, tonic::Status>> + Send>>;

#[tonic::async_trait]
impl AggregatedDiscoveryService for AdsServer {
    type DeltaAggregatedResourcesStream = ResponseStream;

    async fn delta_aggregated_resources(
        &self,
        request: tonic::Request<tonic::Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<tonic::Response<ResponseStream>, tonic::Status> {
        let bearer_token = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .map(|v| v.strip_prefix("Bearer ").unwrap_or(v).trim());
        let cluster_id = request
            .metadata()
            .get(identity::ca::CLUSTER_ID_HEADER)
            .and_then(|v| v.to_str().ok());
        let credentials = StreamCredentials {
            bearer_token,
            cluster_id,
            remote_addr: request.remote_addr(),
        };
        // For the node check on the first request, after the request has been consumed.
        let (token, cluster, remote) = (
            bearer_token.map(str::to_owned),
            cluster_id.map(str::to_owned),
            credentials.remote_addr,
        );
        let who = match self.authenticator.authenticate(&credentials) {
            Ok(who) => who,
            Err(reason) => {
                warn!(remote = ?credentials.remote_addr, %reason, "ADS: stream refused");
                return Err(tonic::Status::unauthenticated(reason));
            }
        };
        info!(%who, remote = ?credentials.remote_addr, "ADS: stream authenticated");
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(64);
        let server = self.clone();
        tokio::spawn(async move {
            let mut types: HashMap<String, TypeState> = HashMap::new();
            let mut changes = server.watch_changes();
            // Initial answers are full diffs; later pushes need only what changed since.
            let mut seen = *changes.borrow_and_update();
            let mut first = true;
            loop {
                tokio::select! {
                    message = inbound.message() => {
                        let request = match message {
                            Ok(Some(r)) => r,
                            Ok(None) => break,
                            Err(e) => {
                                debug!(error = %e, "ADS: stream ended");
                                break;
                            }
                        };
                        if std::mem::take(&mut first) {
                            let credentials = StreamCredentials {
                                bearer_token: token.as_deref(),
                                cluster_id: cluster.as_deref(),
                                remote_addr: remote,
                            };
                            let node = request.node.as_ref();
                            if let Err(reason) =
                                server.authenticator.admit_node(&who, &credentials, node)
                            {
                                warn!(%who, node = ?node.map(|n| &n.id), %reason, "ADS: node refused");
                                let _ = tx.send(Err(tonic::Status::permission_denied(reason))).await;
                                break;
                            }
                        }
                        if let Some(response) = server.on_request(&mut types, request)
                            && tx.send(Ok(response)).await.is_err()
                        {
                            break;
                        }
                    }
                    changed = changes.changed() => {
                        if changed.is_err() {
                            break;
                        }
                        let now = *changes.borrow_and_update();
                        let changed = server.changes_since(seen);
                        seen = now;
                        // Policies before the workloads that name them.
                        let mut ordered: Vec<(&String, &mut TypeState)> = types.iter_mut().collect();
                        ordered.sort_by_key(|(url, _)| crate::resources::push_order(url));
                        for (type_url, state) in ordered {
                            let response = match &changed {
                                Some(by_type) => match by_type.get(type_url) {
                                    Some(names) => server.diff_names(type_url, state, names),
                                    None => None,
                                },
                                None => server.diff(type_url, state, false),
                            };
                            if let Some(response) = response
                                && tx.send(Ok(response)).await.is_err()
                            {
                                return;
                            }
                        }
                    }
                }
            }
        });
        Ok(tonic::Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

impl AdsServer {
    /// Handles one request; returns the response to send, if any.
    fn on_request(
        &self,
        types: &mut HashMap<String, TypeState>,
        request: DeltaDiscoveryRequest,
    ) -> Option<DeltaDiscoveryResponse> {
        let type_url = request.type_url.clone();
        if !request.response_nonce.is_empty() {
            let error = request.error_detail.as_ref().map(|s| s.message.clone());
            match &error {
                None => debug!(%type_url, nonce = %request.response_nonce, "ADS: ACK"),
                Some(message) => {
                    warn!(%type_url, nonce = %request.response_nonce, %message, "ADS: NACK")
                }
            }
            let counter = match error {
                None => &self.state.acks_total,
                Some(_) => &self.state.nacks_total,
            };
            counter.fetch_add(1, Ordering::Relaxed);
            let mut acks = self.state.acks.lock().expect("lock");
            if acks.len() == ACK_LOG {
                acks.pop_front();
            }
            acks.push_back(AckRecord {
                type_url: type_url.clone(),
                nonce: request.response_nonce.clone(),
                error,
            });
        }
        let initial = !types.contains_key(&type_url);
        let state = types.entry(type_url.clone()).or_default();
        if initial {
            // Wildcard: no names on the first request, or an explicit "*".
            state.wildcard = request.resource_names_subscribe.is_empty();
            state.sent = request.initial_resource_versions.into_iter().collect();
            info!(%type_url, wildcard = state.wildcard, held = state.sent.len(), "ADS: new subscription");
        }
        let mut subscription_changed = false;
        for name in request.resource_names_subscribe {
            if name == "*" {
                state.wildcard = true;
            } else if state.names.insert(name.clone()) {
                // The client may have dropped it: always send what it subscribes to.
                state.sent.remove(&name);
            }
            subscription_changed = true;
        }
        for name in request.resource_names_unsubscribe {
            if name == "*" {
                state.wildcard = false;
            }
            state.names.remove(&name);
            subscription_changed = true;
        }
        if initial || subscription_changed {
            return self.diff(&type_url, state, initial);
        }
        None
    }

    /// Like [`Self::diff`], looking only at `names`.
    fn diff_names(
        &self,
        type_url: &str,
        state: &mut TypeState,
        names: &HashSet<String>,
    ) -> Option<DeltaDiscoveryResponse> {
        let all = self.state.resources.lock().expect("lock");
        let current = all.get(type_url);
        let wanted = |name: &str| state.wildcard || state.names.contains(name);
        let mut resources = Vec::new();
        let mut removed = Vec::new();
        for name in names {
            match current.and_then(|m| m.get(name)) {
                Some(v) if wanted(name) => {
                    if state.sent.get(name) != Some(&v.version) {
                        resources.push(v.resource(type_url, name));
                    }
                }
                _ => {
                    if state.sent.contains_key(name) {
                        removed.push(name.clone());
                    }
                }
            }
        }
        drop(all);
        self.respond(type_url, state, resources, removed, false)
    }

    /// What `state` lacks or holds in excess; `always` answers even when there is nothing.
    fn diff(
        &self,
        type_url: &str,
        state: &mut TypeState,
        always: bool,
    ) -> Option<DeltaDiscoveryResponse> {
        let all = self.state.resources.lock().expect("lock");
        let empty = BTreeMap::new();
        let current = all.get(type_url).unwrap_or(&empty);
        let wanted = |name: &str| state.wildcard || state.names.contains(name);
        let mut resources = Vec::new();
        for (name, v) in current.iter().filter(|(n, _)| wanted(n)) {
            if state.sent.get(name) != Some(&v.version) {
                resources.push(v.resource(type_url, name));
            }
        }
        let removed: Vec<String> = state
            .sent
            .keys()
            .filter(|n| !current.contains_key(*n) || !wanted(n))
            .cloned()
            .collect();
        drop(all);
        self.respond(type_url, state, resources, removed, always)
    }

    /// Records what the client will hold and builds the response (or nothing to send).
    fn respond(
        &self,
        type_url: &str,
        state: &mut TypeState,
        resources: Vec<Resource>,
        removed: Vec<String>,
        always: bool,
    ) -> Option<DeltaDiscoveryResponse> {
        if resources.is_empty() && removed.is_empty() && !always {
            return None;
        }
        for r in &resources {
            state.sent.insert(r.name.clone(), r.version.clone());
        }
        for n in &removed {
            state.sent.remove(n);
        }
        let nonce = self
            .state
            .next_nonce
            .fetch_add(1, Ordering::Relaxed)
            .to_string();
        debug!(%type_url, resources = resources.len(), removed = removed.len(), %nonce, "ADS: push");
        Some(DeltaDiscoveryResponse {
            system_version_info: String::new(),
            resources,
            type_url: type_url.to_owned(),
            nonce,
            removed_resources: removed,
        })
    }
}

/// A 64-bit FNV-1a hash of the content, in hex.
fn content_version(body: &[u8]) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in body {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{hash:016x}")
}
