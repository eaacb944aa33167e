//! HTTP/2 PING keepalive: detects a peer that stopped answering without closing the socket
//! (a killed node, a dropped route), which TCP alone would only notice after many minutes.

use std::time::Duration;

use crate::wire::conn::Connection;
use crate::wire::session::Failure;

/// Why a keepalive gave up on a connection.
#[derive(Debug)]
pub(crate) enum KeepaliveFailure {
    /// No PONG within the timeout.
    Timeout(Duration),
    /// The connection could no longer send a PING.
    Closed(Failure),
}

impl std::fmt::Display for KeepaliveFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KeepaliveFailure::Timeout(after) => write!(f, "no PING answer within {after:?}"),
            KeepaliveFailure::Closed(e) => write!(f, "PING failed: {e}"),
        }
    }
}

/// Pings every `interval`; resolves only when a PING is not answered within `timeout`.
pub(crate) async fn keepalive(
    connection: &Connection,
    interval: Duration,
    timeout: Duration,
) -> KeepaliveFailure {
    loop {
        tokio::time::sleep(interval).await;
        match tokio::time::timeout(timeout, connection.ping()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return KeepaliveFailure::Closed(e),
            Err(_) => return KeepaliveFailure::Timeout(timeout),
        }
    }
}
