//! A compact, contiguous form of a policy for the decision path.
//!
//! The model (`Vec` of rules of `Vec` of clauses of `Vec` of 12-field matches, each field its own
//! `Vec` of heap strings) is pleasant to build and explain, but a decision that must examine
//! 100,000 rules spends its time waiting for memory, one pointer per field. Here each policy keeps
//! its rules, clauses and matches in a handful of flat arrays, exact strings become interned
//! numbers, and each match records which fields it uses. `explain` keeps using the model; tests
//! check that both reach the same decisions.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;

use crate::model::{Match, Policy, ServiceAccountMatch, StringMatch};

/// A fast, non-cryptographic hasher (the Fx mix) for the evaluator's maps. Their keys come from
/// policies (the control plane) and from verified peer identities, which a remote party cannot
/// choose freely, so flooding attacks on the hash are not a concern here.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct FxHasher(u64);

impl std::hash::Hasher for FxHasher {
    fn write(&mut self, bytes: &[u8]) {
        const K: u64 = 0x51_7c_c1_b7_27_22_0a_95;
        let mut chunks = bytes.chunks_exact(8);
        for chunk in &mut chunks {
            let word = u64::from_le_bytes(chunk.try_into().expect("8 bytes"));
            self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(K);
        }
        for &byte in chunks.remainder() {
            self.0 = (self.0.rotate_left(5) ^ u64::from(byte)).wrapping_mul(K);
        }
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// Map with the [`FxHasher`].
pub(crate) type FxMap<K, V> = HashMap<K, V, std::hash::BuildHasherDefault<FxHasher>>;

/// Interned strings: each distinct exact principal, namespace or service-account part gets a
/// number. Never shrinks (policies are few compared to memory).
#[derive(Debug, Clone, Default)]
pub(crate) struct Interner {
    ids: FxMap<Arc<str>, u32>,
}

/// The number of a string no policy mentions.
pub(crate) const UNKNOWN: u32 = u32::MAX;

impl Interner {
    fn intern(&mut self, s: &str) -> u32 {
        if let Some(id) = self.ids.get(s) {
            return *id;
        }
        let id = self.ids.len() as u32;
        self.ids.insert(Arc::from(s), id);
        id
    }

    /// The number of `s`, or [`UNKNOWN`].
    pub(crate) fn lookup(&self, s: &str) -> u32 {
        self.ids.get(s).copied().unwrap_or(UNKNOWN)
    }
}

/// A string pattern with exact strings interned.
#[derive(Debug, Clone)]
enum FlatStr {
    Exact(u32),
    Prefix(Box<str>),
    Suffix(Box<str>),
    Presence,
}

/// Field positions in [`FlatMatch::ranges`].
const NS: usize = 0;
const NOT_NS: usize = 1;
const PRINCIPAL: usize = 2;
const NOT_PRINCIPAL: usize = 3;
const SRC: usize = 4;
const NOT_SRC: usize = 5;
const DST: usize = 6;
const NOT_DST: usize = 7;
const PORT: usize = 8;
const NOT_PORT: usize = 9;
const SA: usize = 10;
const NOT_SA: usize = 11;

/// One match: for each field, a range into the arena's value arrays.
#[derive(Debug, Clone)]
struct FlatMatch {
    /// Bit `i` set when field `i` is non-empty.
    used: u16,
    ranges: [(u32, u32); 12],
}

/// Policies in flat form: one policy when compiled, a whole bucket's when concatenated (so that
/// scanning a bucket reads memory in order).
#[derive(Debug, Default)]
pub(crate) struct FlatArena {
    /// Per policy, its range of `rules`.
    policies: Vec<(u32, u32)>,
    /// Per rule, its range of `clauses`.
    rules: Vec<(u32, u32)>,
    /// Per clause, its range of `matches`.
    clauses: Vec<(u32, u32)>,
    matches: Vec<FlatMatch>,
    strs: Vec<FlatStr>,
    nets: Vec<IpNet>,
    ports: Vec<u16>,
    /// (namespace, name) interned.
    sas: Vec<(u32, u32)>,
}

/// The connection's facts as the flat form needs them.
#[derive(Debug, Clone, Copy)]
pub(crate) struct FlatFacts<'a> {
    pub(crate) principal: &'a str,
    pub(crate) principal_id: u32,
    pub(crate) namespace: &'a str,
    pub(crate) namespace_id: u32,
    pub(crate) service_account_id: u32,
    pub(crate) has_service_account: bool,
    pub(crate) source_ip: IpAddr,
    pub(crate) destination_ip: IpAddr,
    pub(crate) destination_port: u16,
}

impl FlatArena {
    /// Compiles one policy (it becomes policy 0), interning its exact strings.
    pub(crate) fn single(policy: &Policy, interner: &mut Interner) -> Self {
        let mut b = FlatArena {
            rules: Vec::with_capacity(policy.rules.len()),
            ..FlatArena::default()
        };
        for rule in &policy.rules {
            let start = b.clauses.len() as u32;
            for clause in &rule.clauses {
                let m_start = b.matches.len() as u32;
                for m in &clause.matches {
                    let flat = b.add_match(m, interner);
                    b.matches.push(flat);
                }
                b.clauses.push((m_start, b.matches.len() as u32));
            }
            b.rules.push((start, b.clauses.len() as u32));
        }
        b.policies.push((0, b.rules.len() as u32));
        b
    }

    /// Concatenates arenas in order: policy `i` of the result is the `i`-th policy given.
    pub(crate) fn concat<'a>(parts: impl Iterator<Item = &'a FlatArena>) -> Self {
        let mut out = FlatArena::default();
        for part in parts {
            let shift = |r: (u32, u32), by: usize| (r.0 + by as u32, r.1 + by as u32);
            let (rules, clauses, matches) = (out.rules.len(), out.clauses.len(), out.matches.len());
            let (strs, nets, ports, sas) = (
                out.strs.len(),
                out.nets.len(),
                out.ports.len(),
                out.sas.len(),
            );
            out.policies
                .extend(part.policies.iter().map(|r| shift(*r, rules)));
            out.rules
                .extend(part.rules.iter().map(|r| shift(*r, clauses)));
            out.clauses
                .extend(part.clauses.iter().map(|r| shift(*r, matches)));
            out.matches.extend(part.matches.iter().map(|m| {
                let mut m = m.clone();
                for (i, range) in m.ranges.iter_mut().enumerate() {
                    let by = match i {
                        NS | NOT_NS | PRINCIPAL | NOT_PRINCIPAL => strs,
                        SRC | NOT_SRC | DST | NOT_DST => nets,
                        PORT | NOT_PORT => ports,
                        _ => sas,
                    };
                    *range = shift(*range, by);
                }
                m
            }));
            out.strs.extend(part.strs.iter().cloned());
            out.nets.extend_from_slice(&part.nets);
            out.ports.extend_from_slice(&part.ports);
            out.sas.extend_from_slice(&part.sas);
        }
        out
    }

    /// The index of the first matching rule of policy `policy`, exactly as the model's
    /// evaluation decides it.
    pub(crate) fn first_match(&self, policy: u32, facts: &FlatFacts<'_>) -> Option<usize> {
        let (r0, r1) = self.policies[policy as usize];
        self.rules[r0 as usize..r1 as usize]
            .iter()
            .position(|&(c0, c1)| {
                self.clauses[c0 as usize..c1 as usize]
                    .iter()
                    .all(|&(m0, m1)| {
                        m0 == m1
                            || self.matches[m0 as usize..m1 as usize]
                                .iter()
                                .any(|m| self.match_ok(m, facts))
                    })
            })
    }

    /// Visits only the fields the match uses (set bits of `used`), failing at the first field
    /// that does not pass.
    #[inline]
    fn match_ok(&self, m: &FlatMatch, f: &FlatFacts<'_>) -> bool {
        if m.used == 0 {
            return false;
        }
        let mut bits = m.used;
        while bits != 0 {
            let i = bits.trailing_zeros() as usize;
            bits &= bits - 1;
            let (a, b) = m.ranges[i];
            let (a, b) = (a as usize, b as usize);
            let ok = match i {
                NS => self.strs[a..b]
                    .iter()
                    .any(|s| str_ok(s, f.namespace, f.namespace_id)),
                NOT_NS => !self.strs[a..b]
                    .iter()
                    .any(|s| str_ok(s, f.namespace, f.namespace_id)),
                PRINCIPAL => self.strs[a..b]
                    .iter()
                    .any(|s| str_ok(s, f.principal, f.principal_id)),
                NOT_PRINCIPAL => !self.strs[a..b]
                    .iter()
                    .any(|s| str_ok(s, f.principal, f.principal_id)),
                SRC => self.nets[a..b].iter().any(|n| n.contains(&f.source_ip)),
                NOT_SRC => !self.nets[a..b].iter().any(|n| n.contains(&f.source_ip)),
                DST => self.nets[a..b]
                    .iter()
                    .any(|n| n.contains(&f.destination_ip)),
                NOT_DST => !self.nets[a..b]
                    .iter()
                    .any(|n| n.contains(&f.destination_ip)),
                PORT => self.ports[a..b].contains(&f.destination_port),
                NOT_PORT => !self.ports[a..b].contains(&f.destination_port),
                SA => self.sas[a..b].iter().any(|sa| sa_ok(sa, f)),
                _ => !self.sas[a..b].iter().any(|sa| sa_ok(sa, f)),
            };
            if !ok {
                return false;
            }
        }
        true
    }
}

fn sa_ok(&(ns, name): &(u32, u32), f: &FlatFacts<'_>) -> bool {
    f.has_service_account && ns == f.namespace_id && name == f.service_account_id
}

#[inline]
fn str_ok(s: &FlatStr, text: &str, id: u32) -> bool {
    match s {
        FlatStr::Exact(e) => *e == id,
        FlatStr::Prefix(p) => text.starts_with(&**p),
        FlatStr::Suffix(x) => text.ends_with(&**x),
        FlatStr::Presence => !text.is_empty(),
    }
}

/// Compiling: the arena being filled is its own builder.
impl FlatArena {
    /// Flattens one match, appending its values to the arena's value lists.
    fn add_match(&mut self, m: &Match, interner: &mut Interner) -> FlatMatch {
        let mut flat = FlatMatch {
            used: 0,
            ranges: [(0, 0); 12],
        };
        let mut strs = |i: usize, list: &[StringMatch], b: &mut FlatArena, flat: &mut FlatMatch| {
            let start = b.strs.len() as u32;
            b.strs.extend(list.iter().map(|s| match s {
                StringMatch::Exact(v) => FlatStr::Exact(interner.intern(v)),
                StringMatch::Prefix(v) => FlatStr::Prefix(v.as_str().into()),
                StringMatch::Suffix(v) => FlatStr::Suffix(v.as_str().into()),
                StringMatch::Presence => FlatStr::Presence,
            }));
            set(flat, i, start, b.strs.len() as u32);
        };
        strs(NS, &m.namespaces, self, &mut flat);
        strs(NOT_NS, &m.not_namespaces, self, &mut flat);
        strs(PRINCIPAL, &m.principals, self, &mut flat);
        strs(NOT_PRINCIPAL, &m.not_principals, self, &mut flat);
        for (i, list) in [
            (SRC, &m.source_ips),
            (NOT_SRC, &m.not_source_ips),
            (DST, &m.destination_ips),
            (NOT_DST, &m.not_destination_ips),
        ] {
            let start = self.nets.len() as u32;
            self.nets.extend(list.iter().map(IpNet::trunc));
            set(&mut flat, i, start, self.nets.len() as u32);
        }
        for (i, list) in [
            (PORT, &m.destination_ports),
            (NOT_PORT, &m.not_destination_ports),
        ] {
            let start = self.ports.len() as u32;
            self.ports.extend_from_slice(list);
            set(&mut flat, i, start, self.ports.len() as u32);
        }
        let mut sas =
            |i: usize, list: &[ServiceAccountMatch], b: &mut FlatArena, flat: &mut FlatMatch| {
                let start = b.sas.len() as u32;
                b.sas.extend(
                    list.iter()
                        .map(|s| (interner.intern(&s.namespace), interner.intern(&s.name))),
                );
                set(flat, i, start, b.sas.len() as u32);
            };
        sas(SA, &m.service_accounts, self, &mut flat);
        sas(NOT_SA, &m.not_service_accounts, self, &mut flat);
        flat
    }
}

fn set(flat: &mut FlatMatch, i: usize, start: u32, end: u32) {
    flat.ranges[i] = (start, end);
    if end > start {
        flat.used |= 1 << i;
    }
}
