//! Delta ADS (xDS) for Istio's ambient resources: the protocol messages and the resource types.
//!
//! What is here today: the Envoy delta-discovery messages and gRPC service (compiled from
//! `proto/` with protox, no `protoc`), the `istio.workload.Address` resources (workloads and
//! services) decoded into a validated Rust model, and `istio.security.Authorization` through the
//! `authz` crate. Still to come (see the issue tracker): the delta-ADS client with per-type
//! handlers, ACK/NACK and reconnection, and the server for tests and the local control plane.
//!
//! ```
//! use xds_client::resources::{Address, decode_address, encode_address};
//!
//! // A truncated resource is a rejection with a reason, never a panic.
//! let err = decode_address(&[0x0a, 0x05, 0x0a]).unwrap_err();
//! assert!(err.to_string().contains("not a valid protobuf"));
//! # let _ = (encode_address, std::marker::PhantomData::<Address>);
//! ```
#![forbid(unsafe_code)]

pub mod resources;

/// Generated protobuf and gRPC code.
#[allow(missing_docs, unreachable_pub, unused_qualifications, clippy::all)]
pub mod proto {
    /// `envoy.service.discovery.v3`: delta ADS.
    pub mod discovery {
        tonic::include_proto!("envoy.service.discovery.v3");
    }
    /// `istio.workload`: workloads and services.
    pub mod workload {
        tonic::include_proto!("istio.workload");
    }
}
