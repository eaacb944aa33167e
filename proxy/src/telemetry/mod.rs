//! What the proxy tells about its connections: Istio's metrics ([`metrics`]), the bytes counted
//! as they move ([`Counted`]), and the access log ([`access_log`]), written from each
//! connection's record (its outcome, with the workloads found when it was set up).

pub mod access_log;
mod counted;
pub mod metrics;

pub use counted::Counted;
