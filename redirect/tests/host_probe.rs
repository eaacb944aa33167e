//! The node's kubelet-probe rewrite ([`redirect::host::ProbeSnat`]) in a test namespace standing
//! for the node, with both backends: set to exactly the given pods, read back, drift seen,
//! removed without touching anyone else's rules, IPv4 and IPv6 alike. Needs root.

mod common;

use common::Netns;

use std::collections::BTreeSet;
use std::net::IpAddr;

use redirect::Backend;
use redirect::host::ProbeSnat;

fn pods(ips: &[&str]) -> BTreeSet<IpAddr> {
    ips.iter().map(|ip| ip.parse().unwrap()).collect()
}

#[test]
fn iptables_rules_are_exact_reread_and_removed_leaving_others_alone() {
    let node = Netns::new("probe-ipt");
    node.exec("iptables -t nat -A POSTROUTING -s 10.99.0.0/16 -j MASQUERADE");
    let snat = ProbeSnat::in_netns(Backend::Iptables, node.path());
    assert_eq!(snat.live().unwrap(), None);
    snat.apply(&pods(&["10.1.0.5", "10.1.0.6", "fd00::5"]))
        .unwrap();
    assert_eq!(
        snat.live().unwrap(),
        Some(pods(&["10.1.0.5", "10.1.0.6", "fd00::5"]))
    );
    let saved6 = node.output("ip6tables-save -t nat");
    assert!(
        saved6.contains("-A ZTUNNEL_POSTRT -d fd00::5/128 -p tcp -m addrtype --src-type LOCAL -j SNAT --to-source fd16:9254:7127:1337:ffff:ffff:ffff:ffff"),
        "{saved6}"
    );
    assert!(!saved6.contains("10.1.0.5"), "{saved6}");
    // Again with one pod fewer: exactly that, one jump, first in POSTROUTING.
    snat.apply(&pods(&["10.1.0.6"])).unwrap();
    assert_eq!(snat.live().unwrap(), Some(pods(&["10.1.0.6"])));
    let saved = node.output("iptables-save -t nat");
    let postrouting: Vec<&str> = saved
        .lines()
        .filter(|l| l.starts_with("-A POSTROUTING"))
        .collect();
    assert_eq!(
        postrouting,
        [
            "-A POSTROUTING -j ZTUNNEL_POSTRT",
            "-A POSTROUTING -s 10.99.0.0/16 -j MASQUERADE"
        ]
    );
    // Drift: the jump deleted by someone else is seen.
    node.exec("iptables -t nat -D POSTROUTING -j ZTUNNEL_POSTRT");
    assert_eq!(snat.live().unwrap(), None);
    snat.apply(&pods(&["10.1.0.6"])).unwrap();
    assert_eq!(snat.live().unwrap(), Some(pods(&["10.1.0.6"])));
    snat.remove().unwrap();
    let saved = node.output("iptables-save -t nat");
    assert!(!saved.contains("ZTUNNEL_POSTRT"), "{saved}");
    let saved6 = node.output("ip6tables-save -t nat");
    assert!(!saved6.contains("ZTUNNEL_POSTRT"), "{saved6}");
    assert!(saved.contains("-A POSTROUTING -s 10.99.0.0/16 -j MASQUERADE"));
    // Removing twice is fine.
    snat.remove().unwrap();
}

#[test]
fn nftables_table_is_exact_reread_and_removed() {
    let node = Netns::new("probe-nft");
    let snat = ProbeSnat::in_netns(Backend::Nftables, node.path());
    assert_eq!(snat.live().unwrap(), None);
    snat.apply(&pods(&["10.1.0.5", "10.1.0.6", "fd00::5", "fd00::6"]))
        .unwrap();
    assert_eq!(
        snat.live().unwrap(),
        Some(pods(&["10.1.0.5", "10.1.0.6", "fd00::5", "fd00::6"]))
    );
    assert!(node.ruleset().contains("table ip6 ztunnel-host"));
    // The IPv6 table deleted by someone else is drift.
    node.exec("nft delete table ip6 ztunnel-host");
    assert_eq!(snat.live().unwrap(), None);
    snat.apply(&BTreeSet::new()).unwrap();
    assert_eq!(snat.live().unwrap(), Some(BTreeSet::new()));
    snat.apply(&pods(&["10.1.0.7"])).unwrap();
    assert_eq!(snat.live().unwrap(), Some(pods(&["10.1.0.7"])));
    snat.remove().unwrap();
    assert!(!node.ruleset().contains("ztunnel-host"));
    assert_eq!(snat.live().unwrap(), None);
    snat.remove().unwrap();
}
