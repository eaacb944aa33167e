//! An inbound tunnel that moved here from another proxy process (an upgrade): what the old
//! process attached to its copy (the memo: the client, the authority, when it began), and how
//! this process goes on with it.
//!
//! The tunnel is admitted again before a byte more flows: the policy in force here, the client's
//! identity from the certificate its connection presented, the destination from the authority.
//! A tunnel no longer allowed is reset, as a policy change would have closed it.

use hbone::handoff::AdoptedTunnel;
use tracing::info;

use super::Inbound;
use crate::inbound::memo::read_memo;
use crate::inbound::{Ended, InboundOutcome, copy_until_closed};
use crate::sockets::Connector;
use crate::telemetry::metrics::Flow;

impl<C: Connector> Inbound<C> {
    /// Goes on with a tunnel adopted from another process (`hbone::Server::adopt`) until it
    /// ends (or moves again), then records it as any other: the access log line, with the bytes
    /// and duration of its whole life. Refused (the tunnel and the app's connection reset, the
    /// refusal logged) when its memo does not read, or when the policy here no longer allows it.
    pub async fn resume(&self, adopted: AdoptedTunnel) {
        let Some((m, adopted)) = crate::moving::memo_or_refuse(adopted, read_memo, "inbound")
        else {
            return;
        };
        let AdoptedTunnel {
            mut tunnel,
            app,
            copy,
            memo,
            peer_addr: _,
            peer_certificates,
        } = adopted;
        // Its age, on this process's monotonic clock.
        let started = crate::moving::started_here(m.started);
        let mut outcome = InboundOutcome::new(m.source, m.authority, true);
        outcome.status = 200;
        outcome.bytes = (copy.transferred.a_to_b, copy.transferred.b_to_a);
        // A refused tunnel is reset, and so is the app's connection: a clean end could pass
        // for the end of the client's request.
        let refused = |mut outcome: InboundOutcome,
                       error: String,
                       tunnel: hbone::Tunnel,
                       app: Option<&tokio::net::TcpStream>| {
            tunnel.abort();
            if let Some(app) = app {
                crate::sockets::reset_on_close(app);
            }
            outcome.error = Some(format!("a moved tunnel was closed: {error}"));
            outcome.duration = started.elapsed();
            outcome
        };
        let app = match tokio::net::TcpStream::from_std(app) {
            Ok(app) => app,
            Err(e) => {
                let error = format!("its app socket cannot be used: {e}");
                return self.finish(refused(outcome, error, tunnel, None));
            }
        };
        let state = match self.serving.begin(&mut outcome) {
            Ok(state) => state,
            Err(refusal) => {
                let outcome = refused(outcome, refusal.to_string(), tunnel, Some(&app));
                return self.finish(outcome);
            }
        };
        let peer = match identity::tls::peer_spiffe_id(&peer_certificates) {
            Ok(id) => id,
            Err(e) => return self.finish(refused(outcome, e.to_string(), tunnel, Some(&app))),
        };
        outcome.source_identity = Some(peer.as_str().to_owned());
        let admitted =
            self.serving
                .admit_and_register(&state, &mut outcome, m.destination, Some(&peer));
        drop(state);
        let registered = match admitted {
            Ok(registered) => registered,
            Err(refusal) => {
                let outcome = refused(outcome, refusal.to_string(), tunnel, Some(&app));
                return self.finish(outcome);
            }
        };
        let open = self.serving.metrics.open(&outcome);
        let mut app = open.count(app, Flow::Sent);
        info!(src = %m.source, dst = %m.destination, "inbound: a moved tunnel goes on here");
        let ended = {
            let copy = std::pin::pin!(hbone::handoff::copy_tunnel_movable(
                &mut tunnel,
                &mut app,
                memo,
                Some(copy)
            ));
            copy_until_closed(copy, &registered, &mut outcome).await
        };
        match ended {
            Ended::Moved => return open.moved(),
            Ended::Aborted => crate::sockets::reset_on_close(app.get_ref()),
            Ended::Closed => {}
        }
        drop(open);
        outcome.duration = started.elapsed();
        self.finish(outcome);
    }
}
