//! One connection against the applicable policies: the facts of the connection, each policy's
//! rules and matches, and the verdict they add up to.

use super::*;

/// The enforced verdict and the one with dry-run policies enforced too.
#[derive(Default)]
pub(super) struct Verdicts<'a> {
    pub(super) enforced: Verdict<'a>,
    pub(super) with_dry_run: Verdict<'a>,
    /// From bucket indexes: an (enforced / any) ALLOW policy applies, visited or not.
    pub(super) enforced_allow: bool,
    pub(super) any_allow: bool,
}

impl<'a> Verdicts<'a> {
    pub(super) fn add(&mut self, c: &'a Compiled, matched: Option<usize>) {
        self.with_dry_run.add(c, matched);
        if !c.policy.dry_run {
            self.enforced.add(c, matched);
        }
    }

    pub(super) fn note_allow(&mut self, enforced: bool, any: bool) {
        self.enforced_allow |= enforced;
        self.any_allow |= any;
    }

    pub(super) fn merge_notes(&mut self, notes: &Verdicts<'_>) {
        self.enforced.allow_applies |= notes.enforced_allow;
        self.with_dry_run.allow_applies |= notes.any_allow;
    }
}

/// Accumulates the policies' results in the order of the decision rule.
#[derive(Default)]
pub(super) struct Verdict<'a> {
    pub(super) deny: Option<(&'a str, usize)>,
    pub(super) allow: Option<(&'a str, usize)>,
    pub(super) allow_applies: bool,
}

impl<'a> Verdict<'a> {
    pub(super) fn add(&mut self, c: &'a Compiled, matched: Option<usize>) {
        match c.policy.action {
            Action::Deny => {
                if let (None, Some(rule)) = (&self.deny, matched) {
                    self.deny = Some((&c.key, rule));
                }
            }
            Action::Allow => {
                self.allow_applies = true;
                if let (None, Some(rule)) = (&self.allow, matched) {
                    self.allow = Some((&c.key, rule));
                }
            }
        }
    }

    pub(super) fn outcome(&self, allow_keys: impl FnOnce() -> Vec<String>) -> (bool, Reason) {
        if let Some((policy, rule)) = self.deny {
            return (
                false,
                Reason::DeniedBy {
                    policy: policy.to_owned(),
                    rule,
                },
            );
        }
        if !self.allow_applies {
            return (true, Reason::NoAllowPolicies);
        }
        match self.allow {
            Some((policy, rule)) => (
                true,
                Reason::AllowedBy {
                    policy: policy.to_owned(),
                    rule,
                },
            ),
            None => (
                false,
                Reason::NoAllowMatched {
                    policies: allow_keys(),
                },
            ),
        }
    }
}

/// What is known about a connection, prepared once for all policies.
pub(super) struct Facts<'a> {
    pub(super) principal: &'a str,
    pub(super) namespace: &'a str,
    pub(super) service_account: &'a str,
    pub(super) source_ip: IpAddr,
    pub(super) destination_ip: IpAddr,
    pub(super) destination_port: u16,
}

impl<'a> Facts<'a> {
    /// The same facts with interned ids, for the flat evaluator.
    pub(super) fn flat(&self, interner: &Interner) -> FlatFacts<'a> {
        FlatFacts {
            principal: self.principal,
            principal_id: interner.lookup(self.principal),
            namespace: self.namespace,
            namespace_id: interner.lookup(self.namespace),
            service_account_id: interner.lookup(self.service_account),
            has_service_account: !self.service_account.is_empty(),
            source_ip: self.source_ip,
            destination_ip: self.destination_ip,
            destination_port: self.destination_port,
        }
    }

    /// Facts of no connection, for walking policies without deciding.
    pub(super) fn empty() -> Self {
        Facts {
            principal: "",
            namespace: "",
            service_account: "",
            source_ip: IpAddr::from([0, 0, 0, 0]),
            destination_ip: IpAddr::from([0, 0, 0, 0]),
            destination_port: 0,
        }
    }

    pub(super) fn new(conn: &'a Connection) -> Self {
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
pub(super) fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Returns the index of the first matching rule.
pub(super) fn eval_policy<T: Trace>(
    c: &Compiled,
    facts: &Facts<'_>,
    trace: &mut T,
) -> Option<usize> {
    let policy = &c.policy;
    trace!(
        trace,
        0,
        "policy {} ({}{}, {:?} scope, {} rule(s))",
        c.key,
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

pub(super) fn eval_rule<T: Trace>(
    rule: &Rule,
    index: usize,
    facts: &Facts<'_>,
    trace: &mut T,
) -> bool {
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

pub(super) fn eval_match<T: Trace>(
    m: &Match,
    facts: &Facts<'_>,
    trace: &mut T,
    rule: usize,
    clause: usize,
    index: usize,
) -> bool {
    let at = |text: String| format!("rule {rule} clause {clause} match {index}: {text}");
    if m.is_empty() {
        trace!(
            trace,
            2,
            "{}",
            at("every field is empty, so it never matches".into())
        );
        return false;
    }
    macro_rules! field {
        ($ok:expr, $what:expr, $value:expr, $pos:expr, $neg:expr) => {
            if !$ok {
                trace!(
                    trace,
                    2,
                    "{}",
                    at(format!("fails: {}", describe($what, $value, $pos, $neg)))
                );
                return false;
            }
        };
    }
    field!(
        strings(&m.principals, &m.not_principals, facts.principal),
        "source principal",
        facts.principal,
        &m.principals,
        &m.not_principals
    );
    field!(
        strings(&m.namespaces, &m.not_namespaces, facts.namespace),
        "source namespace",
        facts.namespace,
        &m.namespaces,
        &m.not_namespaces
    );
    field!(
        ports(
            &m.destination_ports,
            &m.not_destination_ports,
            facts.destination_port
        ),
        "destination port",
        facts.destination_port,
        &m.destination_ports,
        &m.not_destination_ports
    );
    field!(
        nets(&m.source_ips, &m.not_source_ips, facts.source_ip),
        "source IP",
        facts.source_ip,
        &m.source_ips,
        &m.not_source_ips
    );
    field!(
        nets(
            &m.destination_ips,
            &m.not_destination_ips,
            facts.destination_ip
        ),
        "destination IP",
        facts.destination_ip,
        &m.destination_ips,
        &m.not_destination_ips
    );
    field!(
        service_accounts(&m.service_accounts, &m.not_service_accounts, facts),
        "source service account",
        format!("{}/{}", facts.namespace, facts.service_account),
        &m.service_accounts,
        &m.not_service_accounts
    );
    trace!(trace, 2, "{}", at("matches".into()));
    true
}

pub(super) fn strings(pos: &[StringMatch], neg: &[StringMatch], value: &str) -> bool {
    (pos.is_empty() || pos.iter().any(|p| p.matches(value)))
        && !neg.iter().any(|p| p.matches(value))
}

pub(super) fn nets(pos: &[IpNet], neg: &[IpNet], ip: IpAddr) -> bool {
    (pos.is_empty() || pos.iter().any(|n| n.contains(&ip))) && !neg.iter().any(|n| n.contains(&ip))
}

pub(super) fn ports(pos: &[u16], neg: &[u16], port: u16) -> bool {
    (pos.is_empty() || pos.contains(&port)) && !neg.contains(&port)
}

pub(super) fn service_accounts(
    pos: &[ServiceAccountMatch],
    neg: &[ServiceAccountMatch],
    facts: &Facts<'_>,
) -> bool {
    let is = |sa: &ServiceAccountMatch| {
        !facts.service_account.is_empty()
            && sa.namespace == facts.namespace
            && sa.name == facts.service_account
    };
    (pos.is_empty() || pos.iter().any(is)) && !neg.iter().any(is)
}

pub(super) fn describe<V: std::fmt::Display, P: std::fmt::Display>(
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
