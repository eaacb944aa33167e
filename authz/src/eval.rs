//! The evaluator: which policies apply to a workload, and what they decide for a connection.
//!
//! Decision for a connection to workload W (DESIGN.md): any matching DENY -> deny; else no ALLOW
//! policy applies -> allow; else allow iff some ALLOW matches. Dry-run policies are evaluated
//! the same way on the side and reported when they would have changed the outcome.
//!
//! Two checks come first and fail closed: a store marked not synced denies everything, and a
//! workload that names a policy the store does not hold (not received yet, rejected, renamed) is
//! denied, since the missing policy might have been its only ALLOW or a DENY.
//!
//! The same code computes decisions and explanations: evaluation is generic over a [`Trace`]
//! sink, and the decision path uses one that does nothing (and compiles away).

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::net::IpAddr;
use std::sync::{Arc, OnceLock};

use ipnet::IpNet;

use crate::flat::{FlatArena, FlatFacts, FxMap, Interner};
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
#[non_exhaustive]
pub enum Reason {
    /// The store has not received its first complete set of policies: denied.
    NotSynced,
    /// The workload names policies the store does not hold: denied.
    MissingPolicies {
        /// `namespace/name` of each missing policy.
        policies: Vec<String>,
    },
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
            Reason::NotSynced => f.write_str(
                "the policy store is not synced yet (no complete set of policies received), so every connection is denied",
            ),
            Reason::MissingPolicies { policies } => write!(
                f,
                "the workload names policies that are not in the store ({}): not received, rejected or renamed; denied until they arrive",
                policies.join(", ")
            ),
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
/// to their number, not to the size of the store; and, within a namespace (or the global set),
/// indexed by the exact principals their rules require, so that a decision looks only at the
/// policies that could match the connection's identity.
#[derive(Debug, Clone)]
pub struct PolicyStore {
    root_namespace: String,
    interner: Interner,
    policies: HashMap<String, Arc<Compiled>>,
    /// GLOBAL policies.
    global: Bucket,
    /// NAMESPACE policies, by namespace.
    by_namespace: HashMap<String, Bucket>,
    /// WORKLOAD_SELECTOR policies with label selectors (from YAML), by namespace.
    selectors: HashMap<String, Vec<Arc<Compiled>>>,
    /// False until the owner says the store holds a complete set; decisions deny meanwhile.
    synced: bool,
}

/// A policy with what the evaluator precomputes for it.
#[derive(Debug)]
struct Compiled {
    policy: Arc<Policy>,
    key: String,
    /// The flat form the decision path evaluates (for policies outside buckets; bucket
    /// policies are evaluated from the bucket's concatenated arena).
    flat: FlatArena,
    /// `Some(keys)`: the policy can only match a connection whose principal or namespace matches
    /// one of these patterns (every rule has a clause whose matches all list principals, or all
    /// list namespaces). `None`: it may match anything and is always examined.
    keys: Option<Vec<IndexKey>>,
}

/// Which connection attribute a string index key constrains.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Field {
    Principal = 0,
    Namespace = 1,
}

/// One pattern a candidate must satisfy.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum IndexKey {
    /// A principal or namespace pattern.
    Text { field: Field, pattern: StringMatch },
    /// A source address block.
    SourceNet(IpNet),
    /// A destination port.
    Port(u16),
}

/// The policies of one scope bucket, with a lazily built pattern index.
#[derive(Debug, Clone, Default)]
struct Bucket {
    policies: Vec<Arc<Compiled>>,
    index: OnceLock<Arc<BucketIndex>>,
}

/// Positions (in `Bucket::policies`) of the policies keyed by each pattern, per field.
#[derive(Debug, Default)]
struct BucketIndex {
    exact: [FxMap<Arc<str>, Vec<u32>>; 2],
    prefix: [FxMap<Arc<str>, Vec<u32>>; 2],
    suffix: [FxMap<Arc<str>, Vec<u32>>; 2],
    presence: [Vec<u32>; 2],
    source_nets: FxMap<IpNet, Vec<u32>>,
    /// Distinct (is IPv4, prefix length) pairs among `source_nets`, for lookups.
    source_lens: Vec<(bool, u8)>,
    ports: FxMap<u16, Vec<u32>>,
    /// Positions of policies that may match anything.
    residual: Vec<u32>,
    /// Whether an enforced ALLOW policy is in the bucket.
    enforced_allow: bool,
    /// Whether any ALLOW policy (dry-run included) is in the bucket.
    any_allow: bool,
    /// The bucket's policies in flat form, contiguous, in bucket order.
    arena: FlatArena,
}

/// What a visitor is told about a policy: already evaluated (flat form), or to be evaluated.
enum Visit<'a> {
    /// Evaluate it yourself (tracing, or a policy outside the buckets).
    Evaluate,
    /// Evaluate policy `.1` of this arena.
    Arena(&'a FlatArena, u32),
}

impl Bucket {
    fn push(&mut self, c: Arc<Compiled>) {
        self.policies.push(c);
        self.index = OnceLock::new();
    }

    fn remove(&mut self, key: &str) {
        self.policies.retain(|c| c.key != key);
        self.index = OnceLock::new();
    }

    fn index(&self) -> &BucketIndex {
        self.index.get_or_init(|| {
            let mut index = BucketIndex {
                arena: FlatArena::concat(self.policies.iter().map(|c| &c.flat)),
                ..BucketIndex::default()
            };
            for (i, c) in self.policies.iter().enumerate() {
                let i = i as u32;
                if c.policy.action == Action::Allow {
                    index.any_allow = true;
                    index.enforced_allow |= !c.policy.dry_run;
                }
                let Some(keys) = &c.keys else {
                    index.residual.push(i);
                    continue;
                };
                for key in keys {
                    let list = match key {
                        IndexKey::Text { field, pattern } => {
                            let f = *field as usize;
                            match pattern {
                                StringMatch::Exact(v) => {
                                    index.exact[f].entry(Arc::from(v.as_str())).or_default()
                                }
                                StringMatch::Prefix(v) => {
                                    index.prefix[f].entry(Arc::from(v.as_str())).or_default()
                                }
                                StringMatch::Suffix(v) => {
                                    index.suffix[f].entry(Arc::from(v.as_str())).or_default()
                                }
                                StringMatch::Presence => &mut index.presence[f],
                            }
                        }
                        IndexKey::SourceNet(net) => {
                            let len = (matches!(net, IpNet::V4(_)), net.prefix_len());
                            if !index.source_lens.contains(&len) {
                                index.source_lens.push(len);
                            }
                            index.source_nets.entry(*net).or_default()
                        }
                        IndexKey::Port(port) => index.ports.entry(*port).or_default(),
                    };
                    if list.last() != Some(&i) {
                        list.push(i);
                    }
                }
            }
            Arc::new(index)
        })
    }

    /// Visits, in insertion order, the policies that could match the connection (all of them
    /// when tracing, so explanations show every applicable policy).
    fn visit<'a, T: Trace>(
        &'a self,
        facts: &Facts<'_>,
        verdicts: &mut Verdicts<'a>,
        mut f: impl FnMut(&'a Compiled, Visit<'a>),
    ) {
        if self.policies.is_empty() {
            return;
        }
        if T::ENABLED {
            self.policies.iter().for_each(|c| f(c, Visit::Evaluate));
            return;
        }
        let index = self.index();
        verdicts.note_allow(index.enforced_allow, index.any_allow);
        let mut hits: Vec<u32> = index.residual.clone();
        for (field, value) in [
            (Field::Principal, facts.principal),
            (Field::Namespace, facts.namespace),
        ] {
            index.collect(field, value, &mut hits);
        }
        let v4 = facts.source_ip.is_ipv4();
        for &(_, len) in index.source_lens.iter().filter(|(is_v4, _)| *is_v4 == v4) {
            if let Ok(net) = IpNet::new(facts.source_ip, len)
                && let Some(list) = index.source_nets.get(&net.trunc())
            {
                hits.extend_from_slice(list);
            }
        }
        if let Some(list) = index.ports.get(&facts.destination_port) {
            hits.extend_from_slice(list);
        }
        hits.sort_unstable();
        hits.dedup();
        for i in hits {
            f(&self.policies[i as usize], Visit::Arena(&index.arena, i));
        }
    }
}

impl BucketIndex {
    /// Adds the positions of policies with a pattern on `field` that `value` satisfies.
    fn collect(&self, field: Field, value: &str, out: &mut Vec<u32>) {
        let f = field as usize;
        if let Some(list) = self.exact[f].get(value) {
            out.extend_from_slice(list);
        }
        if !self.prefix[f].is_empty() {
            for end in (0..=value.len()).filter(|&i| value.is_char_boundary(i)) {
                if let Some(list) = self.prefix[f].get(&value[..end]) {
                    out.extend_from_slice(list);
                }
            }
        }
        if !self.suffix[f].is_empty() {
            for start in (0..=value.len()).filter(|&i| value.is_char_boundary(i)) {
                if let Some(list) = self.suffix[f].get(&value[start..]) {
                    out.extend_from_slice(list);
                }
            }
        }
        if !value.is_empty() {
            out.extend_from_slice(&self.presence[f]);
        }
    }
}

impl Compiled {
    fn new(policy: Policy, interner: &mut Interner) -> Self {
        let keys = index_keys(&policy);
        Compiled {
            flat: FlatArena::single(&policy, interner),
            key: policy.key(),
            policy: Arc::new(policy),
            keys,
        }
    }
}

/// The keys one of which every match of a policy requires, if there are such. Each rule must
/// have a clause whose matches all constrain the same attribute with a positive list; the most
/// selective such attribute is used (principal, namespace, source address, destination port),
/// and the values of that clause become the rule's keys.
fn index_keys(policy: &Policy) -> Option<Vec<IndexKey>> {
    type Extract = fn(&Match) -> Vec<IndexKey>;
    let extractors: [Extract; 4] = [
        |m| {
            m.principals
                .iter()
                .map(|p| IndexKey::Text {
                    field: Field::Principal,
                    pattern: p.clone(),
                })
                .collect()
        },
        |m| {
            m.namespaces
                .iter()
                .map(|p| IndexKey::Text {
                    field: Field::Namespace,
                    pattern: p.clone(),
                })
                .collect()
        },
        |m| {
            m.source_ips
                .iter()
                .map(|n| IndexKey::SourceNet(n.trunc()))
                .collect()
        },
        |m| {
            m.destination_ports
                .iter()
                .map(|p| IndexKey::Port(*p))
                .collect()
        },
    ];
    let mut keys = Vec::new();
    for rule in &policy.rules {
        let keyed = extractors.iter().find_map(|extract| {
            rule.clauses.iter().find_map(|c| {
                let per_match: Vec<Vec<IndexKey>> = c.matches.iter().map(extract).collect();
                (!per_match.is_empty() && per_match.iter().all(|k| !k.is_empty()))
                    .then(|| per_match.into_iter().flatten().collect::<Vec<_>>())
            })
        })?;
        keys.extend(keyed);
    }
    Some(keys)
}

impl PolicyStore {
    /// An empty store; `root_namespace` (Istio's `istio-system`) is where selector policies
    /// apply mesh-wide.
    pub fn new(root_namespace: &str) -> Self {
        PolicyStore {
            root_namespace: root_namespace.to_owned(),
            interner: Interner::default(),
            policies: HashMap::new(),
            global: Bucket::default(),
            by_namespace: HashMap::new(),
            selectors: HashMap::new(),
            synced: true,
        }
    }

    /// Marks the store synced (it holds a complete set of policies) or not. A new store is
    /// synced; a proxy fed by xDS marks it not synced until the first complete response, and
    /// while it is not, every decision is a deny with [`Reason::NotSynced`].
    pub fn set_synced(&mut self, synced: bool) {
        self.synced = synced;
    }

    /// Whether the store is marked synced.
    pub fn is_synced(&self) -> bool {
        self.synced
    }

    /// Adds or replaces a policy (by `namespace/name`).
    pub fn insert(&mut self, policy: Policy) {
        let compiled = Arc::new(Compiled::new(policy, &mut self.interner));
        let key = compiled.key.clone();
        self.remove(&key);
        let p = &compiled.policy;
        match p.scope {
            Scope::Global => self.global.push(compiled.clone()),
            Scope::Namespace => self
                .by_namespace
                .entry(p.namespace.clone())
                .or_default()
                .push(compiled.clone()),
            Scope::WorkloadSelector if !p.selector.is_empty() => self
                .selectors
                .entry(p.namespace.clone())
                .or_default()
                .push(compiled.clone()),
            Scope::WorkloadSelector => {}
        }
        self.policies.insert(key, compiled);
    }

    /// Removes a policy; returns it if it was there.
    pub fn remove(&mut self, key: &str) -> Option<Arc<Policy>> {
        let old = self.policies.remove(key)?;
        match old.policy.scope {
            Scope::Global => self.global.remove(key),
            Scope::Namespace => {
                if let Some(bucket) = self.by_namespace.get_mut(&old.policy.namespace) {
                    bucket.remove(key);
                    if bucket.policies.is_empty() {
                        self.by_namespace.remove(&old.policy.namespace);
                    }
                }
            }
            Scope::WorkloadSelector => {
                if let Some(list) = self.selectors.get_mut(&old.policy.namespace) {
                    list.retain(|c| c.key != key);
                }
            }
        }
        Some(old.policy.clone())
    }

    /// A policy by `namespace/name`.
    pub fn get(&self, key: &str) -> Option<&Arc<Policy>> {
        self.policies.get(key).map(|c| &c.policy)
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
        self.policies.values().map(|c| &c.policy)
    }

    /// The policies that apply to `workload`, each once.
    pub fn applicable(&self, workload: &Workload) -> Vec<&Arc<Policy>> {
        let mut out = Vec::new();
        self.for_each_applicable(workload, |c| out.push(&c.policy));
        out
    }

    /// Visits every applicable policy (no index).
    fn for_each_applicable<'a>(&'a self, workload: &Workload, mut f: impl FnMut(&'a Compiled)) {
        let mut sink = Verdicts::default();
        let facts = Facts::empty();
        self.visit_candidates::<TextTrace>(workload, &facts, &mut sink, &mut |c, _| f(c));
    }

    /// Visits the applicable policies that could match the connection (all applicable ones when
    /// `T` traces), telling `verdicts` which ALLOW policies apply without visiting them.
    fn visit_candidates<'a, T: Trace>(
        &'a self,
        workload: &Workload,
        facts: &Facts<'_>,
        verdicts: &mut Verdicts<'a>,
        f: &mut impl FnMut(&'a Compiled, Visit<'a>),
    ) {
        self.global.visit::<T>(facts, verdicts, &mut *f);
        if let Some(bucket) = self.by_namespace.get(&workload.namespace) {
            bucket.visit::<T>(facts, verdicts, &mut *f);
        }
        // Named by the workload (xDS): always applies, whatever its selector says (a named
        // policy is never skipped for want of labels). YAML selector policies are matched by
        // labels below, unless the workload named them already.
        for key in &workload.policies {
            if let Some(c) = self.policies.get(key)
                && c.policy.scope == Scope::WorkloadSelector
            {
                f(c, Visit::Evaluate);
            }
        }
        let selects = |c: &Compiled| {
            !workload.policies.contains(&c.key)
                && c.policy
                    .selector
                    .iter()
                    .all(|(k, v)| workload.labels.get(k) == Some(v))
        };
        for namespace in [workload.namespace.as_str(), self.root_namespace.as_str()] {
            if let Some(list) = self.selectors.get(namespace) {
                list.iter()
                    .filter(|c| selects(c))
                    .for_each(|c| f(c, Visit::Evaluate));
            }
            if workload.namespace == self.root_namespace {
                break;
            }
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

    fn evaluate<'s, T: Trace>(
        &'s self,
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
        if let Some(reason) = self.fail_closed(workload) {
            let decision = Decision {
                allowed: false,
                reason,
                dry_run: None,
            };
            trace!(trace, 0, "decision: {decision}");
            return decision;
        }
        let mut verdicts: Verdicts<'s> = Verdicts::default();
        let mut any = false;
        // The flat form needs interned ids; look them up once, on the first policy evaluated.
        let flat_facts = std::cell::OnceCell::new();
        let mut visit = |c: &'s Compiled, how: Visit<'s>| {
            any = true;
            let matched = if T::ENABLED {
                eval_policy(c, &facts, trace)
            } else {
                let flat = flat_facts.get_or_init(|| facts.flat(&self.interner));
                match how {
                    Visit::Arena(arena, i) => arena.first_match(i, flat),
                    Visit::Evaluate => c.flat.first_match(0, flat),
                }
            };
            verdicts.add(c, matched);
        };
        // The index reports applicable ALLOW policies it skipped through `noted`.
        let mut noted = Verdicts::default();
        self.visit_candidates::<T>(workload, &facts, &mut noted, &mut visit);
        verdicts.merge_notes(&noted);
        if !any && !noted.enforced_allow && !noted.any_allow {
            trace!(trace, 0, "no policy applies to this workload");
        }
        let (allowed, reason) = verdicts
            .enforced
            .outcome(|| self.allow_keys(workload, false));
        let (dry_allowed, dry_reason) = verdicts
            .with_dry_run
            .outcome(|| self.allow_keys(workload, true));
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

    /// Why a decision must deny before any policy is evaluated: the store is not synced, or the
    /// workload names policies the store lacks.
    fn fail_closed(&self, workload: &Workload) -> Option<Reason> {
        if !self.synced {
            return Some(Reason::NotSynced);
        }
        if workload
            .policies
            .iter()
            .all(|key| self.policies.contains_key(key))
        {
            return None;
        }
        let mut missing: Vec<String> = workload
            .policies
            .iter()
            .filter(|key| !self.policies.contains_key(*key))
            .cloned()
            .collect();
        missing.sort();
        missing.dedup();
        Some(Reason::MissingPolicies { policies: missing })
    }

    /// The sorted keys of the ALLOW policies that apply to `workload` (for the deny reason).
    fn allow_keys(&self, workload: &Workload, include_dry_run: bool) -> Vec<String> {
        let mut keys = Vec::new();
        self.for_each_applicable(workload, |c| {
            if c.policy.action == Action::Allow && (include_dry_run || !c.policy.dry_run) {
                keys.push(c.key.clone());
            }
        });
        keys.sort();
        keys
    }
}

/// The enforced verdict and the one with dry-run policies enforced too.
#[derive(Default)]
struct Verdicts<'a> {
    enforced: Verdict<'a>,
    with_dry_run: Verdict<'a>,
    /// From bucket indexes: an (enforced / any) ALLOW policy applies, visited or not.
    enforced_allow: bool,
    any_allow: bool,
}

impl<'a> Verdicts<'a> {
    fn add(&mut self, c: &'a Compiled, matched: Option<usize>) {
        self.with_dry_run.add(c, matched);
        if !c.policy.dry_run {
            self.enforced.add(c, matched);
        }
    }

    fn note_allow(&mut self, enforced: bool, any: bool) {
        self.enforced_allow |= enforced;
        self.any_allow |= any;
    }

    fn merge_notes(&mut self, notes: &Verdicts<'_>) {
        self.enforced.allow_applies |= notes.enforced_allow;
        self.with_dry_run.allow_applies |= notes.any_allow;
    }
}

/// Accumulates the policies' results in the order of the decision rule.
#[derive(Default)]
struct Verdict<'a> {
    deny: Option<(&'a str, usize)>,
    allow: Option<(&'a str, usize)>,
    allow_applies: bool,
}

impl<'a> Verdict<'a> {
    fn add(&mut self, c: &'a Compiled, matched: Option<usize>) {
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

    fn outcome(&self, allow_keys: impl FnOnce() -> Vec<String>) -> (bool, Reason) {
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
struct Facts<'a> {
    principal: &'a str,
    namespace: &'a str,
    service_account: &'a str,
    source_ip: IpAddr,
    destination_ip: IpAddr,
    destination_port: u16,
}

impl<'a> Facts<'a> {
    /// The same facts with interned ids, for the flat evaluator.
    fn flat(&self, interner: &Interner) -> FlatFacts<'a> {
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
    fn empty() -> Self {
        Facts {
            principal: "",
            namespace: "",
            service_account: "",
            source_ip: IpAddr::from([0, 0, 0, 0]),
            destination_ip: IpAddr::from([0, 0, 0, 0]),
            destination_port: 0,
        }
    }

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
fn eval_policy<T: Trace>(c: &Compiled, facts: &Facts<'_>, trace: &mut T) -> Option<usize> {
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

fn strings(pos: &[StringMatch], neg: &[StringMatch], value: &str) -> bool {
    (pos.is_empty() || pos.iter().any(|p| p.matches(value)))
        && !neg.iter().any(|p| p.matches(value))
}

fn nets(pos: &[IpNet], neg: &[IpNet], ip: IpAddr) -> bool {
    (pos.is_empty() || pos.iter().any(|n| n.contains(&ip))) && !neg.iter().any(|n| n.contains(&ip))
}

fn ports(pos: &[u16], neg: &[u16], port: u16) -> bool {
    (pos.is_empty() || pos.contains(&port)) && !neg.contains(&port)
}

fn service_accounts(
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
