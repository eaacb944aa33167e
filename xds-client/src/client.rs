//! The delta-ADS client: one stream, many resource types, a handler per type.
//!
//! Protocol behaviour (DESIGN.md): the first request of each type subscribes (no names means
//! wildcard) and carries `initial_resource_versions` for everything held; each response is ACKed
//! with its nonce, or NACKed with `error_detail` naming the rejected resources ("name: reason",
//! joined with "; ") while the good resources of the same response are still applied; responses
//! of types nobody registered are ACKed and ignored; a lost stream is re-established with
//! capped exponential backoff (10 ms doubling to 15 s), and nothing held is dropped in between:
//! only the server's explicit removals remove resources. `synced` turns true once every
//! registered type has had its first response, and stays true.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tracing::{debug, info, warn};

use crate::proto::discovery::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use crate::proto::discovery::{DeltaDiscoveryRequest, DeltaDiscoveryResponse, Node, Status};

/// One resource of an update, still encoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawResource {
    /// The resource name (the key clients index by).
    pub name: String,
    /// The server's version of it.
    pub version: String,
    /// The encoded message (the `Any`'s value).
    pub body: Vec<u8>,
}

/// Receives the updates of one resource type.
pub trait Handler: Send + Sync + 'static {
    /// Applies added or updated resources and removals; returns the resources it rejected,
    /// as `(name, reason)`. Rejected resources are NACKed; the others count as applied.
    fn apply(&self, added: Vec<RawResource>, removed: Vec<String>) -> Vec<(String, String)>;
}

/// A [`Handler`] that decodes each resource with `decode` before handing the decoded ones to
/// `apply`; resources that fail to decode are rejected (NACKed) with the decoder's reason, and
/// `apply` never sees them.
pub struct Decoding<T, D, A> {
    decode: D,
    apply: A,
    _type: std::marker::PhantomData<fn() -> T>,
}

impl<T, D, A> Decoding<T, D, A>
where
    D: Fn(&[u8]) -> Result<T, String> + Send + Sync + 'static,
    A: Fn(Vec<(String, T)>, Vec<String>) + Send + Sync + 'static,
    T: 'static,
{
    /// Decodes with `decode`, applies with `apply`.
    pub fn new(decode: D, apply: A) -> Self {
        Decoding {
            decode,
            apply,
            _type: std::marker::PhantomData,
        }
    }
}

impl<T, D, A> Handler for Decoding<T, D, A>
where
    D: Fn(&[u8]) -> Result<T, String> + Send + Sync + 'static,
    A: Fn(Vec<(String, T)>, Vec<String>) + Send + Sync + 'static,
    T: 'static,
{
    fn apply(&self, added: Vec<RawResource>, removed: Vec<String>) -> Vec<(String, String)> {
        let mut good = Vec::with_capacity(added.len());
        let mut rejected = Vec::new();
        for r in added {
            match (self.decode)(&r.body) {
                Ok(value) => good.push((r.name, value)),
                Err(reason) => rejected.push((r.name, reason)),
            }
        }
        (self.apply)(good, removed);
        rejected
    }
}

/// What to subscribe to for a type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Subscription {
    /// Everything of the type.
    Wildcard,
    /// These names only (more can be added later with [`XdsHandle::subscribe`]).
    Names(Vec<String>),
}

/// The default of [`ClientConfig::max_response_bytes`].
pub const MAX_RESPONSE_BYTES: usize = 256 * 1024 * 1024;

/// Client settings.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ClientConfig {
    /// `http://host:port` (plaintext, local use) or `https://host:port`.
    pub address: String,
    /// What the server's certificate must chain to (required for https): a PEM root, or the
    /// system's trust store.
    pub server_root: Option<identity::grpc::TrustRoot>,
    /// DNS name to expect in the server's certificate (default: the host of `address`).
    pub tls_server_name: Option<String>,
    /// Bearer token file, read again on every (re)connection.
    pub token_file: Option<PathBuf>,
    /// The cluster this client is in, sent as the `clusterid` header (istiod checks it).
    pub cluster_id: Option<String>,
    /// Node id, `ztunnel~<ip>~<pod>.<ns>~<ns>.svc.cluster.local` for a ztunnel.
    pub node_id: String,
    /// Node metadata (strings).
    pub node_metadata: BTreeMap<String, String>,
    /// First reconnection delay.
    pub initial_backoff: Duration,
    /// Longest reconnection delay.
    pub max_backoff: Duration,
    /// The largest response accepted, in bytes (default [`MAX_RESPONSE_BYTES`], 256 MiB: istiod
    /// sends a whole cluster's workloads in its first response, and Istio's ztunnel accepts 200
    /// MiB). A larger one fails the stream, which is retried with backoff.
    pub max_response_bytes: usize,
}

impl ClientConfig {
    /// Settings with Istio's defaults for backoff.
    pub fn new(address: impl Into<String>, node_id: impl Into<String>) -> Self {
        ClientConfig {
            address: address.into(),
            server_root: None,
            tls_server_name: None,
            token_file: None,
            cluster_id: None,
            node_id: node_id.into(),
            node_metadata: BTreeMap::new(),
            initial_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_secs(15),
            max_response_bytes: MAX_RESPONSE_BYTES,
        }
    }
}

/// Errors that stop the client from starting.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The settings are unusable.
    #[error("xDS client for {address}: {reason}")]
    Config {
        /// The server address.
        address: String,
        /// What is wrong.
        reason: String,
    },
}

/// The client: register handlers, then [`XdsClient::run`].
pub struct XdsClient {
    config: ClientConfig,
    channel: identity::grpc::FollowedChannel,
    types: Vec<(String, Subscription, Arc<dyn Handler>)>,
    synced_tx: watch::Sender<bool>,
    commands_tx: mpsc::UnboundedSender<(String, Vec<String>)>,
    commands_rx: mpsc::UnboundedReceiver<(String, Vec<String>)>,
}

/// Lets other tasks follow and steer a running client.
#[derive(Debug, Clone)]
pub struct XdsHandle {
    synced: watch::Receiver<bool>,
    commands: mpsc::UnboundedSender<(String, Vec<String>)>,
}

impl XdsHandle {
    /// Turns true once every registered type has had its first response.
    pub fn synced(&self) -> watch::Receiver<bool> {
        self.synced.clone()
    }

    /// Subscribes to more names of `type_url` (on-demand); takes effect on the live stream.
    pub fn subscribe(&self, type_url: &str, names: Vec<String>) {
        let _ = self.commands.send((type_url.to_owned(), names));
    }
}

/// Per-type state that survives reconnections.
struct TypeState {
    subscription: Subscription,
    extra: HashSet<String>,
    handler: Arc<dyn Handler>,
    held: HashMap<String, String>,
    got_first: bool,
}

impl XdsClient {
    /// A client for `config`; connects lazily when run.
    pub fn new(config: ClientConfig) -> Result<Self, ClientError> {
        let bad = |reason: String| ClientError::Config {
            address: config.address.clone(),
            reason,
        };
        let channel = identity::grpc::FollowedChannel::new(&identity::grpc::ChannelSpec {
            address: &config.address,
            root: config.server_root.as_ref(),
            tls_server_name: config.tls_server_name.as_deref(),
            connect_timeout: Duration::from_secs(10),
            request_timeout: None,
            keep_alive: Some(Duration::from_secs(30)),
        })
        .map_err(bad)?;
        let (synced_tx, _) = watch::channel(false);
        let (commands_tx, commands_rx) = mpsc::unbounded_channel();
        Ok(XdsClient {
            channel,
            config,
            types: Vec::new(),
            synced_tx,
            commands_tx,
            commands_rx,
        })
    }

    /// Registers the handler of `type_url`.
    pub fn watch(
        mut self,
        type_url: &str,
        subscription: Subscription,
        handler: Arc<dyn Handler>,
    ) -> Self {
        self.types
            .push((type_url.to_owned(), subscription, handler));
        self
    }

    /// A handle to follow readiness and subscribe on demand.
    pub fn handle(&self) -> XdsHandle {
        XdsHandle {
            synced: self.synced_tx.subscribe(),
            commands: self.commands_tx.clone(),
        }
    }

    /// Runs forever: connects, streams, reconnects with backoff.
    pub async fn run(mut self) {
        let mut types: HashMap<String, TypeState> = self
            .types
            .drain(..)
            .map(|(url, subscription, handler)| {
                (
                    url,
                    TypeState {
                        subscription,
                        extra: HashSet::new(),
                        handler,
                        held: HashMap::new(),
                        got_first: false,
                    },
                )
            })
            .collect();
        let mut backoff = self.config.initial_backoff;
        loop {
            match self.stream_once(&mut types, &mut backoff).await {
                Ok(()) => {
                    info!(address = %self.config.address, "xDS stream closed by the server; reconnecting")
                }
                Err(e) => {
                    warn!(address = %self.config.address, error = %e, retry_in = ?backoff, "xDS stream failed")
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(self.config.max_backoff);
        }
    }

    async fn stream_once(
        &mut self,
        types: &mut HashMap<String, TypeState>,
        backoff: &mut Duration,
    ) -> Result<(), String> {
        let (tx, rx) = mpsc::unbounded_channel::<DeltaDiscoveryRequest>();
        let node = Node {
            id: self.config.node_id.clone(),
            cluster: String::new(),
            metadata: Some(prost_types::Struct {
                fields: self
                    .config
                    .node_metadata
                    .iter()
                    .map(|(k, v)| {
                        (
                            k.clone(),
                            prost_types::Value {
                                kind: Some(prost_types::value::Kind::StringValue(v.clone())),
                            },
                        )
                    })
                    .collect(),
            }),
            build_version: concat!("ambient-rs ", env!("CARGO_PKG_VERSION")).to_owned(),
        };
        let mut first = true;
        // Authorization first: the server answers in request order, so policies arrive before
        // the workloads that name them.
        let mut urls: Vec<&String> = types.keys().collect();
        urls.sort_by_key(|url| crate::resources::push_order(url));
        for url in urls {
            let state = &types[url];
            let mut names: Vec<String> = match &state.subscription {
                Subscription::Wildcard => Vec::new(),
                Subscription::Names(names) => names.clone(),
            };
            names.extend(state.extra.iter().cloned());
            let _ = tx.send(DeltaDiscoveryRequest {
                node: first.then(|| node.clone()),
                type_url: url.clone(),
                resource_names_subscribe: names,
                initial_resource_versions: state.held.clone().into_iter().collect(),
                ..Default::default()
            });
            first = false;
        }
        let mut request = tonic::Request::new(UnboundedReceiverStream::new(rx));
        if let Some(path) = &self.config.token_file {
            let value = identity::grpc::bearer_header(path).await?;
            request.metadata_mut().insert("authorization", value);
        }
        if let Some(cluster) = &self.config.cluster_id {
            let value = cluster
                .parse()
                .map_err(|_| format!("the cluster id {cluster:?} is not a valid header value"))?;
            request
                .metadata_mut()
                .insert(identity::ca::CLUSTER_ID_HEADER, value);
        }
        let mut client = AggregatedDiscoveryServiceClient::new(self.channel.channel()?)
            .max_decoding_message_size(self.config.max_response_bytes)
            .max_encoding_message_size(usize::MAX);
        let mut responses = client
            .delta_aggregated_resources(request)
            .await
            .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?
            .into_inner();
        loop {
            tokio::select! {
                message = responses.message() => {
                    let Some(response) = message.map_err(|s| format!("{:?}: {}", s.code(), s.message()))? else {
                        return Ok(());
                    };
                    *backoff = self.config.initial_backoff;
                    let reply = self.on_response(types, response);
                    let _ = tx.send(reply);
                }
                Some((url, names)) = self.commands_rx.recv() => {
                    if let Some(state) = types.get_mut(&url) {
                        let new: Vec<String> = names.into_iter().filter(|n| state.extra.insert(n.clone())).collect();
                        if !new.is_empty() {
                            let _ = tx.send(DeltaDiscoveryRequest {
                                type_url: url,
                                resource_names_subscribe: new,
                                ..Default::default()
                            });
                        }
                    }
                }
            }
        }
    }

    /// Applies one response and builds its ACK or NACK.
    fn on_response(
        &self,
        types: &mut HashMap<String, TypeState>,
        response: DeltaDiscoveryResponse,
    ) -> DeltaDiscoveryRequest {
        let url = response.type_url.clone();
        let ack = |error: Option<String>| DeltaDiscoveryRequest {
            type_url: url.clone(),
            response_nonce: response.nonce.clone(),
            error_detail: error.map(|message| Status {
                code: 3, // INVALID_ARGUMENT
                message,
                details: Vec::new(),
            }),
            ..Default::default()
        };
        let Some(state) = types.get_mut(&url) else {
            debug!(type_url = %url, "xDS: ACKing a response of a type nobody registered");
            return ack(None);
        };
        let mut rejected: Vec<(String, String)> = Vec::new();
        let mut added = Vec::new();
        for r in &response.resources {
            match &r.resource {
                Some(any) if any.type_url == url || any.type_url.is_empty() => {
                    added.push(RawResource {
                        name: r.name.clone(),
                        version: r.version.clone(),
                        body: any.value.clone(),
                    })
                }
                Some(any) => rejected.push((
                    r.name.clone(),
                    format!("resource of type {} in a {url} response", any.type_url),
                )),
                None => rejected.push((r.name.clone(), "resource body missing".into())),
            }
        }
        let versions: Vec<(String, String)> = added
            .iter()
            .map(|r| (r.name.clone(), r.version.clone()))
            .collect();
        rejected.extend(
            state
                .handler
                .apply(added, response.removed_resources.clone()),
        );
        let rejected_names: HashSet<&str> = rejected.iter().map(|(n, _)| n.as_str()).collect();
        for (name, version) in versions {
            if !rejected_names.contains(name.as_str()) {
                state.held.insert(name, version);
            }
        }
        for name in &response.removed_resources {
            state.held.remove(name);
        }
        if !state.got_first {
            state.got_first = true;
            if types.values().all(|t| t.got_first) {
                info!("xDS: every type has had its first response; synced");
                self.synced_tx.send_replace(true);
            }
        }
        if rejected.is_empty() {
            ack(None)
        } else {
            let message = rejected
                .iter()
                .map(|(n, reason)| format!("{n}: {reason}"))
                .collect::<Vec<_>>()
                .join("; ");
            warn!(type_url = %url, %message, "xDS: NACK");
            ack(Some(message))
        }
    }
}
