//! Shared mode's part of an upgrade that drops nothing: the old proxy hands every pod's live
//! connections to its successor over the handoff channel ([`SharedProxy::hand_off`]): the HBONE
//! ones, tunnels and all, that the pod's inbound listener accepted and that its outbound path
//! dialed (with their pool keys), and the plain ones (passthrough, inbound plaintext) with both
//! their sockets; the successor takes each into the pod it belongs to
//! ([`SharedProxy::take_over`]), which must already be served there (the successor connects
//! only once it serves every pod the node agent handed it).
//!
//! The old proxy speaks first: the format versions it can send. A successor that takes none
//! of them says so, and the old proxy drains as it would without one; one that takes version 1
//! only gets the inbound connections (the outbound ones drain). A connection that cannot move
//! now (a handshake, a request being decided) stays with the old proxy and drains there.

use std::io;
use std::time::Duration;

use prost::Message;
use tracing::{info, warn};

use super::SharedProxy;
use crate::assembly::PodHandedOff;
use crate::certs::Certificates;
use crate::handoff::{
    Channel, Handed, Offer, PlainKind, VERSIONS, answer, decode_answer, decode_offer, recv_moved,
    send_moved,
};

/// What an old proxy handed over.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct HandedOff {
    /// Connections sent to the successor.
    pub connections: usize,
    /// Of them, the outbound ones (dialed by a pod's outbound path).
    pub outbound: usize,
    /// Their tunnels.
    pub tunnels: usize,
    /// Plain connections (passthrough, inbound plaintext) sent.
    pub plain: usize,
    /// Connections that stayed here (the peer and why), to drain.
    pub stayed: Vec<String>,
}

/// What a new proxy took over.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct TookOver {
    /// HBONE connections served here now.
    pub connections: usize,
    /// Their tunnels.
    pub tunnels: usize,
    /// Plain connections (passthrough, inbound plaintext) served here now.
    pub plain: usize,
    /// Connections refused (closed), and why: a pod not served here, a state that did not check
    /// out.
    pub refused: Vec<String>,
}

fn ended() -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        "handoff: the other proxy closed the channel",
    )
}

impl<C: Certificates> SharedProxy<C> {
    /// Hands every pod's live connections (HBONE inbound and outbound, passthrough, inbound
    /// plaintext) to the successor on `channel`, waiting at most `patience` for each to settle. An error before anything moved
    /// (the successor refused the version, the channel broke) leaves every connection here.
    pub async fn hand_off(&self, channel: Channel, patience: Duration) -> io::Result<HandedOff> {
        let channel = tokio::task::spawn_blocking(move || {
            let offer = Offer {
                versions: VERSIONS.to_vec(),
                sender: concat!("ztunnel ", env!("CARGO_PKG_VERSION")).to_owned(),
            };
            channel.send(&offer.encode_to_vec(), &[])?;
            let (reply, _) = channel.recv()?.ok_or_else(ended)?;
            let version = decode_answer(&reply).map_err(io::Error::other)?;
            Ok::<_, io::Error>((channel, version))
        })
        .await
        .map_err(io::Error::other)??;
        let (channel, version) = channel;
        // Version 1 knows inbound HBONE connections only.
        let everything = version >= 2;
        // The successor serves every pod: new connections are its own from now on. Closing the
        // listeners first lets the handshakes under way here finish and move too.
        let handing: Vec<_> = self
            .lock()
            .iter()
            .map(|(uid, pod)| {
                pod.stop.cancel();
                (uid.clone(), (pod.handoff.hand_off)(patience, everything))
            })
            .collect();
        // Each pod's connections go to the successor as soon as they are taken apart: a
        // connection between two pods of this node has both its ends here, and the client's end
        // waits for answers from the server's, which come only once the successor runs it.
        let (tx, rx) = std::sync::mpsc::channel::<Handed>();
        let sender = tokio::task::spawn_blocking(move || {
            for item in rx {
                send_moved(&channel, version, &item)?;
                // The duplicates here close with `item`; the successor holds the sockets.
            }
            Ok::<_, io::Error>(())
        });
        let mut done = HandedOff::default();
        for (uid, handing) in handing {
            let PodHandedOff {
                inbound,
                outbound,
                plain,
                plain_stayed,
            } = handing.await;
            let stayed =
                |(peer, why), way| format!("pod {uid}: the connection {way} {peer}: {why}");
            done.stayed
                .extend(inbound.stayed.into_iter().map(|s| stayed(s, "from")));
            done.stayed
                .extend(outbound.pool.stayed.into_iter().map(|s| stayed(s, "to")));
            done.stayed.extend(
                plain_stayed
                    .into_iter()
                    .map(|why| format!("pod {uid}: a plain connection: {why}")),
            );
            let pod = || uid.clone();
            let mut moved = Vec::new();
            moved.extend(
                inbound
                    .moved
                    .into_iter()
                    .map(|connection| Handed::Connection {
                        pod: pod(),
                        outbound: None,
                        connection,
                    }),
            );
            done.outbound += outbound.pool.moved.len();
            moved.extend(outbound.pool.moved.into_iter().map(|m| Handed::Connection {
                pod: pod(),
                outbound: Some(m.key),
                connection: m.connection,
            }));
            done.plain += outbound.plain.len() + plain.len();
            moved.extend(outbound.plain.into_iter().map(|copy| Handed::Plain {
                pod: pod(),
                kind: PlainKind::Passthrough,
                copy,
            }));
            moved.extend(plain.into_iter().map(|copy| Handed::Plain {
                pod: pod(),
                kind: PlainKind::InboundPlaintext,
                copy,
            }));
            for item in moved {
                if let Handed::Connection { connection, .. } = &item {
                    done.connections += 1;
                    done.tunnels += connection.tunnels.len();
                }
                // A sender that stopped says why below.
                let _ = tx.send(item);
            }
        }
        drop(tx);
        sender.await.map_err(io::Error::other)??;
        info!(
            connections = done.connections,
            outbound = done.outbound,
            tunnels = done.tunnels,
            plain = done.plain,
            stayed = done.stayed.len(),
            version,
            "handoff: live connections handed to the new proxy"
        );
        Ok(done)
    }

    /// Takes over what the old proxy on `channel` hands: each connection into the pod whose
    /// listener accepted it, its tunnels resumed. Returns when the old proxy has sent
    /// everything; an error says why the handoff ended early (what came before it is served).
    pub async fn take_over(&self, channel: Channel) -> io::Result<TookOver> {
        let (tx, mut rx) = tokio::sync::mpsc::channel(16);
        let reader = tokio::task::spawn_blocking(move || {
            let (offer, _) = channel.recv()?.ok_or_else(ended)?;
            let offer = decode_offer(&offer).map_err(io::Error::other)?;
            let reply = answer(&offer);
            channel.send(&reply.encode_to_vec(), &[])?;
            if reply.version == 0 {
                return Err(io::Error::other(format!(
                    "handoff refused: {}",
                    reply.refusal
                )));
            }
            while let Some(moved) = recv_moved(&channel, reply.version)? {
                if tx.blocking_send(moved).is_err() {
                    break;
                }
            }
            Ok(())
        });
        let mut done = TookOver::default();
        while let Some(handed) = rx.recv().await {
            let (uid, peer, plain) = match &handed {
                Handed::Connection {
                    pod, connection, ..
                } => (pod.clone(), connection.socket.peer_addr().ok(), false),
                Handed::Plain { pod, .. } => (pod.clone(), None, true),
            };
            let pods = self.lock();
            let adopted = match pods.get(&uid) {
                None => Err(format!("pod {uid} is not served here")),
                Some(pod) => (pod.handoff.adopt)(handed),
            };
            drop(pods);
            match adopted {
                Ok(_) if plain => done.plain += 1,
                Ok(tunnels) => {
                    done.connections += 1;
                    done.tunnels += tunnels;
                }
                Err(why) => {
                    warn!(pod = %uid, peer = ?peer, %why, "handoff: a moved connection was refused; it is closed");
                    done.refused.push(why);
                }
            }
        }
        reader.await.map_err(io::Error::other)??;
        info!(
            connections = done.connections,
            tunnels = done.tunnels,
            plain = done.plain,
            refused = done.refused.len(),
            "handoff: live connections taken over from the old proxy"
        );
        Ok(done)
    }
}
