//! The policy store: every policy by key, which apply to a workload, and the decision for a
//! connection with the checks that fail closed first.

use super::*;

/// All policies, indexed so that finding those that apply to a workload costs time proportional
/// to their number, not to the size of the store; and, within a namespace (or the global set),
/// indexed by the exact principals their rules require, so that a decision looks only at the
/// policies that could match the connection's identity.
#[derive(Debug, Clone)]
pub struct PolicyStore {
    pub(super) root_namespace: String,
    pub(super) interner: Interner,
    pub(super) policies: HashMap<String, Arc<Compiled>>,
    /// GLOBAL policies.
    pub(super) global: Bucket,
    /// NAMESPACE policies, by namespace.
    pub(super) by_namespace: HashMap<String, Bucket>,
    /// WORKLOAD_SELECTOR policies with label selectors (from YAML), by namespace.
    pub(super) selectors: HashMap<String, Vec<Arc<Compiled>>>,
    /// False until the owner says the store holds a complete set; decisions deny meanwhile.
    pub(super) synced: bool,
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
    pub(super) fn for_each_applicable<'a>(
        &'a self,
        workload: &Workload,
        mut f: impl FnMut(&'a Compiled),
    ) {
        let mut sink = Verdicts::default();
        let facts = Facts::empty();
        self.visit_candidates::<TextTrace>(workload, &facts, &mut sink, &mut |c, _| f(c));
    }

    /// Visits the applicable policies that could match the connection (all applicable ones when
    /// `T` traces), telling `verdicts` which ALLOW policies apply without visiting them.
    pub(super) fn visit_candidates<'a, T: Trace>(
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

    pub(super) fn evaluate<'s, T: Trace>(
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
    pub(super) fn fail_closed(&self, workload: &Workload) -> Option<Reason> {
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
    pub(super) fn allow_keys(&self, workload: &Workload, include_dry_run: bool) -> Vec<String> {
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
