//! What the proxy knows: workloads, services and policies, with the lookups the data path needs.
//!
//! Why a snapshot: every connection looks things up (its source workload, its destination, the
//! policies), while xDS updates arrive now and then. Readers take an `Arc<State>` (a pointer copy
//! under a lock held for nanoseconds) and use it for the whole connection decision without any
//! lock; a writer applies an update to its own copy and swaps it in. No I/O here: updates come in
//! as decoded resources ([`xds_client::resources::Address`], [`authz::Policy`]).
//!
//! Address conflicts: when two workloads (or services) claim the same (network, IP) — a pod
//! deleted and its IP reused before the removal arrives — the one applied last holds the address;
//! when it goes, the address falls back to the earlier claimant.
//!
//! Host-network workloads share their node's address with every other host-network pod of the
//! node, so they are never found by address (a connection to that address is to the node, not
//! to one of them). A service address with a prefix (a range, such as a ServiceEntry's CIDR)
//! holds every address in it that no exact VIP holds; the longest prefix wins, then the range
//! applied last.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, RwLock};

use ipnet::IpNet;
use xds_client::resources::{Address, NetworkMode, PortMapping, Service, Workload};

mod xds;

pub use xds::{AddressHandler, PolicyHandler, follow};

/// A network and an address in it (the empty network is the default one).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NetworkAddr {
    /// The network name.
    pub network: String,
    /// The address.
    pub ip: IpAddr,
}

impl NetworkAddr {
    /// `ip` in `network`.
    pub fn new(network: &str, ip: IpAddr) -> Self {
        NetworkAddr {
            network: network.to_owned(),
            ip,
        }
    }
}

/// Which workload a proxy serves: known by its xDS uid (dedicated mode, tests), or by what the
/// node agent says about a pod handed over (shared mode), resolved against the current state at
/// each connection, since the pod may reach the proxy before its workload reaches xDS.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum LocalWorkload {
    /// The workload with this xDS uid.
    Uid(String),
    /// The one workload with this pod name, namespace and service account on this node
    /// ([`State::workload_for_pod`]).
    Pod {
        /// The pod's namespace.
        namespace: String,
        /// The pod's name.
        name: String,
        /// Its service account.
        service_account: String,
        /// The node (empty: any).
        node: String,
    },
}

impl From<&str> for LocalWorkload {
    fn from(uid: &str) -> Self {
        LocalWorkload::Uid(uid.to_owned())
    }
}

impl From<String> for LocalWorkload {
    fn from(uid: String) -> Self {
        LocalWorkload::Uid(uid)
    }
}

impl std::fmt::Display for LocalWorkload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LocalWorkload::Uid(uid) => f.write_str(uid),
            LocalWorkload::Pod {
                namespace,
                name,
                service_account,
                ..
            } => write!(f, "{namespace}/{name} (service account {service_account})"),
        }
    }
}

/// One consistent view of workloads, services and policies.
#[derive(Debug, Clone)]
pub struct State {
    workloads: HashMap<String, Arc<Workload>>,
    /// Claimants of each address, oldest first; the last one holds it.
    by_addr: HashMap<NetworkAddr, Vec<String>>,
    services: HashMap<String, Arc<Service>>,
    /// Claimants of each VIP, oldest first; the last one holds it.
    by_vip: HashMap<NetworkAddr, Vec<String>>,
    /// Service ranges: (network, range, service key), in the order applied.
    ranges: Vec<(String, IpNet, String)>,
    /// Service key -> workload uid -> that workload's port mappings for the service.
    endpoints: HashMap<String, BTreeMap<String, Vec<PortMapping>>>,
    /// (namespace, pod name) -> workload uids.
    by_pod: HashMap<(String, String), Vec<String>>,
    /// What each xDS Address key names, for removals.
    address_kinds: HashMap<String, AddressKind>,
    /// Lowercased hostname -> keys of the services with that hostname (name resolution).
    by_host: HashMap<String, Vec<String>>,
    policies: authz::PolicyStore,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AddressKind {
    Workload,
    Service,
}

impl State {
    /// An empty state; `root_namespace` is where mesh-wide policies live (Istio: `istio-system`).
    /// Its policy store is not synced: every decision denies until [`set_synced`] says the first
    /// complete set of policies has arrived.
    ///
    /// [`set_synced`]: State::set_synced
    pub fn new(root_namespace: &str) -> Self {
        let mut policies = authz::PolicyStore::new(root_namespace);
        policies.set_synced(false);
        State {
            workloads: HashMap::new(),
            by_addr: HashMap::new(),
            services: HashMap::new(),
            by_vip: HashMap::new(),
            ranges: Vec::new(),
            endpoints: HashMap::new(),
            by_pod: HashMap::new(),
            address_kinds: HashMap::new(),
            by_host: HashMap::new(),
            policies,
        }
    }

    /// Adds or replaces a workload or service (by its xDS key).
    pub fn insert_address(&mut self, address: Address) {
        let key = address.key();
        self.remove_address(&key);
        match address {
            Address::Workload(w) => {
                if w.network_mode != NetworkMode::HostNetwork {
                    for ip in &w.addresses {
                        claim(&mut self.by_addr, NetworkAddr::new(&w.network, *ip), &key);
                    }
                }
                for (service, ports) in &w.services {
                    self.endpoints
                        .entry(service.clone())
                        .or_default()
                        .insert(w.uid.clone(), ports.clone());
                }
                self.by_pod
                    .entry((w.namespace.clone(), w.name.clone()))
                    .or_default()
                    .push(w.uid.clone());
                self.address_kinds
                    .insert(key.clone(), AddressKind::Workload);
                self.workloads.insert(key, Arc::new(w));
            }
            Address::Service(s) => {
                for (network, ip) in &s.addresses {
                    claim(&mut self.by_vip, NetworkAddr::new(network, *ip), &key);
                }
                for (network, range) in &s.ranges {
                    self.ranges.push((network.clone(), *range, key.clone()));
                }
                self.address_kinds.insert(key.clone(), AddressKind::Service);
                self.by_host
                    .entry(s.hostname.to_ascii_lowercase())
                    .or_default()
                    .push(key.clone());
                self.services.insert(key, Arc::new(s));
            }
        }
    }

    /// Removes a workload (by uid) or service (by `namespace/hostname`); unknown keys are ignored.
    pub fn remove_address(&mut self, key: &str) {
        match self.address_kinds.remove(key) {
            Some(AddressKind::Workload) => {
                let Some(w) = self.workloads.remove(key) else {
                    return;
                };
                // Releasing what was never claimed (a host-network workload) is a no-op.
                for ip in &w.addresses {
                    release(&mut self.by_addr, NetworkAddr::new(&w.network, *ip), key);
                }
                for service in w.services.keys() {
                    if let Some(members) = self.endpoints.get_mut(service) {
                        members.remove(key);
                        if members.is_empty() {
                            self.endpoints.remove(service);
                        }
                    }
                }
                let pod = (w.namespace.clone(), w.name.clone());
                if let Some(uids) = self.by_pod.get_mut(&pod) {
                    uids.retain(|uid| uid != key);
                    if uids.is_empty() {
                        self.by_pod.remove(&pod);
                    }
                }
            }
            Some(AddressKind::Service) => {
                let Some(s) = self.services.remove(key) else {
                    return;
                };
                for (network, ip) in &s.addresses {
                    release(&mut self.by_vip, NetworkAddr::new(network, *ip), key);
                }
                self.ranges.retain(|(_, _, k)| k != key);
                let host = s.hostname.to_ascii_lowercase();
                if let Some(keys) = self.by_host.get_mut(&host) {
                    keys.retain(|k| k != key);
                    if keys.is_empty() {
                        self.by_host.remove(&host);
                    }
                }
            }
            None => {}
        }
    }

    /// Adds or replaces a policy.
    pub fn insert_policy(&mut self, policy: authz::Policy) {
        self.policies.insert(policy);
    }

    /// Removes a policy by `namespace/name`.
    pub fn remove_policy(&mut self, key: &str) {
        self.policies.remove(key);
    }

    /// Marks the policies complete (after the first xDS response, or a static load).
    pub fn set_synced(&mut self, synced: bool) {
        self.policies.set_synced(synced);
    }

    /// Whether the policies are complete.
    pub fn is_synced(&self) -> bool {
        self.policies.is_synced()
    }

    /// The workload with this uid.
    pub fn workload(&self, uid: &str) -> Option<&Arc<Workload>> {
        self.workloads.get(uid)
    }

    /// The workload that holds `ip` in `network`.
    pub fn workload_at(&self, network: &str, ip: IpAddr) -> Option<&Arc<Workload>> {
        self.by_addr
            .get(&NetworkAddr::new(network, ip))
            .and_then(|uids| uids.last())
            .and_then(|uid| self.workloads.get(uid))
    }

    /// The service whose VIP is `ip` in `network`, else the one with the longest range that
    /// holds it (of equal ranges, the one applied last).
    pub fn service_at(&self, network: &str, ip: IpAddr) -> Option<&Arc<Service>> {
        if let Some(service) = self
            .by_vip
            .get(&NetworkAddr::new(network, ip))
            .and_then(|keys| keys.last())
            .and_then(|key| self.services.get(key))
        {
            return Some(service);
        }
        self.ranges
            .iter()
            .enumerate()
            .filter(|(_, (n, range, _))| n == network && range.contains(&ip))
            .max_by_key(|(order, (_, range, _))| (range.prefix_len(), *order))
            .and_then(|(_, (_, _, key))| self.services.get(key))
    }

    /// The service with this key (`namespace/hostname`).
    pub fn service(&self, key: &str) -> Option<&Arc<Service>> {
        self.services.get(key)
    }

    /// The workloads behind a service (`namespace/hostname`), with their port mappings for it,
    /// in uid order.
    pub fn endpoints(
        &self,
        service_key: &str,
    ) -> impl Iterator<Item = (&Arc<Workload>, &[PortMapping])> {
        self.endpoints
            .get(service_key)
            .into_iter()
            .flatten()
            .filter_map(|(uid, ports)| Some((self.workloads.get(uid)?, ports.as_slice())))
    }

    /// The services whose hostname is `host` (compared without regard to ASCII case; several
    /// namespaces may define the same host, e.g. ServiceEntries).
    pub fn services_named(&self, host: &str) -> impl Iterator<Item = &Arc<Service>> {
        self.by_host
            .get(&host.to_ascii_lowercase())
            .into_iter()
            .flatten()
            .filter_map(|key| self.services.get(key))
    }

    /// The workload a pod handed over by the node agent is: found by name, namespace, service
    /// account and node, as Istio's ztunnel does (the handoff's uid is only the agent's key).
    /// `None` when no workload, or more than one, fits.
    pub fn workload_for_pod(
        &self,
        namespace: &str,
        name: &str,
        service_account: &str,
        node: &str,
    ) -> Option<&Arc<Workload>> {
        let mut fits = self
            .by_pod
            .get(&(namespace.to_owned(), name.to_owned()))
            .into_iter()
            .flatten()
            .filter_map(|uid| self.workloads.get(uid))
            .filter(|w| {
                w.identity.service_account() == Some(service_account)
                    && (node.is_empty() || w.node == node)
            });
        let first = fits.next()?;
        fits.next().is_none().then_some(first)
    }

    /// The workload `local` names, if exactly one fits.
    pub fn local(&self, local: &LocalWorkload) -> Option<&Arc<Workload>> {
        match local {
            LocalWorkload::Uid(uid) => self.workload(uid),
            LocalWorkload::Pod {
                namespace,
                name,
                service_account,
                node,
            } => self.workload_for_pod(namespace, name, service_account, node),
        }
    }

    /// Every workload (no order).
    pub fn workloads(&self) -> impl Iterator<Item = &Arc<Workload>> {
        self.workloads.values()
    }

    /// Every service (no order).
    pub fn services(&self) -> impl Iterator<Item = &Arc<Service>> {
        self.services.values()
    }

    /// The policy store.
    pub fn policies(&self) -> &authz::PolicyStore {
        &self.policies
    }

    /// Number of workloads and services.
    pub fn counts(&self) -> (usize, usize) {
        (self.workloads.len(), self.services.len())
    }
}

/// Adds `key` as the newest claimant of `at` (once, even if it lists the address twice).
fn claim(index: &mut HashMap<NetworkAddr, Vec<String>>, at: NetworkAddr, key: &str) {
    let claimants = index.entry(at).or_default();
    claimants.retain(|k| k != key);
    claimants.push(key.to_owned());
}

/// Removes `key` from the claimants of `at`.
fn release(index: &mut HashMap<NetworkAddr, Vec<String>>, at: NetworkAddr, key: &str) {
    if let Some(claimants) = index.get_mut(&at) {
        claimants.retain(|k| k != key);
        if claimants.is_empty() {
            index.remove(&at);
        }
    }
}

/// The shared, updatable state: readers take snapshots, writers swap in updated copies.
#[derive(Debug)]
pub struct StateStore {
    current: RwLock<Arc<State>>,
    /// Serializes writers (each copies, changes and swaps), so no update is lost; readers never
    /// wait for it.
    writer: Mutex<()>,
    /// Bumped after every update, for those who re-check something when the state changes.
    changes: tokio::sync::watch::Sender<u64>,
}

impl StateStore {
    /// A store starting from `state`.
    pub fn new(state: State) -> Self {
        StateStore {
            current: RwLock::new(Arc::new(state)),
            writer: Mutex::new(()),
            changes: tokio::sync::watch::channel(0).0,
        }
    }

    /// The current state; it never changes under the caller.
    pub fn snapshot(&self) -> Arc<State> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Applies `change` to a copy of the current state and makes it current (one update, or a
    /// whole xDS response, at a time: readers see all of it or none).
    pub fn update(&self, change: impl FnOnce(&mut State)) {
        let _writer = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let mut next = State::clone(&self.snapshot());
        change(&mut next);
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(next);
        self.changes.send_modify(|generation| *generation += 1);
    }

    /// Wakes after each update (the value counts updates); the open-connection registry uses it
    /// to re-check connections when policies change.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }
}
