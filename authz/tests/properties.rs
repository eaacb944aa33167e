//! Property tests over arbitrary policy sets and connections.

use std::net::{IpAddr, SocketAddr};

use authz::{
    Action, Clause, Connection, Match, Policy, PolicyStore, Principal, Rule, Scope,
    ServiceAccountMatch, StringMatch, Workload,
};
use ipnet::IpNet;
use proptest::prelude::*;

const ROOT: &str = "istio-system";

fn ns() -> impl Strategy<Value = String> {
    prop_oneof![Just("a".to_owned()), Just("b".to_owned())]
}

fn string_match(values: &'static [&'static str]) -> impl Strategy<Value = StringMatch> {
    prop_oneof![
        proptest::sample::select(values).prop_map(|v| StringMatch::Exact(v.to_owned())),
        proptest::sample::select(values)
            .prop_map(|v| StringMatch::Prefix(v[..v.len() / 2].to_owned())),
        proptest::sample::select(values)
            .prop_map(|v| StringMatch::Suffix(v[v.len() / 2..].to_owned())),
        Just(StringMatch::Presence),
    ]
}

const PRINCIPALS: &[&str] = &[
    "cluster.local/ns/a/sa/x",
    "cluster.local/ns/a/sa/y",
    "cluster.local/ns/b/sa/x",
];
const NAMESPACES: &[&str] = &["a", "b"];

fn net() -> impl Strategy<Value = IpNet> {
    prop_oneof![
        Just("10.0.0.0/24".parse().unwrap()),
        Just("10.0.1.0/24".parse().unwrap()),
        Just("10.0.0.0/16".parse().unwrap()),
        Just("10.0.0.7/32".parse().unwrap()),
    ]
}

fn sa() -> impl Strategy<Value = ServiceAccountMatch> {
    (ns(), prop_oneof![Just("x"), Just("y")]).prop_map(|(namespace, name)| ServiceAccountMatch {
        namespace,
        name: name.to_owned(),
    })
}

/// A field is set in about one match of six, so that matches often match and every field
/// gets to decide outcomes.
fn small<T: std::fmt::Debug>(s: impl Strategy<Value = T>) -> impl Strategy<Value = Vec<T>> {
    proptest::option::weighted(0.16, s).prop_map(|o| o.into_iter().collect())
}

fn a_match() -> impl Strategy<Value = Match> {
    (
        (
            small(string_match(NAMESPACES)),
            small(string_match(NAMESPACES)),
        ),
        (
            small(string_match(PRINCIPALS)),
            small(string_match(PRINCIPALS)),
        ),
        (small(net()), small(net()), small(net()), small(net())),
        (
            small(prop_oneof![Just(80u16), Just(8080)]),
            small(prop_oneof![Just(80u16), Just(8080)]),
        ),
        (small(sa()), small(sa())),
    )
        .prop_map(
            |((n, nn), (p, np), (s, ns_, d, nd), (dp, ndp), (sa, nsa))| Match {
                namespaces: n,
                not_namespaces: nn,
                principals: p,
                not_principals: np,
                source_ips: s,
                not_source_ips: ns_,
                destination_ips: d,
                not_destination_ips: nd,
                destination_ports: dp,
                not_destination_ports: ndp,
                service_accounts: sa,
                not_service_accounts: nsa,
            },
        )
}

fn rules() -> impl Strategy<Value = Vec<Rule>> {
    let clause = proptest::collection::vec(a_match(), 0..3).prop_map(|matches| Clause { matches });
    let rule = proptest::collection::vec(clause, 0..3).prop_map(|clauses| Rule { clauses });
    proptest::collection::vec(rule, 0..3)
}

fn policy(index: usize) -> impl Strategy<Value = Policy> {
    (
        prop_oneof![
            Just(Scope::Global),
            Just(Scope::Namespace),
            Just(Scope::WorkloadSelector)
        ],
        ns(),
        prop_oneof![Just(Action::Allow), Just(Action::Deny)],
        rules(),
        proptest::bool::weighted(0.15),
    )
        .prop_map(move |(scope, namespace, action, rules, dry_run)| Policy {
            name: format!("p{index}"),
            namespace: if scope == Scope::Global {
                ROOT.to_owned()
            } else {
                namespace
            },
            scope,
            action,
            rules,
            dry_run,
            selector: Default::default(),
        })
}

fn policies() -> impl Strategy<Value = Vec<Policy>> {
    (0usize..6).prop_flat_map(|n| (0..n).map(policy).collect::<Vec<_>>())
}

fn connection() -> impl Strategy<Value = Connection> {
    (
        proptest::option::weighted(0.8, proptest::sample::select(PRINCIPALS)),
        proptest::sample::select(&["10.0.0.7", "10.0.1.3", "10.0.2.1", "::ffff:10.0.0.7"][..]),
        proptest::sample::select(&["10.0.0.9", "10.0.1.9"][..]),
        proptest::sample::select(&[80u16, 8080, 9090][..]),
    )
        .prop_map(|(peer, src, dst, port)| Connection {
            source: SocketAddr::new(src.parse::<IpAddr>().unwrap(), 40000),
            destination: SocketAddr::new(dst.parse::<IpAddr>().unwrap(), port),
            peer: peer.map(|p| Principal::parse(&format!("spiffe://{p}"))),
        })
}

fn workload(policies: &[Policy]) -> impl Strategy<Value = Workload> + use<> {
    let names: Vec<String> = policies
        .iter()
        .filter(|p| p.scope == Scope::WorkloadSelector)
        .map(Policy::key)
        .collect();
    (
        ns(),
        proptest::sample::subsequence(names.clone(), 0..=names.len()),
    )
        .prop_map(|(namespace, policies)| Workload {
            namespace,
            labels: Default::default(),
            policies,
        })
}

/// A policy set and a workload that names some of its selector policies.
fn scenario() -> impl Strategy<Value = (Vec<Policy>, Workload)> {
    policies().prop_flat_map(|ps| {
        let w = workload(&ps);
        (Just(ps), w)
    })
}

fn store(policies: &[Policy]) -> PolicyStore {
    let mut store = PolicyStore::new(ROOT);
    for p in policies {
        store.insert(p.clone());
    }
    store
}

/// An independent, naive implementation of the semantics, to check the real one against.
fn oracle(policies: &[Policy], conn: &Connection, w: &Workload) -> bool {
    let applies = |p: &Policy| match p.scope {
        Scope::Global => true,
        Scope::Namespace => p.namespace == w.namespace,
        Scope::WorkloadSelector => w.policies.contains(&p.key()),
    };
    let peer = conn.peer.clone();
    let principal = peer
        .as_ref()
        .map(|p| p.principal.to_string())
        .unwrap_or_default();
    let namespace = peer
        .as_ref()
        .map(|p| p.namespace.to_string())
        .unwrap_or_default();
    let service_account = peer
        .as_ref()
        .map(|p| p.service_account.to_string())
        .unwrap_or_default();
    let v4 = |ip: IpAddr| match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        ip => ip,
    };
    let (src, dst, port) = (
        v4(conn.source.ip()),
        v4(conn.destination.ip()),
        conn.destination.port(),
    );
    let smatch = |m: &StringMatch, v: &str| match m {
        StringMatch::Exact(s) => v == s,
        StringMatch::Prefix(s) => v.starts_with(s.as_str()),
        StringMatch::Suffix(s) => v.ends_with(s.as_str()),
        StringMatch::Presence => !v.is_empty(),
    };
    let field = |pos: bool, neg: bool, pos_empty: bool| (pos_empty || pos) && !neg;
    let sa_is = |s: &ServiceAccountMatch| {
        !service_account.is_empty() && s.namespace == namespace && s.name == service_account
    };
    let match_ok = |m: &Match| {
        let empty = m.namespaces.is_empty()
            && m.not_namespaces.is_empty()
            && m.principals.is_empty()
            && m.not_principals.is_empty()
            && m.source_ips.is_empty()
            && m.not_source_ips.is_empty()
            && m.destination_ips.is_empty()
            && m.not_destination_ips.is_empty()
            && m.destination_ports.is_empty()
            && m.not_destination_ports.is_empty()
            && m.service_accounts.is_empty()
            && m.not_service_accounts.is_empty();
        !empty
            && field(
                m.namespaces.iter().any(|x| smatch(x, &namespace)),
                m.not_namespaces.iter().any(|x| smatch(x, &namespace)),
                m.namespaces.is_empty(),
            )
            && field(
                m.principals.iter().any(|x| smatch(x, &principal)),
                m.not_principals.iter().any(|x| smatch(x, &principal)),
                m.principals.is_empty(),
            )
            && field(
                m.source_ips.iter().any(|n| n.contains(&src)),
                m.not_source_ips.iter().any(|n| n.contains(&src)),
                m.source_ips.is_empty(),
            )
            && field(
                m.destination_ips.iter().any(|n| n.contains(&dst)),
                m.not_destination_ips.iter().any(|n| n.contains(&dst)),
                m.destination_ips.is_empty(),
            )
            && field(
                m.destination_ports.contains(&port),
                m.not_destination_ports.contains(&port),
                m.destination_ports.is_empty(),
            )
            && field(
                m.service_accounts.iter().any(sa_is),
                m.not_service_accounts.iter().any(sa_is),
                m.service_accounts.is_empty(),
            )
    };
    let policy_matches = |p: &Policy| {
        p.rules.iter().any(|r| {
            r.clauses
                .iter()
                .all(|c| c.matches.is_empty() || c.matches.iter().any(match_ok))
        })
    };
    let enforced: Vec<&Policy> = policies
        .iter()
        .filter(|p| applies(p) && !p.dry_run)
        .collect();
    if enforced
        .iter()
        .any(|p| p.action == Action::Deny && policy_matches(p))
    {
        return false;
    }
    let allows: Vec<&&Policy> = enforced
        .iter()
        .filter(|p| p.action == Action::Allow)
        .collect();
    allows.is_empty() || allows.iter().any(|p| policy_matches(p))
}

/// Policies whose every rule needs exact principals: the ones the store's principal index
/// serves, mixed with ordinary ones.
fn indexed_policies() -> impl Strategy<Value = Vec<Policy>> {
    // A clause whose matches all list principals, or all list namespaces, of any pattern kind.
    let principal_clause = proptest::collection::vec(
        proptest::collection::vec(string_match(PRINCIPALS), 1..3).prop_map(|principals| Match {
            principals,
            ..Match::default()
        }),
        1..3,
    )
    .prop_map(|matches| Clause { matches });
    let namespace_clause = proptest::collection::vec(
        proptest::collection::vec(string_match(NAMESPACES), 1..3).prop_map(|namespaces| Match {
            namespaces,
            ..Match::default()
        }),
        1..3,
    )
    .prop_map(|matches| Clause { matches });
    let keyed_clause = prop_oneof![principal_clause, namespace_clause];
    let rule = (keyed_clause, proptest::option::of(a_match())).prop_map(|(c, extra)| Rule {
        clauses: std::iter::once(c)
            .chain(extra.map(|m| Clause { matches: vec![m] }))
            .collect(),
    });
    let indexed = (
        prop_oneof![Just(Scope::Global), Just(Scope::Namespace)],
        ns(),
        prop_oneof![Just(Action::Allow), Just(Action::Deny)],
        proptest::collection::vec(rule, 0..3),
        proptest::bool::weighted(0.15),
    );
    (proptest::collection::vec(indexed, 0..6), policies()).prop_map(|(idx, mut others)| {
        for (i, (scope, namespace, action, rules, dry_run)) in idx.into_iter().enumerate() {
            others.push(Policy {
                name: format!("x{i}"),
                namespace: if scope == Scope::Global {
                    ROOT.to_owned()
                } else {
                    namespace
                },
                scope,
                action,
                rules,
                dry_run,
                selector: Default::default(),
            });
        }
        others
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn principal_index_agrees_with_a_naive_scan(ps in indexed_policies(), w_ns in ns(), conn in connection()) {
        let w = Workload { namespace: w_ns, ..Workload::default() };
        let s = store(&ps);
        let decision = s.decide(&conn, &w);
        prop_assert_eq!(decision.allowed, oracle(&ps, &conn, &w), "{}", decision);
        // The explanation scans everything; it must reach the very same decision.
        prop_assert_eq!(s.explain(&conn, &w).0, decision);
    }

    #[test]
    fn indexed_store_agrees_with_a_naive_scan((ps, w) in scenario(), conn in connection()) {
        let decision = store(&ps).decide(&conn, &w);
        prop_assert_eq!(decision.allowed, oracle(&ps, &conn, &w), "{}", decision);
    }

    #[test]
    fn adding_a_deny_never_allows_more((ps, w) in scenario(), extra in policy(99), conn in connection()) {
        let mut extra = extra;
        extra.action = Action::Deny;
        let before = store(&ps).decide(&conn, &w).allowed;
        let mut more = ps.clone();
        more.push(extra);
        let after = store(&more).decide(&conn, &w).allowed;
        prop_assert!(before || !after, "a DENY policy turned a deny into an allow");
    }

    #[test]
    fn adding_an_allow_never_denies_more_once_allow_policies_apply((ps, w) in scenario(), extra in policy(99), conn in connection()) {
        let s = store(&ps);
        let allow_applies = s.applicable(&w).iter().any(|p| p.action == Action::Allow && !p.dry_run);
        prop_assume!(allow_applies);
        let mut extra = extra;
        extra.action = Action::Allow;
        let before = s.decide(&conn, &w).allowed;
        let mut more = ps.clone();
        more.push(extra);
        let after = store(&more).decide(&conn, &w).allowed;
        prop_assert!(!before || after, "an ALLOW policy turned an allow into a deny");
    }

    #[test]
    fn spec_empty_denies_everything((ps, w) in scenario(), conn in connection()) {
        let mut more = ps.clone();
        more.push(Policy {
            name: "allow-nothing".into(),
            namespace: w.namespace.clone(),
            scope: Scope::Namespace,
            action: Action::Allow,
            rules: Vec::new(),
            dry_run: false,
            selector: Default::default(),
        });
        // Only another ALLOW can let a connection through, never `spec: {}` itself; with no
        // other ALLOW applying, everything is denied.
        let s = store(&more);
        let other_allows = s.applicable(&w).iter().any(|p| p.action == Action::Allow && !p.dry_run && p.name != "allow-nothing");
        if !other_allows {
            prop_assert!(!s.decide(&conn, &w).allowed);
        }
    }

    #[test]
    fn order_does_not_matter((ps, w) in scenario(), conn in connection()) {
        let forward = store(&ps).decide(&conn, &w);
        let mut reversed = ps.clone();
        reversed.reverse();
        let backward = store(&reversed).decide(&conn, &w);
        prop_assert_eq!(forward.allowed, backward.allowed);
        prop_assert_eq!(forward.dry_run.map(|d| d.allowed), backward.dry_run.map(|d| d.allowed));
    }

    #[test]
    fn proto_round_trip_preserves_decisions((ps, w) in scenario(), conn in connection()) {
        let round: Vec<Policy> = ps
            .iter()
            .map(|p| authz::proto::decode(&prost::Message::encode_to_vec(&authz::proto::to_proto(p))).unwrap())
            .collect();
        prop_assert_eq!(&round, &ps);
        prop_assert_eq!(store(&round).decide(&conn, &w), store(&ps).decide(&conn, &w));
    }
}
