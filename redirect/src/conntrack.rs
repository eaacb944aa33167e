//! Emptying conntrack's table in a pod's network namespace when the pod enters the mesh.
//!
//! The capture redirects a connection's first packet (a SYN) in the nat table, which sees only
//! connections conntrack has no entry for. An entry made while the pod was outside the mesh (a
//! connection it opened then) carries no redirect, and a later connection from the same port to
//! the same place joins it: the guard behind the capture refuses that SYN (it would otherwise
//! go out in plaintext), so the app sees its connection refused. An entry normally goes soon
//! after its connection ends, but one whose end conntrack missed stays `ESTABLISHED` for five
//! days (RELIABILITY.md, finding 13). So a pod captured anew starts with an empty table.
//! Connections still open from before go on: with mid-connection pickup off
//! (`nf_conntrack_tcp_loose` = 0, set by the capture first) their packets get no new entry and
//! pass as before, untouched by the nat table.
//!
//! One netlink request, ctnetlink's delete without a tuple (which empties the table of the
//! namespace the socket was made in), from a thread that entered the namespace: no tool to
//! install, no `unsafe`.

use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::Duration;

use nix::sched::CloneFlags;
use nix::sys::socket::{
    AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, bind, recv, send,
    socket,
};

/// nfnetlink's subsystem for conntrack (`NFNL_SUBSYS_CTNETLINK`).
const SUBSYS_CTNETLINK: u16 = 1;
/// ctnetlink's delete (`IPCTNL_MSG_CT_DELETE`); without a tuple it deletes every entry.
const MSG_CT_DELETE: u16 = 2;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
/// The kernel's answer: an error code, 0 for success (`NLMSG_ERROR`).
const NLMSG_ERROR: u16 = 2;
/// How long the kernel may take to answer.
const ANSWER_WITHIN: Duration = Duration::from_secs(5);

/// Deletes every conntrack entry of the network namespace at `netns`.
pub(crate) fn flush(netns: &Path) -> io::Result<()> {
    let file = std::fs::File::open(netns)?;
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                // This thread only: the namespace goes with it.
                nix::sched::setns(&file, CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
                flush_here()
            })
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("the conntrack flush panicked")))
    })
}

/// [`flush`] in the calling thread's namespace.
fn flush_here() -> io::Result<()> {
    let sock = socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkNetFilter,
    )?;
    bind(sock.as_raw_fd(), &NetlinkAddr::new(0, 0))?;
    crate::sys::set_recv_timeout(&sock, ANSWER_WITHIN)?;
    send(sock.as_raw_fd(), &request(), MsgFlags::empty())?;
    let mut answer = [0u8; 256];
    let n = recv(sock.as_raw_fd(), &mut answer, MsgFlags::empty())?;
    read_answer(&answer[..n])
}

/// The request: a netlink header, then nfnetlink's (any family, version 0, no resource).
fn request() -> Vec<u8> {
    let mut msg = Vec::with_capacity(20);
    msg.extend_from_slice(&20u32.to_ne_bytes());
    msg.extend_from_slice(&((SUBSYS_CTNETLINK << 8) | MSG_CT_DELETE).to_ne_bytes());
    msg.extend_from_slice(&(NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
    msg.extend_from_slice(&1u32.to_ne_bytes()); // sequence number
    msg.extend_from_slice(&0u32.to_ne_bytes()); // to the kernel
    msg.extend_from_slice(&[0, 0, 0, 0]); // AF_UNSPEC, NFNETLINK_V0, resource 0
    msg
}

/// The kernel's acknowledgement: `Ok` for error code 0, else that error.
fn read_answer(answer: &[u8]) -> io::Result<()> {
    let short = || io::Error::other(format!("a conntrack answer of {} bytes", answer.len()));
    let kind = u16::from_ne_bytes(answer.get(4..6).ok_or_else(short)?.try_into().unwrap());
    if kind != NLMSG_ERROR {
        return Err(io::Error::other(format!(
            "conntrack answered with message type {kind}, not an acknowledgement"
        )));
    }
    let code = i32::from_ne_bytes(answer.get(16..20).ok_or_else(short)?.try_into().unwrap());
    match code {
        0 => Ok(()),
        _ => Err(io::Error::from_raw_os_error(code.saturating_neg())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_read_or_refused_by_what_they_say() {
        let ack = |kind: u16, code: i32| {
            let mut a = vec![0u8; 36];
            a[4..6].copy_from_slice(&kind.to_ne_bytes());
            a[16..20].copy_from_slice(&code.to_ne_bytes());
            a
        };
        assert!(read_answer(&ack(NLMSG_ERROR, 0)).is_ok());
        let denied = read_answer(&ack(NLMSG_ERROR, -1)).unwrap_err();
        assert_eq!(denied.raw_os_error(), Some(1));
        assert!(
            read_answer(&ack(3, 0))
                .unwrap_err()
                .to_string()
                .contains("type 3")
        );
        let short = |answer: &[u8]| read_answer(answer).unwrap_err().to_string();
        assert!(short(&[0; 4]).contains("4 bytes"));
        assert!(short(&ack(NLMSG_ERROR, 0)[..18]).contains("18 bytes"));
        assert_eq!(request().len(), 20);
    }
}
