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

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use hbone::{ConnectHandler, InboundConnect};
use http::StatusCode;
use tokio::net::TcpStream;
use tracing::{info, warn};

use crate::connections::Connections;
use crate::state::StateStore;

/// How the inbound path reaches the app (a plain connect in the current netns by default; in
/// shared mode, a socket made inside the pod's netns).
pub trait AppConnector: Send + Sync + 'static {
    /// Connects to the app at `addr`.
    fn connect(&self, addr: SocketAddr) -> impl Future<Output = std::io::Result<TcpStream>> + Send;
}

/// Connects from the current network namespace.
#[derive(Debug, Clone, Copy, Default)]
pub struct DirectConnector;

impl AppConnector for DirectConnector {
    fn connect(&self, addr: SocketAddr) -> impl Future<Output = std::io::Result<TcpStream>> + Send {
        TcpStream::connect(addr)
    }
}

/// What one inbound connection did, for the access log and metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboundOutcome {
    /// The client's address (its pod, or its node proxy).
    pub source: SocketAddr,
    /// The client's SPIFFE id, when it presented a usable one.
    pub source_identity: Option<String>,
    /// The CONNECT authority.
    pub destination: String,
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
    local_uid: String,
    connector: C,
    connect_timeout: Duration,
    on_done: Box<dyn Fn(InboundOutcome) + Send + Sync>,
    draining: Arc<AtomicBool>,
}

impl<C> std::fmt::Debug for Inbound<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inbound")
            .field("local_uid", &self.local_uid)
            .finish_non_exhaustive()
    }
}

impl<C: AppConnector> Inbound<C> {
    /// Serves the workload `local_uid` of `state`, reaching its app through `connector`.
    /// `on_done` receives every connection's outcome (the access log; metrics).
    pub fn new(
        state: Arc<StateStore>,
        connections: Arc<Connections>,
        local_uid: &str,
        connector: C,
        on_done: impl Fn(InboundOutcome) + Send + Sync + 'static,
    ) -> Self {
        Inbound {
            state,
            connections,
            local_uid: local_uid.to_owned(),
            connector,
            connect_timeout: Duration::from_secs(10),
            on_done: Box::new(on_done),
            draining: Arc::default(),
        }
    }

    /// A switch that, once set, makes every new CONNECT (also on connections already open) a
    /// 503: the proxy is draining. Tunnels already established continue.
    pub fn drain_switch(&self) -> Arc<AtomicBool> {
        self.draining.clone()
    }

    async fn serve(&self, req: InboundConnect) -> InboundOutcome {
        let started = Instant::now();
        let mut outcome = InboundOutcome {
            source: req.peer_addr(),
            source_identity: None,
            destination: req.authority().to_string(),
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
            return refuse(req, outcome, StatusCode::SERVICE_UNAVAILABLE, why);
        }
        let state = self.state.snapshot();
        let Some(local) = state.workload(&self.local_uid).cloned() else {
            let why = format!("the local workload {} is not known (yet)", self.local_uid);
            return refuse(req, outcome, StatusCode::SERVICE_UNAVAILABLE, why);
        };
        let Some(destination) = req.authority().socket_addr() else {
            let why = format!("authority {} is not an ip:port", req.authority());
            return refuse(req, outcome, StatusCode::BAD_REQUEST, why);
        };
        if crate::addr::PROXY_PORTS.contains(&destination.port()) {
            let why = format!("authority {destination} is the proxy's own port");
            return refuse(req, outcome, StatusCode::BAD_REQUEST, why);
        }
        if !local.addresses.contains(&destination.ip()) {
            let why = format!(
                "authority {destination} is not an address of {}/{} (served here)",
                local.namespace, local.name
            );
            return refuse(req, outcome, StatusCode::BAD_REQUEST, why);
        }
        let peer = match identity::tls::peer_spiffe_id(req.peer_certificates()) {
            Ok(id) => id,
            Err(e) => {
                let why = format!("the client's certificate has no usable SPIFFE id: {e}");
                return refuse(req, outcome, StatusCode::UNAUTHORIZED, why);
            }
        };
        outcome.source_identity = Some(peer.as_str().to_owned());
        let connection = authz::Connection {
            source: req.peer_addr(),
            destination,
            peer: Some(authz::Principal::parse(peer.as_str())),
        };
        let decision = state
            .policies()
            .decide(&connection, &crate::authz_workload(&local));
        if !decision.allowed {
            warn!(src = %req.peer_addr(), src_identity = %peer, dst = %destination, reason = %decision.reason, "connection denied by policy");
            let why = format!("denied: {}", decision.reason);
            return refuse(req, outcome, StatusCode::UNAUTHORIZED, why);
        }
        let registered = self.connections.register(connection, &local.uid);
        let app =
            match tokio::time::timeout(self.connect_timeout, self.connector.connect(destination))
                .await
            {
                Ok(Ok(app)) => app,
                Ok(Err(e)) => {
                    let why = format!("cannot connect to the app at {destination}: {e}");
                    return refuse(req, outcome, StatusCode::SERVICE_UNAVAILABLE, why);
                }
                Err(_) => {
                    let why = format!(
                        "the app at {destination} did not accept within {:?}",
                        self.connect_timeout
                    );
                    return refuse(req, outcome, StatusCode::SERVICE_UNAVAILABLE, why);
                }
            };
        let _ = app.set_nodelay(true);
        let mut tunnel = match req.accept() {
            Ok(t) => t,
            Err(e) => {
                outcome.status = 200;
                outcome.error = Some(format!("the client went away before the answer: {e}"));
                outcome.duration = started.elapsed();
                return outcome;
            }
        };
        outcome.status = 200;
        let mut app = app;
        tokio::select! {
            copied = hbone::copy_tunnel_bidirectional(&mut tunnel, &mut app) => match copied {
                Ok(t) => outcome.bytes = (t.a_to_b, t.b_to_a),
                Err(e) => {
                    outcome.bytes = (e.transferred.a_to_b, e.transferred.b_to_a);
                    outcome.error = Some(e.to_string());
                }
            },
            reason = registered.closed() => {
                outcome.error = Some(format!("connection closed due to policy change: {reason}"));
            }
        }
        outcome.duration = started.elapsed();
        outcome
    }
}

impl<C: AppConnector> ConnectHandler for Inbound<C> {
    async fn handle(&self, request: InboundConnect) {
        let outcome = self.serve(request).await;
        if let Some(error) = &outcome.error {
            info!(src = %outcome.source, dst = %outcome.destination, status = outcome.status, %error, "inbound connection ended");
        }
        (self.on_done)(outcome);
    }
}
