//! A connection taken apart for another process, and put together there: its byte stream's
//! socket and TLS state, its session, and the received bytes not yet parsed into frames.
//!
//! Taking apart leaves the connection here without a socket: nothing more is read or written
//! (its streams' handles, dropped afterwards, reset nothing on the wire); the session's state
//! was copied before, so the other process answers for everything from then on.

use std::any::Any;
use std::time::Duration;

use super::*;
use crate::transport::Apart;
use crate::wire::session::SessionState;

/// An HBONE connection between two frames, without its socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionState {
    /// The TLS connection.
    pub tls: crate::tls::TlsState,
    /// The HTTP/2 session.
    pub session: SessionState,
    /// Plaintext received and not yet parsed (the start of a frame).
    pub received: Vec<u8>,
}

/// A connection taken apart, with what its tunnels' copy loops handed over.
pub(crate) struct Moved {
    /// What it ran on.
    pub(crate) socket: Box<dyn Any + Send>,
    /// Its state.
    pub(crate) state: ConnectionState,
    /// Its tunnels, in stream order; a stream without one is to be reset.
    pub(crate) tunnels: Vec<crate::moving::MovedTunnel>,
}

/// How often a move waiting for the session to settle looks again.
const SETTLE_CHECK: Duration = Duration::from_millis(10);

/// Why a connection was not taken apart: it goes on here as it was.
#[derive(Debug)]
pub(crate) struct NotMoved(pub(crate) String);

impl std::fmt::Display for NotMoved {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl Connection {
    /// Takes the connection apart: the socket it ran on (a `tokio::net::TcpStream` in
    /// production) and its state. Refused, the connection untouched, when its session has not
    /// settled or its byte stream cannot move.
    #[cfg(test)]
    pub(crate) fn take_apart(&self) -> Result<(Box<dyn Any + Send>, ConnectionState), NotMoved> {
        self.take_apart_if(|_| Ok(()))
    }

    /// [`Connection::take_apart`], once `ready` agrees, under the same lock, on the streams to
    /// be moved (their ids in order).
    fn take_apart_if(
        &self,
        ready: impl FnOnce(&[u32]) -> Result<(), String>,
    ) -> Result<(Box<dyn Any + Send>, ConnectionState), NotMoved> {
        let mut st = self.lock();
        let session = st.session.state().map_err(NotMoved)?;
        let ids: Vec<u32> = session.streams.iter().map(|s| s.id).collect();
        ready(&ids).map_err(NotMoved)?;
        let Some(io) = st.io.take() else {
            return Err(NotMoved("the connection is closed".into()));
        };
        match io.take_apart() {
            Apart::Refused(io, e) => {
                st.io = Some(io);
                Err(NotMoved(e.to_string()))
            }
            Apart::Moved(socket, tls) => {
                let received = std::mem::take(&mut st.rbuf).to_vec();
                // Nothing of the old session may reach the wire any more: what it would still
                // say (a reset from a dropped handle) goes nowhere, and its tasks see it closed.
                st.session.fail(Failure::Io {
                    kind: io::ErrorKind::NotConnected,
                    detail: "the HBONE connection moved to another process".to_owned(),
                });
                st.session.out.clear();
                st.moved = true;
                st.wake_driver();
                for w in st.write_blocked.drain(..) {
                    w.wake();
                }
                Ok((
                    socket,
                    ConnectionState {
                        tls: *tls,
                        session,
                        received,
                    },
                ))
            }
        }
    }

    /// Moves the connection out with its tunnels: asks each stream's copy loop to pause; once
    /// every stream of the connection has a paused loop and the session has settled, takes the
    /// connection apart and collects what each loop hands over. Refused, every loop resumed
    /// and the connection going on here, when that does not happen within `patience`.
    /// A loop that does not hand over within `patience` after the taking (its task gone) leaves
    /// its stream without a tunnel: the other process resets it.
    pub(crate) async fn hand_off(&self, patience: Duration) -> Result<Moved, NotMoved> {
        let mover = self.lock().mover.clone();
        mover.pause();
        let deadline = tokio::time::Instant::now() + patience;
        let (socket, state) = loop {
            let changed = mover.changed();
            let ready = |ids: &[u32]| {
                mover
                    .all_paused(ids.iter().copied())
                    .map_err(|id| format!("stream {id}'s copy did not pause"))
            };
            match self.take_apart_if(ready) {
                Ok(taken) => break taken,
                Err(e) if tokio::time::Instant::now() >= deadline => {
                    mover.resume();
                    return Err(e);
                }
                // Paused loops say so; the session settles without a word (a frame's end, a
                // stream answered): look again soon either way.
                Err(_) => {
                    let _ = tokio::time::timeout_at(
                        deadline.min(tokio::time::Instant::now() + SETTLE_CHECK),
                        changed,
                    )
                    .await;
                }
            }
        };
        mover.take();
        let deadline = tokio::time::Instant::now() + patience;
        let mut tunnels = Vec::with_capacity(state.session.streams.len());
        for stream in &state.session.streams {
            loop {
                let changed = mover.changed();
                if let Some(tunnel) = mover.taken(stream.id) {
                    tunnels.push(tunnel);
                    break;
                }
                if tokio::time::timeout_at(deadline, changed).await.is_err() {
                    tracing::warn!(
                        stream = stream.id,
                        "HBONE handoff: a tunnel's copy did not hand over; the new process resets its stream"
                    );
                    break;
                }
            }
        }
        Ok(Moved {
            socket,
            state,
            tunnels,
        })
    }

    /// Whether the connection was taken apart for another process.
    pub(crate) fn has_moved(&self) -> bool {
        self.lock().moved
    }

    /// A connection handed over by another process, on `io` (its byte stream put together
    /// again), with the handles of its streams, in id order. `limits` governs what is ours alone;
    /// what the peer was told comes with the state.
    pub(crate) fn put_together(
        session: SessionState,
        received: Vec<u8>,
        limits: Limits,
        io: impl Io,
    ) -> Result<(Connection, Vec<StreamRef>), String> {
        let max_received = session.max_frame_size as usize + HEADER_LEN;
        if received.len() > max_received.max(READ_KEEP) {
            return Err(format!(
                "a moved connection with {} bytes received and not parsed, more than a frame",
                received.len()
            ));
        }
        let ids: Vec<u32> = session.streams.iter().map(|s| s.id).collect();
        let session = Session::from_state(session, limits)?;
        let conn = Connection {
            shared: Arc::new(Mutex::new(State {
                session,
                io: Some(Box::new(io)),
                rbuf: BytesMut::from(&received[..]),
                driver: None,
                write_blocked: Vec::new(),
                mover: Arc::default(),
                moved: false,
            })),
        };
        let streams = ids
            .into_iter()
            .map(|id| StreamRef {
                conn: conn.clone(),
                id,
            })
            .collect();
        Ok((conn, streams))
    }
}
