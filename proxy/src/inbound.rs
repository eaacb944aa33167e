//! The inbound HBONE path (port 15008): each CONNECT is checked and, when allowed, joined to a
//! connection to the destination app.
//!
//! One [`Inbound`] serves one local workload (a pod's listener in shared mode, the workload in
//! dedicated mode), whose certificate the TLS layer presents. For each CONNECT:
//! 1. the `:authority` must be an `ip:port` of that workload, not one of the proxy's own ports
//!    (anything else: 400, logged);
//! 2. the client's SPIFFE id comes from its verified certificate (the TLS layer already required
//!    the mesh's roots and trust domain);
//! 3. L4 policy decides with that identity, the client's address and the authority (deny: 401,
//!    logged with the source identity and the deciding policy);
//! 4. the app is dialed (failure or no answer within the limit: 503), the tunnel accepted and
//!    the bytes copied with half-close, while the connection stays registered so a policy change
//!    can close it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use hbone::{ConnectHandler, InboundConnect};
use http::StatusCode;
use tracing::{info, warn};

use crate::connections::{Connections, Registered};
use crate::metrics::{Counted, Ends, Flow, Metrics, Open};
use crate::sockets::Connector;
use crate::state::{LocalWorkload, State, StateStore};
use xds_client::resources::Workload;

/// The inbound path reaches the app from the current network namespace, without a mark, unless
/// it is given another [`Connector`] (shared mode: a socket made inside the pod's netns).
pub type DirectConnector = crate::sockets::Marked;

/// What one inbound connection did, for the access log and metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboundOutcome {
    /// The client's address (its pod, or its node proxy).
    pub source: SocketAddr,
    /// The client's SPIFFE id, when it presented a usable one.
    pub source_identity: Option<String>,
    /// The CONNECT authority (for plaintext inbound: the original destination).
    pub destination: String,
    /// The local workload's uid, once known.
    pub destination_uid: Option<String>,
    /// The HTTP status answered (200, 400, 401, 503).
    pub status: u16,
    /// Why it was refused or ended early, if it was.
    pub error: Option<String>,
    /// Bytes from the client to the app, and back.
    pub bytes: (u64, u64),
    /// How long it lasted.
    pub duration: Duration,
}

/// The inbound handler of one local workload.
pub struct Inbound<C = DirectConnector> {
    state: Arc<StateStore>,
    connections: Arc<Connections>,
    local: LocalWorkload,
    connector: C,
    connect_timeout: Duration,
    on_done: Box<dyn Fn(InboundOutcome) + Send + Sync>,
    draining: Arc<AtomicBool>,
    metrics: Arc<Metrics>,
}

impl<C> std::fmt::Debug for Inbound<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inbound")
            .field("local", &self.local)
            .finish_non_exhaustive()
    }
}

impl<C: Connector> Inbound<C> {
    /// Serves the workload `local` of `state`, reaching its app through `connector`.
    /// `on_done` receives every connection's outcome (the access log; metrics).
    pub fn new(
        state: Arc<StateStore>,
        connections: Arc<Connections>,
        local: impl Into<LocalWorkload>,
        connector: C,
        on_done: impl Fn(InboundOutcome) + Send + Sync + 'static,
    ) -> Self {
        Inbound {
            state,
            connections,
            local: local.into(),
            connector,
            connect_timeout: Duration::from_secs(10),
            on_done: Box::new(on_done),
            draining: Arc::default(),
            metrics: Metrics::new(Duration::from_secs(300)),
        }
    }

    /// Counts connections into `metrics` (reporter `destination`) instead of a private registry.
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = metrics;
        self
    }

    /// A switch that, once set, makes every new CONNECT (also on connections already open) a
    /// 503: the proxy is draining. Tunnels already established continue.
    pub fn drain_switch(&self) -> Arc<AtomicBool> {
        self.draining.clone()
    }

    /// Checks the CONNECT, dials the app and accepts the tunnel. Kept apart from the copy (and
    /// boxed by the caller) so the request, the state snapshot and the dial do not stay in the
    /// connection's task while the bytes flow.
    async fn establish(
        &self,
        req: InboundConnect,
        started: Instant,
    ) -> Result<(InboundOutcome, Established), InboundOutcome> {
        let mut outcome = InboundOutcome {
            source: req.peer_addr(),
            source_identity: None,
            destination: req.authority().to_string(),
            destination_uid: None,
            status: 0,
            error: None,
            bytes: (0, 0),
            duration: Duration::ZERO,
        };
        let refuse =
            |req: InboundConnect, mut outcome: InboundOutcome, status: StatusCode, why: String| {
                req.reject(status);
                outcome.status = status.as_u16();
                outcome.error = Some(why);
                outcome.duration = started.elapsed();
                outcome
            };
        if self.draining.load(Ordering::SeqCst) {
            let why = "the proxy is draining (shutting down)".to_owned();
            return Err(refuse(req, outcome, StatusCode::SERVICE_UNAVAILABLE, why));
        }
        // Parsed once per HBONE connection (7% of the server's cycles with 8 clients connecting
        // in a loop, when it was parsed for every CONNECT).
        let peer = match req
            .peer_memo(|chain| identity::tls::peer_spiffe_id(chain).map_err(|e| e.to_string()))
        {
            Ok(id) => id,
            Err(e) => {
                let why = format!("the client's certificate has no usable SPIFFE id: {e}");
                return Err(refuse(req, outcome, StatusCode::UNAUTHORIZED, why));
            }
        };
        outcome.source_identity = Some(peer.as_str().to_owned());
        let Some(destination) = req.authority().socket_addr() else {
            let why = format!("authority {} is not an ip:port", req.authority());
            return Err(refuse(req, outcome, StatusCode::BAD_REQUEST, why));
        };
        let state = self.state.snapshot();
        let source = state.workload_at("", req.peer_addr().ip()).cloned();
        let mut ends = Ends {
            source: source.as_deref(),
            source_identity: Some(peer.as_str()),
            destination: state.local(&self.local).map(|w| &**w),
            mtls: true,
            ..Ends::default()
        };
        let (local, connection) = match authorize(
            &state,
            &self.local,
            req.peer_addr(),
            destination,
            Some(&peer),
        ) {
            Ok(allowed) => allowed,
            Err((status, why)) => {
                self.metrics
                    .failed(DESTINATION, ends, failure_flags(status));
                return Err(refuse(req, outcome, status, why));
            }
        };
        ends.destination = Some(&local);
        outcome.destination_uid = Some(local.uid.clone());
        let registered = self.connections.register(connection, &local.uid);
        let app = match dial_app(&self.connector, destination, self.connect_timeout).await {
            Ok(app) => app,
            Err(why) => {
                self.metrics.failed(DESTINATION, ends, "CONNECT");
                return Err(refuse(req, outcome, StatusCode::SERVICE_UNAVAILABLE, why));
            }
        };
        let open = self.metrics.opened(DESTINATION, ends);
        drop(state);
        let tunnel = match req.accept() {
            Ok(t) => t,
            Err(e) => {
                outcome.status = 200;
                outcome.error = Some(format!("the client went away before the answer: {e}"));
                outcome.duration = started.elapsed();
                return Err(outcome);
            }
        };
        outcome.status = 200;
        let app = open.count(app, Flow::Sent);
        Ok((
            outcome,
            Established {
                tunnel,
                app,
                registered,
                _open: open,
            },
        ))
    }

    async fn serve(&self, req: InboundConnect) -> InboundOutcome {
        let started = Instant::now();
        let (mut outcome, mut established) = match Box::pin(self.establish(req, started)).await {
            Ok(ok) => ok,
            Err(refused) => return refused,
        };
        // Used in place: moving the parts out would keep them twice in the task.
        let Established {
            tunnel,
            app,
            registered,
            ..
        } = &mut established;
        let aborted = {
            let copy = std::pin::pin!(hbone::copy_tunnel_bidirectional(tunnel, &mut *app));
            copy_until_closed(copy, registered, &mut outcome).await
        };
        if aborted {
            crate::sockets::reset_on_close(app.get_ref());
        }
        outcome.duration = started.elapsed();
        outcome
    }
}

/// Dials the app at `destination` through `connector`, giving up after `timeout`; on failure,
/// why (both inbound paths log and answer it).
pub(crate) async fn dial_app<C: Connector>(
    connector: &C,
    destination: SocketAddr,
    timeout: Duration,
) -> Result<tokio::net::TcpStream, String> {
    match tokio::time::timeout(timeout, connector.connect(destination)).await {
        Ok(Ok(app)) => Ok(app),
        Ok(Err(e)) => Err(format!("cannot connect to the app at {destination}: {e}")),
        Err(_) => Err(format!(
            "the app at {destination} did not accept within {timeout:?}"
        )),
    }
}

/// Runs an inbound connection's `copy` until it ends or a policy change closes the connection,
/// recording the bytes moved and why it ended in `outcome`. `copy` is pinned by the caller, so the
/// copy's state is stored once, in the caller's future. Returns whether the connection was
/// aborted (the copy failed, or the policy change closed it): its sockets are then reset, not
/// closed (`sockets::reset_on_close`).
pub(crate) async fn copy_until_closed(
    copy: std::pin::Pin<&mut impl Future<Output = Result<hbone::Transferred, hbone::CopyError>>>,
    registered: &Registered,
    outcome: &mut InboundOutcome,
) -> bool {
    tokio::select! {
        copied = copy => match copied {
            Ok(t) => {
                outcome.bytes = (t.a_to_b, t.b_to_a);
                false
            }
            Err(e) => {
                outcome.bytes = (e.transferred.a_to_b, e.transferred.b_to_a);
                outcome.error = Some(e.to_string());
                true
            }
        },
        reason = registered.closed() => {
            outcome.error = Some(format!("connection closed due to policy change: {reason}"));
            true
        }
    }
}

/// The reporter label of the inbound side.
pub(crate) const DESTINATION: &str = "destination";

/// The `response_flags` of an inbound refusal answered with `status`.
pub(crate) fn failure_flags(status: StatusCode) -> &'static str {
    if status == StatusCode::UNAUTHORIZED {
        "DENY"
    } else {
        "CONNECT"
    }
}

/// The checks every inbound connection passes (HBONE and plaintext): the local workload is known,
/// `destination` is one of its addresses and not a proxy port, and policy allows `source` (with
/// the client's identity, if it has one). On refusal: the status to answer and why (logged by
/// the caller's access log; a policy denial is also logged here as a warning).
pub(crate) fn authorize(
    state: &State,
    local: &LocalWorkload,
    source: SocketAddr,
    destination: SocketAddr,
    peer: Option<&identity::SpiffeId>,
) -> Result<(Arc<Workload>, authz::Connection), (StatusCode, String)> {
    let Some(workload) = state.local(local).cloned() else {
        let why = format!("the local workload {local} is not known (yet)");
        return Err((StatusCode::SERVICE_UNAVAILABLE, why));
    };
    if crate::addr::PROXY_PORTS.contains(&destination.port()) {
        let why = format!("destination {destination} is the proxy's own port");
        return Err((StatusCode::BAD_REQUEST, why));
    }
    if !workload.addresses.contains(&destination.ip()) {
        let why = format!(
            "destination {destination} is not an address of {}/{} (served here)",
            workload.namespace, workload.name
        );
        return Err((StatusCode::BAD_REQUEST, why));
    }
    let connection = authz::Connection {
        source,
        destination,
        peer: peer.map(|p| authz::Principal::parse(p.as_str())),
    };
    let decision = state
        .policies()
        .decide(&connection, &crate::authz_workload(&workload));
    if !decision.allowed {
        let src_identity = peer.map(|p| p.as_str()).unwrap_or("-");
        warn!(src = %source, src_identity, dst = %destination, reason = %decision.reason, "connection denied by policy");
        return Err((
            StatusCode::UNAUTHORIZED,
            format!("denied: {}", decision.reason),
        ));
    }
    Ok((workload, connection))
}

/// What an allowed connection keeps while its bytes flow.
struct Established {
    tunnel: hbone::Tunnel,
    app: Counted<tokio::net::TcpStream>,
    registered: Registered,
    _open: Open,
}

impl<C: Connector> ConnectHandler for Inbound<C> {
    async fn handle(&self, request: InboundConnect) {
        let outcome = self.serve(request).await;
        if let Some(error) = &outcome.error {
            info!(src = %outcome.source, dst = %outcome.destination, status = outcome.status, %error, "inbound connection ended");
        }
        (self.on_done)(outcome);
    }
}
