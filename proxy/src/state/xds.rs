//! Feeding the state from xDS: handlers for `istio.workload.Address` and
//! `istio.security.Authorization` that decode each resource, reject (NACK) the bad ones with a
//! reason and apply the good ones of a response as one update.
//!
//! A rejected resource changes nothing: the previous version of it stays (so a malformed update
//! never withdraws a DENY), and a workload naming a policy that was never accepted is denied by
//! the policy store until it arrives.

use std::sync::Arc;

use xds_client::client::{Handler, RawResource};
use xds_client::resources::decode_address;

use super::StateStore;

/// Applies `istio.workload.Address` responses to a [`StateStore`].
#[derive(Debug, Clone)]
pub struct AddressHandler(pub Arc<StateStore>);

/// Applies `istio.security.Authorization` responses to a [`StateStore`].
#[derive(Debug, Clone)]
pub struct PolicyHandler(pub Arc<StateStore>);

impl Handler for AddressHandler {
    fn apply(&self, added: Vec<RawResource>, removed: Vec<String>) -> Vec<(String, String)> {
        let mut rejected = Vec::new();
        let mut good = Vec::new();
        for r in added {
            match decode_address(&r.body) {
                Ok(address) if address.key() == r.name => good.push(address),
                Ok(address) => {
                    rejected.push((r.name, format!("the resource describes {}", address.key())))
                }
                Err(e) => rejected.push((r.name, e.to_string())),
            }
        }
        self.0.update(|state| {
            for key in &removed {
                state.remove_address(key);
            }
            for address in good {
                state.insert_address(address);
            }
        });
        rejected
    }
}

impl Handler for PolicyHandler {
    fn apply(&self, added: Vec<RawResource>, removed: Vec<String>) -> Vec<(String, String)> {
        let mut rejected = Vec::new();
        let mut good = Vec::new();
        for r in added {
            match authz::proto::decode(&r.body) {
                Ok(policy) if policy.key() == r.name => good.push(policy),
                Ok(policy) => rejected.push((
                    r.name,
                    format!("the resource describes policy {}", policy.key()),
                )),
                Err(e) => rejected.push((r.name, e.to_string())),
            }
        }
        self.0.update(|state| {
            for key in &removed {
                state.remove_policy(key);
            }
            for policy in good {
                state.insert_policy(policy);
            }
        });
        rejected
    }
}
