//! L4 authorization for an ambient mesh: Istio `AuthorizationPolicy` semantics, exactly.
//!
//! The policy [`model`], the translation from Kubernetes YAML ([`parse_policies`], with warnings
//! for what an L4 proxy cannot see) and from the `istio.security.Authorization` protobuf
//! ([`proto`]), and a [`PolicyStore`] that decides connections and explains its decisions. Pure:
//! no I/O, no clocks.
//!
//! ```
//! use authz::{Connection, PolicyStore, Principal, Workload, parse_policies};
//!
//! let yaml = r#"
//! apiVersion: security.istio.io/v1
//! kind: AuthorizationPolicy
//! metadata: {name: web-api-rbac, namespace: default}
//! spec:
//!   selector: {matchLabels: {app: web-api}}
//!   rules:
//!   - from:
//!     - source: {principals: ["cluster.local/ns/default/sa/sleep"]}
//! "#;
//! let translation = parse_policies(yaml, "example.yaml", "istio-system")?;
//! let mut store = PolicyStore::new("istio-system");
//! translation.policies.into_iter().for_each(|p| store.insert(p));
//!
//! let web_api = Workload {
//!     namespace: "default".into(),
//!     labels: [("app".to_owned(), "web-api".to_owned())].into(),
//!     ..Workload::default()
//! };
//! let from = |sa: &str| Connection {
//!     source: "10.0.0.1:40000".parse().unwrap(),
//!     destination: "10.0.0.2:8080".parse().unwrap(),
//!     peer: Some(Principal::parse(&format!("spiffe://cluster.local/ns/default/sa/{sa}"))),
//! };
//! assert!(store.decide(&from("sleep"), &web_api).allowed);
//! let denied = store.decide(&from("notsleep"), &web_api);
//! assert!(!denied.allowed);
//! println!("{denied}"); // DENY: no ALLOW policy matched (applicable: default/web-api-rbac)
//! # Ok::<(), authz::ParseError>(())
//! ```
#![forbid(unsafe_code)]

mod eval;
mod flat;
pub mod model;
pub mod proto;
mod yaml;

pub use eval::{
    Decision, DryRunOutcome, NoTrace, PolicyStore, Reason, TextTrace, Trace, parse_labels,
};
pub use model::{
    Action, Clause, Connection, Match, Policy, Principal, Rule, Scope, ServiceAccountMatch,
    StringMatch, Workload,
};
pub use yaml::{
    DEFAULT_ROOT_NAMESPACE, DRY_RUN_ANNOTATION, ParseError, Translation, Warning, parse_policies,
};

/// Body of the `authz_yaml` fuzz target, kept here so an ordinary test runs it over the seed
/// corpus: parsing arbitrary text, and deciding and explaining connections against whatever
/// parses, never panics, and explanations agree with decisions.
#[doc(hidden)]
#[cfg(feature = "fuzzing")]
pub fn fuzz_yaml(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(translation) = parse_policies(text, "fuzz", DEFAULT_ROOT_NAMESPACE) else {
        return;
    };
    let mut store = PolicyStore::new(DEFAULT_ROOT_NAMESPACE);
    for policy in translation.policies {
        let bytes = prost::Message::encode_to_vec(&proto::to_proto(&policy));
        assert!(
            proto::decode(&bytes).is_ok(),
            "a translated policy survives the proto"
        );
        store.insert(policy);
    }
    let namespaces: Vec<String> = store.iter().map(|p| p.namespace.clone()).collect();
    for namespace in namespaces.iter().take(4) {
        let workload = Workload {
            namespace: namespace.clone(),
            ..Workload::default()
        };
        for peer in [
            None,
            Some(Principal::parse(
                "spiffe://cluster.local/ns/default/sa/sleep",
            )),
        ] {
            let connection = Connection {
                source: "10.0.0.1:1234".parse().expect("literal"),
                destination: "10.0.0.2:8080".parse().expect("literal"),
                peer,
            };
            let decision = store.decide(&connection, &workload);
            let (explained, _) = store.explain(&connection, &workload);
            assert_eq!(decision, explained);
        }
    }
}

/// The README's example, compiled and run as a doctest so it stays true.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
