//! Outbound tunnels moving between proxy processes (an upgrade): the old process hands its
//! pooled HBONE connections out, tunnels and all ([`Outbound::hand_off`]); the new one takes each
//! into the pod's pool ([`Outbound::adopt`]) and goes on with its tunnels
//! ([`Outbound::resume`]), with what the old one attached to each copy (the memo: the client, its
//! original destination, when the tunnel began, the bytes that went with the CONNECT).
//!
//! Before a byte more flows, the new process checks what it can: the pod's workload is still
//! served here and presents the identity the connection was pooled by, and the server's
//! certificate names one of the identities the connection expects. A tunnel that fails either is
//! reset, as a connection the new process would not have made.

use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime};

use hbone::handoff::{AdoptedTunnel, Copied, MovedConnection, MovedPlain, PoolHandOff};
use prost::Message;
use tokio::net::TcpStream;
use tracing::{info, warn};

use super::execute::{Outbound, OutboundOutcome, PoolKey};
use crate::addr::{ClientAddr, OrigDst};
use crate::certs::Certificates;
use crate::handoff::proto::OutboundTunnel;
use crate::sockets::Connector;
use crate::state::LocalWorkload;
use crate::telemetry::metrics::Flow;

/// The longest memo taken: two addresses, a time and a count.
const MAX_MEMO: usize = 1024;

/// What an outbound tunnel's copy carries to another process: `outcome`'s ends, when the tunnel
/// began (`started`, on this process's clock, told as wall time at `now`), and the `first`
/// bytes that went with the CONNECT.
pub(super) fn memo(
    outcome: &OutboundOutcome,
    first: u64,
    started: Instant,
    now: SystemTime,
) -> Vec<u8> {
    OutboundTunnel {
        source: outcome.source.0.to_string(),
        destination: outcome.destination.0.to_string(),
        started_unix_ms: crate::moving::started_unix_ms(now, started.elapsed()),
        first_bytes: first,
    }
    .encode_to_vec()
}

/// A memo read back.
#[derive(Debug)]
struct Memo {
    source: SocketAddr,
    destination: SocketAddr,
    started: SystemTime,
    first: u64,
}

fn read_memo(memo: &[u8]) -> Result<Memo, String> {
    if memo.len() > MAX_MEMO {
        return Err(format!(
            "a memo of {} bytes, more than {MAX_MEMO}",
            memo.len()
        ));
    }
    let m = OutboundTunnel::decode(memo).map_err(|e| format!("its memo: {e}"))?;
    let addr = |what: &str, text: &str| {
        text.parse::<SocketAddr>()
            .map_err(|e| format!("its memo's {what} {text:?}: {e}"))
    };
    Ok(Memo {
        source: addr("source", &m.source)?,
        destination: addr("destination", &m.destination)?,
        started: SystemTime::UNIX_EPOCH + Duration::from_millis(m.started_unix_ms),
        first: m.first_bytes,
    })
}

/// What [`Outbound::hand_off`] handed out.
#[derive(Debug, Default)]
pub struct OutboundHandOff {
    /// The pooled HBONE connections.
    pub pool: PoolHandOff<PoolKey>,
    /// The passthrough connections' copies.
    pub plain: Vec<MovedPlain>,
    /// Passthrough copies that stayed (why).
    pub plain_stayed: Vec<String>,
}

impl<C: Certificates, N: Connector> Outbound<C, N> {
    /// Hands every pooled HBONE connection out of this process, with its tunnels (see
    /// `hbone::Pool::hand_off`), and every passthrough connection's copy (their copies end here
    /// as moved, and are not recorded here). The caller has stopped accepting new connections
    /// first.
    pub async fn hand_off(&self, patience: Duration) -> OutboundHandOff {
        let (pool, (plain, stayed)) =
            tokio::join!(self.pool.hand_off(patience), self.plain.hand_off(patience));
        OutboundHandOff {
            pool,
            plain,
            plain_stayed: stayed,
        }
    }

    /// Takes a connection another process's outbound path handed out into this one's pool
    /// (pooled by `key`), and returns its tunnels for [`Outbound::resume`].
    pub fn adopt(
        &self,
        key: PoolKey,
        moved: MovedConnection,
    ) -> Result<Vec<AdoptedTunnel>, hbone::Error> {
        self.pool.adopt(key, moved)
    }

    /// Goes on with a tunnel of workload `source`'s connection pooled by `key`, adopted from
    /// another process, until it ends (or moves again); then returns its outcome, with the
    /// bytes and duration of its whole life, for the access log. Refused (the tunnel and the
    /// client's connection reset, the refusal logged and returned) when its memo does not read,
    /// when the workload is no longer served here or presents another identity, or when the
    /// server's certificate does not name an identity the connection expects.
    pub async fn resume(
        &self,
        adopted: AdoptedTunnel,
        key: &PoolKey,
        source: &LocalWorkload,
    ) -> Option<OutboundOutcome> {
        let (m, adopted) = crate::moving::memo_or_refuse(adopted, read_memo, "outbound")?;
        let AdoptedTunnel {
            mut tunnel,
            app,
            copy,
            memo,
            peer_addr,
            peer_certificates,
        } = adopted;
        let started = crate::moving::started_here(m.started);
        let mut outcome = OutboundOutcome {
            hbone_target: Some(peer_addr),
            mtls: true,
            bytes: (m.first + copy.transferred.b_to_a, copy.transferred.a_to_b),
            ..OutboundOutcome::begun(ClientAddr(m.source), OrigDst(m.destination))
        };
        let checked = TcpStream::from_std(app)
            .map_err(|e| format!("its client's socket cannot be used: {e}"))
            .and_then(|app| {
                match self.check_moved(&mut outcome, key, source, &peer_certificates) {
                    Ok(()) => Ok(app),
                    Err(e) => {
                        // The client sees an abort, not a clean end it could take for the
                        // whole answer.
                        crate::sockets::reset_on_close(&app);
                        Err(e)
                    }
                }
            });
        let app = match checked {
            Ok(app) => app,
            Err(e) => {
                tunnel.abort();
                outcome.error = Some(format!("a moved tunnel was closed: {e}"));
                outcome.duration = started.elapsed();
                warn!(src = %m.source, dst = %m.destination, error = %e, "outbound: a moved tunnel was refused");
                return Some(outcome);
            }
        };
        let open = self.metrics.open(&outcome);
        let mut client = open.count(app, Flow::Received);
        info!(src = %m.source, dst = %m.destination, "outbound: a moved tunnel goes on here");
        let copied =
            hbone::handoff::copy_tunnel_movable(&mut tunnel, &mut client, memo, Some(copy)).await;
        match copied {
            Ok(Copied::Moved(_)) => {
                open.moved();
                return None;
            }
            Ok(Copied::Done(t)) => outcome.bytes = (m.first + t.b_to_a, t.a_to_b),
            Err(e) => {
                outcome.bytes = (m.first + e.transferred.b_to_a, e.transferred.a_to_b);
                outcome.error = Some(e.to_string());
                crate::sockets::reset_on_close(client.get_ref());
            }
        }
        drop(open);
        outcome.duration = started.elapsed();
        self.metrics.finished(&outcome);
        Some(outcome)
    }

    /// Goes on with a passthrough connection of workload `source` moved from another process,
    /// until it ends (or moves again); then returns its outcome, with the bytes and duration of
    /// its whole life. Refused (both sockets reset, the refusal logged and returned) when its
    /// memo does not read or the workload is no longer served here.
    pub async fn resume_passthrough(
        &self,
        moved: MovedPlain,
        source: &LocalWorkload,
    ) -> Option<OutboundOutcome> {
        let MovedPlain { a, b, copy, memo } = moved;
        let (client, mut upstream) = crate::moving::plain_sockets(a, b, "outbound passthrough")?;
        let m = match read_memo(&memo) {
            Ok(m) => m,
            Err(e) => {
                warn!(error = %e, "outbound: a moved passthrough connection was refused");
                crate::moving::reset_both(&client, &upstream);
                return None;
            }
        };
        let started = crate::moving::started_here(m.started);
        let mut outcome = OutboundOutcome {
            bytes: (copy.transferred.a_to_b, copy.transferred.b_to_a),
            ..OutboundOutcome::begun(ClientAddr(m.source), OrigDst(m.destination))
        };
        {
            let state = self.state.snapshot();
            let Some(workload) = state.local(source).cloned() else {
                crate::moving::reset_both(&client, &upstream);
                let e = format!("unknown source workload {source}");
                warn!(src = %m.source, dst = %m.destination, error = %e, "outbound: a moved passthrough connection was refused");
                outcome.error = Some(format!("a moved connection was closed: {e}"));
                outcome.duration = started.elapsed();
                return Some(outcome);
            };
            outcome.destination_workload = state
                .workload_at(&workload.network, m.destination.ip())
                .cloned();
            outcome.service = state
                .service_at(&workload.network, m.destination.ip())
                .cloned();
            outcome.source_workload = Some(workload);
        }
        let open = self.metrics.open(&outcome);
        let mut client_counted = open.count(client, Flow::Received);
        info!(src = %m.source, dst = %m.destination, "outbound: a moved passthrough connection goes on here");
        let tracked = self.plain.track();
        let copied = hbone::handoff::copy_movable(
            &mut client_counted,
            &mut upstream,
            &tracked.mover,
            memo,
            Some(copy),
        )
        .await;
        drop(tracked);
        match copied {
            Ok(Copied::Moved(_)) => {
                open.moved();
                return None;
            }
            Ok(Copied::Done(t)) => outcome.bytes = (t.a_to_b, t.b_to_a),
            Err(e) => {
                outcome.bytes = (e.transferred.a_to_b, e.transferred.b_to_a);
                outcome.error = Some(e.to_string());
                crate::moving::reset_both(client_counted.get_ref(), &upstream);
            }
        }
        drop(open);
        outcome.duration = started.elapsed();
        self.metrics.finished(&outcome);
        Some(outcome)
    }

    /// What this process can check of a moved tunnel, filling in `outcome`'s ends: the source
    /// workload is served here with the key's identity, and the server proved one the key
    /// expects.
    fn check_moved(
        &self,
        outcome: &mut OutboundOutcome,
        key: &PoolKey,
        source: &LocalWorkload,
        peer_certificates: &[rustls::pki_types::CertificateDer<'static>],
    ) -> Result<(), String> {
        let state = self.state.snapshot();
        let Some(workload) = state.local(source).cloned() else {
            return Err(format!("unknown source workload {source}"));
        };
        outcome.source_workload = Some(workload.clone());
        if workload.identity != key.source {
            return Err(format!(
                "the connection presents {}, and the workload is {}",
                key.source, workload.identity
            ));
        }
        if let Some(target) = outcome.hbone_target {
            outcome.destination_workload =
                state.workload_at(&workload.network, target.ip()).cloned();
        }
        outcome.service = state
            .service_at(&workload.network, outcome.destination.0.ip())
            .cloned();
        let server = identity::tls::peer_spiffe_id(peer_certificates)
            .map_err(|e| format!("the server's certificate: {e}"))?;
        if !key.expected.contains(&server) {
            return Err(format!(
                "the server presented {server}, which the connection does not expect"
            ));
        }
        if key.expected.len() == 1 {
            outcome.destination_identity = Some(server);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_memo_reads_back_and_a_bad_one_is_refused_naming_its_field() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let memo = OutboundTunnel {
            source: "10.0.0.1:40000".into(),
            destination: "10.96.0.10:80".into(),
            started_unix_ms: 999_998_000,
            first_bytes: 17,
        }
        .encode_to_vec();
        let m = read_memo(&memo).unwrap();
        assert_eq!(m.source.to_string(), "10.0.0.1:40000");
        assert_eq!(m.destination.to_string(), "10.96.0.10:80");
        assert_eq!(m.started, now - Duration::from_secs(2));
        assert_eq!(m.first, 17);

        let bad = |source: &str, destination: &str| {
            let memo = OutboundTunnel {
                source: source.into(),
                destination: destination.into(),
                ..OutboundTunnel::default()
            }
            .encode_to_vec();
            read_memo(&memo).unwrap_err()
        };
        assert!(bad("nope", "10.0.0.2:80").contains("source"));
        assert!(bad("10.0.0.1:1", "web.default:80").contains("destination"));
        assert!(read_memo(&[0xff; 4]).is_err());
        assert!(
            read_memo(&[0; MAX_MEMO + 1])
                .unwrap_err()
                .contains("more than")
        );
    }
}
