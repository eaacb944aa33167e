//! Delta ADS (xDS) for Istio's ambient resources: the protocol, a client, a server, and the
//! resource types.
//!
//! - [`client::XdsClient`]: one delta-ADS stream carrying every registered type, a
//!   [`client::Handler`] per type, ACK/NACK (applying the good resources of a partly bad
//!   response), wildcard and named subscriptions plus on-demand ones, reconnection with backoff
//!   and `initial_resource_versions`, and a `synced` signal for readiness.
//! - [`server::AdsServer`] (feature `server`): versioned resources, per-stream subscription state,
//!   pushes of only what changed, ACK/NACK records; the local control plane's transport.
//! - [`resources`]: `istio.workload.Address` decoded into a validated model (and
//!   `istio.security.Authorization` through the `authz` crate); a bad resource is a per-resource
//!   rejection, never a panic.
//!
//! Messages are generated from `proto/` (Istio's schema, checked field by field) into
//! `src/generated/` by `cargo run -p protogen`; building needs no protobuf compiler.
//!
//! ```
//! use xds_client::resources::decode_address;
//!
//! // A truncated resource is a rejection with a reason, never a panic.
//! let err = decode_address(&[0x0a, 0x05, 0x0a]).unwrap_err();
//! assert!(err.to_string().contains("not a valid protobuf"));
//! ```
#![forbid(unsafe_code)]

pub mod client;
pub mod resources;
#[cfg(feature = "server")]
pub mod server;

/// Generated protobuf and gRPC code (`src/generated/`, from `proto/`).
#[allow(missing_docs, unreachable_pub, unused_qualifications, clippy::all)]
pub mod proto {
    /// `envoy.service.discovery.v3`: delta ADS.
    pub mod discovery {
        include!("generated/envoy.service.discovery.v3.rs");
    }
    /// `istio.workload`: workloads and services.
    pub mod workload {
        include!("generated/istio.workload.rs");
    }
}

/// The README's example, compiled and run as a doctest so it stays true.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
