//! Unix stream sockets that carry descriptors (SCM_RIGHTS) between two processes of the same
//! user: a proxy hands its live connections to its successor this way (`proxy::handoff`). The
//! system calls are those the ZDS handoff uses (`sys`); this is their safe face.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;

use crate::sys;

/// The most descriptors one message may carry (Linux's `SCM_MAX_FD`).
pub const MAX_FDS: usize = sys::MAX_FDS;

/// A listening socket at `path`, mode 0600 whatever the umask, replacing a stale one (it is
/// bound under a temporary name and renamed into place once private).
pub fn private_listener(path: &Path) -> io::Result<UnixListener> {
    sys::stream_listener(path)
}

/// Connects to the listening socket at `path`.
pub fn connect(path: &Path) -> io::Result<UnixStream> {
    sys::stream_connect(path)
}

/// The user id of the process at the other end of `conn`, as it was when it connected
/// (`SO_PEERCRED`: the kernel's word, not the peer's).
pub fn peer_uid(conn: &impl AsFd) -> io::Result<u32> {
    sys::peer_credentials(conn).map(|(_, uid)| uid)
}

/// Sends what the socket takes of `bytes` now (at least one byte), with `fds` attached to the
/// first of them; returns how many bytes went.
pub fn send_some(conn: &impl AsFd, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<usize> {
    if fds.len() > MAX_FDS {
        return Err(io::Error::other(format!(
            "{} descriptors in one message, more than {MAX_FDS}",
            fds.len()
        )));
    }
    sys::send_some(conn, bytes, fds)
}

/// Receives what the socket has (up to `buf`'s length) and the descriptors that came with it;
/// `0` bytes: the peer closed.
pub fn recv_some(conn: &impl AsFd, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
    sys::recv_some(conn, buf)
}
