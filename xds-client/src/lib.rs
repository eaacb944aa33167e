//! A delta ADS (xDS) client for Istio's ambient resources.
//!
//! This crate will hold the Envoy discovery protos, the `istio.workload` and `istio.security`
//! resource types, and a generic delta-ADS client with per-type handlers (plus a small server for
//! tests and the local control plane, behind a feature). Nothing is implemented yet; see the
//! project's issue tracker.
#![forbid(unsafe_code)]
