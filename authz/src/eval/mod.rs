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

macro_rules! trace {
    ($t:expr, $depth:expr, $($arg:tt)*) => {
        if T::ENABLED {
            $t.line($depth, format!($($arg)*));
        }
    };
}

mod decision;
mod index;
mod store;
mod trace;

use decision::{Facts, Verdicts, eval_policy};
use index::{Bucket, Compiled, Visit};
pub use store::PolicyStore;
pub use trace::{NoTrace, TextTrace, Trace};

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
