//! The Istio resource types in clean Rust form, decoded from their protobuf with validation.
//!
//! Decoding is per resource: a truncated or inconsistent resource is rejected with a reason that
//! names it (the client NACKs it and keeps the others), never a panic.

use std::collections::BTreeMap;
use std::net::IpAddr;

use identity::SpiffeId;
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
    /// Whether the workload is in the mesh and speaks HBONE (via its node's proxy).
    pub hbone: bool,
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

/// A service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    /// Service name.
    pub name: String,
    /// Namespace.
    pub namespace: String,
    /// FQDN, e.g. `web.default.svc.cluster.local`.
    pub hostname: String,
    /// Addresses per network.
    pub addresses: Vec<(String, IpAddr)>,
    /// Ports.
    pub ports: Vec<PortMapping>,
    /// Identities to expect instead of per-workload ones, if set.
    pub subject_alt_names: Vec<String>,
    /// The waypoint all traffic to it must go through, if any.
    pub waypoint: Option<Waypoint>,
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
    let tunnel = pb::TunnelProtocol::try_from(w.tunnel_protocol)
        .map_err(|_| err(format!("unknown tunnel_protocol {}", w.tunnel_protocol)))?;
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
        hbone: tunnel == pb::TunnelProtocol::Hbone,
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
    })
}

fn workload_to_proto(w: &Workload) -> pb::Workload {
    pb::Workload {
        name: w.name.clone(),
        namespace: w.namespace.clone(),
        addresses: w
            .addresses
            .iter()
            .map(|a| match a {
                IpAddr::V4(v4) => v4.octets().to_vec(),
                IpAddr::V6(v6) => v6.octets().to_vec(),
            })
            .collect(),
        network: w.network.clone(),
        tunnel_protocol: if w.hbone {
            pb::TunnelProtocol::Hbone
        } else {
            pb::TunnelProtocol::None
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
    }
}

fn ports_to_proto(list: &[PortMapping]) -> Vec<pb::Port> {
    list.iter()
        .map(|p| pb::Port {
            service_port: u32::from(p.service_port),
            target_port: u32::from(p.target_port),
        })
        .collect()
}

fn service_from_proto(s: pb::Service) -> Result<Service, DecodeError> {
    let what = format!("Service {}/{}", s.namespace, s.hostname);
    if s.namespace.is_empty() || s.hostname.is_empty() {
        return Err(DecodeError {
            what,
            reason: "namespace and hostname must be set".into(),
        });
    }
    let addresses = s
        .addresses
        .iter()
        .enumerate()
        .map(|(i, a)| {
            Ok((
                a.network.clone(),
                ip(&a.address, &format!("{what} addresses[{i}]"))?,
            ))
        })
        .collect::<Result<Vec<_>, DecodeError>>()?;
    let waypoint = s
        .waypoint
        .as_ref()
        .map(|g| waypoint_from_proto(g, &format!("{what} waypoint")))
        .transpose()?;
    Ok(Service {
        waypoint,
        ports: ports(&s.ports, &format!("{what} ports"))?,
        name: s.name,
        namespace: s.namespace,
        hostname: s.hostname,
        addresses,
        subject_alt_names: s.subject_alt_names,
    })
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
                address: match a {
                    IpAddr::V4(v4) => v4.octets().to_vec(),
                    IpAddr::V6(v6) => v6.octets().to_vec(),
                },
            })
            .collect(),
        ports: ports_to_proto(&s.ports),
        subject_alt_names: s.subject_alt_names.clone(),
        waypoint: s.waypoint.as_ref().map(waypoint_to_proto),
    }
}
