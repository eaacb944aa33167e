//! The `/config_dump` document, in the shape Istio's ztunnel writes and `istioctl
//! ztunnel-config` reads: `workloads`, `services`, `policies`, `certificates`, `workloadState`
//! (shared mode), `version` and `config`, with the same keys, value formats and omissions
//! (`interop/config_dump.sh` compares the two for one state). Ours adds `synced` (whether the
//! policy store has its first complete set) and `pods` (each served pod with its resolved
//! workload, certificate expiry and open connections); readers of Istio's shape ignore them.
//!
//! Formats, as Istio's: addresses `network/ip` (the default network empty: `/10.96.0.10`),
//! waypoints and gateways `{"destination": "network/ip" | "namespace/hostname",
//! "hboneMtlsPort": n}`, port maps with the service port as a string key, enum values in their
//! Rust spelling (`Healthy`, `HostNetwork`, `Failover`, `IPv6`), certificates with the PEM text
//! base64-encoded, the serial number in decimal and RFC 3339 times.

use base64::Engine;
use rustls::pki_types::CertificateDer;
use serde_json::{Map, Value, json};
use xds_client::resources::{
    IpFamilies, LoadBalancingMode, LocalityScope, NetworkMode, Service, Tunnel, Visibility,
    Waypoint, WaypointAddress, Workload,
};

use crate::admin::PodStatus;
use crate::state::State;

/// One identity's certificates, for the dump.
#[derive(Debug, Clone)]
pub struct CertificateDump {
    /// The SPIFFE id.
    pub identity: String,
    /// Its chain, leaf first (empty while none has been issued).
    pub chain: Vec<CertificateDer<'static>>,
    /// The trust roots it is verified against.
    pub roots: Vec<CertificateDer<'static>>,
    /// Why there is no certificate, when the last attempt failed.
    pub error: Option<String>,
}

/// What the dump shows besides the state.
#[derive(Debug, Clone, Default)]
pub struct DumpContext {
    /// Certificates held, one entry per identity.
    pub certificates: Vec<CertificateDump>,
    /// The pods served (shared mode).
    pub pods: Vec<PodStatus>,
    /// The proxy's effective settings (`config`).
    pub config: Value,
}

/// The `/config_dump` body: pretty-printed JSON.
pub fn config_dump(state: &State, context: &DumpContext) -> String {
    let mut workloads: Vec<&Workload> = state.workloads().map(|w| &**w).collect();
    workloads.sort_by(|a, b| a.uid.cmp(&b.uid));
    let mut services: Vec<&Service> = state.services().map(|s| &**s).collect();
    services.sort_by(|a, b| (&a.namespace, &a.hostname).cmp(&(&b.namespace, &b.hostname)));
    let mut policies: Vec<&authz::Policy> = state.policies().iter().map(|p| &**p).collect();
    policies.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    let mut certificates: Vec<&CertificateDump> = context.certificates.iter().collect();
    certificates.sort_by(|a, b| a.identity.cmp(&b.identity));
    let mut doc = Map::new();
    doc.insert(
        "workloads".into(),
        workloads.into_iter().map(workload).collect(),
    );
    doc.insert(
        "services".into(),
        services.into_iter().map(|s| service(state, s)).collect(),
    );
    doc.insert(
        "policies".into(),
        policies.into_iter().map(policy).collect(),
    );
    doc.insert(
        "certificates".into(),
        certificates.into_iter().map(certificate).collect(),
    );
    if !context.pods.is_empty() {
        doc.insert("workloadState".into(), workload_state(&context.pods));
    }
    doc.insert(
        "version".into(),
        json!({
            "version": env!("CARGO_PKG_VERSION"),
            "implementation": "ambient-rs",
            "buildProfile": if cfg!(debug_assertions) { "debug" } else { "release" },
            "cryptoProvider": "aws-lc-rs",
        }),
    );
    doc.insert("config".into(), context.config.clone());
    doc.insert("synced".into(), state.is_synced().into());
    doc.insert("pods".into(), context.pods.iter().map(pod).collect());
    serde_json::to_string_pretty(&Value::Object(doc)).unwrap_or_default()
}

/// `network/ip`, as Istio writes a network address.
fn network_addr(network: &str, ip: impl std::fmt::Display) -> String {
    format!("{network}/{ip}")
}

fn gateway(g: &Waypoint) -> Value {
    let destination = match &g.destination {
        WaypointAddress::Ip { network, ip } => network_addr(network, ip),
        WaypointAddress::Hostname {
            namespace,
            hostname,
        } => format!("{namespace}/{hostname}"),
    };
    json!({"destination": destination, "hboneMtlsPort": g.hbone_port})
}

/// Inserts `key` when `value` is not empty (Istio omits default fields).
fn put_nonempty(o: &mut Map<String, Value>, key: &str, value: &str) {
    if !value.is_empty() {
        o.insert(key.into(), value.into());
    }
}

fn workload(w: &Workload) -> Value {
    let mut o = Map::new();
    o.insert("uid".into(), w.uid.clone().into());
    o.insert(
        "workloadIps".into(),
        w.addresses.iter().map(|a| a.to_string()).collect(),
    );
    if let Some(waypoint) = &w.waypoint {
        o.insert("waypoint".into(), gateway(waypoint));
    }
    if let Some(g) = &w.network_gateway {
        o.insert("networkGateway".into(), gateway(g));
    }
    let protocol = match w.tunnel {
        Tunnel::None => "TCP",
        Tunnel::Hbone => "HBONE",
        Tunnel::LegacyIstioMtls => "LEGACY_ISTIO_MTLS",
    };
    o.insert("protocol".into(), protocol.into());
    let mode = match w.network_mode {
        NetworkMode::Standard => "Standard",
        NetworkMode::HostNetwork => "HostNetwork",
    };
    o.insert("networkMode".into(), mode.into());
    o.insert("name".into(), w.name.clone().into());
    o.insert("namespace".into(), w.namespace.clone().into());
    // Always: the model fills in the default an elided trust domain stands for (where Istio
    // shows none, we show `cluster.local`).
    o.insert("trustDomain".into(), w.identity.trust_domain().into());
    put_nonempty(
        &mut o,
        "serviceAccount",
        w.identity.service_account().unwrap_or_default(),
    );
    put_nonempty(&mut o, "network", &w.network);
    put_nonempty(&mut o, "workloadName", &w.workload_name);
    o.insert("workloadType".into(), w.workload_type.kind().into());
    put_nonempty(&mut o, "canonicalName", &w.canonical_name);
    put_nonempty(&mut o, "canonicalRevision", &w.canonical_revision);
    put_nonempty(&mut o, "hostname", &w.hostname);
    put_nonempty(&mut o, "node", &w.node);
    if w.native_tunnel {
        o.insert("nativeTunnel".into(), true.into());
    }
    if let Some(t) = w.application_tunnel {
        let mut tunnel = Map::new();
        tunnel.insert(
            "protocol".into(),
            if t.proxy_protocol { "PROXY" } else { "NONE" }.into(),
        );
        if t.port != 0 {
            tunnel.insert("port".into(), t.port.into());
        }
        o.insert("applicationTunnel".into(), Value::Object(tunnel));
    }
    if !w.authorization_policies.is_empty() {
        o.insert(
            "authorizationPolicies".into(),
            w.authorization_policies.clone().into(),
        );
    }
    o.insert("status".into(), health(w.healthy).into());
    o.insert("clusterId".into(), w.cluster_id.clone().into());
    let l = &w.locality;
    if !(l.region.is_empty() && l.zone.is_empty() && l.subzone.is_empty()) {
        let mut locality = Map::new();
        put_nonempty(&mut locality, "region", &l.region);
        put_nonempty(&mut locality, "zone", &l.zone);
        put_nonempty(&mut locality, "subzone", &l.subzone);
        o.insert("locality".into(), Value::Object(locality));
    }
    if !w.services.is_empty() {
        o.insert(
            "services".into(),
            w.services.keys().cloned().collect::<Vec<_>>().into(),
        );
    }
    o.insert("capacity".into(), w.capacity.into());
    Value::Object(o)
}

fn health(healthy: bool) -> &'static str {
    if healthy { "Healthy" } else { "Unhealthy" }
}

fn port_map(ports: &[xds_client::resources::PortMapping]) -> Value {
    ports
        .iter()
        .map(|p| (p.service_port.to_string(), Value::from(p.target_port)))
        .collect::<Map<_, _>>()
        .into()
}

fn service(state: &State, s: &Service) -> Value {
    let key = format!("{}/{}", s.namespace, s.hostname);
    let mut o = Map::new();
    o.insert("name".into(), s.name.clone().into());
    o.insert("namespace".into(), s.namespace.clone().into());
    o.insert("hostname".into(), s.hostname.clone().into());
    o.insert(
        "vips".into(),
        s.addresses
            .iter()
            .map(|(n, ip)| network_addr(n, ip))
            .collect(),
    );
    if !s.ranges.is_empty() {
        o.insert(
            "cidrVips".into(),
            s.ranges
                .iter()
                .map(|(n, net)| json!({"network": n, "cidr": net.to_string()}))
                .collect(),
        );
    }
    o.insert("ports".into(), port_map(&s.ports));
    // The endpoints a connection may be sent to: healthy ones, or all under `ALLOW_ALL`.
    let allow_unhealthy = s
        .load_balancing
        .as_ref()
        .is_some_and(|lb| lb.allow_unhealthy);
    let endpoints: Map<String, Value> = state
        .endpoints(&key)
        .filter(|(w, _)| w.healthy || allow_unhealthy)
        .map(|(w, ports)| {
            (
                w.uid.clone(),
                json!({"workloadUid": w.uid, "port": port_map(ports), "status": health(w.healthy)}),
            )
        })
        .collect();
    o.insert("endpoints".into(), endpoints.into());
    o.insert("subjectAltNames".into(), s.subject_alt_names.clone().into());
    if let Some(waypoint) = &s.waypoint {
        o.insert("waypoint".into(), gateway(waypoint));
    }
    if !s.weighted_waypoints.is_empty() {
        o.insert(
            "weightedWaypoints".into(),
            s.weighted_waypoints
                .iter()
                .map(|(w, weight)| json!({"destination": gateway(w), "weight": weight}))
                .collect(),
        );
    }
    if let Some(lb) = &s.load_balancing {
        let scopes: Vec<&str> = lb
            .routing_preference
            .iter()
            .map(|scope| match scope {
                LocalityScope::Region => "Region",
                LocalityScope::Zone => "Zone",
                LocalityScope::Subzone => "Subzone",
                LocalityScope::Node => "Node",
                LocalityScope::Cluster => "Cluster",
                LocalityScope::Network => "Network",
            })
            .collect();
        let mode = match lb.mode {
            LoadBalancingMode::Standard => "Standard",
            LoadBalancingMode::Strict => "Strict",
            LoadBalancingMode::Failover => "Failover",
            LoadBalancingMode::Passthrough => "Passthrough",
        };
        let health_policy = if lb.allow_unhealthy {
            "AllowAll"
        } else {
            "OnlyHealthy"
        };
        o.insert(
            "loadBalancer".into(),
            json!({"routingPreferences": scopes, "mode": mode, "healthPolicy": health_policy}),
        );
    }
    let families = match s.ip_families {
        IpFamilies::Automatic => None,
        IpFamilies::Ipv4Only => Some("IPv4"),
        IpFamilies::Ipv6Only => Some("IPv6"),
        IpFamilies::Dual => Some("Dual"),
    };
    if let Some(f) = families {
        o.insert("ipFamilies".into(), f.into());
    }
    o.insert("canonical".into(), s.canonical.into());
    let visibility = match s.visibility {
        Visibility::Public => "Public",
        Visibility::Namespace => "Namespace",
    };
    o.insert("visibility".into(), visibility.into());
    Value::Object(o)
}

fn policy(p: &authz::Policy) -> Value {
    let rules: Vec<Value> = p
        .rules
        .iter()
        .map(|r| {
            r.clauses
                .iter()
                .map(|c| c.matches.iter().map(policy_match).collect::<Value>())
                .collect()
        })
        .collect();
    json!({
        "name": p.name,
        "namespace": p.namespace,
        "scope": format!("{:?}", p.scope),
        "action": format!("{:?}", p.action),
        "rules": rules,
        "dryRun": p.dry_run,
    })
}

fn policy_match(m: &authz::Match) -> Value {
    let mut o = Map::new();
    let strings = |o: &mut Map<String, Value>, key: &str, v: &[authz::StringMatch]| {
        if !v.is_empty() {
            let list = v
                .iter()
                .map(|s| match s {
                    authz::StringMatch::Exact(x) => json!({"Exact": x}),
                    authz::StringMatch::Prefix(x) => json!({"Prefix": x}),
                    authz::StringMatch::Suffix(x) => json!({"Suffix": x}),
                    authz::StringMatch::Presence => json!({"Presence": null}),
                })
                .collect();
            o.insert(key.into(), list);
        }
    };
    let nets = |o: &mut Map<String, Value>, key: &str, v: &[ipnet::IpNet]| {
        if !v.is_empty() {
            o.insert(key.into(), v.iter().map(|n| n.to_string()).collect());
        }
    };
    let ports = |o: &mut Map<String, Value>, key: &str, v: &[u16]| {
        if !v.is_empty() {
            o.insert(key.into(), v.to_vec().into());
        }
    };
    let accounts = |o: &mut Map<String, Value>, key: &str, v: &[authz::ServiceAccountMatch]| {
        if !v.is_empty() {
            let list = v
                .iter()
                .map(|s| json!({"namespace": s.namespace, "serviceAccount": s.name}))
                .collect();
            o.insert(key.into(), list);
        }
    };
    strings(&mut o, "namespaces", &m.namespaces);
    strings(&mut o, "notNamespaces", &m.not_namespaces);
    accounts(&mut o, "serviceAccounts", &m.service_accounts);
    accounts(&mut o, "notServiceAccounts", &m.not_service_accounts);
    strings(&mut o, "principals", &m.principals);
    strings(&mut o, "notPrincipals", &m.not_principals);
    nets(&mut o, "sourceIps", &m.source_ips);
    nets(&mut o, "notSourceIps", &m.not_source_ips);
    nets(&mut o, "destinationIps", &m.destination_ips);
    nets(&mut o, "notDestinationIps", &m.not_destination_ips);
    ports(&mut o, "destinationPorts", &m.destination_ports);
    ports(&mut o, "notDestinationPorts", &m.not_destination_ports);
    Value::Object(o)
}

fn certificate(c: &CertificateDump) -> Value {
    let state = match (&c.error, c.chain.is_empty()) {
        (_, false) => "Available".to_owned(),
        (Some(e), true) => format!("Unavailable: {e}"),
        (None, true) => "Initializing".to_owned(),
    };
    json!({
        "identity": c.identity,
        "state": state,
        "certChain": c.chain.iter().map(cert).collect::<Vec<_>>(),
        "rootCerts": c.roots.iter().map(cert).collect::<Vec<_>>(),
    })
}

fn cert(der: &CertificateDer<'static>) -> Value {
    let pem = identity::pem::certs_to_pem(std::slice::from_ref(der));
    let mut o = Map::new();
    o.insert(
        "pem".into(),
        base64::engine::general_purpose::STANDARD.encode(pem).into(),
    );
    match identity::CertInfo::parse(der) {
        Ok(info) => {
            o.insert("serialNumber".into(), info.serial_number.into());
            o.insert(
                "validFrom".into(),
                identity::fmt_time(info.not_before).into(),
            );
            o.insert(
                "expirationTime".into(),
                identity::fmt_time(info.not_after).into(),
            );
        }
        Err(e) => {
            o.insert("error".into(), e.to_string().into());
        }
    }
    Value::Object(o)
}

/// Istio's `workloadState`: each served pod by the agent's uid, `Up`, with who it is.
fn workload_state(pods: &[PodStatus]) -> Value {
    pods.iter()
        .map(|p| {
            let id = identity::SpiffeId::parse(&p.identity).ok();
            let mut info = Map::new();
            info.insert("name".into(), p.name.clone().into());
            info.insert("namespace".into(), p.namespace.clone().into());
            if let Some(id) = &id {
                info.insert("trustDomain".into(), id.trust_domain().into());
                info.insert(
                    "serviceAccount".into(),
                    id.service_account().unwrap_or_default().into(),
                );
            }
            (p.uid.clone(), json!({"state": "Up", "info": info}))
        })
        .collect::<Map<_, _>>()
        .into()
}

fn pod(p: &PodStatus) -> Value {
    json!({
        "uid": p.uid, "namespace": p.namespace, "name": p.name, "identity": p.identity,
        "workloadUid": p.workload_uid,
        "certificateExpiry": p.cert_expiry.map(identity::fmt_time),
        "openConnections": p.open_connections,
    })
}
