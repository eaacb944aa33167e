//! Addresses that play different roles get different types, so that a client address can never
//! be passed where an original destination or a tunnel target is meant.

use std::fmt;
use std::net::{IpAddr, SocketAddr};

/// The HBONE port every mesh workload's node proxy listens on (in the pod's netns).
pub use common::ports::HBONE as HBONE_PORT;

/// The proxy's own data-path ports in a pod (outbound capture, inbound plaintext, HBONE): a
/// tunnel to one of them would reach the proxy itself, so it is refused.
pub use common::ports::PROXY_PORTS;

macro_rules! address_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(pub SocketAddr);

        impl $name {
            /// The IP address.
            pub fn ip(&self) -> IpAddr {
                self.0.ip()
            }

            /// The port.
            pub fn port(&self) -> u16 {
                self.0.port()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }
    };
}

address_type!(
    /// Where a captured connection comes from (the source pod's socket).
    ClientAddr
);
address_type!(
    /// Where the application meant to connect (`SO_ORIGINAL_DST` of a captured connection): a
    /// pod, a service VIP, or something outside the mesh.
    OrigDst
);
address_type!(
    /// Where an HBONE tunnel is dialed: a destination pod's (or waypoint's) address on port
    /// 15008.
    HboneTarget
);
address_type!(
    /// Where the bytes finally go: the `:authority` of the CONNECT (an endpoint's address and
    /// its target port), or the address a passthrough connection dials.
    Upstream
);

impl HboneTarget {
    /// The HBONE port of `ip`.
    pub fn for_ip(ip: IpAddr) -> Self {
        HboneTarget(SocketAddr::new(ip, HBONE_PORT))
    }
}
