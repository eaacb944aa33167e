//! Finding a pod's network namespace from its IP, as istio-cni does for pods that were already
//! running: look through the network namespaces on the machine for the one that holds the address.
//!
//! Candidates are the named namespaces under `/var/run/netns` (preferred: their path is stable) and
//! every process's `/proc/<pid>/ns/net`, deduplicated by namespace inode; the agent's own namespace
//! (the host's) is never a candidate. A namespace is never guessed: when more than one namespace
//! holds an address, [`find_by_ip`] says so and names them all, and the agent captures nothing. A process-held namespace's addresses are read from
//! `/proc/<pid>/net/fib_trie` and `/proc/<pid>/net/if_inet6`; a named namespace that no process
//! holds is read through `nsenter --net=PATH cat ...`.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Where named network namespaces live (`ip netns add`).
pub const NAMED_NETNS_DIR: &str = "/var/run/netns";

/// Every address held by a network namespace other than ours, with a path to each namespace
/// that holds it (one per namespace; more than one means the address is ambiguous).
///
/// Unreadable candidates (processes that exit mid-scan, namespaces removed meanwhile) are skipped.
pub fn addresses() -> HashMap<IpAddr, Vec<PathBuf>> {
    addresses_under(Path::new("/"))
}

/// The namespaces never taken for a pod's: this process's and, under a host root, the host's
/// (its PID 1's).
fn host_namespaces(root: &Path) -> HashSet<u64> {
    [
        PathBuf::from("/proc/self/ns/net"),
        root.join("proc/1/ns/net"),
    ]
    .iter()
    .filter_map(|p| std::fs::metadata(p).ok())
    .map(|m| m.ino())
    .collect()
}

/// Like [`addresses`], looking under `root` (where the host's file system is mounted, e.g.
/// `/host`: its `proc` and `var/run/netns`).
pub fn addresses_under(root: &Path) -> HashMap<IpAddr, Vec<PathBuf>> {
    let mut seen: HashSet<u64> = host_namespaces(root);
    let mut found: HashMap<IpAddr, Vec<PathBuf>> = HashMap::new();
    let mut named: Vec<(u64, PathBuf)> = Vec::new();
    let named_dir = root.join(NAMED_NETNS_DIR.trim_start_matches('/'));
    if let Ok(dir) = std::fs::read_dir(named_dir) {
        for entry in dir.flatten() {
            let path = entry.path();
            if let Ok(meta) = std::fs::metadata(&path)
                && seen.insert(meta.ino())
            {
                named.push((meta.ino(), path));
            }
        }
    }
    let mut by_process: HashMap<u64, PathBuf> = HashMap::new();
    {
        for proc_dir in processes(root) {
            if let Ok(meta) = std::fs::metadata(proc_dir.join("ns/net"))
                && (named.iter().any(|(ino, _)| *ino == meta.ino()) || seen.insert(meta.ino()))
            {
                by_process.entry(meta.ino()).or_insert(proc_dir);
            }
        }
    }
    for (ino, path) in named {
        // Cheaper through a process that lives in it, when there is one.
        let text = match by_process.remove(&ino) {
            Some(proc_dir) => read_proc_net(&proc_dir),
            None => read_through_nsenter(&path),
        };
        for ip in parse_addresses(&text) {
            found.entry(ip).or_default().push(path.clone());
        }
    }
    for (_, proc_dir) in by_process {
        let text = read_proc_net(&proc_dir);
        for ip in parse_addresses(&text) {
            found.entry(ip).or_default().push(proc_dir.join("ns/net"));
        }
    }
    found
}

/// The process directories under `root`'s `proc` (`/proc/<pid>`).
fn processes(root: &Path) -> impl Iterator<Item = PathBuf> {
    std::fs::read_dir(root.join("proc"))
        .into_iter()
        .flatten()
        .flatten()
        .filter(|entry| {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            !name.is_empty() && name.bytes().all(|b| b.is_ascii_digit())
        })
        .map(|entry| entry.path())
}

/// Why a pod's network namespace was not taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unresolved {
    /// More than one namespace could be the pod's.
    #[error(transparent)]
    Ambiguous(#[from] Ambiguous),
    /// The pod's processes are in more than one namespace.
    #[error("the processes of pod {uid} are in {} network namespaces: {}; not guessing", candidates.len(), list(candidates))]
    Scattered {
        /// The pod's uid.
        uid: String,
        /// Each namespace.
        candidates: Vec<PathBuf>,
    },
    /// The namespace of the pod's processes does not hold the pod's address.
    #[error("the network namespace of the pod's processes ({}) holds none of its IPs {}; not capturing", netns.display(), ips.iter().map(IpAddr::to_string).collect::<Vec<_>>().join(", "))]
    WrongAddress {
        /// The namespace found by the pod's uid.
        netns: PathBuf,
        /// The pod's addresses.
        ips: Vec<IpAddr>,
    },
}

/// The network namespace of the pod whose uid is `uid`, found as istio-cni finds a running
/// pod's in a cluster: the processes under `root`'s `proc` whose cgroup path names the pod
/// (`pod<uid>`, or with `_` for `-` as the systemd driver writes it), all in one namespace other
/// than the host's, which must hold one of the pod's `ips`. `None` while no such process runs or
/// the pod has no address yet; an error when the pod's processes are in several namespaces or
/// theirs does not hold the pod's address (a pod is never captured by a guess).
pub fn find_by_uid(root: &Path, uid: &str, ips: &[IpAddr]) -> Result<Option<PathBuf>, Unresolved> {
    if uid.is_empty() || ips.is_empty() {
        return Ok(None);
    }
    let needles = [format!("pod{uid}"), format!("pod{}", uid.replace('-', "_"))];
    let host = host_namespaces(root);
    let mut found: Vec<(u64, PathBuf)> = Vec::new();
    for proc_dir in processes(root) {
        let Ok(cgroup) = std::fs::read_to_string(proc_dir.join("cgroup")) else {
            continue;
        };
        if !needles.iter().any(|n| cgroup.contains(n.as_str())) {
            continue;
        }
        let Ok(meta) = std::fs::metadata(proc_dir.join("ns/net")) else {
            continue;
        };
        if host.contains(&meta.ino()) || found.iter().any(|(ino, _)| *ino == meta.ino()) {
            continue;
        }
        found.push((meta.ino(), proc_dir));
    }
    match found.as_slice() {
        [] => Ok(None),
        [(_, proc_dir)] => {
            let netns = proc_dir.join("ns/net");
            let mut text = read_proc_net(proc_dir);
            if text.is_empty() {
                text = read_through_nsenter(&netns);
            }
            let held = parse_addresses(&text);
            if ips.iter().any(|ip| held.contains(ip)) {
                Ok(Some(netns))
            } else {
                Err(Unresolved::WrongAddress {
                    netns,
                    ips: ips.to_vec(),
                })
            }
        }
        many => Err(Unresolved::Scattered {
            uid: uid.to_owned(),
            candidates: many.iter().map(|(_, p)| p.join("ns/net")).collect(),
        }),
    }
}

/// More than one network namespace holds the pod's addresses: which one is the pod's cannot be
/// known, so none is used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{} network namespaces hold the pod's IP {ip}: {}; not guessing", candidates.len(), list(candidates))]
pub struct Ambiguous {
    /// The address held more than once.
    pub ip: IpAddr,
    /// Every namespace that holds it.
    pub candidates: Vec<PathBuf>,
}

fn list(paths: &[PathBuf]) -> String {
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The one network namespace that holds `ips` (any of them), `None` if none does, and an error
/// naming the candidates if more than one does.
pub fn find_by_ip(ips: &[IpAddr]) -> Result<Option<PathBuf>, Ambiguous> {
    choose(&addresses(), ips)
}

/// Picks the namespace of `ips` from a scan made by [`addresses`]: all of the pod's addresses
/// that any namespace holds must be held by the same single namespace.
pub fn choose(
    scan: &HashMap<IpAddr, Vec<PathBuf>>,
    ips: &[IpAddr],
) -> Result<Option<PathBuf>, Ambiguous> {
    let mut chosen: Option<(IpAddr, &PathBuf)> = None;
    for ip in ips {
        match scan.get(ip).map(Vec::as_slice) {
            None | Some([]) => {}
            Some([one]) => match chosen {
                None => chosen = Some((*ip, one)),
                Some((_, earlier)) if earlier == one => {}
                Some((first_ip, earlier)) => {
                    return Err(Ambiguous {
                        ip: first_ip,
                        candidates: vec![earlier.clone(), one.clone()],
                    });
                }
            },
            Some(many) => {
                return Err(Ambiguous {
                    ip: *ip,
                    candidates: many.to_vec(),
                });
            }
        }
    }
    Ok(chosen.map(|(_, path)| path.clone()))
}

fn read_proc_net(proc_dir: &Path) -> String {
    let mut text = std::fs::read_to_string(proc_dir.join("net/fib_trie")).unwrap_or_default();
    text.push_str(&std::fs::read_to_string(proc_dir.join("net/if_inet6")).unwrap_or_default());
    text
}

/// How long reading a namespace's addresses through `nsenter` may take.
const NSENTER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

fn read_through_nsenter(netns: &Path) -> String {
    let mut command = Command::new("nsenter");
    command.arg(format!("--net={}", netns.display())).args([
        "cat",
        "/proc/self/net/fib_trie",
        "/proc/self/net/if_inet6",
    ]);
    match crate::process::output(command, None, NSENTER_TIMEOUT) {
        Ok(out) => String::from_utf8_lossy(&out.stdout).into_owned(),
        Err(e) => {
            tracing::warn!(netns = %netns.display(), error = ?e, "could not read the namespace's addresses");
            String::new()
        }
    }
}

/// The local addresses in the text of `fib_trie` (an address line followed by `/32 host LOCAL`)
/// followed by `if_inet6` (32 hex digits per line). Loopback and link-local addresses are left out.
pub fn parse_addresses(text: &str) -> Vec<IpAddr> {
    let mut out = Vec::new();
    let mut last_v4: Option<Ipv4Addr> = None;
    for line in text.lines() {
        let trimmed = line.trim_start_matches([' ', '|', '+', '-']).trim();
        if let Some(first) = line.split_whitespace().next()
            && first.len() == 32
            && let Ok(bits) = u128::from_str_radix(first, 16)
        {
            out.push(IpAddr::V6(Ipv6Addr::from(bits)));
            continue;
        }
        if trimmed.starts_with('/') {
            if trimmed.starts_with("/32 host LOCAL")
                && let Some(ip) = last_v4
            {
                out.push(IpAddr::V4(ip));
            }
            continue;
        }
        last_v4 = trimmed
            .split_whitespace()
            .next()
            .and_then(|t| t.parse().ok());
    }
    // Link-local addresses repeat across namespaces; a pod IP is never one.
    out.retain(|ip| match ip {
        IpAddr::V4(v4) => !v4.is_loopback() && !v4.is_link_local(),
        IpAddr::V6(v6) => !v6.is_loopback() && !v6.is_unicast_link_local(),
    });
    out.sort();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_fib_trie_and_if_inet6() {
        let text = "Main:\n  +-- 0.0.0.0/0 3 0 5\n     |-- 10.244.0.0\n        /24 link UNICAST\n     |-- 10.244.0.5\n        /32 host LOCAL\n     |-- 127.0.0.1\n        /32 host LOCAL\nLocal:\n     |-- 10.244.0.5\n        /32 host LOCAL\n     |-- 10.244.0.255\n        /32 link BROADCAST\nfd000000000000000000000000000005 03 40 00 00 eth0\n00000000000000000000000000000001 01 80 10 80 lo\nfe80000000000000442125fffe7bc245 02 40 20 c0 eth0\n";
        let ips = parse_addresses(text);
        assert_eq!(
            ips,
            vec![
                "10.244.0.5".parse::<IpAddr>().unwrap(),
                "fd00::5".parse().unwrap()
            ]
        );
    }

    #[test]
    fn an_address_held_twice_is_ambiguous_and_names_both() {
        let ip: IpAddr = "10.1.2.3".parse().unwrap();
        let other: IpAddr = "fd00::3".parse().unwrap();
        let a = PathBuf::from("/var/run/netns/a");
        let b = PathBuf::from("/proc/7/ns/net");
        let mut scan = HashMap::new();
        scan.insert(ip, vec![a.clone()]);
        assert_eq!(choose(&scan, &[ip]), Ok(Some(a.clone())));
        assert_eq!(choose(&scan, &["10.9.9.9".parse().unwrap()]), Ok(None));
        scan.insert(ip, vec![a.clone(), b.clone()]);
        let err = choose(&scan, &[ip]).unwrap_err();
        assert_eq!(err.candidates, vec![a.clone(), b.clone()]);
        assert!(
            err.to_string().contains("/var/run/netns/a")
                && err.to_string().contains("/proc/7/ns/net")
        );
        // Two addresses of one pod in two different namespaces: ambiguous too.
        scan.insert(ip, vec![a.clone()]);
        scan.insert(other, vec![b.clone()]);
        assert!(choose(&scan, &[ip, other]).is_err());
    }

    #[test]
    fn ignores_garbage() {
        assert!(parse_addresses("").is_empty());
        assert!(
            parse_addresses("/32 host LOCAL\nnot an address\n|-- 999.1.1.1\n/32 host LOCAL\n")
                .is_empty()
        );
    }
}
