//! The soak: hours of traffic through a local mesh while its parts fail, every connection's
//! bytes and outcome checked. [`check`] is what a connection is judged by.

pub mod check;
pub mod traffic;
