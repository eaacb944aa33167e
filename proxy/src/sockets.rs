//! The socket options a captured data path needs: the original destination of a connection
//! redirected by iptables/nftables (`SO_ORIGINAL_DST`), and the mark on the proxy's own outgoing
//! sockets (`SO_MARK`) that keeps the capture rules from redirecting them back to the proxy.

use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

use nix::sys::socket::{getsockopt, setsockopt, sockopt};
use tokio::net::{TcpSocket, TcpStream};

use crate::addr::OrigDst;

/// Where a redirected connection was originally going (its destination before the REDIRECT).
/// `peer` is the client's address as the accept returned it: its family is the socket's (one
/// system call per connection less than asking the socket for its own address).
pub fn original_dst(stream: &TcpStream, peer: SocketAddr) -> io::Result<OrigDst> {
    let addr = if peer.is_ipv4() {
        let raw = getsockopt(stream, sockopt::OriginalDst).map_err(io::Error::from)?;
        SocketAddr::V4(SocketAddrV4::new(
            Ipv4Addr::from(u32::from_be(raw.sin_addr.s_addr)),
            u16::from_be(raw.sin_port),
        ))
    } else {
        let raw = getsockopt(stream, sockopt::Ip6tOriginalDst).map_err(io::Error::from)?;
        SocketAddr::V6(SocketAddrV6::new(
            Ipv6Addr::from(raw.sin6_addr.s6_addr),
            u16::from_be(raw.sin6_port),
            0,
            0,
        ))
    };
    Ok(OrigDst(addr))
}

/// Makes `socket` end with a TCP reset instead of a FIN when it is closed: for a connection
/// whose other half was aborted (a tunnel reset by its peer, an HBONE connection lost, the other
/// socket reset, a policy change), so its application sees an error, never a clean end it could
/// take a truncated transfer for. (`SO_LINGER` of zero; the close does not block.)
pub fn reset_on_close(socket: &TcpStream) {
    if let Err(e) = socket.set_zero_linger() {
        tracing::debug!(error = %e, "cannot make a socket reset on close");
    }
}

/// Connects to `to` from a socket carrying `mark` (when set), so capture rules skip it.
pub async fn connect_marked(to: SocketAddr, mark: Option<u32>) -> io::Result<TcpStream> {
    let stream = marked_socket(to, mark)?.connect(to).await?;
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

/// How the proxy opens its outgoing TCP connections (to the app, to a peer proxy, to a
/// passthrough destination): from the current network namespace, or from a pod's in shared mode.
pub trait Connector: Send + Sync + 'static {
    /// Connects to `to`. The stream comes with `TCP_NODELAY` set (callers do not set it again:
    /// one system call per connection less).
    fn connect(&self, to: SocketAddr) -> impl Future<Output = io::Result<TcpStream>> + Send;

    /// Connects to the app at `to` for a client at `client`. A connector that preserves the
    /// client's address (the in-pod one) connects from `client`; the others, as [`connect`]
    /// (from their own address), which is what they are documented to do.
    ///
    /// [`connect`]: Connector::connect
    fn connect_app(
        &self,
        client: IpAddr,
        to: SocketAddr,
    ) -> impl Future<Output = io::Result<TcpStream>> + Send {
        let _ = client;
        self.connect(to)
    }
}

/// Connects from the current network namespace, marking the socket with `SO_MARK` when `mark`
/// is set (so capture rules skip it).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Marked {
    /// The mark (Istio: 0x539), or none.
    pub mark: Option<u32>,
}

impl Connector for Marked {
    fn connect(&self, to: SocketAddr) -> impl Future<Output = io::Result<TcpStream>> + Send {
        connect_marked(to, self.mark)
    }
}

/// A new unconnected TCP socket for `to`'s address family, carrying `mark` when set.
pub fn marked_socket(to: SocketAddr, mark: Option<u32>) -> io::Result<TcpSocket> {
    let socket = if to.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Some(mark) = mark {
        setsockopt(&socket, sockopt::Mark, &mark).map_err(|e| {
            io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!("cannot set SO_MARK {mark:#x} (needs CAP_NET_ADMIN): {e}"),
            )
        })?;
    }
    Ok(socket)
}

/// A new unconnected TCP socket for `to`, carrying `mark` when set, bound to `source` (its port
/// chosen at connect, `IP_BIND_ADDRESS_NO_PORT`) with `IP_TRANSPARENT` / `IPV6_TRANSPARENT`, so
/// it may be an address of another host (the client's): the connection then leaves from the
/// client's address. Needs `CAP_NET_ADMIN`, and,
/// for the replies to come back, the return route the node agent installs in the pod
/// (`redirect::ReturnRoute`). `source` must be of `to`'s family.
pub fn transparent_socket(
    source: IpAddr,
    to: SocketAddr,
    mark: Option<u32>,
) -> io::Result<TcpSocket> {
    if source.is_ipv4() != to.is_ipv4() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("cannot connect to {to} from {source}: the families differ"),
        ));
    }
    let socket = marked_socket(to, mark)?;
    let sock = socket2::SockRef::from(&socket);
    let transparent = if source.is_ipv4() {
        sock.set_ip_transparent_v4(true)
    } else {
        sock.set_ip_transparent_v6(true)
    };
    transparent.map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("cannot make a transparent socket to connect from {source} (needs CAP_NET_ADMIN): {e}"),
        )
    })?;
    // The port is chosen when connecting, where only the whole 4-tuple must be unique: bound
    // with port 0, every connection from one client would need a port no socket on that address
    // holds (TIME_WAIT ones included), from half the ephemeral range, and a few hundred
    // connections a second from one client ran them out (the soak saw connects stall).
    setsockopt(&socket, sockopt::IpBindAddressNoPort, &true)?;
    socket.bind(SocketAddr::new(source, 0)).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("cannot bind to the client's address {source}: {e}"),
        )
    })?;
    Ok(socket)
}

/// Whether the calling thread's network namespace has IPv6: its loopback holds `::1` (IPv6 is
/// neither disabled there nor missing from the kernel).
pub fn has_ipv6() -> bool {
    std::net::UdpSocket::bind((Ipv6Addr::LOCALHOST, 0)).is_ok()
}

/// The address of `port` a listener of one family binds: the loopback (`127.0.0.1`, `::1`) or
/// every address (`0.0.0.0`, `[::]`).
pub fn family_addr(v6: bool, loopback: bool, port: u16) -> SocketAddr {
    let ip: IpAddr = match (v6, loopback) {
        (false, true) => Ipv4Addr::LOCALHOST.into(),
        (false, false) => Ipv4Addr::UNSPECIFIED.into(),
        (true, true) => Ipv6Addr::LOCALHOST.into(),
        (true, false) => Ipv6Addr::UNSPECIFIED.into(),
    };
    SocketAddr::new(ip, port)
}

/// A listening socket on `addr` (non-blocking, `SO_REUSEADDR` as std sets it), with
/// `SO_REUSEPORT` when `reuse_port`; made on the calling thread, so in its network namespace.
/// An IPv6 address is IPv6 only (`IPV6_V6ONLY`), so `[::]` and `0.0.0.0` bind side by side.
pub fn listener(addr: SocketAddr, reuse_port: bool) -> io::Result<std::net::TcpListener> {
    use nix::sys::socket::{Backlog, SockType, SockaddrStorage, bind, listen};
    let fd = new_socket(addr, SockType::Stream)?;
    setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    if reuse_port {
        setsockopt(&fd, sockopt::ReusePort, &true)?;
    }
    bind(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &SockaddrStorage::from(addr),
    )?;
    listen(&fd, Backlog::new(1024)?)?;
    Ok(std::net::TcpListener::from(fd))
}

/// A UDP socket bound to `addr` (non-blocking), with `SO_REUSEPORT` when `reuse_port` and
/// `SO_MARK` when `mark` is set; made on the calling thread, so in its network namespace.
pub fn udp_socket(
    addr: SocketAddr,
    reuse_port: bool,
    mark: Option<u32>,
) -> io::Result<std::net::UdpSocket> {
    use nix::sys::socket::{SockType, SockaddrStorage, bind};
    let fd = new_socket(addr, SockType::Datagram)?;
    if reuse_port {
        setsockopt(&fd, sockopt::ReusePort, &true)?;
    }
    if let Some(mark) = mark {
        setsockopt(&fd, sockopt::Mark, &mark).map_err(|e| {
            io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!("cannot set SO_MARK {mark:#x} (needs CAP_NET_ADMIN): {e}"),
            )
        })?;
    }
    bind(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &SockaddrStorage::from(addr),
    )?;
    Ok(std::net::UdpSocket::from(fd))
}

/// A non-blocking, close-on-exec socket of `kind` for `addr`'s family; IPv6 only for an IPv6
/// address (`IPV6_V6ONLY`: an IPv4 socket of the same port serves IPv4).
fn new_socket(
    addr: SocketAddr,
    kind: nix::sys::socket::SockType,
) -> io::Result<std::os::fd::OwnedFd> {
    use nix::sys::socket::{AddressFamily, SockFlag, socket};
    let family = if addr.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let fd = socket(
        family,
        kind,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )?;
    if addr.is_ipv6() {
        setsockopt(&fd, sockopt::Ipv6V6Only, &true)?;
    }
    Ok(fd)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_transparent_socket_takes_its_port_when_it_connects_not_when_it_binds() {
        // bind(ip, 0) would reserve a port against every socket on that address, TIME_WAIT
        // ones included, from half the ephemeral range: at a few hundred connections a second
        // from one client, connects stalled for seconds. Deferred to connect, a port is shared
        // by connections to different destinations and found among the whole range.
        for (source, to) in [("10.1.2.3", "10.1.2.4:80"), ("fd00::3", "[fd00::4]:80")] {
            let socket =
                transparent_socket(source.parse().unwrap(), to.parse().unwrap(), None).unwrap();
            assert!(
                getsockopt(&socket, sockopt::IpBindAddressNoPort).unwrap(),
                "{source}"
            );
            assert_eq!(socket.local_addr().unwrap().port(), 0, "{source}");
        }
    }
}
