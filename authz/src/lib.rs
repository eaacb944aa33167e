//! L4 authorization for an ambient mesh: Istio `AuthorizationPolicy` semantics, exactly.
//!
//! This crate will hold the policy model (scope, action, rule -> clause -> match, dry-run), the
//! translation from Kubernetes `AuthorizationPolicy` YAML and from the `istio.security.Authorization`
//! protobuf, and a pure evaluator with an explain trace. It performs no I/O. Nothing is implemented
//! yet; see the project's issue tracker.
#![forbid(unsafe_code)]
