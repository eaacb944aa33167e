//! The local socket between the old and the new proxy: a Unix stream socket, mode 0600, each
//! message a 4-byte big-endian length then its bytes, the descriptors it carries (sockets of
//! the connections it moves) attached to its first bytes. Only a peer of our own user (or root)
//! is spoken to: the kernel says who connected (`SO_PEERCRED`), not the peer. Blocking calls with
//! time limits, for a thread of their own: a handoff is rare, and nothing else waits on it.

use std::io::{self, Read as _};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::wire::MAX_MESSAGE;

/// The most descriptors one message may carry.
pub const MAX_FDS: usize = redirect::fdpass::MAX_FDS;

/// How long a send or a receive may wait for the peer.
const TIMEOUT: Duration = Duration::from_secs(10);

/// Where an old proxy waits for its successor.
#[derive(Debug)]
pub struct Listener {
    inner: UnixListener,
    path: PathBuf,
}

impl Listener {
    /// Listens at `path` (0600; a stale socket there is replaced).
    pub fn bind(path: &Path) -> io::Result<Listener> {
        Ok(Listener {
            inner: redirect::fdpass::private_listener(path).map_err(|e| {
                io::Error::new(e.kind(), format!("handoff socket {}: {e}", path.display()))
            })?,
            path: path.to_owned(),
        })
    }

    /// The next successor; a peer of another user is refused (and logged by the caller).
    pub fn accept(&self) -> io::Result<Channel> {
        let (conn, _) = self.inner.accept()?;
        Channel::checked(conn, &self.path)
    }
}

/// One end of a handoff.
#[derive(Debug)]
pub struct Channel {
    conn: UnixStream,
}

impl Channel {
    /// Connects to the old proxy waiting at `path`.
    pub fn connect(path: &Path) -> io::Result<Channel> {
        let conn = redirect::fdpass::connect(path).map_err(|e| {
            io::Error::new(e.kind(), format!("handoff socket {}: {e}", path.display()))
        })?;
        Channel::checked(conn, path)
    }

    /// `conn`, once its peer is known to be root or of our own user, with time limits set.
    fn checked(conn: UnixStream, path: &Path) -> io::Result<Channel> {
        let uid = redirect::fdpass::peer_uid(&conn)?;
        let ours = nix::unistd::geteuid().as_raw();
        if uid != 0 && uid != ours {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!(
                    "handoff socket {}: the peer runs as uid {uid}, neither root nor ours ({ours})",
                    path.display()
                ),
            ));
        }
        conn.set_read_timeout(Some(TIMEOUT))?;
        conn.set_write_timeout(Some(TIMEOUT))?;
        Ok(Channel { conn })
    }

    /// Sends one message with `fds` (at most [`MAX_FDS`]).
    pub fn send(&self, msg: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
        if msg.len() > MAX_MESSAGE {
            return Err(io::Error::other(format!(
                "a handoff message of {} bytes, more than {MAX_MESSAGE}",
                msg.len()
            )));
        }
        let mut framed = Vec::with_capacity(4 + msg.len());
        framed.extend_from_slice(&(msg.len() as u32).to_be_bytes());
        framed.extend_from_slice(msg);
        let mut sent = redirect::fdpass::send_some(&self.conn, &framed, fds)?;
        while sent < framed.len() {
            sent += redirect::fdpass::send_some(&self.conn, &framed[sent..], &[])?;
        }
        Ok(())
    }

    /// Receives one message and its descriptors; `None` when the peer closed between messages.
    /// A length over [`MAX_MESSAGE`], an end inside a message, or descriptors arriving anywhere
    /// but with a message's first bytes are errors.
    pub fn recv(&self) -> io::Result<Option<(Vec<u8>, Vec<OwnedFd>)>> {
        let mut header = [0u8; 4];
        let mut got = 0;
        let mut fds = Vec::new();
        while got < header.len() {
            let (n, more) = redirect::fdpass::recv_some(&self.conn, &mut header[got..])?;
            if n == 0 {
                if got == 0 && fds.is_empty() && more.is_empty() {
                    return Ok(None);
                }
                return Err(truncated("its length"));
            }
            if got > 0 && !more.is_empty() {
                return Err(io::Error::other(
                    "handoff: descriptors arrived in the middle of a message's length",
                ));
            }
            fds.extend(more);
            got += n;
        }
        let len = u32::from_be_bytes(header) as usize;
        if len > MAX_MESSAGE {
            return Err(io::Error::other(format!(
                "handoff: a message of {len} bytes announced, more than {MAX_MESSAGE}"
            )));
        }
        if fds.len() > MAX_FDS {
            return Err(io::Error::other("handoff: too many descriptors"));
        }
        let mut msg = vec![0u8; len];
        let mut conn = &self.conn;
        conn.read_exact(&mut msg).map_err(|e| match e.kind() {
            io::ErrorKind::UnexpectedEof => truncated("its bytes"),
            _ => e,
        })?;
        Ok(Some((msg, fds)))
    }

    /// The socket, for a caller that waits on it.
    pub fn as_fd(&self) -> BorrowedFd<'_> {
        self.conn.as_fd()
    }
}

fn truncated(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        format!("handoff: the peer closed in the middle of a message ({what})"),
    )
}
