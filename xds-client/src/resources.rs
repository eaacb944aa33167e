//! The Istio resource types in clean Rust form, decoded from their protobuf with validation.
//!
//! Decoding is per resource: a truncated or inconsistent resource is rejected with a reason that
//! names it (the client NACKs it and keeps the others), never a panic.

use std::collections::BTreeMap;
use std::net::IpAddr;

use identity::SpiffeId;
use ipnet::IpNet;
use prost::Message;

use crate::proto::workload as pb;

/// `type.googleapis.com/istio.workload.Address`.
pub const ADDRESS_TYPE_URL: &str = "type.googleapis.com/istio.workload.Address";
/// `type.googleapis.com/istio.security.Authorization`.
pub const AUTHORIZATION_TYPE_URL: &str = "type.googleapis.com/istio.security.Authorization";

/// The order in which types are requested and pushed: Authorization before Address, so a
/// workload never arrives before the policies it names; other types after both, by name.
pub fn push_order(type_url: &str) -> (u8, &str) {
    match type_url {
        AUTHORIZATION_TYPE_URL => (0, type_url),
        ADDRESS_TYPE_URL => (1, type_url),
        other => (2, other),
    }
}

/// The trust domain assumed when a workload does not name one (Istio elides the default).
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";

/// An `istio.workload.Address`: a workload or a service.
// Addresses are transient (decoded, then moved into the proxy's state), so the size of the
// larger variant costs a copy per update, not memory held.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    /// A workload (a pod).
    Workload(Workload),
    /// A service.
    Service(Service),
}

/// A workload, as the proxy's store keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workload {
    /// Unique id (the resource name).
    pub uid: String,
    /// Pod name.
    pub name: String,
    /// Namespace.
    pub namespace: String,
    /// IP addresses (empty for workloads reached only through a gateway).
    pub addresses: Vec<IpAddr>,
    /// Network, empty for the default one.
    pub network: String,
    /// How it is reached: plain TCP, HBONE, or a sidecar's mutual TLS.
    pub tunnel: Tunnel,
    /// Its identity: `spiffe://<trust domain>/ns/<namespace>/sa/<service account>`.
    pub identity: SpiffeId,
    /// Node it runs on.
    pub node: String,
    /// Canonical service name (telemetry).
    pub canonical_name: String,
    /// Canonical revision (telemetry).
    pub canonical_revision: String,
    /// Kind of the owning workload (telemetry): deployment, cronjob, pod, job.
    pub workload_type: WorkloadType,
    /// Name of the owning workload (telemetry).
    pub workload_name: String,
    /// Selector policies that apply (`namespace/name`).
    pub authorization_policies: Vec<String>,
    /// Whether it is ready.
    pub healthy: bool,
    /// Cluster id.
    pub cluster_id: String,
    /// Hostname, for workloads without addresses.
    pub hostname: String,
    /// Services it belongs to (`namespace/hostname`), with port mappings.
    pub services: BTreeMap<String, Vec<PortMapping>>,
    /// The waypoint all traffic to it must go through, if any.
    pub waypoint: Option<Waypoint>,
    /// How it is reached from another network, if it is in one (not carried yet: such
    /// destinations are refused with a reason).
    pub network_gateway: Option<Waypoint>,
    /// Whether it has its own address or shares its node's.
    pub network_mode: NetworkMode,
    /// Where it runs, for locality-aware endpoint choice.
    pub locality: Locality,
    /// Its weight in endpoint choice (1 when the resource leaves it unset; 0 is never chosen).
    pub capacity: u32,
    /// Whether it terminates HBONE itself (no node proxy in front of it).
    pub native_tunnel: bool,
    /// How the tunnel's end hands connections to the application, when not plain TCP.
    pub application_tunnel: Option<ApplicationTunnel>,
}

impl Workload {
    /// The workload a resource naming only `uid`, `name`, `namespace` and `identity` decodes to:
    /// no addresses, plain TCP, a healthy Deployment with capacity 1, everything else empty.
    /// For building workloads by hand (tests, embedders); set the other fields after.
    pub fn new(uid: &str, name: &str, namespace: &str, identity: SpiffeId) -> Self {
        Workload {
            uid: uid.to_owned(),
            name: name.to_owned(),
            namespace: namespace.to_owned(),
            addresses: Vec::new(),
            network: String::new(),
            tunnel: Tunnel::None,
            identity,
            node: String::new(),
            canonical_name: String::new(),
            canonical_revision: String::new(),
            workload_type: WorkloadType::Deployment,
            workload_name: String::new(),
            authorization_policies: Vec::new(),
            healthy: true,
            cluster_id: String::new(),
            hostname: String::new(),
            services: BTreeMap::new(),
            waypoint: None,
            network_gateway: None,
            network_mode: NetworkMode::default(),
            locality: Locality::default(),
            capacity: 1,
            native_tunnel: false,
            application_tunnel: None,
        }
    }

    /// Whether it is in the mesh and reached over HBONE.
    pub fn hbone(&self) -> bool {
        self.tunnel == Tunnel::Hbone
    }
}

/// How a workload is reached (`TunnelProtocol`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Tunnel {
    /// Plain TCP: not in the mesh.
    #[default]
    None,
    /// HBONE (via its node's proxy, or its own).
    Hbone,
    /// A sidecar's mutual TLS on the application port (not carried by this proxy: refused).
    LegacyIstioMtls,
}

/// Whether a workload has its own network namespace (`NetworkMode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum NetworkMode {
    /// Its own address.
    #[default]
    Standard,
    /// Its node's address, shared with every host-network pod of the node: never looked up by
    /// address.
    HostNetwork,
}

/// Region, zone and subzone (empty: not known).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct Locality {
    /// Region.
    pub region: String,
    /// Zone.
    pub zone: String,
    /// Subzone.
    pub subzone: String,
}

/// A workload's application tunnel (`ApplicationTunnel`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ApplicationTunnel {
    /// Whether a PROXY protocol header comes first (`PROXY`), or plain TCP (`NONE`).
    pub proxy_protocol: bool,
    /// The application's port for it (0: the connection's own target port).
    pub port: u16,
}

/// A waypoint proxy (Istio's `GatewayAddress`): where tunnels to a workload or service that uses
/// it are sent instead.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Waypoint {
    /// Where it is.
    pub destination: WaypointAddress,
    /// Its HBONE port (`hbone_mtls_port`; 15008 when the resource leaves it 0).
    pub hbone_port: u16,
}

/// A waypoint's address.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum WaypointAddress {
    /// A workload address in a network.
    Ip {
        /// The network (empty: the default one).
        network: String,
        /// The address.
        ip: IpAddr,
    },
    /// A service, by `namespace` and `hostname` (the waypoint's own Service).
    Hostname {
        /// The service's namespace.
        namespace: String,
        /// Its hostname.
        hostname: String,
    },
}

/// A service. `Default` is a start for building one (an empty service is not valid on the wire:
/// it needs a namespace and a hostname).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Service {
    /// Service name.
    pub name: String,
    /// Namespace.
    pub namespace: String,
    /// FQDN, e.g. `web.default.svc.cluster.local`.
    pub hostname: String,
    /// Addresses per network.
    pub addresses: Vec<(String, IpAddr)>,
    /// Address ranges per network (addresses with a prefix shorter than the address): any
    /// address in one is this service.
    pub ranges: Vec<(String, IpNet)>,
    /// Ports.
    pub ports: Vec<PortMapping>,
    /// Identities to expect instead of per-workload ones, if set.
    pub subject_alt_names: Vec<String>,
    /// The waypoint all traffic to it must go through, if any.
    pub waypoint: Option<Waypoint>,
    /// Waypoints with weights; when any weight is above 0, one is chosen by weight for each
    /// connection in place of `waypoint`.
    pub weighted_waypoints: Vec<(Waypoint, u32)>,
    /// How its endpoints are chosen (`None`: at random among healthy ones, by capacity).
    pub load_balancing: Option<LoadBalancing>,
    /// Which address family of an endpoint is dialed.
    pub ip_families: IpFamilies,
    /// Whether it is the canonical service for its hostname (name resolution).
    pub canonical: bool,
    /// Whether traffic from an ingress gateway also goes through the waypoint (used by
    /// gateways; Istio's ztunnel does not act on it either).
    pub ingress_use_waypoint: bool,
    /// Who may resolve it by name.
    pub visibility: Visibility,
}

/// Who may resolve a service by name (`Service.Visibility`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Visibility {
    /// Everyone.
    #[default]
    Public,
    /// Clients in its own namespace.
    Namespace,
}

/// Which address family of an endpoint is dialed (`IPFamilies`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum IpFamilies {
    /// The family of the address the client dialed, when the endpoint has one; else its first.
    #[default]
    Automatic,
    /// IPv4 only: endpoints without an IPv4 address are not chosen.
    Ipv4Only,
    /// IPv6 only: endpoints without an IPv6 address are not chosen.
    Ipv6Only,
    /// Both (chosen as for `Automatic`).
    Dual,
}

/// Locality-aware endpoint choice (`LoadBalancing`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LoadBalancing {
    /// Scopes in order of preference; an endpoint's rank is how many of them, from the first,
    /// it shares with the client.
    pub routing_preference: Vec<LocalityScope>,
    /// What the rank decides.
    pub mode: LoadBalancingMode,
    /// Whether unhealthy endpoints may be chosen (`ALLOW_ALL`).
    pub allow_unhealthy: bool,
}

/// What a client and an endpoint are compared on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LocalityScope {
    /// Same region.
    Region,
    /// Same zone.
    Zone,
    /// Same subzone.
    Subzone,
    /// Same node.
    Node,
    /// Same cluster.
    Cluster,
    /// Same network.
    Network,
}

/// What an endpoint's rank decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LoadBalancingMode {
    /// Nothing: any endpoint (`UNSPECIFIED_MODE`).
    Standard,
    /// Only endpoints that share every scope.
    Strict,
    /// The endpoints of the highest rank present.
    Failover,
    /// No choice: the connection goes to the address the client dialed.
    Passthrough,
}

/// A service port and the port it forwards to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortMapping {
    /// The port the service is reached at.
    pub service_port: u16,
    /// The workload port (0: same as the service port).
    pub target_port: u16,
}

/// Kind of owning workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkloadType {
    /// A Deployment.
    Deployment,
    /// A CronJob.
    CronJob,
    /// A bare Pod.
    Pod,
    /// A Job.
    Job,
}

impl WorkloadType {
    /// The kind in lower case, as in Istio's baggage key `k8s.<kind>.name` (`deployment`,
    /// `cronjob`, `pod`, `job`).
    pub fn kind(self) -> &'static str {
        match self {
            WorkloadType::Deployment => "deployment",
            WorkloadType::CronJob => "cronjob",
            WorkloadType::Pod => "pod",
            WorkloadType::Job => "job",
        }
    }
}

/// A resource that could not be used, with the reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what}: {reason}")]
pub struct DecodeError {
    /// Which resource (name or field path).
    pub what: String,
    /// Why it was rejected.
    pub reason: String,
}

impl Address {
    /// The name clients index the resource by: the workload uid, or `namespace/hostname`.
    pub fn key(&self) -> String {
        match self {
            Address::Workload(w) => w.uid.clone(),
            Address::Service(s) => format!("{}/{}", s.namespace, s.hostname),
        }
    }
}

/// Decodes and validates one `istio.workload.Address`.
pub fn decode_address(bytes: &[u8]) -> Result<Address, DecodeError> {
    let msg = pb::Address::decode(bytes).map_err(|e| DecodeError {
        what: "Address".into(),
        reason: format!("not a valid protobuf: {e}"),
    })?;
    match msg.r#type {
        Some(pb::address::Type::Workload(w)) => workload_from_proto(w).map(Address::Workload),
        Some(pb::address::Type::Service(s)) => service_from_proto(s).map(Address::Service),
        None => Err(DecodeError {
            what: "Address".into(),
            reason: "neither a workload nor a service".into(),
        }),
    }
}

/// Encodes an address (for the server side and tests).
pub fn encode_address(address: &Address) -> Vec<u8> {
    let r#type = match address {
        Address::Workload(w) => pb::address::Type::Workload(workload_to_proto(w)),
        Address::Service(s) => pb::address::Type::Service(service_to_proto(s)),
    };
    pb::Address {
        r#type: Some(r#type),
    }
    .encode_to_vec()
}

/// Body of the `xds_resources` fuzz target: decoding arbitrary bytes as either resource type
/// never panics, and what decodes re-encodes to the same value.
#[doc(hidden)]
#[cfg(feature = "fuzzing")]
pub fn fuzz_resources(data: &[u8]) {
    if let Ok(address) = decode_address(data) {
        let again = decode_address(&encode_address(&address)).expect("re-encoded address decodes");
        assert_eq!(again, address);
    }
    let _ = authz::proto::decode(data);
}

fn ip(bytes: &[u8], what: &str) -> Result<IpAddr, DecodeError> {
    match bytes.len() {
        4 => Ok(IpAddr::from(<[u8; 4]>::try_from(bytes).expect("4 bytes"))),
        16 => Ok(IpAddr::from(<[u8; 16]>::try_from(bytes).expect("16 bytes"))),
        n => Err(DecodeError {
            what: what.to_owned(),
            reason: format!("an address of {n} bytes; expected 4 or 16"),
        }),
    }
}

fn port(value: u32, what: &str) -> Result<u16, DecodeError> {
    u16::try_from(value).map_err(|_| DecodeError {
        what: what.to_owned(),
        reason: format!("port {value} is out of range"),
    })
}

fn ports(list: &[pb::Port], what: &str) -> Result<Vec<PortMapping>, DecodeError> {
    list.iter()
        .enumerate()
        .map(|(i, p)| {
            Ok(PortMapping {
                service_port: port(p.service_port, &format!("{what}[{i}].service_port"))?,
                target_port: port(p.target_port, &format!("{what}[{i}].target_port"))?,
            })
        })
        .collect()
}

fn waypoint_from_proto(g: &pb::GatewayAddress, what: &str) -> Result<Waypoint, DecodeError> {
    let err = |reason: String| DecodeError {
        what: what.to_owned(),
        reason,
    };
    let destination = match &g.destination {
        None => {
            return Err(err(
                "the waypoint has neither an address nor a hostname".into()
            ));
        }
        Some(pb::gateway_address::Destination::Address(a)) => WaypointAddress::Ip {
            network: a.network.clone(),
            ip: ip(&a.address, &format!("{what} address"))?,
        },
        Some(pb::gateway_address::Destination::Hostname(h)) => {
            if h.namespace.is_empty() || h.hostname.is_empty() {
                return Err(err(
                    "the waypoint hostname needs a namespace and a hostname".into(),
                ));
            }
            WaypointAddress::Hostname {
                namespace: h.namespace.clone(),
                hostname: h.hostname.clone(),
            }
        }
    };
    let hbone_port = match port(g.hbone_mtls_port, &format!("{what} hbone_mtls_port"))? {
        0 => common::ports::HBONE,
        p => p,
    };
    Ok(Waypoint {
        destination,
        hbone_port,
    })
}

fn waypoint_to_proto(w: &Waypoint) -> pb::GatewayAddress {
    pb::GatewayAddress {
        destination: Some(match &w.destination {
            WaypointAddress::Ip { network, ip } => {
                pb::gateway_address::Destination::Address(pb::NetworkAddress {
                    network: network.clone(),
                    address: ip_bytes(ip),
                    length: None,
                })
            }
            WaypointAddress::Hostname {
                namespace,
                hostname,
            } => pb::gateway_address::Destination::Hostname(pb::NamespacedHostname {
                namespace: namespace.clone(),
                hostname: hostname.clone(),
            }),
        }),
        hbone_mtls_port: u32::from(w.hbone_port),
    }
}

fn ip_bytes(a: &IpAddr) -> Vec<u8> {
    match a {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

fn workload_from_proto(w: pb::Workload) -> Result<Workload, DecodeError> {
    let what = format!(
        "Workload {}",
        if w.uid.is_empty() { "(no uid)" } else { &w.uid }
    );
    let err = |reason: String| DecodeError {
        what: what.clone(),
        reason,
    };
    if w.uid.is_empty() {
        return Err(err("uid is empty".into()));
    }
    if w.namespace.is_empty() {
        return Err(err("namespace is empty".into()));
    }
    let addresses = w
        .addresses
        .iter()
        .enumerate()
        .map(|(i, a)| ip(a, &format!("{what} addresses[{i}]")))
        .collect::<Result<Vec<_>, _>>()?;
    let trust_domain = if w.trust_domain.is_empty() {
        DEFAULT_TRUST_DOMAIN
    } else {
        &w.trust_domain
    };
    let service_account = if w.service_account.is_empty() {
        "default"
    } else {
        &w.service_account
    };
    let identity = SpiffeId::istio(trust_domain, &w.namespace, service_account)
        .map_err(|e| err(format!("no valid identity: {e}")))?;
    let tunnel = match pb::TunnelProtocol::try_from(w.tunnel_protocol) {
        Ok(pb::TunnelProtocol::None) => Tunnel::None,
        Ok(pb::TunnelProtocol::Hbone) => Tunnel::Hbone,
        Ok(pb::TunnelProtocol::LegacyIstioMtls) => Tunnel::LegacyIstioMtls,
        Err(_) => {
            return Err(err(format!(
                "unknown tunnel_protocol {}",
                w.tunnel_protocol
            )));
        }
    };
    let network_mode = match pb::NetworkMode::try_from(w.network_mode) {
        Ok(pb::NetworkMode::Standard) => NetworkMode::Standard,
        Ok(pb::NetworkMode::HostNetwork) => NetworkMode::HostNetwork,
        Err(_) => return Err(err(format!("unknown network_mode {}", w.network_mode))),
    };
    let application_tunnel = match &w.application_tunnel {
        None => None,
        Some(t) => Some(ApplicationTunnel {
            proxy_protocol: match pb::application_tunnel::Protocol::try_from(t.protocol) {
                Ok(pb::application_tunnel::Protocol::None) => false,
                Ok(pb::application_tunnel::Protocol::Proxy) => true,
                Err(_) => {
                    return Err(err(format!(
                        "unknown application_tunnel protocol {}",
                        t.protocol
                    )));
                }
            },
            port: port(t.port, &format!("{what} application_tunnel.port"))?,
        }),
    };
    let network_gateway = w
        .network_gateway
        .as_ref()
        .map(|g| waypoint_from_proto(g, &format!("{what} network_gateway")))
        .transpose()?;
    let workload_type = match pb::WorkloadType::try_from(w.workload_type) {
        Ok(pb::WorkloadType::Deployment) => WorkloadType::Deployment,
        Ok(pb::WorkloadType::Cronjob) => WorkloadType::CronJob,
        Ok(pb::WorkloadType::Pod) => WorkloadType::Pod,
        Ok(pb::WorkloadType::Job) => WorkloadType::Job,
        Err(_) => return Err(err(format!("unknown workload_type {}", w.workload_type))),
    };
    let healthy = match pb::WorkloadStatus::try_from(w.status) {
        Ok(pb::WorkloadStatus::Healthy) => true,
        Ok(pb::WorkloadStatus::Unhealthy) => false,
        Err(_) => return Err(err(format!("unknown status {}", w.status))),
    };
    let waypoint = w
        .waypoint
        .as_ref()
        .map(|g| waypoint_from_proto(g, &format!("{what} waypoint")))
        .transpose()?;
    let mut services = BTreeMap::new();
    for (key, list) in &w.services {
        services.insert(
            key.clone(),
            ports(&list.ports, &format!("{what} services[{key}]"))?,
        );
    }
    Ok(Workload {
        uid: w.uid,
        name: w.name,
        namespace: w.namespace,
        addresses,
        network: w.network,
        tunnel,
        identity,
        node: w.node,
        canonical_name: w.canonical_name,
        canonical_revision: w.canonical_revision,
        workload_type,
        workload_name: w.workload_name,
        authorization_policies: w.authorization_policies,
        healthy,
        cluster_id: w.cluster_id,
        hostname: w.hostname,
        services,
        waypoint,
        network_gateway,
        network_mode,
        locality: w
            .locality
            .map(|l| Locality {
                region: l.region,
                zone: l.zone,
                subzone: l.subzone,
            })
            .unwrap_or_default(),
        capacity: w.capacity.unwrap_or(1),
        native_tunnel: w.native_tunnel,
        application_tunnel,
    })
}

fn workload_to_proto(w: &Workload) -> pb::Workload {
    pb::Workload {
        name: w.name.clone(),
        namespace: w.namespace.clone(),
        addresses: w.addresses.iter().map(ip_bytes).collect(),
        network: w.network.clone(),
        tunnel_protocol: match w.tunnel {
            Tunnel::None => pb::TunnelProtocol::None,
            Tunnel::Hbone => pb::TunnelProtocol::Hbone,
            Tunnel::LegacyIstioMtls => pb::TunnelProtocol::LegacyIstioMtls,
        } as i32,
        trust_domain: w.identity.trust_domain().to_owned(),
        service_account: w.identity.service_account().unwrap_or_default().to_owned(),
        waypoint: w.waypoint.as_ref().map(waypoint_to_proto),
        node: w.node.clone(),
        canonical_name: w.canonical_name.clone(),
        canonical_revision: w.canonical_revision.clone(),
        workload_type: match w.workload_type {
            WorkloadType::Deployment => pb::WorkloadType::Deployment,
            WorkloadType::CronJob => pb::WorkloadType::Cronjob,
            WorkloadType::Pod => pb::WorkloadType::Pod,
            WorkloadType::Job => pb::WorkloadType::Job,
        } as i32,
        workload_name: w.workload_name.clone(),
        authorization_policies: w.authorization_policies.clone(),
        status: if w.healthy {
            pb::WorkloadStatus::Healthy
        } else {
            pb::WorkloadStatus::Unhealthy
        } as i32,
        cluster_id: w.cluster_id.clone(),
        uid: w.uid.clone(),
        hostname: w.hostname.clone(),
        services: w
            .services
            .iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    pb::PortList {
                        ports: ports_to_proto(v),
                    },
                )
            })
            .collect(),
        network_gateway: w.network_gateway.as_ref().map(waypoint_to_proto),
        native_tunnel: w.native_tunnel,
        application_tunnel: w.application_tunnel.map(|t| pb::ApplicationTunnel {
            protocol: if t.proxy_protocol {
                pb::application_tunnel::Protocol::Proxy
            } else {
                pb::application_tunnel::Protocol::None
            } as i32,
            port: u32::from(t.port),
        }),
        locality: (w.locality != Locality::default()).then(|| pb::Locality {
            region: w.locality.region.clone(),
            zone: w.locality.zone.clone(),
            subzone: w.locality.subzone.clone(),
        }),
        network_mode: match w.network_mode {
            NetworkMode::Standard => pb::NetworkMode::Standard,
            NetworkMode::HostNetwork => pb::NetworkMode::HostNetwork,
        } as i32,
        extensions: Vec::new(),
        capacity: (w.capacity != 1).then_some(w.capacity),
    }
}

fn ports_to_proto(list: &[PortMapping]) -> Vec<pb::Port> {
    list.iter()
        .map(|p| pb::Port {
            service_port: u32::from(p.service_port),
            target_port: u32::from(p.target_port),
            app_protocol: pb::AppProtocol::Unknown as i32,
        })
        .collect()
}

fn service_from_proto(s: pb::Service) -> Result<Service, DecodeError> {
    let what = format!("Service {}/{}", s.namespace, s.hostname);
    let err = |reason: String| DecodeError {
        what: what.clone(),
        reason,
    };
    if s.namespace.is_empty() || s.hostname.is_empty() {
        return Err(err("namespace and hostname must be set".into()));
    }
    let mut addresses = Vec::new();
    let mut ranges = Vec::new();
    for (i, a) in s.addresses.iter().enumerate() {
        let at = format!("{what} addresses[{i}]");
        let ip = ip(&a.address, &at)?;
        let full = if ip.is_ipv4() { 32 } else { 128 };
        match a.length {
            None => addresses.push((a.network.clone(), ip)),
            Some(length) if length == full => addresses.push((a.network.clone(), ip)),
            Some(length) => {
                let net = u8::try_from(length)
                    .ok()
                    .and_then(|l| IpNet::new(ip, l).ok())
                    .ok_or_else(|| DecodeError {
                        what: at.clone(),
                        reason: format!("prefix length {length} does not fit {ip}"),
                    })?;
                ranges.push((a.network.clone(), net.trunc()));
            }
        }
    }
    let waypoint = s
        .waypoint
        .as_ref()
        .map(|g| waypoint_from_proto(g, &format!("{what} waypoint")))
        .transpose()?;
    let weighted_waypoints = s
        .weighted_waypoints
        .iter()
        .enumerate()
        .map(|(i, w)| {
            let at = format!("{what} weighted_waypoints[{i}]");
            let destination = w.destination.as_ref().ok_or_else(|| DecodeError {
                what: at.clone(),
                reason: "no destination".into(),
            })?;
            Ok((waypoint_from_proto(destination, &at)?, w.weight))
        })
        .collect::<Result<Vec<_>, DecodeError>>()?;
    let load_balancing = s
        .load_balancing
        .as_ref()
        .map(|lb| load_balancing_from_proto(lb, &format!("{what} load_balancing")))
        .transpose()?;
    let ip_families = match pb::IpFamilies::try_from(s.ip_families) {
        Ok(pb::IpFamilies::Automatic) => IpFamilies::Automatic,
        Ok(pb::IpFamilies::Ipv4Only) => IpFamilies::Ipv4Only,
        Ok(pb::IpFamilies::Ipv6Only) => IpFamilies::Ipv6Only,
        Ok(pb::IpFamilies::Dual) => IpFamilies::Dual,
        Err(_) => return Err(err(format!("unknown ip_families {}", s.ip_families))),
    };
    let visibility = match pb::service::Visibility::try_from(s.visibility) {
        Ok(pb::service::Visibility::Public) => Visibility::Public,
        Ok(pb::service::Visibility::Namespace) => Visibility::Namespace,
        Err(_) => return Err(err(format!("unknown visibility {}", s.visibility))),
    };
    Ok(Service {
        waypoint,
        ports: ports(&s.ports, &format!("{what} ports"))?,
        name: s.name,
        namespace: s.namespace,
        hostname: s.hostname,
        addresses,
        ranges,
        subject_alt_names: s.subject_alt_names,
        weighted_waypoints,
        load_balancing,
        ip_families,
        canonical: s.canonical,
        ingress_use_waypoint: s.ingress_use_waypoint,
        visibility,
    })
}

fn load_balancing_from_proto(
    lb: &pb::LoadBalancing,
    what: &str,
) -> Result<LoadBalancing, DecodeError> {
    use pb::load_balancing::{HealthPolicy, Mode, Scope};
    let err = |reason: String| DecodeError {
        what: what.to_owned(),
        reason,
    };
    let routing_preference = lb
        .routing_preference
        .iter()
        .map(|v| match Scope::try_from(*v) {
            Ok(Scope::Region) => Ok(LocalityScope::Region),
            Ok(Scope::Zone) => Ok(LocalityScope::Zone),
            Ok(Scope::Subzone) => Ok(LocalityScope::Subzone),
            Ok(Scope::Node) => Ok(LocalityScope::Node),
            Ok(Scope::Cluster) => Ok(LocalityScope::Cluster),
            Ok(Scope::Network) => Ok(LocalityScope::Network),
            Ok(Scope::UnspecifiedScope) | Err(_) => {
                Err(err(format!("routing_preference {v} is not a scope")))
            }
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mode = match Mode::try_from(lb.mode) {
        Ok(Mode::UnspecifiedMode) => LoadBalancingMode::Standard,
        Ok(Mode::Strict) => LoadBalancingMode::Strict,
        Ok(Mode::Failover) => LoadBalancingMode::Failover,
        Ok(Mode::Passthrough) => LoadBalancingMode::Passthrough,
        Err(_) => return Err(err(format!("unknown mode {}", lb.mode))),
    };
    let allow_unhealthy = match HealthPolicy::try_from(lb.health_policy) {
        Ok(HealthPolicy::OnlyHealthy) => false,
        Ok(HealthPolicy::AllowAll) => true,
        Err(_) => return Err(err(format!("unknown health_policy {}", lb.health_policy))),
    };
    Ok(LoadBalancing {
        routing_preference,
        mode,
        allow_unhealthy,
    })
}

fn load_balancing_to_proto(lb: &LoadBalancing) -> pb::LoadBalancing {
    use pb::load_balancing::{HealthPolicy, Mode, Scope};
    pb::LoadBalancing {
        routing_preference: lb
            .routing_preference
            .iter()
            .map(|s| {
                let scope = match s {
                    LocalityScope::Region => Scope::Region,
                    LocalityScope::Zone => Scope::Zone,
                    LocalityScope::Subzone => Scope::Subzone,
                    LocalityScope::Node => Scope::Node,
                    LocalityScope::Cluster => Scope::Cluster,
                    LocalityScope::Network => Scope::Network,
                };
                scope as i32
            })
            .collect(),
        mode: match lb.mode {
            LoadBalancingMode::Standard => Mode::UnspecifiedMode,
            LoadBalancingMode::Strict => Mode::Strict,
            LoadBalancingMode::Failover => Mode::Failover,
            LoadBalancingMode::Passthrough => Mode::Passthrough,
        } as i32,
        health_policy: if lb.allow_unhealthy {
            HealthPolicy::AllowAll
        } else {
            HealthPolicy::OnlyHealthy
        } as i32,
    }
}

fn service_to_proto(s: &Service) -> pb::Service {
    pb::Service {
        name: s.name.clone(),
        namespace: s.namespace.clone(),
        hostname: s.hostname.clone(),
        addresses: s
            .addresses
            .iter()
            .map(|(network, a)| pb::NetworkAddress {
                network: network.clone(),
                address: ip_bytes(a),
                length: None,
            })
            .chain(s.ranges.iter().map(|(network, net)| pb::NetworkAddress {
                network: network.clone(),
                address: ip_bytes(&net.addr()),
                length: Some(u32::from(net.prefix_len())),
            }))
            .collect(),
        ports: ports_to_proto(&s.ports),
        subject_alt_names: s.subject_alt_names.clone(),
        waypoint: s.waypoint.as_ref().map(waypoint_to_proto),
        load_balancing: s.load_balancing.as_ref().map(load_balancing_to_proto),
        ip_families: match s.ip_families {
            IpFamilies::Automatic => pb::IpFamilies::Automatic,
            IpFamilies::Ipv4Only => pb::IpFamilies::Ipv4Only,
            IpFamilies::Ipv6Only => pb::IpFamilies::Ipv6Only,
            IpFamilies::Dual => pb::IpFamilies::Dual,
        } as i32,
        extensions: Vec::new(),
        canonical: s.canonical,
        ingress_use_waypoint: s.ingress_use_waypoint,
        weighted_waypoints: s
            .weighted_waypoints
            .iter()
            .map(|(w, weight)| pb::WeightedWaypoint {
                destination: Some(waypoint_to_proto(w)),
                weight: *weight,
            })
            .collect(),
        visibility: match s.visibility {
            Visibility::Public => pb::service::Visibility::Public,
            Visibility::Namespace => pb::service::Visibility::Namespace,
        } as i32,
    }
}
