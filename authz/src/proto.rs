//! `istio.security.Authorization`, the xDS form of a policy: the protobuf messages (generated
//! from `proto/authorization.proto`, Istio's schema) and conversions to and from the model.
//! `extensions` (on a policy or a match) are carried, not acted on, as in Istio's ztunnel.
//!
//! Decoding checks what the wire format cannot: known enum values, 4- or 16-byte addresses with a
//! prefix length that fits, ports that fit in 16 bits, and string matches that say what to match.
//! A resource that fails is rejected whole (the xDS client NACKs it), never half-applied.

use std::net::IpAddr;

use ipnet::IpNet;
use prost::Message;

use crate::model::{Action, Clause, Match, Policy, Rule, Scope, ServiceAccountMatch, StringMatch};

/// The generated messages: `istio.security` (from `proto/authorization.proto`) and the one
/// `istio.workload` message it uses, by `cargo run -p protogen` into `src/generated/`.
#[allow(missing_docs, unreachable_pub, unused_qualifications, clippy::all)]
pub mod generated {
    /// `istio.security`.
    pub mod security {
        include!("generated/istio.security.rs");
    }
    /// `istio.workload.Extension`, which policies may carry (not acted on).
    pub mod workload {
        include!("generated/istio.workload.rs");
    }
}

pub use generated::security::string_match::MatchType;
pub use generated::security::{
    Action as ProtoAction, Address as ProtoAddress, Authorization, Clause as ProtoClause,
    Match as ProtoMatch, Rule as ProtoRule, Scope as ProtoScope,
    ServiceAccountMatch as ProtoServiceAccountMatch, StringMatch as ProtoStringMatch,
};

/// A resource that is not a usable policy.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("Authorization {resource}: {field}: {message}")]
pub struct ProtoError {
    /// `namespace/name` if known, else `(undecodable)`.
    pub resource: String,
    /// The field concerned, e.g. `rules[0].clauses[1].matches[0].source_ips[2]`.
    pub field: String,
    /// What is wrong.
    pub message: String,
}

/// Decodes and converts one `istio.security.Authorization`.
pub fn decode(bytes: &[u8]) -> Result<Policy, ProtoError> {
    let proto = Authorization::decode(bytes).map_err(|e| ProtoError {
        resource: "(undecodable)".into(),
        field: "(message)".into(),
        message: e.to_string(),
    })?;
    from_proto(&proto)
}

/// Body of the `authz_proto` fuzz target: decoding arbitrary bytes never panics, and whatever is
/// accepted converts back to the same policy.
#[doc(hidden)]
#[cfg(feature = "fuzzing")]
pub fn fuzz_decode(data: &[u8]) {
    if let Ok(policy) = decode(data) {
        let again = from_proto(&to_proto(&policy)).expect("a converted policy converts back");
        assert_eq!(again, policy);
    }
}

/// Converts the model to the protobuf (the selector, which xDS does not carry, is dropped).
pub fn to_proto(policy: &Policy) -> Authorization {
    Authorization {
        name: policy.name.clone(),
        namespace: policy.namespace.clone(),
        scope: match policy.scope {
            Scope::Global => ProtoScope::Global,
            Scope::Namespace => ProtoScope::Namespace,
            Scope::WorkloadSelector => ProtoScope::WorkloadSelector,
        } as i32,
        action: match policy.action {
            Action::Allow => ProtoAction::Allow,
            Action::Deny => ProtoAction::Deny,
        } as i32,
        rules: policy
            .rules
            .iter()
            .map(|r| ProtoRule {
                clauses: r
                    .clauses
                    .iter()
                    .map(|c| ProtoClause {
                        matches: c.matches.iter().map(match_to_proto).collect(),
                    })
                    .collect(),
            })
            .collect(),
        dry_run: policy.dry_run,
        extensions: Vec::new(),
    }
}

fn match_to_proto(m: &Match) -> ProtoMatch {
    let strings = |v: &[StringMatch]| v.iter().map(string_to_proto).collect();
    let nets = |v: &[IpNet]| {
        v.iter()
            .map(|n| ProtoAddress {
                address: match n.addr() {
                    IpAddr::V4(a) => a.octets().to_vec(),
                    IpAddr::V6(a) => a.octets().to_vec(),
                },
                length: u32::from(n.prefix_len()),
            })
            .collect()
    };
    let ports = |v: &[u16]| v.iter().map(|p| u32::from(*p)).collect();
    let sas = |v: &[ServiceAccountMatch]| {
        v.iter()
            .map(|s| ProtoServiceAccountMatch {
                namespace: s.namespace.clone(),
                service_account: s.name.clone(),
            })
            .collect()
    };
    ProtoMatch {
        namespaces: strings(&m.namespaces),
        not_namespaces: strings(&m.not_namespaces),
        principals: strings(&m.principals),
        not_principals: strings(&m.not_principals),
        source_ips: nets(&m.source_ips),
        not_source_ips: nets(&m.not_source_ips),
        destination_ips: nets(&m.destination_ips),
        not_destination_ips: nets(&m.not_destination_ips),
        destination_ports: ports(&m.destination_ports),
        not_destination_ports: ports(&m.not_destination_ports),
        service_accounts: sas(&m.service_accounts),
        not_service_accounts: sas(&m.not_service_accounts),
        extensions: Vec::new(),
    }
}

fn string_to_proto(s: &StringMatch) -> ProtoStringMatch {
    ProtoStringMatch {
        match_type: Some(match s {
            StringMatch::Exact(v) => MatchType::Exact(v.clone()),
            StringMatch::Prefix(v) => MatchType::Prefix(v.clone()),
            StringMatch::Suffix(v) => MatchType::Suffix(v.clone()),
            StringMatch::Presence => MatchType::Presence(()),
        }),
    }
}

/// Converts the protobuf to the model, validating what the wire format cannot.
pub fn from_proto(p: &Authorization) -> Result<Policy, ProtoError> {
    let resource = format!("{}/{}", p.namespace, p.name);
    let err = |field: String, message: String| ProtoError {
        resource: resource.clone(),
        field,
        message,
    };
    if p.name.is_empty() || p.namespace.is_empty() {
        return Err(err("name".into(), "name and namespace must be set".into()));
    }
    let scope = match ProtoScope::try_from(p.scope) {
        Ok(ProtoScope::Global) => Scope::Global,
        Ok(ProtoScope::Namespace) => Scope::Namespace,
        Ok(ProtoScope::WorkloadSelector) => Scope::WorkloadSelector,
        Err(_) => return Err(err("scope".into(), format!("unknown scope {}", p.scope))),
    };
    let action = match ProtoAction::try_from(p.action) {
        Ok(ProtoAction::Allow) => Action::Allow,
        Ok(ProtoAction::Deny) => Action::Deny,
        Err(_) => return Err(err("action".into(), format!("unknown action {}", p.action))),
    };
    let mut rules = Vec::with_capacity(p.rules.len());
    for (r, rule) in p.rules.iter().enumerate() {
        let mut clauses = Vec::with_capacity(rule.clauses.len());
        for (c, clause) in rule.clauses.iter().enumerate() {
            let mut matches = Vec::with_capacity(clause.matches.len());
            for (m, pm) in clause.matches.iter().enumerate() {
                let at = format!("rules[{r}].clauses[{c}].matches[{m}]");
                matches.push(match_from_proto(pm, &at).map_err(|(f, msg)| err(f, msg))?);
            }
            clauses.push(Clause { matches });
        }
        rules.push(Rule { clauses });
    }
    Ok(Policy {
        name: p.name.clone(),
        namespace: p.namespace.clone(),
        scope,
        action,
        rules,
        dry_run: p.dry_run,
        selector: Default::default(),
    })
}

fn match_from_proto(p: &ProtoMatch, at: &str) -> Result<Match, (String, String)> {
    let strings =
        |v: &[ProtoStringMatch], field: &str| -> Result<Vec<StringMatch>, (String, String)> {
            v.iter()
                .enumerate()
                .map(|(i, s)| match &s.match_type {
                    Some(MatchType::Exact(v)) => Ok(StringMatch::Exact(v.clone())),
                    Some(MatchType::Prefix(v)) => Ok(StringMatch::Prefix(v.clone())),
                    Some(MatchType::Suffix(v)) => Ok(StringMatch::Suffix(v.clone())),
                    Some(MatchType::Presence(())) => Ok(StringMatch::Presence),
                    None => Err((
                        format!("{at}.{field}[{i}]"),
                        "string match with no match type".into(),
                    )),
                })
                .collect()
        };
    let nets = |v: &[ProtoAddress], field: &str| -> Result<Vec<IpNet>, (String, String)> {
        v.iter()
            .enumerate()
            .map(|(i, a)| {
                let bad = |message: String| (format!("{at}.{field}[{i}]"), message);
                let ip = match a.address.len() {
                    4 => IpAddr::from(<[u8; 4]>::try_from(a.address.as_slice()).expect("4 bytes")),
                    16 => {
                        IpAddr::from(<[u8; 16]>::try_from(a.address.as_slice()).expect("16 bytes"))
                    }
                    n => return Err(bad(format!("address of {n} bytes; expected 4 or 16"))),
                };
                let len = u8::try_from(a.length)
                    .map_err(|_| bad(format!("prefix length {}", a.length)))?;
                IpNet::new(ip, len)
                    .map(crate::model::canonical_net)
                    .map_err(|_| bad(format!("prefix length {} too long for {ip}", a.length)))
            })
            .collect()
    };
    let ports = |v: &[u32], field: &str| -> Result<Vec<u16>, (String, String)> {
        v.iter()
            .enumerate()
            .map(|(i, p)| match u16::try_from(*p) {
                Ok(port) if port != 0 => Ok(port),
                _ => Err((
                    format!("{at}.{field}[{i}]"),
                    format!("port {p} is out of range; expected 1-65535"),
                )),
            })
            .collect()
    };
    let sas = |v: &[ProtoServiceAccountMatch]| {
        v.iter()
            .map(|s| ServiceAccountMatch {
                namespace: s.namespace.clone(),
                name: s.service_account.clone(),
            })
            .collect()
    };
    Ok(Match {
        namespaces: strings(&p.namespaces, "namespaces")?,
        not_namespaces: strings(&p.not_namespaces, "not_namespaces")?,
        principals: strings(&p.principals, "principals")?,
        not_principals: strings(&p.not_principals, "not_principals")?,
        source_ips: nets(&p.source_ips, "source_ips")?,
        not_source_ips: nets(&p.not_source_ips, "not_source_ips")?,
        destination_ips: nets(&p.destination_ips, "destination_ips")?,
        not_destination_ips: nets(&p.not_destination_ips, "not_destination_ips")?,
        destination_ports: ports(&p.destination_ports, "destination_ports")?,
        not_destination_ports: ports(&p.not_destination_ports, "not_destination_ports")?,
        service_accounts: sas(&p.service_accounts),
        not_service_accounts: sas(&p.not_service_accounts),
    })
}
