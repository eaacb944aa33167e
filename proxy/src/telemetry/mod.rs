//! What the proxy tells about its connections: Istio's metrics ([`metrics`]), the bytes counted
//! as they move ([`Counted`]), and the access log ([`access_log`]).
//!
//! Both are written from one record per connection ([`Record`]: the inbound or outbound
//! outcome), which holds the workloads, identities and service found when the connection was
//! set up: the metrics series is chosen from it when the connection opens (or, for a refused
//! one, when it ends), and the access log line is written from it when the connection ends.
//! Nothing is looked up again.

pub mod access_log;
mod counted;
pub mod metrics;

pub use counted::Counted;

/// One connection's record, as both the metrics and the access log read it.
pub trait Record {
    /// Who reports it: `source` (outbound) or `destination` (inbound).
    const REPORTER: &'static str;

    /// Its two ends, as found when it was set up.
    fn ends(&self) -> metrics::Ends<'_>;

    /// Istio's `response_flags` when it failed (refused, or never established), else `None`.
    fn failure(&self) -> Option<&'static str>;
}
