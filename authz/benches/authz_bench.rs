//! authz benchmarks: decision cost with many policies in the store, the worst case where every
//! policy applies, and YAML parse rate. Run with `cargo bench -p authz`.

use std::hint::black_box;
use std::time::Instant;

use authz::{
    Action, Clause, Connection, Match, Policy, PolicyStore, Principal, Rule, Scope, StringMatch,
    Workload,
};

/// How the benchmark policies name their sources.
#[derive(Clone, Copy)]
enum Source {
    /// `principals: [exact]` (served by the principal index).
    Principal,
    /// `namespaces: [exact]` (served by the namespace index).
    Namespace,
    /// `principals: [prefix*]` (served by the prefix index).
    PrincipalPrefix,
    /// `ipBlocks: [cidr]` (served by the address index).
    IpBlock,
    /// `notNamespaces: [default, x]`: only the port clause is indexable, and the connection's
    /// port hits every rule, so every rule is examined.
    Unindexed,
}

/// A policy whose rules each allow (or deny) one principal on one port.
fn policy(namespace: &str, name: &str, action: Action, rules: usize, seed: usize) -> Policy {
    policy_with(namespace, name, action, rules, seed, Source::Principal)
}

fn policy_with(
    namespace: &str,
    name: &str,
    action: Action,
    rules: usize,
    seed: usize,
    source: Source,
) -> Policy {
    Policy {
        name: name.to_owned(),
        namespace: namespace.to_owned(),
        scope: Scope::Namespace,
        action,
        rules: (0..rules)
            .map(|r| Rule {
                clauses: vec![
                    Clause {
                        matches: vec![match source {
                            Source::Principal => Match {
                                principals: vec![StringMatch::Exact(format!(
                                    "cluster.local/ns/client-{seed}/sa/sa-{r}"
                                ))],
                                ..Match::default()
                            },
                            Source::Namespace => Match {
                                namespaces: vec![StringMatch::Exact(format!("client-{seed}-{r}"))],
                                ..Match::default()
                            },
                            Source::Unindexed => Match {
                                not_namespaces: vec![
                                    StringMatch::Exact("default".into()),
                                    StringMatch::Exact(format!("client-{seed}-{r}")),
                                ],
                                ..Match::default()
                            },
                            Source::IpBlock => Match {
                                source_ips: vec![
                                    format!("10.{}.{}.0/24", seed % 250, r).parse().unwrap(),
                                ],
                                ..Match::default()
                            },
                            Source::PrincipalPrefix => Match {
                                principals: vec![StringMatch::Prefix(format!(
                                    "cluster.local/ns/client-{seed}/sa/sa-{r}-"
                                ))],
                                ..Match::default()
                            },
                        }],
                    },
                    Clause {
                        matches: vec![Match {
                            destination_ports: vec![8080],
                            ..Match::default()
                        }],
                    },
                ],
            })
            .collect(),
        dry_run: false,
        selector: Default::default(),
    }
}

fn connection(principal: &str) -> Connection {
    Connection {
        source: "10.0.0.1:40000".parse().unwrap(),
        destination: "10.0.0.2:8080".parse().unwrap(),
        peer: Some(Principal::parse(principal)),
    }
}

/// Nanoseconds per decision, over enough iterations to last about a second.
fn ns_per_decision(store: &PolicyStore, conn: &Connection, workload: &Workload) -> f64 {
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed().as_secs_f64() < 1.0 {
        for _ in 0..16 {
            black_box(store.decide(black_box(conn), black_box(workload)));
        }
        n += 16;
    }
    start.elapsed().as_nanos() as f64 / n as f64
}

fn main() {
    // `-- --only TEXT` runs only the rows whose label contains TEXT (for profiling).
    let args: Vec<String> = std::env::args().collect();
    let only = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1))
        .cloned();
    let wanted = |label: &str| only.as_deref().is_none_or(|o| label.contains(o));
    println!("authz benchmark: one thread\n");
    println!("| measurement | result |");
    println!("|---|---|");

    // 10,000 policies: 1,000 namespaces x 10 (mixed ALLOW/DENY, 3 rules each); the workload's
    // namespace holds 10 or 100, keyed by principal (indexed) or by source address (all
    // evaluated).
    for (applicable, source, label) in [
        (10usize, Source::Principal, "principal rules"),
        (100, Source::Principal, "principal rules"),
        (10, Source::IpBlock, "ipBlock rules"),
        (100, Source::IpBlock, "ipBlock rules"),
    ] {
        if !wanted(label) {
            continue;
        }
        let mut store = PolicyStore::new("istio-system");
        for ns in 0..1000 {
            for p in 0..10 {
                let action = if p % 3 == 0 {
                    Action::Deny
                } else {
                    Action::Allow
                };
                store.insert(policy(
                    &format!("ns-{ns}"),
                    &format!("p-{p}"),
                    action,
                    3,
                    ns * 10 + p,
                ));
            }
        }
        // The workload's namespace holds `applicable` policies (replacing its 10).
        for p in 0..10 {
            store.remove(&format!("ns-7/p-{p}"));
        }
        for p in 0..applicable {
            let action = if p % 3 == 0 {
                Action::Deny
            } else {
                Action::Allow
            };
            store.insert(policy_with(
                "ns-7",
                &format!("q-{p}"),
                action,
                3,
                100_000 + p,
                source,
            ));
        }
        let workload = Workload {
            namespace: "ns-7".into(),
            ..Workload::default()
        };
        // Matches the last ALLOW policy's last rule.
        let last_allow = (0..applicable).rev().find(|p| p % 3 != 0).unwrap();
        let seed = 100_000 + last_allow;
        let mut conn = connection(&format!("spiffe://cluster.local/ns/client-{seed}/sa/sa-2"));
        if let Source::IpBlock = source {
            conn.source = format!("10.{}.2.9:40000", seed % 250).parse().unwrap();
        }
        assert!(store.decide(&conn, &workload).allowed);
        let ns = ns_per_decision(&store, &conn, &workload);
        println!(
            "| decision, {} policies in store, {applicable} applying ({label}) | {ns:.0} ns ({:.2} M decisions/s) |",
            store.len(),
            1e3 / ns
        );
    }

    // Worst case: 10,000 namespace-wide DENY policies of 10 rules each, all applying, none
    // matching. With principal or namespace patterns the index finds the few candidates; with
    // rules on source addresses only, every one of the 100,000 rules is examined.
    for (source, label) in [
        (Source::Principal, "exact principals (indexed)"),
        (Source::Namespace, "exact namespaces (indexed)"),
        (Source::PrincipalPrefix, "principal prefixes (indexed)"),
        (Source::IpBlock, "source ipBlocks (indexed)"),
        (
            Source::Unindexed,
            "notNamespaces only (every rule examined)",
        ),
    ] {
        if !wanted(label) {
            continue;
        }
        let mut store = PolicyStore::new("istio-system");
        for p in 0..10_000 {
            store.insert(policy_with(
                "default",
                &format!("deny-{p}"),
                Action::Deny,
                10,
                p,
                source,
            ));
        }
        let workload = Workload {
            namespace: "default".into(),
            ..Workload::default()
        };
        let mut conn = connection("spiffe://cluster.local/ns/default/sa/innocent");
        conn.source = "192.168.1.1:40000".parse().unwrap();
        assert!(store.decide(&conn, &workload).allowed);
        let ns = ns_per_decision(&store, &conn, &workload);
        println!(
            "| worst case: 10,000 DENY policies x 10 rules, all applying, {label} | {:.4} ms per decision ({:.0}x faster than Istio's ~23 ms) |",
            ns / 1e6,
            23e6 / ns
        );
    }

    // 100 applying policies that no index serves, none matching: every rule is evaluated.
    if wanted("100 unindexable") {
        let mut store = PolicyStore::new("istio-system");
        for p in 0..100 {
            store.insert(policy_with(
                "default",
                &format!("deny-{p}"),
                Action::Deny,
                3,
                p,
                Source::Unindexed,
            ));
        }
        let workload = Workload {
            namespace: "default".into(),
            ..Workload::default()
        };
        let conn = connection("spiffe://cluster.local/ns/default/sa/innocent");
        assert!(store.decide(&conn, &workload).allowed);
        let ns = ns_per_decision(&store, &conn, &workload);
        println!(
            "| decision, 100 unindexable DENY policies x 3 rules applying, all evaluated | {ns:.0} ns ({:.2} M decisions/s) |",
            1e3 / ns
        );
    }

    // YAML parse rate.
    let mut yaml = String::new();
    for p in 0..1000 {
        yaml.push_str(&format!(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: p{p}, namespace: ns-{}}}\nspec:\n  selector: {{matchLabels: {{app: web-{p}}}}}\n  rules:\n  - from:\n    - source: {{principals: [\"cluster.local/ns/a/sa/b{p}\"], ipBlocks: [\"10.0.0.0/8\"]}}\n    to:\n    - operation: {{ports: [\"8080\", \"9090\"]}}\n---\n",
            p % 50
        ));
    }
    let start = Instant::now();
    let mut rounds = 0;
    while start.elapsed().as_secs_f64() < 1.0 {
        let t = authz::parse_policies(black_box(&yaml), "bench", "istio-system").unwrap();
        assert_eq!(t.policies.len(), 1000);
        rounds += 1;
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "| YAML parse + translate | {:.0} policies/s ({:.1} MB/s) |",
        f64::from(rounds * 1000) / secs,
        (rounds as f64 * yaml.len() as f64) / secs / 1e6
    );
}
