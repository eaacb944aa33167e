//! The few system calls the netns handoff needs that std does not offer: SOCK_SEQPACKET Unix
//! sockets and file-descriptor passing (SCM_RIGHTS). The only `unsafe` of the crate lives here.
#![allow(unsafe_code)]

use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;

use nix::sys::socket::{
    AddressFamily, Backlog, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType,
    UnixAddr, accept, bind, connect, listen, recvmsg, sendmsg, socket,
};

fn io(e: nix::Error) -> io::Error {
    io::Error::from_raw_os_error(e as i32)
}

fn unix_socket(kind: SockType) -> io::Result<OwnedFd> {
    socket(AddressFamily::Unix, kind, SockFlag::SOCK_CLOEXEC, None).map_err(io)
}

/// A listening SOCK_SEQPACKET socket at `path` (see [`private_listener`]).
pub(crate) fn seqpacket_listener(path: &Path) -> io::Result<OwnedFd> {
    private_listener(path, SockType::SeqPacket)
}

/// A listening SOCK_STREAM socket at `path` (see [`private_listener`]).
pub(crate) fn stream_listener(path: &Path) -> io::Result<std::os::unix::net::UnixListener> {
    private_listener(path, SockType::Stream).map(Into::into)
}

/// A listening Unix socket of `kind` at `path` (a stale socket file there is replaced), its
/// file mode 0600 whatever the umask: it is bound under a temporary name, made 0600, and only
/// then renamed to `path`, so no one can connect while it is more open.
fn private_listener(path: &Path, kind: SockType) -> io::Result<OwnedFd> {
    use std::os::unix::fs::PermissionsExt;
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::other(format!("{}: not a file path", path.display())))?;
    let temporary = path.with_file_name(format!(
        ".{}.{}.binding",
        name.to_string_lossy(),
        std::process::id()
    ));
    let _ = std::fs::remove_file(&temporary);
    let fd = unix_socket(kind)?;
    bind(fd.as_raw_fd(), &UnixAddr::new(&temporary).map_err(io)?).map_err(io)?;
    let placed = std::fs::set_permissions(&temporary, std::fs::Permissions::from_mode(0o600))
        .and_then(|()| {
            listen(&fd, Backlog::new(16).map_err(io)?).map_err(io)?;
            std::fs::rename(&temporary, path)
        });
    if let Err(e) = placed {
        let _ = std::fs::remove_file(&temporary);
        return Err(e);
    }
    Ok(fd)
}

/// The process id and user id of the peer of a connected Unix socket, as they were when it
/// connected (`SO_PEERCRED`).
pub(crate) fn peer_credentials(conn: &impl AsFd) -> io::Result<(i32, u32)> {
    let creds = nix::sys::socket::getsockopt(conn, nix::sys::socket::sockopt::PeerCredentials)
        .map_err(io)?;
    Ok((creds.pid(), creds.uid()))
}

/// Accepts one connection.
pub(crate) fn accept_conn(listener: &OwnedFd) -> io::Result<OwnedFd> {
    let raw = accept(listener.as_raw_fd()).map_err(io)?;
    // SAFETY: accept(2) returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// Connects to a SOCK_SEQPACKET socket at `path`.
pub(crate) fn seqpacket_connect(path: &Path) -> io::Result<OwnedFd> {
    let fd = unix_socket(SockType::SeqPacket)?;
    connect(fd.as_raw_fd(), &UnixAddr::new(path).map_err(io)?).map_err(io)?;
    Ok(fd)
}

/// Sends one datagram, with `fds` attached (SCM_RIGHTS) when not empty.
pub(crate) fn send(sock: &OwnedFd, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    send_with_fds(sock, bytes, fds, MsgFlags::empty()).map(drop)
}

/// Receives one datagram into `buf`, with any descriptors that came with it. Zero bytes and no
/// descriptors means the peer closed.
pub(crate) fn recv(sock: &OwnedFd, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
    let mut space = nix::cmsg_space!([RawFd; 4]);
    recv_with_fds(sock, buf, &mut space).map(|(n, fds, _)| (n, fds))
}

/// The most descriptors one message may carry (Linux's `SCM_MAX_FD`).
pub(crate) const MAX_FDS: usize = 253;

/// Sends what a stream socket takes of `bytes` now (at least one byte, blocking until then),
/// with `fds` attached (SCM_RIGHTS) when not empty; returns how many bytes went.
pub(crate) fn send_some(
    sock: &impl AsFd,
    bytes: &[u8],
    fds: &[BorrowedFd<'_>],
) -> io::Result<usize> {
    send_with_fds(sock, bytes, fds, MsgFlags::MSG_NOSIGNAL)
}

/// Receives what a stream socket has (up to `buf`'s length, blocking until something), with
/// the descriptors that came with it (up to [`MAX_FDS`]; more is an error: the kernel dropped
/// them). Zero bytes: the peer closed.
pub(crate) fn recv_some(sock: &impl AsFd, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
    let mut space = nix::cmsg_space!([RawFd; MAX_FDS]);
    let (n, fds, truncated) = recv_with_fds(sock, buf, &mut space)?;
    if truncated {
        return Err(io::Error::other(format!(
            "more than {MAX_FDS} descriptors came with one message (the rest were dropped)"
        )));
    }
    Ok((n, fds))
}

/// `sendmsg` of `bytes` with `fds` attached (SCM_RIGHTS) when not empty; how many bytes went.
fn send_with_fds(
    sock: &impl AsFd,
    bytes: &[u8],
    fds: &[BorrowedFd<'_>],
    flags: MsgFlags,
) -> io::Result<usize> {
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let cmsgs = if raw.is_empty() {
        vec![]
    } else {
        vec![ControlMessage::ScmRights(&raw)]
    };
    sendmsg::<()>(
        sock.as_fd().as_raw_fd(),
        &[IoSlice::new(bytes)],
        &cmsgs,
        flags,
        None,
    )
    .map_err(io)
}

/// `recvmsg` into `buf` with `space` for control messages: the bytes, the descriptors that came
/// with them, and whether some did not fit in `space` (the kernel closed those).
fn recv_with_fds(
    sock: &impl AsFd,
    buf: &mut [u8],
    space: &mut [u8],
) -> io::Result<(usize, Vec<OwnedFd>, bool)> {
    let mut iov = [IoSliceMut::new(buf)];
    let msg = recvmsg::<()>(
        sock.as_fd().as_raw_fd(),
        &mut iov,
        Some(space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(io)?;
    let mut fds = Vec::new();
    for cmsg in msg.cmsgs().map_err(io)? {
        if let ControlMessageOwned::ScmRights(received) = cmsg {
            for raw in received {
                // SAFETY: the kernel installed these descriptors in our table for this message;
                // nothing else owns them.
                fds.push(unsafe { OwnedFd::from_raw_fd(raw) });
            }
        }
    }
    Ok((msg.bytes, fds, msg.flags.contains(MsgFlags::MSG_CTRUNC)))
}

/// Connects to a SOCK_STREAM socket at `path`.
pub(crate) fn stream_connect(path: &Path) -> io::Result<std::os::unix::net::UnixStream> {
    std::os::unix::net::UnixStream::connect(path)
}

/// Makes receives on `sock` fail with `WouldBlock` after `timeout` without data (`SO_RCVTIMEO`).
pub(crate) fn set_recv_timeout(sock: &OwnedFd, timeout: std::time::Duration) -> io::Result<()> {
    let tv = nix::sys::time::TimeVal::new(
        timeout.as_secs() as nix::libc::time_t,
        timeout.subsec_micros() as nix::libc::suseconds_t,
    );
    nix::sys::socket::setsockopt(sock, nix::sys::socket::sockopt::ReceiveTimeout, &tv).map_err(io)
}

/// Whether the peer of an idle connection has gone (closed its end) or sent something unasked,
/// checked without waiting. Either way the connection is over.
pub(crate) fn idle_peer_gone(sock: &OwnedFd) -> bool {
    let mut byte = [0u8; 1];
    !matches!(
        nix::sys::socket::recv(
            sock.as_raw_fd(),
            &mut byte,
            MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT,
        ),
        Err(nix::Error::EAGAIN | nix::Error::EINTR)
    )
}
