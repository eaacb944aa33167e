//! Where a captured outbound connection goes: a pure function of the state, the source workload
//! and the original destination, so it can be tested exhaustively without sockets.
//!
//! The rules (Istio's ztunnel behaves the same):
//! - the destination is a service VIP or in a service's range (in the source's network): a
//!   service in `PASSTHROUGH` load-balancing mode is passed to the address dialed; else the
//!   service must list the port, and an endpoint is picked among those in the source's network
//!   with an address of the family the service allows (`ip_families`; with `AUTOMATIC` or
//!   `DUAL`, the dialed address's family when the endpoint has one): healthy ones only, unless
//!   its health policy is `ALLOW_ALL`; under `STRICT` only those sharing every locality scope
//!   of its routing preference with the source, under `FAILOVER` those sharing the most
//!   (counted from the first scope); then at random, weighted by capacity (0: never). The
//!   target port comes from the endpoint's own port map for the service, else from the
//!   service's; a target port of 0 (a named port nobody resolved) is an error. Then as for that
//!   workload. When the only endpoints are in other networks behind a network gateway, the
//!   connection is refused with that reason (gateways are not carried yet);
//! - the destination is a workload's address: a mesh workload (HBONE) is reached through an
//!   HBONE tunnel to `<its ip>:15008` with `<its ip>:<port>` as `:authority`, expecting its
//!   identity (and the service's SANs, when reached through one); a workload outside the mesh is
//!   reached directly;
//! - a workload that speaks a sidecar's mutual TLS (`LEGACY_ISTIO_MTLS`): refused, with that
//!   reason (not carried: sending it plain text would weaken what it asked for);
//! - a service or workload with a `waypoint` (for a service with weighted waypoints, one chosen
//!   by weight): an HBONE tunnel to the waypoint (an address, or an
//!   endpoint of the waypoint's service) on its HBONE port, with the original destination as
//!   `:authority`, expecting the waypoint's identity; the waypoint itself is not sent back to
//!   itself but reaches the destination directly; a waypoint that cannot be found is an error
//!   (the connection is refused, never sent around the waypoint);
//! - anything else is outside the mesh: passthrough to the original destination;
//! - except the proxy's own ports (15001/15006/15008) at the source's own address: refused.
//!
//! Same-node destinations go through HBONE too.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use identity::SpiffeId;
use xds_client::resources::{
    IpFamilies, LoadBalancingMode, LocalityScope, PortMapping, Service, Tunnel, Waypoint,
    WaypointAddress, Workload,
};

use crate::addr::{HboneTarget, OrigDst, Upstream};
use crate::state::State;

/// What to do with one outbound connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// Tunnel through HBONE.
    Hbone {
        /// Where to dial (the destination pod's address, port 15008).
        target: HboneTarget,
        /// The CONNECT `:authority`: the destination pod's address and target port.
        authority: Upstream,
        /// Identities the destination may present (never empty).
        expected: Vec<SpiffeId>,
        /// The destination workload.
        destination: Arc<Workload>,
        /// The service it was reached through, if any.
        service: Option<Arc<Service>>,
    },
    /// Connect directly (the destination is not in the mesh).
    Passthrough {
        /// Where to connect.
        to: Upstream,
        /// The destination workload, when it is known but not in the mesh.
        destination: Option<Arc<Workload>>,
        /// The service it was reached through, if any.
        service: Option<Arc<Service>>,
    },
}

/// Why a connection cannot be routed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RouteError {
    /// The service does not list the port the client dialed.
    #[error("service {service} has no port {port}")]
    NoServicePort {
        /// `namespace/hostname`.
        service: String,
        /// The port dialed.
        port: u16,
    },
    /// The chosen endpoint's target port for the service port is unknown (named, unresolved).
    #[error("service {service} port {port}: endpoint {endpoint} has no target port for it")]
    NoTargetPort {
        /// `namespace/hostname`.
        service: String,
        /// The service port.
        port: u16,
        /// The endpoint's uid.
        endpoint: String,
    },
    /// The destination is one of the proxy's own ports at the source's own address: it would
    /// reach the proxy itself.
    #[error("{destination} is the proxy's own port (a connection to the proxy itself)")]
    SelfCall {
        /// The original destination.
        destination: SocketAddr,
    },
    /// The service has no healthy endpoint with an address in the source's network.
    #[error(
        "service {service} has no healthy endpoint (of {total}) reachable from network {network:?}"
    )]
    NoHealthyEndpoint {
        /// `namespace/hostname`.
        service: String,
        /// How many endpoints it has in all.
        total: usize,
        /// The source's network.
        network: String,
    },
    /// The service's only endpoints are in other networks, reached through a network gateway,
    /// which this proxy does not carry yet.
    #[error(
        "service {service} has endpoints only in network {network:?}, behind network gateway \
         {gateway}; network gateways are not carried yet"
    )]
    NetworkGatewayNotCarried {
        /// `namespace/hostname`.
        service: String,
        /// The endpoints' network.
        network: String,
        /// The gateway as the resource names it.
        gateway: String,
    },
    /// The destination speaks a sidecar's mutual TLS (`LEGACY_ISTIO_MTLS`), which this proxy
    /// does not originate: refused rather than sent in plain text.
    #[error(
        "{destination} expects a sidecar's mutual TLS (LEGACY_ISTIO_MTLS), which is not carried"
    )]
    TunnelNotCarried {
        /// The destination workload's uid.
        destination: String,
    },
    /// The destination must be reached through a waypoint that cannot be found (or has no
    /// healthy endpoint): refused rather than sent around it.
    #[error("{destination} must go through waypoint {waypoint}, which is not known or not healthy")]
    NoWaypoint {
        /// The destination (workload uid or service key).
        destination: String,
        /// The waypoint as the resource names it.
        waypoint: String,
    },
}

/// Decides the route of a connection from `source` to `dst`. `pick(n)` chooses one of `n`
/// weight units (`0..n`) of the candidates laid end to end (each endpoint's capacity, each
/// weighted waypoint's weight): random in production, fixed in tests. With every weight 1 it is
/// the index of the candidate.
pub fn decide(
    state: &State,
    source: &Workload,
    dst: OrigDst,
    pick: &mut impl FnMut(usize) -> usize,
) -> Result<Route, RouteError> {
    let network = source.network.as_str();
    if crate::addr::PROXY_PORTS.contains(&dst.port()) && source.addresses.contains(&dst.ip()) {
        return Err(RouteError::SelfCall { destination: dst.0 });
    }
    if let Some(service) = state.service_at(network, dst.ip()) {
        if let Some(waypoint) = service_waypoint(service, pick) {
            let key = format!("{}/{}", service.namespace, service.hostname);
            if let Some(route) = via_waypoint(state, source, waypoint, dst, &key, pick)? {
                return Ok(route.with_service(service));
            }
        }
        return via_service(state, source, service, dst, pick);
    }
    match state.workload_at(network, dst.ip()) {
        Some(w) => match &w.waypoint {
            Some(waypoint) => match via_waypoint(state, source, waypoint, dst, &w.uid, pick)? {
                Some(route) => Ok(route),
                None => to_workload(w, dst.0, None),
            },
            None => to_workload(w, dst.0, None),
        },
        None => Ok(Route::Passthrough {
            to: Upstream(dst.0),
            destination: None,
            service: None,
        }),
    }
}

/// The waypoint of a service: one of its weighted waypoints chosen by weight, when their
/// weights add up to more than 0; else its `waypoint`.
fn service_waypoint<'s>(
    service: &'s Service,
    pick: &mut impl FnMut(usize) -> usize,
) -> Option<&'s Waypoint> {
    choose(&service.weighted_waypoints, |(_, w)| *w, pick)
        .map(|(w, _)| w)
        .or(service.waypoint.as_ref())
}

/// One of `options`, by weight: `pick(total)` lands in one option's share. `None` when the
/// weights add up to 0.
fn choose<'o, T>(
    options: &'o [T],
    weight: impl Fn(&T) -> u32,
    pick: &mut impl FnMut(usize) -> usize,
) -> Option<&'o T> {
    let total: u64 = options.iter().map(|o| u64::from(weight(o))).sum();
    let total = usize::try_from(total).ok().filter(|t| *t > 0)?;
    let mut at = pick(total).min(total - 1);
    for option in options {
        let w = weight(option) as usize;
        if at < w {
            return Some(option);
        }
        at -= w;
    }
    None
}

/// The address of `w` to dial for a connection to `dialed` under `families`: the first of the
/// allowed family; with `Automatic`/`Dual`, the first of `dialed`'s family, else the first.
fn endpoint_address(w: &Workload, dialed: IpAddr, families: IpFamilies) -> Option<IpAddr> {
    let first_v4 = || w.addresses.iter().copied().find(IpAddr::is_ipv4);
    let first_v6 = || w.addresses.iter().copied().find(IpAddr::is_ipv6);
    match families {
        IpFamilies::Ipv4Only => first_v4(),
        IpFamilies::Ipv6Only => first_v6(),
        IpFamilies::Automatic | IpFamilies::Dual => {
            let same = if dialed.is_ipv4() {
                first_v4()
            } else {
                first_v6()
            };
            same.or_else(|| w.addresses.first().copied())
        }
    }
}

/// How many of `preference`, from the first, `endpoint` shares with `source`.
fn locality_rank(source: &Workload, endpoint: &Workload, preference: &[LocalityScope]) -> usize {
    preference
        .iter()
        .take_while(|scope| match scope {
            LocalityScope::Region => source.locality.region == endpoint.locality.region,
            LocalityScope::Zone => source.locality.zone == endpoint.locality.zone,
            LocalityScope::Subzone => source.locality.subzone == endpoint.locality.subzone,
            LocalityScope::Node => source.node == endpoint.node,
            LocalityScope::Cluster => source.cluster_id == endpoint.cluster_id,
            LocalityScope::Network => source.network == endpoint.network,
        })
        .count()
}

fn via_service(
    state: &State,
    source: &Workload,
    service: &Arc<Service>,
    dst: OrigDst,
    pick: &mut impl FnMut(usize) -> usize,
) -> Result<Route, RouteError> {
    let key = format!("{}/{}", service.namespace, service.hostname);
    let port = dst.port();
    let lb = service.load_balancing.as_ref();
    if lb.is_some_and(|lb| lb.mode == LoadBalancingMode::Passthrough) {
        return Ok(Route::Passthrough {
            to: Upstream(dst.0),
            destination: None,
            service: Some(service.clone()),
        });
    }
    let Some(service_port) = find_port(&service.ports, port) else {
        return Err(RouteError::NoServicePort { service: key, port });
    };
    let allow_unhealthy = lb.is_some_and(|lb| lb.allow_unhealthy);
    let mut elsewhere: Option<(&str, &Waypoint)> = None;
    let mut candidates: Vec<(&Arc<Workload>, &[PortMapping], IpAddr, usize)> = Vec::new();
    for (w, ports) in state.endpoints(&key) {
        if !(w.healthy || allow_unhealthy) {
            continue;
        }
        if w.network != source.network {
            if let Some(gateway) = &w.network_gateway {
                elsewhere.get_or_insert((&w.network, gateway));
            }
            continue;
        }
        let Some(ip) = endpoint_address(w, dst.ip(), service.ip_families) else {
            continue;
        };
        let rank = match lb {
            Some(lb)
                if matches!(
                    lb.mode,
                    LoadBalancingMode::Strict | LoadBalancingMode::Failover
                ) =>
            {
                let rank = locality_rank(source, w, &lb.routing_preference);
                if lb.mode == LoadBalancingMode::Strict && rank < lb.routing_preference.len() {
                    continue;
                }
                rank
            }
            _ => 0,
        };
        candidates.push((w, ports, ip, rank));
    }
    let best = candidates.iter().map(|c| c.3).max().unwrap_or(0);
    candidates.retain(|c| c.3 == best);
    let Some(&(endpoint, ports, ip, _)) = choose(&candidates, |c| c.0.capacity, pick) else {
        if candidates.is_empty()
            && let Some((network, gateway)) = elsewhere
        {
            return Err(RouteError::NetworkGatewayNotCarried {
                service: key,
                network: network.to_owned(),
                gateway: gateway_name(gateway),
            });
        }
        return Err(RouteError::NoHealthyEndpoint {
            total: state.endpoints(&key).count(),
            service: key,
            network: source.network.clone(),
        });
    };
    let target_port = find_port(ports, port)
        .map(|p| p.target_port)
        .filter(|p| *p != 0)
        .unwrap_or(service_port.target_port);
    if target_port == 0 {
        return Err(RouteError::NoTargetPort {
            service: key,
            port,
            endpoint: endpoint.uid.clone(),
        });
    }
    to_workload(
        endpoint,
        SocketAddr::new(ip, target_port),
        Some(service.clone()),
    )
}

/// A waypoint or gateway as its resource names it.
fn gateway_name(gateway: &Waypoint) -> String {
    match &gateway.destination {
        WaypointAddress::Ip { network, ip } if network.is_empty() => ip.to_string(),
        WaypointAddress::Ip { network, ip } => format!("{network}/{ip}"),
        WaypointAddress::Hostname {
            namespace,
            hostname,
        } => format!("{namespace}/{hostname}"),
    }
}

fn to_workload(
    w: &Arc<Workload>,
    upstream: SocketAddr,
    service: Option<Arc<Service>>,
) -> Result<Route, RouteError> {
    match w.tunnel {
        Tunnel::Hbone => {}
        Tunnel::None => {
            return Ok(Route::Passthrough {
                to: Upstream(upstream),
                destination: Some(w.clone()),
                service,
            });
        }
        Tunnel::LegacyIstioMtls => {
            return Err(RouteError::TunnelNotCarried {
                destination: w.uid.clone(),
            });
        }
    }
    let mut expected = vec![w.identity.clone()];
    if let Some(s) = &service {
        for san in &s.subject_alt_names {
            if let Ok(id) = SpiffeId::parse(san)
                && !expected.contains(&id)
            {
                expected.push(id);
            }
        }
    }
    Ok(Route::Hbone {
        target: HboneTarget::for_ip(upstream.ip()),
        authority: Upstream(upstream),
        expected,
        destination: w.clone(),
        service,
    })
}

impl Route {
    fn with_service(self, via: &Arc<Service>) -> Route {
        match self {
            Route::Hbone {
                target,
                authority,
                expected,
                destination,
                ..
            } => Route::Hbone {
                target,
                authority,
                expected,
                destination,
                service: Some(via.clone()),
            },
            other => other,
        }
    }
}

/// The tunnel to `waypoint` for a connection to `dst` (named `destination` in errors): to the
/// waypoint's address on its HBONE port, with `dst` as the authority and the waypoint's identity
/// expected. `None` when `source` is that waypoint (it reaches the destination directly).
fn via_waypoint(
    state: &State,
    source: &Workload,
    waypoint: &Waypoint,
    dst: OrigDst,
    destination: &str,
    pick: &mut impl FnMut(usize) -> usize,
) -> Result<Option<Route>, RouteError> {
    let missing = || RouteError::NoWaypoint {
        destination: destination.to_owned(),
        waypoint: gateway_name(waypoint),
    };
    let (workload, ip) = match &waypoint.destination {
        WaypointAddress::Ip { network, ip } => {
            if source.network == *network && source.addresses.contains(ip) {
                return Ok(None);
            }
            (state.workload_at(network, *ip).ok_or_else(missing)?, *ip)
        }
        WaypointAddress::Hostname {
            namespace,
            hostname,
        } => {
            let key = format!("{namespace}/{hostname}");
            if source.services.contains_key(&key) {
                return Ok(None);
            }
            let healthy: Vec<(&Arc<Workload>, IpAddr)> = state
                .endpoints(&key)
                .filter(|(w, _)| w.healthy && w.network == source.network)
                .filter_map(|(w, _)| {
                    Some((w, endpoint_address(w, dst.ip(), IpFamilies::Automatic)?))
                })
                .collect();
            *choose(&healthy, |(w, _)| w.capacity, pick).ok_or_else(missing)?
        }
    };
    if workload.uid == source.uid {
        return Ok(None);
    }
    Ok(Some(Route::Hbone {
        target: HboneTarget(SocketAddr::new(ip, waypoint.hbone_port)),
        authority: Upstream(dst.0),
        expected: vec![workload.identity.clone()],
        destination: workload.clone(),
        service: None,
    }))
}

fn find_port(ports: &[PortMapping], service_port: u16) -> Option<PortMapping> {
    ports
        .iter()
        .copied()
        .find(|p| p.service_port == service_port)
}
