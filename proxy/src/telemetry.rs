//! The access log: one line per finished connection, with DESIGN.md's fields, through `tracing`
//! (target `access`), so the binary's log format (plain or JSON, `LOG_FORMAT`) applies to it.
//!
//! Workload names come from the state at the end of the connection: the source of an inbound
//! connection is the workload at its address (in shared mode the peer proxy dials from inside
//! the source pod), the destination of an outbound one the workload the route chose.

use std::net::SocketAddr;
use std::sync::Arc;

use xds_client::resources::Workload;

use crate::inbound::InboundOutcome;
use crate::outbound::OutboundOutcome;
use crate::state::State;

/// What the access log says about one side of a connection.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Peer {
    /// Workload name (`-` when unknown).
    pub workload: String,
    /// Namespace.
    pub namespace: String,
    /// SPIFFE id.
    pub identity: String,
}

impl Peer {
    fn of(w: Option<&Arc<Workload>>) -> Self {
        match w {
            Some(w) => Peer {
                workload: w.workload_name.clone(),
                namespace: w.namespace.clone(),
                identity: w.identity.to_string(),
            },
            None => Peer {
                workload: "-".into(),
                namespace: "-".into(),
                identity: "-".into(),
            },
        }
    }
}

fn workload_at(state: &State, addr: SocketAddr) -> Option<&Arc<Workload>> {
    state.workload_at("", addr.ip())
}

/// Logs a finished outbound connection.
pub fn log_outbound(state: &State, o: &OutboundOutcome) {
    let src = Peer::of(state.workload(&o.source_uid));
    let dst = Peer::of(o.destination_uid.as_deref().and_then(|u| state.workload(u)));
    let dst_identity = if o.mtls { dst.identity.as_str() } else { "-" };
    tracing::info!(
        target: "access",
        direction = "outbound",
        src.addr = %o.source,
        src.workload = %src.workload,
        src.namespace = %src.namespace,
        src.identity = src.identity.as_str(),
        dst.addr = %o.destination,
        dst.hbone_addr = %o.hbone_target.map(|t| t.to_string()).unwrap_or_else(|| "-".into()),
        dst.workload = %dst.workload,
        dst.namespace = %dst.namespace,
        dst.identity = dst_identity,
        mtls = o.mtls,
        bytes_sent = o.bytes.0,
        bytes_recv = o.bytes.1,
        duration_ms = o.duration.as_millis() as u64,
        error = o.error.as_deref().unwrap_or("-"),
        "connection complete"
    );
}

/// Logs a finished inbound connection (HBONE or plaintext).
pub fn log_inbound(state: &State, o: &InboundOutcome) {
    let src = Peer::of(workload_at(state, o.source));
    let dst = Peer::of(o.destination_uid.as_deref().and_then(|u| state.workload(u)));
    tracing::info!(
        target: "access",
        direction = "inbound",
        src.addr = %o.source,
        src.workload = %src.workload,
        src.namespace = %src.namespace,
        src.identity = o.source_identity.as_deref().unwrap_or("-"),
        dst.addr = %o.destination,
        dst.workload = %dst.workload,
        dst.namespace = %dst.namespace,
        dst.identity = dst.identity.as_str(),
        status = o.status,
        bytes_recv = o.bytes.0,
        bytes_sent = o.bytes.1,
        duration_ms = o.duration.as_millis() as u64,
        error = o.error.as_deref().unwrap_or("-"),
        "connection complete"
    );
}
