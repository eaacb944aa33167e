//! Where a captured outbound connection goes: a pure function of the state, the source workload
//! and the original destination, so it can be tested exhaustively without sockets.
//!
//! The rules (Istio's ztunnel behaves the same):
//! - the destination is a service VIP (in the source's network): the service must list the
//!   port; a healthy endpoint is picked (unhealthy ones skipped) and the target port comes from
//!   the endpoint's own port map for the service, else from the service's; a target port of 0
//!   (a named port nobody resolved) is an error. Then as for that workload;
//! - the destination is a workload's address: a mesh workload (HBONE) is reached through an
//!   HBONE tunnel to `<its ip>:15008` with `<its ip>:<port>` as `:authority`, expecting its
//!   identity (and the service's SANs, when reached through one); a workload outside the mesh is
//!   reached directly;
//! - a service or workload with a `waypoint`: an HBONE tunnel to the waypoint (an address, or an
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
use xds_client::resources::{PortMapping, Service, Waypoint, WaypointAddress, Workload};

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
/// healthy endpoints (`0..n`): random in production, fixed in tests.
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
        if let Some(waypoint) = &service.waypoint {
            let key = format!("{}/{}", service.namespace, service.hostname);
            if let Some(route) = via_waypoint(state, source, waypoint, dst, &key, pick)? {
                return Ok(route.with_service(service));
            }
        }
        return via_service(state, network, service, dst.port(), pick);
    }
    Ok(match state.workload_at(network, dst.ip()) {
        Some(w) => match &w.waypoint {
            Some(waypoint) => match via_waypoint(state, source, waypoint, dst, &w.uid, pick)? {
                Some(route) => route,
                None => to_workload(w, dst.0, None),
            },
            None => to_workload(w, dst.0, None),
        },
        None => Route::Passthrough {
            to: Upstream(dst.0),
            destination: None,
            service: None,
        },
    })
}

fn via_service(
    state: &State,
    network: &str,
    service: &Arc<Service>,
    port: u16,
    pick: &mut impl FnMut(usize) -> usize,
) -> Result<Route, RouteError> {
    let key = format!("{}/{}", service.namespace, service.hostname);
    let Some(service_port) = find_port(&service.ports, port) else {
        return Err(RouteError::NoServicePort { service: key, port });
    };
    let healthy: Vec<(&Arc<Workload>, &[PortMapping], IpAddr)> = state
        .endpoints(&key)
        .filter(|(w, _)| w.healthy && w.network == network)
        .filter_map(|(w, ports)| Some((w, ports, *w.addresses.first()?)))
        .collect();
    if healthy.is_empty() {
        return Err(RouteError::NoHealthyEndpoint {
            total: state.endpoints(&key).count(),
            service: key,
            network: network.to_owned(),
        });
    }
    let (endpoint, ports, ip) = healthy[pick(healthy.len()).min(healthy.len() - 1)];
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
    Ok(to_workload(
        endpoint,
        SocketAddr::new(ip, target_port),
        Some(service.clone()),
    ))
}

fn to_workload(w: &Arc<Workload>, upstream: SocketAddr, service: Option<Arc<Service>>) -> Route {
    if !w.hbone() {
        return Route::Passthrough {
            to: Upstream(upstream),
            destination: Some(w.clone()),
            service,
        };
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
    Route::Hbone {
        target: HboneTarget::for_ip(upstream.ip()),
        authority: Upstream(upstream),
        expected,
        destination: w.clone(),
        service,
    }
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
        waypoint: match &waypoint.destination {
            WaypointAddress::Ip { network, ip } if network.is_empty() => ip.to_string(),
            WaypointAddress::Ip { network, ip } => format!("{network}/{ip}"),
            WaypointAddress::Hostname {
                namespace,
                hostname,
            } => format!("{namespace}/{hostname}"),
        },
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
                .filter_map(|(w, _)| Some((w, *w.addresses.first()?)))
                .collect();
            if healthy.is_empty() {
                return Err(missing());
            }
            healthy[pick(healthy.len()).min(healthy.len() - 1)]
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
