//! Moved connections over a [`Channel`]: each one a `Connection` message carrying its socket
//! and its tunnels' application sockets, in the message's order. A message holds at most
//! [`MAX_FDS`] descriptors; a connection with more tunnels sends the rest in messages of no
//! bytes that follow it, as many as it takes.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use hbone::handoff::{MovedConnection, MovedTunnel};

use super::channel::{Channel, MAX_FDS};
use super::wire::{Carried, CarriedTunnel, decode_connection, encode_connection};
use crate::outbound::PoolKey;

/// A moved connection as received, with where it goes.
#[derive(Debug)]
pub struct Received {
    /// The pod it belongs to (its node agent's uid).
    pub pod: String,
    /// For a connection the pod's outbound path dialed: its pool key. `None`: the pod's inbound
    /// listener accepted it.
    pub outbound: Option<PoolKey>,
    /// The connection.
    pub connection: MovedConnection,
}

/// Sends `moved`, accepted by pod `pod`'s inbound listener (`outbound` None) or dialed by its
/// outbound path (`outbound`: its pool key), to the successor on `channel`. The descriptors are
/// duplicates: this process closes its own afterwards.
pub fn send_connection(
    channel: &Channel,
    pod: &str,
    outbound: Option<&PoolKey>,
    moved: &MovedConnection,
) -> io::Result<()> {
    let carried = Carried {
        pod: pod.to_owned(),
        outbound: outbound.cloned(),
        state: moved.state.clone(),
        tunnels: moved
            .tunnels
            .iter()
            .map(|t| CarriedTunnel {
                stream_id: t.stream_id,
                copy: t.copy.clone(),
                memo: t.memo.clone(),
            })
            .collect(),
    };
    let mut fds: Vec<BorrowedFd<'_>> = Vec::with_capacity(1 + moved.tunnels.len());
    fds.push(moved.socket.as_fd());
    fds.extend(moved.tunnels.iter().map(|t| t.app.as_fd()));
    let mut batches = fds.chunks(MAX_FDS);
    channel.send(
        &encode_connection(&carried),
        batches.next().unwrap_or_default(),
    )?;
    for more in batches {
        channel.send(&[], more)?;
    }
    Ok(())
}

/// Receives the next moved connection and where it goes; `None` when the old proxy has sent
/// them all (it closed the channel). A message that does not decode, or descriptors that
/// do not match its tunnels, are errors that end the handoff (the descriptors received are
/// closed).
pub fn recv_connection(channel: &Channel) -> io::Result<Option<Received>> {
    let Some((msg, mut fds)) = channel.recv()? else {
        return Ok(None);
    };
    let carried = decode_connection(&msg).map_err(io::Error::other)?;
    let wanted = 1 + carried.tunnels.len();
    while fds.len() < wanted {
        match channel.recv()? {
            Some((more, extra)) if more.is_empty() && !extra.is_empty() => fds.extend(extra),
            Some(_) => {
                return Err(io::Error::other(format!(
                    "handoff: a connection of {} tunnels came with {} descriptors, then another message",
                    carried.tunnels.len(),
                    fds.len()
                )));
            }
            None => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "handoff: the channel ended after {} of a connection's {wanted} descriptors",
                        fds.len()
                    ),
                ));
            }
        }
    }
    if fds.len() != wanted {
        return Err(io::Error::other(format!(
            "handoff: a connection of {} tunnels came with {} descriptors",
            carried.tunnels.len(),
            fds.len()
        )));
    }
    let mut fds = fds.into_iter();
    let Some(socket) = fds.next() else {
        return Err(io::Error::other("handoff: a connection without its socket"));
    };
    let socket = std::net::TcpStream::from(socket);
    let tunnels = carried
        .tunnels
        .into_iter()
        .zip(fds)
        .map(|(t, app): (CarriedTunnel, OwnedFd)| MovedTunnel {
            stream_id: t.stream_id,
            app,
            copy: t.copy,
            memo: t.memo,
        })
        .collect();
    Ok(Some(Received {
        pod: carried.pod,
        outbound: carried.outbound,
        connection: MovedConnection {
            socket,
            state: carried.state,
            tunnels,
        },
    }))
}
