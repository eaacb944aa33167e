//! The evaluator: which policies apply to a workload, and what they decide for a connection.
//!
//! Decision for a connection to workload W (DESIGN.md): any matching DENY -> deny; else no ALLOW
//! policy applies -> allow; else allow iff some ALLOW matches. Dry-run policies are evaluated
//! the same way on the side and reported when they would have changed the outcome.
//!
//! The same code computes decisions and explanations: evaluation is generic over a [`Trace`]
//! sink, and the decision path uses one that does nothing (and compiles away).

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;

use crate::model::{
    Action, Connection, Match, Policy, Rule, Scope, ServiceAccountMatch, StringMatch, Workload,
};

/// The outcome of authorizing one connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Whether the connection may proceed.
    pub allowed: bool,
    /// Why.
    pub reason: Reason,
    /// What enforcing the dry-run policies too would have decided, when that differs.
    pub dry_run: Option<DryRunOutcome>,
}

/// Why a decision came out as it did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reason {
    /// A DENY policy matched.
    DeniedBy {
        /// `namespace/name` of the policy.
        policy: String,
        /// Index of the matching rule.
        rule: usize,
    },
    /// An ALLOW policy matched.
    AllowedBy {
        /// `namespace/name` of the policy.
        policy: String,
        /// Index of the matching rule.
        rule: usize,
    },
    /// No ALLOW policy applies to the workload (and no DENY matched): allowed.
    NoAllowPolicies,
    /// ALLOW policies apply but none matched: denied.
    NoAllowMatched {
        /// The ALLOW policies that applied.
        policies: Vec<String>,
    },
}

/// The decision the dry-run policies would have caused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DryRunOutcome {
    /// Whether it would have been allowed.
    pub allowed: bool,
    /// Why.
    pub reason: Reason,
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reason::DeniedBy { policy, rule } => {
                write!(f, "denied by rule {rule} of DENY policy {policy}")
            }
            Reason::AllowedBy { policy, rule } => {
                write!(f, "allowed by rule {rule} of ALLOW policy {policy}")
            }
            Reason::NoAllowPolicies => {
                f.write_str("no DENY policy matched and no ALLOW policy applies")
            }
            Reason::NoAllowMatched { policies } => {
                write!(
                    f,
                    "no ALLOW policy matched (applicable: {})",
                    policies.join(", ")
                )
            }
        }
    }
}

impl std::fmt::Display for Decision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: {}",
            if self.allowed { "ALLOW" } else { "DENY" },
            self.reason
        )?;
        if let Some(dry) = &self.dry_run {
            write!(
                f,
                " (dry-run policies would have {}: {})",
                if dry.allowed { "allowed" } else { "denied" },
                dry.reason
            )?;
        }
        Ok(())
    }
}

/// Receives explanation lines; the decision path uses [`NoTrace`].
pub trait Trace {
    /// Whether lines are wanted (so callers can skip building them).
    const ENABLED: bool;
    /// Records one line at an indentation depth.
    fn line(&mut self, depth: usize, text: String);
}

/// Records nothing.
#[derive(Debug, Default)]
pub struct NoTrace;

impl Trace for NoTrace {
    const ENABLED: bool = false;
    fn line(&mut self, _depth: usize, _text: String) {}
}

/// Records lines for [`PolicyStore::explain`].
#[derive(Debug, Default)]
pub struct TextTrace {
    /// The explanation so far.
    pub text: String,
}

impl Trace for TextTrace {
    const ENABLED: bool = true;
    fn line(&mut self, depth: usize, text: String) {
        for _ in 0..depth {
            self.text.push_str("  ");
        }
        self.text.push_str(&text);
        self.text.push('\n');
    }
}

macro_rules! trace {
    ($t:expr, $depth:expr, $($arg:tt)*) => {
        if T::ENABLED {
            $t.line($depth, format!($($arg)*));
        }
    };
}

/// All policies, indexed so that finding those that apply to a workload costs time proportional
/// to their number, not to the size of the store.
#[derive(Debug, Clone)]
pub struct PolicyStore {
    root_namespace: String,
    policies: HashMap<String, Arc<Policy>>,
    /// Keys of GLOBAL policies.
    global: Vec<String>,
    /// Keys of NAMESPACE policies, by namespace.
    by_namespace: HashMap<String, Vec<String>>,
    /// Keys of WORKLOAD_SELECTOR policies with label selectors (from YAML), by namespace.
    selectors: HashMap<String, Vec<String>>,
}

impl PolicyStore {
    /// An empty store; `root_namespace` (Istio's `istio-system`) is where selector policies
    /// apply mesh-wide.
    pub fn new(root_namespace: &str) -> Self {
        PolicyStore {
            root_namespace: root_namespace.to_owned(),
            policies: HashMap::new(),
            global: Vec::new(),
            by_namespace: HashMap::new(),
            selectors: HashMap::new(),
        }
    }

    /// Adds or replaces a policy (by `namespace/name`).
    pub fn insert(&mut self, policy: Policy) {
        let key = policy.key();
        self.remove(&key);
        match policy.scope {
            Scope::Global => self.global.push(key.clone()),
            Scope::Namespace => self
                .by_namespace
                .entry(policy.namespace.clone())
                .or_default()
                .push(key.clone()),
            Scope::WorkloadSelector if !policy.selector.is_empty() => self
                .selectors
                .entry(policy.namespace.clone())
                .or_default()
                .push(key.clone()),
            Scope::WorkloadSelector => {}
        }
        self.policies.insert(key, Arc::new(policy));
    }

    /// Removes a policy; returns it if it was there.
    pub fn remove(&mut self, key: &str) -> Option<Arc<Policy>> {
        let old = self.policies.remove(key)?;
        let drop_key = |list: &mut Vec<String>| list.retain(|k| k != key);
        match old.scope {
            Scope::Global => drop_key(&mut self.global),
            Scope::Namespace => {
                if let Some(list) = self.by_namespace.get_mut(&old.namespace) {
                    drop_key(list);
                }
            }
            Scope::WorkloadSelector => {
                if let Some(list) = self.selectors.get_mut(&old.namespace) {
                    drop_key(list);
                }
            }
        }
        Some(old)
    }

    /// A policy by `namespace/name`.
    pub fn get(&self, key: &str) -> Option<&Arc<Policy>> {
        self.policies.get(key)
    }

    /// Number of policies.
    pub fn len(&self) -> usize {
        self.policies.len()
    }

    /// Whether the store is empty.
    pub fn is_empty(&self) -> bool {
        self.policies.is_empty()
    }

    /// Every policy, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Policy>> {
        self.policies.values()
    }

    /// The policies that apply to `workload`, each once.
    pub fn applicable(&self, workload: &Workload) -> Vec<&Arc<Policy>> {
        let mut out = Vec::new();
        self.for_each_applicable(workload, |p| out.push(p));
        out
    }

    fn for_each_applicable<'a>(&'a self, workload: &Workload, mut f: impl FnMut(&'a Arc<Policy>)) {
        let get = |key: &String| self.policies.get(key);
        self.global.iter().filter_map(get).for_each(&mut f);
        if let Some(keys) = self.by_namespace.get(&workload.namespace) {
            keys.iter().filter_map(get).for_each(&mut f);
        }
        // Named by the workload (xDS). A name may also be a YAML selector policy that selects
        // the workload; skip those here, they are visited below.
        for key in &workload.policies {
            if let Some(p) = self.policies.get(key)
                && p.scope == Scope::WorkloadSelector
                && p.selector.is_empty()
            {
                f(p);
            }
        }
        let selects = |p: &Policy| {
            p.selector
                .iter()
                .all(|(k, v)| workload.labels.get(k) == Some(v))
        };
        let mut visit_selectors = |namespace: &str| {
            if let Some(keys) = self.selectors.get(namespace) {
                keys.iter()
                    .filter_map(get)
                    .filter(|p| selects(p))
                    .for_each(&mut f);
            }
        };
        visit_selectors(&workload.namespace);
        if workload.namespace != self.root_namespace {
            visit_selectors(&self.root_namespace);
        }
    }

    /// Authorizes `connection` to `workload`.
    pub fn decide(&self, connection: &Connection, workload: &Workload) -> Decision {
        self.evaluate(connection, workload, &mut NoTrace)
    }

    /// Authorizes `connection` to `workload` and explains every step.
    pub fn explain(&self, connection: &Connection, workload: &Workload) -> (Decision, String) {
        let mut trace = TextTrace::default();
        let decision = self.evaluate(connection, workload, &mut trace);
        (decision, trace.text)
    }

    fn evaluate<T: Trace>(
        &self,
        conn: &Connection,
        workload: &Workload,
        trace: &mut T,
    ) -> Decision {
        let facts = Facts::new(conn);
        trace!(
            trace,
            0,
            "connection {} -> {} from {}",
            conn.source,
            conn.destination,
            match &conn.peer {
                Some(p) => p.principal.to_string(),
                None => "no identity (plaintext)".to_owned(),
            }
        );
        trace!(
            trace,
            0, "workload in namespace {} with labels {:?}", workload.namespace, workload.labels
        );
        // Enforced and dry-run verdicts, computed in one pass over the applicable policies.
        let mut enforced = Verdict::default();
        let mut with_dry_run = Verdict::default();
        let mut any = false;
        self.for_each_applicable(workload, |policy| {
            any = true;
            let matched = eval_policy(policy, &facts, trace);
            with_dry_run.add(policy, matched);
            if !policy.dry_run {
                enforced.add(policy, matched);
            }
        });
        if !any {
            trace!(trace, 0, "no policy applies to this workload");
        }
        let (allowed, reason) = enforced.outcome();
        let (dry_allowed, dry_reason) = with_dry_run.outcome();
        let dry_run = (dry_allowed != allowed).then_some(DryRunOutcome {
            allowed: dry_allowed,
            reason: dry_reason,
        });
        let decision = Decision {
            allowed,
            reason,
            dry_run,
        };
        trace!(trace, 0, "decision: {decision}");
        decision
    }
}

/// Accumulates the policies' results in the order of the decision rule.
#[derive(Default)]
struct Verdict {
    deny: Option<(String, usize)>,
    allow: Option<(String, usize)>,
    allow_policies: Vec<String>,
}

impl Verdict {
    fn add(&mut self, policy: &Policy, matched: Option<usize>) {
        match policy.action {
            Action::Deny => {
                if let (None, Some(rule)) = (&self.deny, matched) {
                    self.deny = Some((policy.key(), rule));
                }
            }
            Action::Allow => {
                self.allow_policies.push(policy.key());
                if let (None, Some(rule)) = (&self.allow, matched) {
                    self.allow = Some((policy.key(), rule));
                }
            }
        }
    }

    fn outcome(&mut self) -> (bool, Reason) {
        if let Some((policy, rule)) = self.deny.take() {
            return (false, Reason::DeniedBy { policy, rule });
        }
        if self.allow_policies.is_empty() {
            return (true, Reason::NoAllowPolicies);
        }
        match self.allow.take() {
            Some((policy, rule)) => (true, Reason::AllowedBy { policy, rule }),
            None => {
                let mut policies = std::mem::take(&mut self.allow_policies);
                policies.sort();
                (false, Reason::NoAllowMatched { policies })
            }
        }
    }
}

/// What is known about a connection, prepared once for all policies.
struct Facts<'a> {
    principal: &'a str,
    namespace: &'a str,
    service_account: &'a str,
    source_ip: IpAddr,
    destination_ip: IpAddr,
    destination_port: u16,
}

impl<'a> Facts<'a> {
    fn new(conn: &'a Connection) -> Self {
        let (principal, namespace, service_account) = match &conn.peer {
            Some(p) => (&*p.principal, &*p.namespace, &*p.service_account),
            None => ("", "", ""),
        };
        Facts {
            principal,
            namespace,
            service_account,
            source_ip: canonical(conn.source.ip()),
            destination_ip: canonical(conn.destination.ip()),
            destination_port: conn.destination.port(),
        }
    }
}

/// IPv4-mapped IPv6 addresses compare as IPv4.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Returns the index of the first matching rule.
fn eval_policy<T: Trace>(policy: &Policy, facts: &Facts<'_>, trace: &mut T) -> Option<usize> {
    trace!(
        trace,
        0,
        "policy {} ({}{}, {:?} scope, {} rule(s))",
        policy.key(),
        policy.action,
        if policy.dry_run { ", dry-run" } else { "" },
        policy.scope,
        policy.rules.len()
    );
    if policy.rules.is_empty() {
        trace!(trace, 1, "has no rules, so it never matches");
    }
    for (i, rule) in policy.rules.iter().enumerate() {
        if eval_rule(rule, i, facts, trace) {
            trace!(trace, 1, "rule {i} matches: the policy matches");
            return Some(i);
        }
    }
    if !policy.rules.is_empty() {
        trace!(trace, 1, "no rule matches");
    }
    None
}

fn eval_rule<T: Trace>(rule: &Rule, index: usize, facts: &Facts<'_>, trace: &mut T) -> bool {
    if rule.clauses.is_empty() {
        trace!(
            trace,
            1, "rule {index} has no clauses: it matches everything"
        );
        return true;
    }
    for (c, clause) in rule.clauses.iter().enumerate() {
        if clause.matches.is_empty() {
            trace!(
                trace,
                2, "rule {index} clause {c} has no matches: it counts as a match"
            );
            continue;
        }
        let mut any = false;
        for (m, matcher) in clause.matches.iter().enumerate() {
            if eval_match(matcher, facts, trace, index, c, m) {
                any = true;
                break;
            }
        }
        if !any {
            trace!(trace, 1, "rule {index} fails at clause {c}");
            return false;
        }
    }
    true
}

fn eval_match<T: Trace>(
    m: &Match,
    facts: &Facts<'_>,
    trace: &mut T,
    rule: usize,
    clause: usize,
    index: usize,
) -> bool {
    let at = |field: &str| format!("rule {rule} clause {clause} match {index}: {field}");
    if m.is_empty() {
        trace!(
            trace,
            2,
            "{}",
            at("every field is empty, so it never matches")
        );
        return false;
    }
    let strings = |pos: &[StringMatch], neg: &[StringMatch], value: &str| {
        (pos.is_empty() || pos.iter().any(|p| p.matches(value)))
            && !neg.iter().any(|p| p.matches(value))
    };
    let nets = |pos: &[IpNet], neg: &[IpNet], ip: IpAddr| {
        (pos.is_empty() || pos.iter().any(|n| n.contains(&ip)))
            && !neg.iter().any(|n| n.contains(&ip))
    };
    let ports = |pos: &[u16], neg: &[u16], port: u16| {
        (pos.is_empty() || pos.contains(&port)) && !neg.contains(&port)
    };
    let sa_matches = |sa: &ServiceAccountMatch| {
        !facts.service_account.is_empty()
            && sa.namespace == facts.namespace
            && sa.name == facts.service_account
    };
    let sas = |pos: &[ServiceAccountMatch], neg: &[ServiceAccountMatch]| {
        (pos.is_empty() || pos.iter().any(sa_matches)) && !neg.iter().any(sa_matches)
    };
    let checks: [(&str, bool, &dyn Fn() -> String); 6] = [
        (
            "namespaces",
            strings(&m.namespaces, &m.not_namespaces, facts.namespace),
            &|| {
                describe(
                    "source namespace",
                    facts.namespace,
                    &m.namespaces,
                    &m.not_namespaces,
                )
            },
        ),
        (
            "principals",
            strings(&m.principals, &m.not_principals, facts.principal),
            &|| {
                describe(
                    "source principal",
                    facts.principal,
                    &m.principals,
                    &m.not_principals,
                )
            },
        ),
        (
            "source IPs",
            nets(&m.source_ips, &m.not_source_ips, facts.source_ip),
            &|| {
                describe(
                    "source IP",
                    facts.source_ip,
                    &m.source_ips,
                    &m.not_source_ips,
                )
            },
        ),
        (
            "destination IPs",
            nets(
                &m.destination_ips,
                &m.not_destination_ips,
                facts.destination_ip,
            ),
            &|| {
                describe(
                    "destination IP",
                    facts.destination_ip,
                    &m.destination_ips,
                    &m.not_destination_ips,
                )
            },
        ),
        (
            "destination ports",
            ports(
                &m.destination_ports,
                &m.not_destination_ports,
                facts.destination_port,
            ),
            &|| {
                describe(
                    "destination port",
                    facts.destination_port,
                    &m.destination_ports,
                    &m.not_destination_ports,
                )
            },
        ),
        (
            "service accounts",
            sas(&m.service_accounts, &m.not_service_accounts),
            &|| {
                describe(
                    "source service account",
                    format!("{}/{}", facts.namespace, facts.service_account),
                    &m.service_accounts,
                    &m.not_service_accounts,
                )
            },
        ),
    ];
    for (_name, ok, why) in &checks {
        if !ok {
            trace!(trace, 2, "{}", at(&format!("fails: {}", why())));
            return false;
        }
    }
    trace!(trace, 2, "{}", at("matches"));
    true
}

fn describe<V: std::fmt::Display, P: std::fmt::Display>(
    what: &str,
    value: V,
    pos: &[P],
    neg: &[P],
) -> String {
    let list = |items: &[P]| {
        items
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    };
    let value = value.to_string();
    let shown = if value.is_empty() {
        "(none)".to_owned()
    } else {
        value
    };
    let mut out = format!("{what} {shown}");
    if !pos.is_empty() {
        let _ = write!(out, " must be one of [{}]", list(pos));
    }
    if !neg.is_empty() {
        let _ = write!(
            out,
            "{} must not be one of [{}]",
            if pos.is_empty() { "" } else { " and" },
            list(neg)
        );
    }
    out
}

/// Labels parsed from `k=v,k2=v2` (the CLI's `--labels`).
pub fn parse_labels(text: &str) -> Result<BTreeMap<String, String>, String> {
    let mut labels = BTreeMap::new();
    for pair in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (k, v) = pair
            .split_once('=')
            .ok_or_else(|| format!("label {pair:?} is not key=value"))?;
        labels.insert(k.trim().to_owned(), v.trim().to_owned());
    }
    Ok(labels)
}
