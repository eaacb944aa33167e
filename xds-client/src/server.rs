//! A small delta-ADS server: the local control plane's transport and the client's test peer.
//!
//! It keeps versioned resources per type, tracks each stream's subscriptions and what it has sent
//! (seeded from `initial_resource_versions` on reconnect), answers every initial request of a
//! type (even with nothing, since clients gate readiness on it), pushes only what changed, and
//! logs every ACK and NACK.

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

/// The server. Cheap to clone; clones share resources and streams.
#[derive(Clone, Default)]
pub struct AdsServer {
    state: Arc<State>,
}

impl std::fmt::Debug for AdsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdsServer").finish_non_exhaustive()
    }
}

#[derive(Default)]
struct State {
    resources: Mutex<HashMap<String, BTreeMap<String, Versioned>>>,
    /// Bumped on every change; streams watch it.
    generation: Mutex<Option<watch::Sender<u64>>>,
    /// Recent changes, `(generation, type, name)`, oldest first, so streams diff only what
    /// changed; bounded, and a stream that fell behind it diffs everything.
    log: Mutex<std::collections::VecDeque<(u64, String, String)>>,
    next_nonce: AtomicU64,
    acks: Mutex<Vec<AckRecord>>,
    /// Bearer tokens streams presented (not verified: local mode).
    tokens: Mutex<Vec<String>>,
}

impl AdsServer {
    /// An empty server.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds or replaces a resource; connected clients that want it receive it. The version is a
    /// hash of the content, so a restarted server agrees with what clients already hold and
    /// resends only what really changed.
    pub fn set(&self, type_url: &str, name: &str, body: Vec<u8>) {
        let version = content_version(&body);
        self.state
            .resources
            .lock()
            .expect("lock")
            .entry(type_url.to_owned())
            .or_default()
            .insert(name.to_owned(), Versioned { version, body });
        self.changed(type_url, name);
    }

    /// Removes a resource; clients that hold it are told.
    pub fn remove(&self, type_url: &str, name: &str) {
        let removed = self
            .state
            .resources
            .lock()
            .expect("lock")
            .get_mut(type_url)
            .and_then(|m| m.remove(name))
            .is_some();
        if removed {
            self.changed(type_url, name);
        }
    }

    /// Every ACK and NACK received so far, oldest first.
    pub fn acks(&self) -> Vec<AckRecord> {
        self.state.acks.lock().expect("lock").clone()
    }

    /// The bearer tokens streams presented so far (accepted unverified: local mode).
    pub fn tokens(&self) -> Vec<String> {
        self.state.tokens.lock().expect("lock").clone()
    }

    /// The gRPC service, to add to a tonic server.
    pub fn service(&self) -> AggregatedDiscoveryServiceServer<AdsServer> {
        AggregatedDiscoveryServiceServer::new(self.clone())
    }

    fn changed(&self, type_url: &str, name: &str) {
        let mut generation = self.state.generation.lock().expect("lock");
        let tx = generation.get_or_insert_with(|| watch::channel(0).0);
        let next = *tx.borrow() + 1;
        {
            let mut log = self.state.log.lock().expect("lock");
            log.push_back((next, type_url.to_owned(), name.to_owned()));
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
        match request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
        {
            Some(value) => self
                .state
                .tokens
                .lock()
                .expect("lock")
                .push(value.trim_start_matches("Bearer ").to_owned()),
            None => info!("ADS: stream without a bearer token, accepted (local mode)"),
        }
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(64);
        let server = self.clone();
        tokio::spawn(async move {
            let mut types: HashMap<String, TypeState> = HashMap::new();
            let mut changes = server.watch_changes();
            // Initial answers are full diffs; later pushes need only what changed since.
            let mut seen = *changes.borrow_and_update();
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
                        for (type_url, state) in types.iter_mut() {
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
            self.state.acks.lock().expect("lock").push(AckRecord {
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
