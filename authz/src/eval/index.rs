//! Policies compiled and indexed by what their rules require (a principal, a namespace, an
//! IP), so a connection visits only the policies that could match it.

use super::*;

/// A policy with what the evaluator precomputes for it.
#[derive(Debug)]
pub(super) struct Compiled {
    pub(super) policy: Arc<Policy>,
    pub(super) key: String,
    /// The flat form the decision path evaluates (for policies outside buckets; bucket
    /// policies are evaluated from the bucket's concatenated arena).
    pub(super) flat: FlatArena,
    /// `Some(keys)`: the policy can only match a connection whose principal or namespace matches
    /// one of these patterns (every rule has a clause whose matches all list principals, or all
    /// list namespaces). `None`: it may match anything and is always examined.
    pub(super) keys: Option<Vec<IndexKey>>,
}

/// Which connection attribute a string index key constrains.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) enum Field {
    Principal = 0,
    Namespace = 1,
}

/// One pattern a candidate must satisfy.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) enum IndexKey {
    /// A principal or namespace pattern.
    Text { field: Field, pattern: StringMatch },
    /// A source address block.
    SourceNet(IpNet),
    /// A destination port.
    Port(u16),
}

/// The policies of one scope bucket, with a lazily built pattern index.
#[derive(Debug, Clone, Default)]
pub(super) struct Bucket {
    pub(super) policies: Vec<Arc<Compiled>>,
    pub(super) index: OnceLock<Arc<BucketIndex>>,
}

/// Positions (in `Bucket::policies`) of the policies keyed by each pattern, per field.
#[derive(Debug, Default)]
pub(super) struct BucketIndex {
    pub(super) exact: [FxMap<Arc<str>, Vec<u32>>; 2],
    pub(super) prefix: [FxMap<Arc<str>, Vec<u32>>; 2],
    pub(super) suffix: [FxMap<Arc<str>, Vec<u32>>; 2],
    pub(super) presence: [Vec<u32>; 2],
    pub(super) source_nets: FxMap<IpNet, Vec<u32>>,
    /// Distinct (is IPv4, prefix length) pairs among `source_nets`, for lookups.
    pub(super) source_lens: Vec<(bool, u8)>,
    pub(super) ports: FxMap<u16, Vec<u32>>,
    /// Positions of policies that may match anything.
    pub(super) residual: Vec<u32>,
    /// Whether an enforced ALLOW policy is in the bucket.
    pub(super) enforced_allow: bool,
    /// Whether any ALLOW policy (dry-run included) is in the bucket.
    pub(super) any_allow: bool,
    /// The bucket's policies in flat form, contiguous, in bucket order.
    pub(super) arena: FlatArena,
}

/// What a visitor is told about a policy: already evaluated (flat form), or to be evaluated.
pub(super) enum Visit<'a> {
    /// Evaluate it yourself (tracing, or a policy outside the buckets).
    Evaluate,
    /// Evaluate policy `.1` of this arena.
    Arena(&'a FlatArena, u32),
}

impl Bucket {
    pub(super) fn push(&mut self, c: Arc<Compiled>) {
        self.policies.push(c);
        self.index = OnceLock::new();
    }

    pub(super) fn remove(&mut self, key: &str) {
        self.policies.retain(|c| c.key != key);
        self.index = OnceLock::new();
    }

    pub(super) fn index(&self) -> &BucketIndex {
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
    pub(super) fn visit<'a, T: Trace>(
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
    pub(super) fn collect(&self, field: Field, value: &str, out: &mut Vec<u32>) {
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
    pub(super) fn new(policy: Policy, interner: &mut Interner) -> Self {
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
pub(super) fn index_keys(policy: &Policy) -> Option<Vec<IndexKey>> {
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
