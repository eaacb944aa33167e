//! The outbound path (port 15001): a captured connection's route is decided by a pure function
//! ([`decide`]) and then executed (in a later part of this crate: dial HBONE with the source
//! pod's certificate, or connect directly).

mod route;

pub use route::{Route, RouteError, decide};
