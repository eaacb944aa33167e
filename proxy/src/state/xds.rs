//! Feeding the state from xDS: handlers for `istio.workload.Address` and
//! `istio.security.Authorization` that decode each resource, reject (NACK) the bad ones with a
//! reason and apply the good ones of a response as one update.
//!
//! A rejected resource changes nothing: the previous version of it stays (so a malformed update
//! never withdraws a DENY), and a workload naming a policy that was never accepted is denied by
//! the policy store until it arrives.

use std::sync::Arc;

use xds_client::client::{ClientConfig, Handler, RawResource, Subscription, XdsClient, XdsHandle};
use xds_client::resources::{ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL};
use xds_client::resources::{Address, decode_address};

use super::StateStore;

/// Applies `istio.workload.Address` responses to a [`StateStore`].
#[derive(Debug, Clone)]
pub struct AddressHandler(pub Arc<StateStore>);

/// Applies `istio.security.Authorization` responses to a [`StateStore`].
#[derive(Debug, Clone)]
pub struct PolicyHandler(pub Arc<StateStore>);

impl Handler for AddressHandler {
    fn apply(&self, added: Vec<RawResource>, removed: Vec<String>) -> Vec<(String, String)> {
        let (good, rejected) = decode_all(
            added,
            |body| decode_address(body).map_err(|e| e.to_string()),
            Address::key,
            "",
        );
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
        let (good, rejected) = decode_all(
            added,
            |body| authz::proto::decode(body).map_err(|e| e.to_string()),
            authz::Policy::key,
            "policy ",
        );
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

/// Starts an xDS client that feeds `store` (wildcard `Address` and `Authorization`) and marks the
/// store synced once both types have had their first response (policies are denied until then).
/// Runs on the current runtime until the process ends.
pub fn follow(
    store: Arc<StateStore>,
    config: ClientConfig,
) -> Result<XdsHandle, xds_client::client::ClientError> {
    let client = XdsClient::new(config)?
        .watch(
            ADDRESS_TYPE_URL,
            Subscription::Wildcard,
            Arc::new(AddressHandler(store.clone())),
        )
        .watch(
            AUTHORIZATION_TYPE_URL,
            Subscription::Wildcard,
            Arc::new(PolicyHandler(store.clone())),
        );
    let handle = client.handle();
    let mut synced = handle.synced();
    tokio::spawn(client.run());
    tokio::spawn(async move {
        if synced.wait_for(|s| *s).await.is_ok() {
            store.update(|s| s.set_synced(true));
            tracing::info!("xDS: first workloads and policies received; serving");
        }
    });
    Ok(handle)
}

/// Decodes every resource; a resource that does not decode, or that describes something other
/// than its name says, is rejected with the reason.
fn decode_all<T>(
    added: Vec<RawResource>,
    decode: impl Fn(&[u8]) -> Result<T, String>,
    key: impl Fn(&T) -> String,
    kind: &str,
) -> (Vec<T>, Vec<(String, String)>) {
    let mut good = Vec::new();
    let mut rejected = Vec::new();
    for r in added {
        match decode(&r.body) {
            Ok(item) if key(&item) == r.name => good.push(item),
            Ok(item) => {
                let describes = key(&item);
                rejected.push((r.name, format!("the resource describes {kind}{describes}")));
            }
            Err(e) => rejected.push((r.name, e)),
        }
    }
    (good, rejected)
}
