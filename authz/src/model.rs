//! The policy model: what istiod sends a ztunnel (`istio.security.Authorization`), in Rust types.
//!
//! Policy -> rules (any matches) -> clauses (all must match) -> matches (any matches) -> fields
//! (each non-empty field must pass). See DESIGN.md, "L4 authorization semantics".

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use ipnet::IpNet;

/// Which workloads a policy applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scope {
    /// Every workload in the mesh (a policy in the root namespace without selector).
    Global,
    /// Every workload of the policy's namespace.
    Namespace,
    /// Workloads that list the policy by name (selected by labels).
    WorkloadSelector,
}

/// What a matching policy does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Action {
    /// Allow the connection.
    Allow,
    /// Deny the connection.
    Deny,
}

/// One L4 authorization policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// Policy name.
    pub name: String,
    /// Policy namespace.
    pub namespace: String,
    /// Which workloads it applies to.
    pub scope: Scope,
    /// ALLOW or DENY.
    pub action: Action,
    /// The rules; the policy matches if any rule matches. No rules: never matches.
    pub rules: Vec<Rule>,
    /// Evaluated and reported, never enforced.
    pub dry_run: bool,
    /// For `WorkloadSelector` policies read from YAML: the `matchLabels`. Empty from xDS, where
    /// workloads name their policies instead.
    pub selector: BTreeMap<String, String>,
}

/// A rule matches if all its clauses match (no clauses: always).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rule {
    /// The clauses, AND-ed.
    pub clauses: Vec<Clause>,
}

/// A clause matches if any of its matches matches (no matches: it counts as a match).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Clause {
    /// The matches, OR-ed.
    pub matches: Vec<Match>,
}

/// A match: each non-empty field must pass (positive list empty or any item matches, and no item
/// of the `not_` list matches). A match with every field empty never matches.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Match {
    /// Source namespaces.
    pub namespaces: Vec<StringMatch>,
    /// Source namespaces that must not match.
    pub not_namespaces: Vec<StringMatch>,
    /// Source principals, without `spiffe://` (`cluster.local/ns/default/sa/sleep`).
    pub principals: Vec<StringMatch>,
    /// Source principals that must not match.
    pub not_principals: Vec<StringMatch>,
    /// Source addresses.
    pub source_ips: Vec<IpNet>,
    /// Source addresses that must not match.
    pub not_source_ips: Vec<IpNet>,
    /// Destination addresses.
    pub destination_ips: Vec<IpNet>,
    /// Destination addresses that must not match.
    pub not_destination_ips: Vec<IpNet>,
    /// Destination ports.
    pub destination_ports: Vec<u16>,
    /// Destination ports that must not match.
    pub not_destination_ports: Vec<u16>,
    /// Source service accounts.
    pub service_accounts: Vec<ServiceAccountMatch>,
    /// Source service accounts that must not match.
    pub not_service_accounts: Vec<ServiceAccountMatch>,
}

/// A string pattern: exact, `prefix*`, `*suffix` or `*` (any non-empty value).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum StringMatch {
    /// Equal to the string.
    Exact(String),
    /// Starts with the string.
    Prefix(String),
    /// Ends with the string.
    Suffix(String),
    /// Any non-empty value.
    Presence,
}

/// A service account `namespace/name`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceAccountMatch {
    /// Namespace of the service account.
    pub namespace: String,
    /// Name of the service account.
    pub name: String,
}

/// The connection being authorized.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connection {
    /// Source address.
    pub source: std::net::SocketAddr,
    /// Destination address (the workload's).
    pub destination: std::net::SocketAddr,
    /// The peer identity, `None` for plaintext (no mTLS).
    pub peer: Option<Principal>,
}

/// A peer identity in Istio form: trust domain, namespace and service account.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Principal {
    /// `cluster.local/ns/<ns>/sa/<sa>`, the SPIFFE id without `spiffe://`.
    pub principal: Arc<str>,
    /// The namespace (from the `ns/` segment), empty if the id is not of the Istio form.
    pub namespace: Arc<str>,
    /// The service account (from the `sa/` segment), empty if not of the Istio form.
    pub service_account: Arc<str>,
}

impl Principal {
    /// Reads an identity given as `spiffe://td/ns/x/sa/y` or `td/ns/x/sa/y`.
    pub fn parse(text: &str) -> Self {
        let principal = text.strip_prefix("spiffe://").unwrap_or(text);
        let segments: Vec<&str> = principal.split('/').collect();
        let (namespace, service_account) = match segments.as_slice() {
            [_, "ns", ns, "sa", sa] => (*ns, *sa),
            _ => ("", ""),
        };
        Principal {
            principal: Arc::from(principal),
            namespace: Arc::from(namespace),
            service_account: Arc::from(service_account),
        }
    }
}

/// The workload a connection goes to: what decides which policies apply.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Workload {
    /// The workload's namespace.
    pub namespace: String,
    /// Its labels (for selector policies read from YAML).
    pub labels: BTreeMap<String, String>,
    /// Policies it names (`namespace/name`), as xDS workloads do.
    pub policies: Vec<String>,
}

/// A CIDR block in canonical form: host bits cleared, and an IPv4-mapped IPv6 block
/// (`::ffff:10.0.0.0/104`) written as the IPv4 block it names (`10.0.0.0/8`), so it matches the
/// IPv4 connections it was written for. Connection addresses are canonicalized the same way.
pub fn canonical_net(net: IpNet) -> IpNet {
    if let IpNet::V6(v6) = net
        && v6.prefix_len() >= 96
        && let Some(v4) = v6.addr().to_ipv4_mapped()
    {
        let v4 = ipnet::Ipv4Net::new(v4, v6.prefix_len() - 96).expect("prefix <= 32");
        return IpNet::V4(v4.trunc());
    }
    net.trunc()
}

impl Policy {
    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

impl StringMatch {
    /// Parses Istio's pattern syntax: `*` presence, `*suffix`, `prefix*`, otherwise exact.
    pub fn from_pattern(pattern: &str) -> Self {
        if pattern == "*" {
            StringMatch::Presence
        } else if let Some(suffix) = pattern.strip_prefix('*') {
            StringMatch::Suffix(suffix.to_owned())
        } else if let Some(prefix) = pattern.strip_suffix('*') {
            StringMatch::Prefix(prefix.to_owned())
        } else {
            StringMatch::Exact(pattern.to_owned())
        }
    }

    /// Whether `value` matches.
    pub fn matches(&self, value: &str) -> bool {
        match self {
            StringMatch::Exact(s) => value == s,
            StringMatch::Prefix(p) => value.starts_with(p.as_str()),
            StringMatch::Suffix(s) => value.ends_with(s.as_str()),
            StringMatch::Presence => !value.is_empty(),
        }
    }
}

impl fmt::Display for StringMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StringMatch::Exact(s) => f.write_str(s),
            StringMatch::Prefix(p) => write!(f, "{p}*"),
            StringMatch::Suffix(s) => write!(f, "*{s}"),
            StringMatch::Presence => f.write_str("*"),
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Action::Allow => "ALLOW",
            Action::Deny => "DENY",
        })
    }
}

impl fmt::Display for ServiceAccountMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

impl Match {
    /// Whether every field is empty (such a match never matches).
    pub fn is_empty(&self) -> bool {
        self.namespaces.is_empty()
            && self.not_namespaces.is_empty()
            && self.principals.is_empty()
            && self.not_principals.is_empty()
            && self.source_ips.is_empty()
            && self.not_source_ips.is_empty()
            && self.destination_ips.is_empty()
            && self.not_destination_ips.is_empty()
            && self.destination_ports.is_empty()
            && self.not_destination_ports.is_empty()
            && self.service_accounts.is_empty()
            && self.not_service_accounts.is_empty()
    }
}
