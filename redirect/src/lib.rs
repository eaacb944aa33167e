//! Traffic capture for an ambient mesh: redirection rules inside a pod's network namespace.
//!
//! This crate will hold the iptables and nftables rule sets for a captured pod (ports 15001,
//! 15006, 15008, skip mark 0x539), applied and removed idempotently, and the node agent that
//! captures pods by namespace label and hands their network namespaces to the proxy. Nothing is
//! implemented yet; see the project's issue tracker.
