//! What every part of an ambient mesh agrees on, defined once: Istio's well-known ports and the
//! packet mark of the proxy's own sockets ([`ports`], [`PACKET_MARK`]), the labels and
//! annotations ambient mode reads and multi-document Kubernetes YAML ([`k8s`]), and writing a
//! file only its owner may read ([`fs`]).
//!
//! A leaf: it depends on no crate of the workspace, so the capture rules, the proxy, the control
//! plane and the local mesh can all take these from here instead of repeating them.
//!
//! ```
//! use common::{PACKET_MARK, k8s, ports};
//!
//! assert_eq!(ports::HBONE, 15008);
//! assert_eq!(PACKET_MARK, 1337);
//! let docs: Vec<_> = k8s::documents("a: 1\n---\n---\nb: 2\n").collect();
//! assert_eq!(docs.len(), 2);
//! assert_eq!(docs[1].0, 3); // documents are numbered as written, empty ones included
//! ```
#![forbid(unsafe_code)]

pub mod fs;
pub mod k8s;
pub mod ports;

/// The mark (`SO_MARK`) on the proxy's own sockets: capture rules let marked packets pass, so
/// the proxy's connections are not captured again. Istio's value (`0x539`, 1337).
pub const PACKET_MARK: u32 = 0x539;

/// The README's example, compiled and run as a doctest so it stays true.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
