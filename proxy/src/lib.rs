//! The ambient node proxy as a library: what it knows (workloads, services, policies) and how it
//! routes captured connections.
//!
//! Its parts: [`state`] (an immutable snapshot the data path reads without locks, updated from xDS
//! resources), [`outbound::decide`], the pure route decision of a captured outbound connection
//! (service VIP -> healthy endpoint -> HBONE or passthrough) and its execution
//! ([`outbound::Outbound`]: HBONE with the source workload's own certificate, or passthrough),
//! [`inbound::Inbound`], the HBONE handler of a local workload (authority check, L4 policy with
//! the client's SPIFFE id, app connect, copy), and [`connections`], which closes connections a
//! policy change now denies; [`inpod`] (the listeners of each pod the node agent hands over) and
//! [`dedicated`] (one workload in the proxy's own namespace); metrics and the access log.
//!
//! ```
//! use proxy::addr::OrigDst;
//! use proxy::outbound::{Route, decide};
//! use proxy::state::{State, StateStore};
//! use xds_client::resources::{Address, NetworkMode, Tunnel, Workload, WorkloadType};
//!
//! let pod = |uid: &str, ip: [u8; 4], sa: &str, hbone: bool| Workload {
//!     uid: uid.into(),
//!     name: uid.into(),
//!     namespace: "default".into(),
//!     addresses: vec![ip.into()],
//!     network: String::new(),
//!     tunnel: if hbone { Tunnel::Hbone } else { Tunnel::None },
//!     identity: format!("spiffe://cluster.local/ns/default/sa/{sa}").parse().unwrap(),
//!     node: "node-a".into(),
//!     canonical_name: uid.into(),
//!     canonical_revision: "latest".into(),
//!     workload_type: WorkloadType::Pod,
//!     workload_name: uid.into(),
//!     authorization_policies: vec![],
//!     healthy: true,
//!     cluster_id: "Kubernetes".into(),
//!     hostname: String::new(),
//!     services: Default::default(),
//!     waypoint: None,
//!     network_gateway: None,
//!     network_mode: NetworkMode::Standard,
//!     locality: Default::default(),
//!     capacity: 1,
//!     native_tunnel: false,
//!     application_tunnel: None,
//! };
//! let store = StateStore::new(State::new("istio-system"));
//! store.update(|s| {
//!     s.insert_address(Address::Workload(pod("sleep", [10, 0, 0, 1], "sleep", true)));
//!     s.insert_address(Address::Workload(pod("web", [10, 0, 0, 2], "web", true)));
//! });
//! let state = store.snapshot();
//! let sleep = state.workload("sleep").unwrap();
//! let route = decide(&state, sleep, OrigDst("10.0.0.2:8080".parse()?), &mut |_| 0).unwrap();
//! match route {
//!     Route::Hbone { target, authority, expected, .. } => {
//!         assert_eq!(target.to_string(), "10.0.0.2:15008");
//!         assert_eq!(authority.to_string(), "10.0.0.2:8080");
//!         assert_eq!(expected[0].as_str(), "spiffe://cluster.local/ns/default/sa/web");
//!     }
//!     other => panic!("{other:?}"),
//! }
//! // Outside the mesh: passthrough.
//! let route = decide(&state, sleep, OrigDst("93.184.216.34:443".parse()?), &mut |_| 0).unwrap();
//! assert!(matches!(route, Route::Passthrough { .. }));
//! # Ok::<(), std::net::AddrParseError>(())
//! ```
#![forbid(unsafe_code)]

pub mod addr;
pub mod admin;
mod assembly;
pub mod certs;
pub mod config_dump;
pub mod connections;
pub mod dedicated;
pub mod dns;
pub mod handoff;
pub mod inbound;
pub mod inpod;
mod moving;
pub mod outbound;
mod serve;
pub mod sockets;
pub mod state;
pub mod telemetry;

/// The policy view of a workload: its namespace and the policies xDS says apply to it.
pub(crate) fn authz_workload(w: &xds_client::resources::Workload) -> authz::Workload {
    authz::Workload {
        namespace: w.namespace.clone(),
        labels: Default::default(),
        policies: w.authorization_policies.clone(),
    }
}

/// The README's example, compiled and run as a doctest so it stays true.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
