//! Moved connections over a [`Channel`]: each one a message carrying its sockets, in the
//! message's order (an HBONE connection's own socket then its tunnels' application sockets; a
//! plain connection's client socket then the other). A message holds at most [`MAX_FDS`]
//! descriptors; a connection with more tunnels sends the rest in messages of no bytes that
//! follow it, as many as it takes. Version 1 sends bare `Connection` messages (inbound HBONE
//! connections only); version 2 wraps each item in a `Moved` message.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use hbone::handoff::{MovedConnection, MovedPlain, MovedTunnel};

use super::channel::{Channel, MAX_FDS};
use super::wire::{
    Carried, CarriedItem, CarriedPlain, CarriedTunnel, PlainKind, decode_connection, decode_moved,
    encode_connection, encode_moved,
};
use crate::outbound::PoolKey;

/// A connection that moves from one proxy process to the next.
#[derive(Debug)]
// Items live for one handoff, once each; boxing the larger would buy nothing.
#[allow(clippy::large_enum_variant)]
pub enum Handed {
    /// An HBONE connection with its tunnels.
    Connection {
        /// The pod it belongs to (its node agent's uid).
        pod: String,
        /// For a connection the pod's outbound path dialed: its pool key. `None`: the pod's
        /// inbound listener accepted it.
        outbound: Option<PoolKey>,
        /// The connection.
        connection: MovedConnection,
    },
    /// A plain connection's copy (a passthrough, or inbound plaintext).
    Plain {
        /// The pod it belongs to.
        pod: String,
        /// What it is.
        kind: PlainKind,
        /// The copy, with its two sockets.
        copy: MovedPlain,
    },
}

/// Sends `item` to the successor on `channel` in the format `version` agreed. The descriptors
/// are duplicates: this process closes its own afterwards. Version 1 carries inbound HBONE
/// connections only: anything else is an error (and nothing is sent).
pub fn send_moved(channel: &Channel, version: u32, item: &Handed) -> io::Result<()> {
    let mut fds: Vec<BorrowedFd<'_>> = Vec::new();
    let carried = match item {
        Handed::Connection {
            pod,
            outbound,
            connection,
        } => {
            fds.push(connection.socket.as_fd());
            fds.extend(connection.tunnels.iter().map(|t| t.app.as_fd()));
            CarriedItem::Connection(Carried {
                pod: pod.clone(),
                outbound: outbound.clone(),
                state: connection.state.clone(),
                tunnels: connection
                    .tunnels
                    .iter()
                    .map(|t| CarriedTunnel {
                        stream_id: t.stream_id,
                        copy: t.copy.clone(),
                        memo: t.memo.clone(),
                    })
                    .collect(),
            })
        }
        Handed::Plain { pod, kind, copy } => {
            fds.push(copy.a.as_fd());
            fds.push(copy.b.as_fd());
            CarriedItem::Plain(CarriedPlain {
                pod: pod.clone(),
                kind: *kind,
                copy: copy.copy.clone(),
                memo: copy.memo.clone(),
            })
        }
    };
    let bytes = match (version, &carried) {
        (1, CarriedItem::Connection(c)) if c.outbound.is_none() => encode_connection(c),
        (1, _) => {
            return Err(io::Error::other(
                "handoff version 1 carries inbound HBONE connections only",
            ));
        }
        _ => encode_moved(&carried),
    };
    let mut batches = fds.chunks(MAX_FDS);
    channel.send(&bytes, batches.next().unwrap_or_default())?;
    for more in batches {
        channel.send(&[], more)?;
    }
    Ok(())
}

/// Receives the next moved connection in the format `version` agreed; `None` when the old
/// proxy has sent them all (it closed the channel). A message that does not decode, or
/// descriptors that do not match it, are errors that end the handoff (the descriptors received
/// are closed).
pub fn recv_moved(channel: &Channel, version: u32) -> io::Result<Option<Handed>> {
    let Some((msg, mut fds)) = channel.recv()? else {
        return Ok(None);
    };
    let carried = if version == 1 {
        decode_connection(&msg).map(CarriedItem::Connection)
    } else {
        decode_moved(&msg)
    }
    .map_err(io::Error::other)?;
    let (wanted, what) = match &carried {
        CarriedItem::Connection(c) => (
            1 + c.tunnels.len(),
            format!("a connection of {} tunnels", c.tunnels.len()),
        ),
        CarriedItem::Plain(_) => (2, "a plain connection".to_owned()),
    };
    while fds.len() < wanted {
        match channel.recv()? {
            Some((more, extra)) if more.is_empty() && !extra.is_empty() => fds.extend(extra),
            Some(_) => {
                return Err(io::Error::other(format!(
                    "handoff: {what} came with {} descriptors, then another message",
                    fds.len()
                )));
            }
            None => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "handoff: the channel ended after {} of {what}'s {wanted} descriptors",
                        fds.len()
                    ),
                ));
            }
        }
    }
    if fds.len() != wanted {
        return Err(io::Error::other(format!(
            "handoff: {what} came with {} descriptors",
            fds.len()
        )));
    }
    let mut fds = fds.into_iter();
    let mut next = || {
        fds.next()
            .ok_or_else(|| io::Error::other(format!("handoff: {what} without its sockets")))
    };
    Ok(Some(match carried {
        CarriedItem::Connection(c) => {
            let socket = std::net::TcpStream::from(next()?);
            let mut tunnels = Vec::with_capacity(c.tunnels.len());
            for t in c.tunnels {
                let app: OwnedFd = next()?;
                tunnels.push(MovedTunnel {
                    stream_id: t.stream_id,
                    app,
                    copy: t.copy,
                    memo: t.memo,
                });
            }
            Handed::Connection {
                pod: c.pod,
                outbound: c.outbound,
                connection: MovedConnection {
                    socket,
                    state: c.state,
                    tunnels,
                },
            }
        }
        CarriedItem::Plain(p) => Handed::Plain {
            pod: p.pod,
            kind: p.kind,
            copy: MovedPlain {
                a: next()?,
                b: next()?,
                copy: p.copy,
                memo: p.memo,
            },
        },
    }))
}
