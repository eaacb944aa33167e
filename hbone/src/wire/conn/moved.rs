//! A connection taken apart for another process, and put together there: its byte stream's
//! socket and TLS state, its session, and the received bytes not yet parsed into frames.
//!
//! Taking apart leaves the connection here without a socket: nothing more is read or written
//! (its streams' handles, dropped afterwards, reset nothing on the wire); the session's state
//! was copied before, so the other process answers for everything from then on.

use std::any::Any;

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

/// Why a connection was not taken apart: it goes on here as it was.
#[derive(Debug)]
pub(crate) struct NotMoved(pub(crate) String);

impl std::fmt::Display for NotMoved {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg_attr(
    not(test),
    expect(
        dead_code,
        reason = "the pool's and server's handoff is what will call it"
    )
)]
impl Connection {
    /// Takes the connection apart: the socket it ran on (a `tokio::net::TcpStream` in
    /// production) and its state. Refused, the connection untouched, when its session has not
    /// settled or its byte stream cannot move.
    pub(crate) fn take_apart(&self) -> Result<(Box<dyn Any + Send>, ConnectionState), NotMoved> {
        let mut st = self.lock();
        let session = st.session.state().map_err(NotMoved)?;
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
