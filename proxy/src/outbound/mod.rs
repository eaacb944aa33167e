//! The outbound path (port 15001): a captured connection's route is decided by a pure function
//! ([`decide`]) and then executed by [`Outbound`]: an HBONE tunnel with the source pod's own
//! certificate, or a direct connection.

mod execute;
mod moved;
mod route;

pub use execute::{IdentityDialer, Outbound, OutboundOutcome, PoolKey};
pub use moved::OutboundHandOff;
pub use route::{Route, RouteError, decide};
