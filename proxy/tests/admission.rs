//! The inbound admission decision (`proxy::inbound::admit`), pure: a table of the refusals and
//! their statuses, and properties over random states, destinations and clients against a naive
//! oracle written from the rules, not from the code.

mod common;

use std::net::{IpAddr, SocketAddr};

use common::{allow, id, workload};
use proptest::prelude::*;
use proxy::inbound::{Refusal, admit};
use proxy::state::{LocalWorkload, State};
use xds_client::resources::{Address, ApplicationTunnel};

fn ip(last: u8) -> IpAddr {
    IpAddr::from([10, 0, 0, last])
}

/// `web` at 10.0.0.2 and 10.0.0.3 (two addresses), naming `policies`; an ALLOW for `sleep`.
fn state(policies: &[&str], synced: bool) -> State {
    let mut s = State::new("istio-system");
    let mut web = workload("web", ip(2), true, policies);
    web.addresses.push(ip(3));
    s.insert_address(Address::Workload(web));
    s.insert_policy(allow("allow-sleep", "sleep"));
    s.set_synced(synced);
    s
}

#[test]
fn each_refusal_has_its_status() {
    let s = state(&["default/allow-sleep"], true);
    let web = LocalWorkload::from("web");
    let src = SocketAddr::new(ip(1), 40000);
    let peer = |sa: &str| Some(id(sa));
    let refused = |local: &LocalWorkload, dst: &str, sa: &str| {
        admit(&s, local, src, dst.parse().unwrap(), peer(sa).as_ref()).unwrap_err()
    };
    let unknown = refused(&LocalWorkload::from("gone"), "10.0.0.2:8080", "sleep");
    assert!(matches!(unknown, Refusal::UnknownLocal(_)));
    assert_eq!(unknown.status(), 503);
    let own = refused(&web, "10.0.0.2:15008", "sleep");
    assert_eq!(own, Refusal::ProxyPort("10.0.0.2:15008".parse().unwrap()));
    assert_eq!(own.status(), 400);
    let elsewhere = refused(&web, "10.0.0.9:8080", "sleep");
    assert!(matches!(elsewhere, Refusal::NotLocal { .. }), "{elsewhere}");
    assert_eq!(elsewhere.status(), 400);
    let denied = refused(&web, "10.0.0.3:8080", "notsleep");
    assert!(matches!(denied, Refusal::Denied(_)), "{denied}");
    assert_eq!(denied.status(), 401);
    assert_eq!(denied.response_flags(), "DENY");
    // Plaintext (no identity) cannot pass an ALLOW that names principals.
    let plain = admit(&s, &web, src, "10.0.0.2:8080".parse().unwrap(), None).unwrap_err();
    assert!(matches!(plain, Refusal::Denied(_)), "{plain}");
    let admitted = admit(
        &s,
        &web,
        src,
        "10.0.0.3:8080".parse().unwrap(),
        peer("sleep").as_ref(),
    );
    assert_eq!(admitted.unwrap().workload.uid, "web");
    // An unsynced policy store refuses even what policy would allow.
    let unsynced = state(&["default/allow-sleep"], false);
    let dst = "10.0.0.2:8080".parse().unwrap();
    let refusal = admit(&unsynced, &web, src, dst, peer("sleep").as_ref()).unwrap_err();
    assert!(matches!(refusal, Refusal::Denied(_)), "{refusal}");
}

#[test]
fn a_workload_that_asks_for_an_application_tunnel_is_refused_after_policy() {
    let mut s = state(&["default/allow-sleep"], true);
    let mut web = (**s.workload("web").unwrap()).clone();
    web.application_tunnel = Some(ApplicationTunnel {
        proxy_protocol: true,
        port: 15088,
    });
    s.insert_address(Address::Workload(web));
    let local = LocalWorkload::from("web");
    let src = SocketAddr::new(ip(1), 40000);
    let dst = "10.0.0.2:8080".parse().unwrap();
    let refusal = admit(&s, &local, src, dst, Some(&id("sleep"))).unwrap_err();
    assert!(
        matches!(refusal, Refusal::ApplicationTunnelNotCarried { .. }),
        "{refusal}"
    );
    assert_eq!(refusal.status(), 503);
    assert!(
        refusal
            .to_string()
            .contains("default/web asks for an application tunnel (PROXY protocol to port 15088)"),
        "{refusal}"
    );
    // Policy still decides first: a denied client is told it is denied.
    let denied = admit(&s, &local, src, dst, Some(&id("notsleep"))).unwrap_err();
    assert!(matches!(denied, Refusal::Denied(_)), "{denied}");
}

proptest! {
    /// Over random destinations, clients, identities, and whether the workload names the ALLOW:
    /// admitted exactly when the oracle says so, and refused with the oracle's kind otherwise.
    #[test]
    fn admission_matches_the_rules(
        last in 1u8..6,
        port in prop::sample::select(vec![80u16, 8080, 15001, 15006, 15008, 15020]),
        src_last in 1u8..6,
        sa in prop::option::of(prop::sample::select(vec!["sleep", "notsleep", "web"])),
        names_allow in any::<bool>(),
        synced in any::<bool>(),
    ) {
        let policies: &[&str] = if names_allow { &["default/allow-sleep"] } else { &[] };
        let s = state(policies, synced);
        let dst = SocketAddr::new(ip(last), port);
        let src = SocketAddr::new(ip(src_last), 40000);
        let peer = sa.map(id);
        let got = admit(&s, &LocalWorkload::from("web"), src, dst, peer.as_ref());
        // The oracle, from the rules: the proxy's own ports never; only web's addresses; then
        // policy: not synced denies; a workload naming the ALLOW needs the identity `sleep`; one
        // naming no policy is allowed (no ALLOW applies).
        let proxy_port = [15001, 15006, 15008].contains(&port);
        let web_address = last == 2 || last == 3;
        let allowed = synced && (!names_allow || sa == Some("sleep"));
        match got {
            Ok(admitted) => {
                prop_assert!(!proxy_port && web_address && allowed);
                prop_assert_eq!(admitted.connection.destination, dst);
                prop_assert_eq!(admitted.connection.source, src);
            }
            Err(Refusal::ProxyPort(d)) => prop_assert!(proxy_port && d == dst),
            Err(Refusal::NotLocal { .. }) => prop_assert!(!proxy_port && !web_address),
            Err(Refusal::Denied(_)) => prop_assert!(!proxy_port && web_address && !allowed),
            Err(other) => prop_assert!(false, "unexpected refusal {}", other),
        }
    }
}
