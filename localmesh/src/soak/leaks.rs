//! What the soak watches for leaks: each part's file descriptors, threads and memory, and what
//! the mesh made in the system (network namespaces, links, routes, rules, run-directory files),
//! sampled through the run and compared once the churn has stopped with the baseline taken
//! before it began.

use std::collections::BTreeMap;

use crate::Config;
use crate::mesh::{self, Part};
use crate::net;
use crate::plan::Mesh;

/// One process's use.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Usage {
    /// Open file descriptors.
    pub fds: u64,
    /// Threads.
    pub threads: u64,
    /// Resident memory, KiB.
    pub rss_kib: u64,
}

/// Everything sampled at one moment.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct Sample {
    /// Per part (`controlplane`, `node-a proxy`, ...), summed over its processes.
    pub processes: BTreeMap<String, Usage>,
    /// Per thing the mesh made (`netns`, `links node-a`, `iptables node-a`, ...): how many.
    pub system: BTreeMap<String, u64>,
    /// Each node proxy's metric series (reported, not compared: a new outcome, such as a
    /// denial, legitimately adds series for workloads that still exist).
    pub series: BTreeMap<String, u64>,
}

/// Each part's use now, summed over its processes, by the part's name (`controlplane`,
/// `node-a node-agent`, `node-a proxy`, ...).
pub fn processes(config: &Config) -> BTreeMap<String, Usage> {
    let mut parts = vec![("controlplane".to_owned(), Part::ControlPlane, None)];
    for node in &config.nodes {
        parts.push((
            format!("{node} node-agent"),
            Part::NodeAgent,
            Some(node.as_str()),
        ));
        parts.push((format!("{node} proxy"), Part::Proxy, Some(node.as_str())));
    }
    let mut out = BTreeMap::new();
    for (name, part, node) in parts {
        let mut usage = Usage::default();
        for pid in mesh::pids(config, part, node) {
            let u = usage_of(pid);
            usage.fds += u.fds;
            usage.threads += u.threads;
            usage.rss_kib += u.rss_kib;
        }
        out.insert(name, usage);
    }
    out
}

/// Samples the mesh's parts and system objects now.
pub fn sample(config: &Config, mesh: &Mesh) -> Sample {
    let mut s = Sample {
        processes: processes(config),
        ..Sample::default()
    };
    s.system
        .insert("netns".into(), net::namespaces(&config.prefix).len() as u64);
    let count = |text: String| text.lines().filter(|l| !l.trim().is_empty()).count() as u64;
    for node in &config.nodes {
        let ns = config.node_ns(node);
        let mut add = |what: &str, text: String| {
            s.system.insert(format!("{what} {node}"), count(text));
        };
        add("links", net::ip(&ns, &["-o", "link"]).unwrap_or_default());
        // Link-local and multicast routes come and go with the links' own addresses (IPv6
        // duplicate address detection finishes a moment after a link is up): the links are
        // counted themselves.
        let routes = net::ip(&ns, &["route", "show", "table", "all"]).unwrap_or_default();
        add(
            "routes",
            routes
                .lines()
                .filter(|l| !l.contains("fe80:") && !l.starts_with("multicast"))
                .collect::<Vec<_>>()
                .join("\n"),
        );
        add("rules", rules_text(&ns));
    }
    for pod in mesh.pods() {
        let ns = Mesh::pod_netns(&config.prefix, &pod.placement);
        let key = format!("{}/{}", pod.placement.namespace, pod.placement.name);
        s.system
            .insert(format!("rules {key}"), count(rules_text(&ns)));
        s.system.insert(
            format!("ip rules {key}"),
            count(net::ip(&ns, &["rule", "show"]).unwrap_or_default()),
        );
    }
    s.system
        .insert("run-dir files".into(), files(&config.run_dir));
    let deployments: Vec<String> = mesh
        .pods()
        .into_iter()
        .map(|p| p.placement.deployment)
        .collect();
    for (i, node) in config.nodes.iter().enumerate() {
        let addr = std::net::SocketAddr::from((mesh.node_ip(i), common::ports::STATS));
        let text = mesh::http_get(addr, "/metrics")
            .map(|(_, body)| body)
            .unwrap_or_default();
        let (series, gone) = metric_series(&text, &deployments);
        s.series.insert(node.clone(), series);
        s.system
            .insert(format!("metric series of gone workloads {node}"), gone);
    }
    s
}

/// How many series `/metrics` text holds, and how many of them name a workload (source or
/// destination) that is none of `workloads`: a gone workload's series, which must expire.
fn metric_series(text: &str, workloads: &[String]) -> (u64, u64) {
    let mut series = 0;
    let mut gone = 0;
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
    {
        series += 1;
        let stale = ["source_workload=\"", "destination_workload=\""]
            .iter()
            .filter_map(|key| {
                line.split_once(key)
                    .and_then(|(_, rest)| rest.split_once('"'))
            })
            .map(|(value, _)| value)
            .any(|w| !w.is_empty() && w != "unknown" && !workloads.iter().any(|d| d == w));
        if stale {
            gone += 1;
        }
    }
    (series, gone)
}

/// The namespace's iptables (both families, all tables) and nftables rules, without comments
/// and counters.
fn rules_text(ns: &str) -> String {
    let mut text = String::new();
    for tool in ["iptables-save", "ip6tables-save"] {
        let saved = net::run_in(ns, tool, &[]).unwrap_or_default();
        for line in saved.lines().filter(|l| l.starts_with("-A")) {
            text.push_str(line);
            text.push('\n');
        }
    }
    let listed = net::run_in(ns, "nft", &["list", "ruleset"]).unwrap_or_default();
    for line in listed.lines().filter(|l| !l.trim().is_empty()) {
        text.push_str(line);
        text.push('\n');
    }
    text
}

fn files(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => files(&e.path()),
            _ => 1,
        })
        .sum()
}

fn usage_of(pid: u32) -> Usage {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count() as u64)
        .unwrap_or(0);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    Usage {
        fds,
        threads: field("Threads:"),
        rss_kib: field("VmRSS:"),
    }
}

/// How far a part may grow over its baseline before it counts as a leak: file descriptors
/// and threads by a few (a connection pool's idle connection, a worker started late), memory by
/// half again plus 16 MiB (allocator caches). System objects must come back exactly.
pub fn leaks(baseline: &Sample, end: &Sample) -> Vec<String> {
    let mut out = Vec::new();
    for (name, before) in &baseline.processes {
        let after = end.processes.get(name).copied().unwrap_or_default();
        if after.fds > before.fds + 16 {
            out.push(format!(
                "{name}: file descriptors {} -> {}",
                before.fds, after.fds
            ));
        }
        if after.threads > before.threads + 4 {
            out.push(format!(
                "{name}: threads {} -> {}",
                before.threads, after.threads
            ));
        }
        if after.rss_kib > before.rss_kib + before.rss_kib / 2 + 16 * 1024 {
            out.push(format!(
                "{name}: RSS {} KiB -> {} KiB",
                before.rss_kib, after.rss_kib
            ));
        }
    }
    for (name, before) in &baseline.system {
        let after = end.system.get(name).copied().unwrap_or(0);
        // Series of gone workloads may only shrink (they expire); everything else comes back.
        let shrinking_is_fine = name.starts_with("metric series of gone workloads");
        if after != *before && !(shrinking_is_fine && after < *before) {
            out.push(format!("{name}: {before} -> {after}"));
        }
    }
    for name in end
        .system
        .keys()
        .filter(|k| !baseline.system.contains_key(*k))
    {
        out.push(format!("{name}: not there before"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_series_of_workloads_that_are_gone_are_counted() {
        let text = "# HELP x\nistio_tcp_connections_opened_total{source_workload=\"soak-client\",destination_workload=\"soak-server\"} 3\nistio_tcp_connections_opened_total{source_workload=\"old-app\",destination_workload=\"soak-server\"} 1\nistio_tcp_sent_bytes_total{source_workload=\"unknown\",destination_workload=\"soak-server\"} 9\nztunnel_dns_requests_total 0\n";
        let live = ["soak-client".to_owned(), "soak-server".to_owned()];
        assert_eq!(metric_series(text, &live), (4, 1));
    }

    #[test]
    fn growth_beyond_the_allowance_and_any_system_change_are_leaks() {
        let mut a = Sample::default();
        a.processes.insert(
            "node-a proxy".into(),
            Usage {
                fds: 40,
                threads: 6,
                rss_kib: 20_000,
            },
        );
        a.system.insert("netns".into(), 9);
        let mut b = a.clone();
        assert!(leaks(&a, &b).is_empty());
        b.processes.get_mut("node-a proxy").unwrap().fds = 50;
        b.processes.get_mut("node-a proxy").unwrap().rss_kib = 40_000;
        assert!(leaks(&a, &b).is_empty(), "within the allowance");
        b.processes.get_mut("node-a proxy").unwrap().fds = 57;
        b.system.insert("netns".into(), 10);
        b.system.insert("links node-a".into(), 3);
        let found = leaks(&a, &b);
        assert_eq!(found.len(), 3, "{found:?}");
        assert!(
            found
                .iter()
                .any(|l| l.contains("file descriptors 40 -> 57"))
        );
    }
}
