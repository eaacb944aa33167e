//! Traffic capture for an ambient mesh: redirection rules inside a pod's network namespace.
//!
//! Today: the capture [`RuleSet`] (ports 15001/15006/15008, skip mark 0x539, loopback and
//! health-probe exceptions, IPv4 and IPv6) rendered for iptables and nftables, and [`apply`],
//! [`remove`] and [`check`] inside a network namespace, idempotent and exact (removing restores
//! the rule set byte for byte). The [`agent`] captures the pods of a node by namespace label, finding a pod's network
//! namespace by its IP ([`netns`]) when the source does not name it. The [`zds`]
//! module hands captured pods' network namespaces to the proxy over Istio's ZDS socket protocol.
//! With the `kube` feature, [`k8s`] is the Kubernetes pod source (watches of Namespaces and this
//! node's Pods).
//!
//! ```
//! use redirect::{Backend, RuleSet};
//!
//! let rules = RuleSet::default();
//! let script = rules.nft_script();
//! assert!(script.contains("redirect to :15001"));
//! assert_eq!("nftables".parse::<Backend>(), Ok(Backend::Nftables));
//! ```
#![deny(unsafe_code)] // allowed only in `sys`, the socket-level module

pub mod agent;
mod apply;
pub mod cni;
mod conntrack;
pub mod fdpass;
pub mod host;
#[cfg(feature = "kube")]
pub mod k8s;
pub mod netns;
mod process;
mod rules;
mod sys;
pub mod takeover;
pub mod zds;

pub use apply::{Drift, Error, apply, check, fd_path, reapply, remove};
pub use rules::{Backend, IPT_OUTPUT, IPT_PREROUTING, NFT_TABLE, RuleSet};

/// Reapplies the rules when [`check`] finds drift; returns the drift it repaired. A repair
/// keeps conntrack's table ([`reapply`]): even with every rule of ours gone, the pod's open
/// connections' entries still carry their redirects.
pub fn reconcile(
    netns: &std::path::Path,
    backend: Backend,
    rules: &RuleSet,
) -> Result<Drift, Error> {
    let drift = check(netns, backend, rules)?;
    if !drift.is_clean() {
        reapply(netns, backend, rules)?;
    }
    Ok(drift)
}

/// The README's example, compiled and run as a doctest so it stays true.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
