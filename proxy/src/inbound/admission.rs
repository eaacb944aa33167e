//! The admission decision of an inbound connection, HBONE or plaintext, as a pure function of the
//! state snapshot and the connection's facts ([`admit`]), like the outbound route decision: no
//! I/O, no logging, a typed [`Refusal`] that says which status the client gets and why.

use std::net::SocketAddr;
use std::sync::Arc;

use http::StatusCode;
use xds_client::resources::Workload;

use crate::state::{LocalWorkload, State};

/// Why an inbound connection is refused, with the HTTP status an HBONE client is answered
/// ([`Refusal::status`]; plaintext inbound reports the same status in its access log).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Refusal {
    /// The proxy is shutting down (503).
    #[error("the proxy is draining (shutting down)")]
    Draining,
    /// The client's certificate carries no usable SPIFFE id (401).
    #[error("the client's certificate has no usable SPIFFE id: {0}")]
    NoPeerIdentity(String),
    /// The CONNECT `:authority` is not an `ip:port` (400).
    #[error("authority {0} is not an ip:port")]
    BadAuthority(String),
    /// The workload this listener serves is not in the state (yet) (503).
    #[error("the local workload {0} is not known (yet)")]
    UnknownLocal(String),
    /// The destination is one of the proxy's own ports (400).
    #[error("destination {0} is the proxy's own port")]
    ProxyPort(SocketAddr),
    /// The destination is not an address of the workload served here (400).
    #[error("destination {destination} is not an address of {workload} (served here)")]
    NotLocal {
        /// The destination asked for.
        destination: SocketAddr,
        /// `namespace/name` of the workload served here.
        workload: String,
    },
    /// L4 policy denies the connection (401).
    #[error("denied: {0}")]
    Denied(authz::Reason),
    /// The app did not accept the connection (503).
    #[error("{0}")]
    AppUnreachable(String),
    /// The workload served here asks for an application tunnel (a PROXY protocol header, or a
    /// port of its own), which this proxy does not carry yet (503).
    #[error(
        "{workload} asks for an application tunnel ({what}), which is not carried; refused \
         rather than handed over in a form it did not ask for"
    )]
    ApplicationTunnelNotCarried {
        /// `namespace/name` of the workload served here.
        workload: String,
        /// The tunnel it asks for.
        what: String,
    },
}

impl Refusal {
    /// The HTTP status an HBONE client is answered.
    pub fn status(&self) -> StatusCode {
        match self {
            Refusal::Draining
            | Refusal::UnknownLocal(_)
            | Refusal::AppUnreachable(_)
            | Refusal::ApplicationTunnelNotCarried { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Refusal::NoPeerIdentity(_) | Refusal::Denied(_) => StatusCode::UNAUTHORIZED,
            Refusal::BadAuthority(_) | Refusal::ProxyPort(_) | Refusal::NotLocal { .. } => {
                StatusCode::BAD_REQUEST
            }
        }
    }

    /// Istio's `response_flags` label of the refusal in metrics.
    pub fn response_flags(&self) -> &'static str {
        match self {
            Refusal::Denied(_) | Refusal::NoPeerIdentity(_) => "DENY",
            _ => "CONNECT",
        }
    }
}

/// An admitted connection: the workload it goes to and the facts policy decided on (kept so a
/// policy change can decide it again).
#[derive(Debug, Clone)]
pub struct Admitted {
    /// The local workload.
    pub workload: Arc<Workload>,
    /// The connection as policy saw it.
    pub connection: authz::Connection,
}

/// Decides whether a connection from `source` (with the client's identity `peer`, if it came
/// through HBONE) to `destination` may reach the local workload `local`: the workload is known,
/// `destination` is one of its addresses and not a proxy port, L4 policy allows it, and the
/// workload does not ask for an application tunnel (not carried yet).
pub fn admit(
    state: &State,
    local: &LocalWorkload,
    source: SocketAddr,
    destination: SocketAddr,
    peer: Option<&identity::SpiffeId>,
) -> Result<Admitted, Refusal> {
    let Some(workload) = state.local(local).cloned() else {
        return Err(Refusal::UnknownLocal(local.to_string()));
    };
    if crate::addr::PROXY_PORTS.contains(&destination.port()) {
        return Err(Refusal::ProxyPort(destination));
    }
    if !workload.addresses.contains(&destination.ip()) {
        return Err(Refusal::NotLocal {
            destination,
            workload: format!("{}/{}", workload.namespace, workload.name),
        });
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
        return Err(Refusal::Denied(decision.reason));
    }
    if let Some(tunnel) = workload.application_tunnel {
        return Err(Refusal::ApplicationTunnelNotCarried {
            workload: format!("{}/{}", workload.namespace, workload.name),
            what: match (tunnel.proxy_protocol, tunnel.port) {
                (true, 0) => "PROXY protocol".to_owned(),
                (true, port) => format!("PROXY protocol to port {port}"),
                (false, port) => format!("plain TCP to port {port}"),
            },
        });
    }
    Ok(Admitted {
        workload,
        connection,
    })
}
