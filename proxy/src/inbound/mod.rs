//! The inbound paths of one local workload: HBONE (port 15008, [`Inbound`]) and plaintext from
//! outside the mesh (port 15006, [`PlainInbound`]). Both admit a connection by the same pure
//! decision ([`admit`]: the workload is known, the destination is one of its addresses and not a
//! proxy port, L4 policy allows it), then dial the app and copy, while the connection stays
//! registered so a policy change can close it.
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
use std::time::Duration;

use identity::SpiffeId;
use tokio::net::TcpStream;
use tracing::warn;
use xds_client::resources::Workload;

use crate::connections::{Connections, Registered};
use crate::sockets::Connector;
use crate::state::{LocalWorkload, State, StateStore};
use crate::telemetry::Record;
use crate::telemetry::metrics::{Ends, Metrics};
use hbone::handoff::Copied;

mod admission;
mod connect;
mod memo;
mod plain;

pub use admission::{Admitted, Refusal, admit};
pub use connect::Inbound;
pub use plain::PlainInbound;

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
    /// The client's workload (the one at its address), as found when the connection was set up.
    pub source_workload: Option<Arc<Workload>>,
    /// The local workload, once known.
    pub destination_workload: Option<Arc<Workload>>,
    /// Whether it came through HBONE (mutual TLS), not the plaintext port.
    pub mtls: bool,
    /// The HTTP status answered (200, 400, 401, 503).
    pub status: u16,
    /// Istio's `response_flags` when it was refused (`DENY`, `CONNECT`), else `None`.
    pub response_flags: Option<&'static str>,
    /// Why it was refused or ended early, if it was.
    pub error: Option<String>,
    /// Bytes from the client to the app, and back.
    pub bytes: (u64, u64),
    /// How long it lasted.
    pub duration: Duration,
}

impl InboundOutcome {
    /// A connection from `source` to `destination` that has only just arrived (through HBONE
    /// when `mtls`).
    fn new(source: SocketAddr, destination: String, mtls: bool) -> InboundOutcome {
        InboundOutcome {
            source,
            source_identity: None,
            destination,
            source_workload: None,
            destination_workload: None,
            mtls,
            status: 0,
            response_flags: None,
            error: None,
            bytes: (0, 0),
            duration: Duration::ZERO,
        }
    }

    /// This outcome, ended by `refusal` after the time since `started`.
    fn refused(mut self, refusal: &Refusal, started: std::time::Instant) -> InboundOutcome {
        self.status = refusal.status().as_u16();
        self.response_flags = Some(refusal.response_flags());
        self.error = Some(refusal.to_string());
        self.duration = started.elapsed();
        self
    }
}

impl Record for InboundOutcome {
    const REPORTER: &'static str = DESTINATION;

    fn ends(&self) -> Ends<'_> {
        Ends {
            source: self.source_workload.as_deref(),
            source_identity: self.source_identity.as_deref(),
            destination: self.destination_workload.as_deref(),
            destination_identity: None,
            service: None,
            mtls: self.mtls,
        }
    }

    fn failure(&self) -> Option<&'static str> {
        self.response_flags
    }
}

/// What the HBONE and the plaintext inbound paths of one workload hold alike, and the steps
/// they take alike.
#[derive(Clone)]
struct Serving<C> {
    state: Arc<StateStore>,
    connections: Arc<Connections>,
    local: LocalWorkload,
    connector: C,
    connect_timeout: Duration,
    draining: Arc<AtomicBool>,
    metrics: Arc<Metrics>,
    /// Tunnels are copied so that they can move to another process (`hbone::Config::movable`).
    movable: bool,
}

impl<C: Connector> Serving<C> {
    /// Names both ends of `outcome` as the current state has them (the record names them
    /// whatever happens next), and refuses while draining. Returns that state.
    fn begin(&self, outcome: &mut InboundOutcome) -> Result<Arc<State>, Refusal> {
        let state = self.state.snapshot();
        outcome.source_workload = state.workload_at("", outcome.source.ip()).cloned();
        outcome.destination_workload = state.local(&self.local).cloned();
        if self.draining.load(Ordering::SeqCst) {
            return Err(Refusal::Draining);
        }
        Ok(state)
    }

    /// Admits the connection from `outcome.source` (with the client's identity `peer`, through
    /// HBONE) to `destination` by [`admit`], registers it for the re-checks a policy change
    /// makes, and dials the app.
    async fn admit_and_dial(
        &self,
        state: &State,
        outcome: &mut InboundOutcome,
        destination: SocketAddr,
        peer: Option<&SpiffeId>,
    ) -> Result<(Registered, TcpStream), Refusal> {
        let registered = self.admit_and_register(state, outcome, destination, peer)?;
        let app = dial_app(
            &self.connector,
            outcome.source,
            destination,
            self.connect_timeout,
        )
        .await?;
        Ok((registered, app))
    }

    /// Admits the connection from `outcome.source` to `destination` by [`admit`] (a refusal by
    /// policy is logged) and registers it for the re-checks a policy change makes.
    fn admit_and_register(
        &self,
        state: &State,
        outcome: &mut InboundOutcome,
        destination: SocketAddr,
        peer: Option<&SpiffeId>,
    ) -> Result<Registered, Refusal> {
        let source = outcome.source;
        let admitted = admit(state, &self.local, source, destination, peer).inspect_err(|r| {
            log_refusal(r, source, destination, peer.map(SpiffeId::as_str));
        })?;
        outcome.destination_workload = Some(admitted.workload.clone());
        Ok(self
            .connections
            .register(admitted.connection, &admitted.workload.uid))
    }
}

/// Dials the app at `destination` through `connector` for the client at `source` (from its
/// address where the connector preserves it), giving up after `timeout`.
async fn dial_app<C: Connector>(
    connector: &C,
    source: SocketAddr,
    destination: SocketAddr,
    timeout: Duration,
) -> Result<TcpStream, Refusal> {
    let dial = connector.connect_app(source.ip(), destination);
    match tokio::time::timeout(timeout, dial).await {
        Ok(Ok(app)) => Ok(app),
        Ok(Err(e)) => Err(Refusal::AppUnreachable(format!(
            "cannot connect to the app at {destination}: {e}"
        ))),
        Err(_) => Err(Refusal::AppUnreachable(format!(
            "the app at {destination} did not accept within {timeout:?}"
        ))),
    }
}

/// Runs an inbound connection's `copy` until it ends or a policy change closes the connection,
/// recording the bytes moved and why it ended in `outcome`. `copy` is pinned by the caller, so the
/// copy's state is stored once, in the caller's future. Returns whether the connection was
/// aborted (the copy failed, or the policy change closed it): its sockets are then reset, not
/// closed (`sockets::reset_on_close`).
async fn copy_until_closed(
    copy: std::pin::Pin<&mut impl Future<Output = Result<Copied, hbone::CopyError>>>,
    registered: &Registered,
    outcome: &mut InboundOutcome,
) -> Ended {
    tokio::select! {
        copied = copy => match copied {
            Ok(Copied::Done(t)) => {
                outcome.bytes = (t.a_to_b, t.b_to_a);
                Ended::Closed
            }
            Ok(Copied::Moved(t)) => {
                outcome.bytes = (t.a_to_b, t.b_to_a);
                Ended::Moved
            }
            Err(e) => {
                outcome.bytes = (e.transferred.a_to_b, e.transferred.b_to_a);
                outcome.error = Some(e.to_string());
                Ended::Aborted
            }
        },
        reason = registered.closed() => {
            outcome.error = Some(format!("connection closed due to policy change: {reason}"));
            Ended::Aborted
        }
    }
}

/// How an inbound connection's copy ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ended {
    /// Both sides closed.
    Closed,
    /// The copy failed or a policy change closed it: its sockets are reset.
    Aborted,
    /// It moved to another process (a proxy upgrade), which goes on with it and logs it.
    Moved,
}

/// The reporter label of the inbound side.
const DESTINATION: &str = "destination";

/// Logs a refusal that an operator should see at warning level (a policy denial), with the
/// client's identity when it has one.
fn log_refusal(refusal: &Refusal, source: SocketAddr, destination: SocketAddr, peer: Option<&str>) {
    if let Refusal::Denied(reason) = refusal {
        let src_identity = peer.unwrap_or("-");
        warn!(src = %source, src_identity, dst = %destination, reason = %reason, "connection denied by policy");
    }
}
