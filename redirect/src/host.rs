//! The node's side of kubelet probes: connections the node itself opens to a captured pod (the
//! kubelet's health probes) leave with the source address [`PROBE_SOURCE`], 169.254.7.127, as
//! istio-cni rewrites them; the pod's own rules ([`crate::RuleSet::probe_sources`]) let that
//! address through to the app, so a probe reaches the app whatever policy the pod has.
//!
//! The rule set names the captured pods' IPv4 addresses, and only TCP whose source is one of
//! the node's own addresses (locally originated: forwarded pod-to-pod traffic is never
//! rewritten):
//!
//! - iptables: chain `ZTUNNEL_POSTRT` in the nat table, one `SNAT` rule per pod, entered from
//!   the top of `POSTROUTING`; written with `iptables-restore --noflush` (declaring the chain
//!   flushes and refills it; nothing else of the table is rewritten).
//! - nftables: table `ip ztunnel-host` with the pods in a set and one rule in a `srcnat - 1`
//!   postrouting chain (before other source NAT), replaced in one transaction.
//!
//! [`ProbeSnat::apply`] sets the rules to exactly the given pods; [`ProbeSnat::live`] reads what
//! is in place (to repair drift); [`ProbeSnat::remove`] takes everything out. IPv6 probes are
//! not rewritten yet (dual-stack is issue 29's).

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::Duration;

use crate::apply::{Error, ipt_restore_noflush, ipt_save, run};
use crate::rules::Backend;

/// The source address probes are rewritten to (Istio's).
pub const PROBE_SOURCE: Ipv4Addr = Ipv4Addr::new(169, 254, 7, 127);
/// Our chain in the node's nat table (iptables).
pub const IPT_POSTROUTING: &str = "ZTUNNEL_POSTRT";
/// Our table on the node (nftables, family `ip`).
pub const NFT_HOST_TABLE: &str = "ztunnel-host";

/// The probe rewrite in one network namespace (the node's).
#[derive(Debug, Clone)]
pub struct ProbeSnat {
    backend: Backend,
    netns: PathBuf,
    limit: Duration,
}

impl ProbeSnat {
    /// In this process's own network namespace (the node's, for an agent on the host network).
    pub fn new(backend: Backend) -> Self {
        Self::in_netns(
            backend,
            PathBuf::from(format!("/proc/{}/ns/net", std::process::id())),
        )
    }

    /// In the namespace at `netns`.
    pub fn in_netns(backend: Backend, netns: PathBuf) -> Self {
        ProbeSnat {
            backend,
            netns,
            limit: Duration::from_secs(10),
        }
    }

    /// The iptables rule for one pod, as `iptables-save` prints it.
    fn iptables_rule(ip: Ipv4Addr) -> String {
        format!(
            "-A {IPT_POSTROUTING} -d {ip}/32 -p tcp -m addrtype --src-type LOCAL -j SNAT --to-source {PROBE_SOURCE}"
        )
    }

    /// The nftables transaction that makes the table hold exactly `pods`.
    pub fn nft_script(pods: &BTreeSet<Ipv4Addr>) -> String {
        let elements = if pods.is_empty() {
            String::new()
        } else {
            let list: Vec<String> = pods.iter().map(Ipv4Addr::to_string).collect();
            format!(" elements = {{ {} }}", list.join(", "))
        };
        format!(
            "add table ip {NFT_HOST_TABLE}\ndelete table ip {NFT_HOST_TABLE}\ntable ip {NFT_HOST_TABLE} {{\n  set probe-pods {{ type ipv4_addr;{elements} }}\n  chain postrouting {{\n    type nat hook postrouting priority srcnat - 1; policy accept;\n    ip daddr @probe-pods meta l4proto tcp fib saddr type local snat to {PROBE_SOURCE}\n  }}\n}}\n"
        )
    }

    /// The `iptables-restore --noflush` script that makes our chain hold exactly `pods`, given
    /// the nat table as it is (`current`): the jump from `POSTROUTING` inserted when missing and
    /// doubled copies deleted.
    pub fn iptables_script(current: &str, pods: &BTreeSet<Ipv4Addr>) -> String {
        let mut script = vec!["*nat".to_owned(), format!(":{IPT_POSTROUTING} - [0:0]")];
        script.extend(pods.iter().map(|ip| Self::iptables_rule(*ip)));
        let jump = format!("-A POSTROUTING -j {IPT_POSTROUTING}");
        let present = current.lines().filter(|l| *l == jump).count();
        if present == 0 {
            script.push(format!("-I POSTROUTING -j {IPT_POSTROUTING}"));
        }
        for _ in 1..present {
            script.push(format!("-D POSTROUTING -j {IPT_POSTROUTING}"));
        }
        script.push("COMMIT".to_owned());
        script.join("\n") + "\n"
    }

    /// Makes the rules rewrite probes to exactly `pods`.
    pub fn apply(&self, pods: &BTreeSet<Ipv4Addr>) -> Result<(), Error> {
        match self.backend {
            Backend::Iptables => {
                let current = ipt_save(&self.netns, false, self.limit)?;
                ipt_restore_noflush(
                    &self.netns,
                    false,
                    &Self::iptables_script(&current, pods),
                    self.limit,
                )
            }
            Backend::Nftables => run(
                &self.netns,
                "nft",
                &["-f", "-"],
                Some(&Self::nft_script(pods)),
                self.limit,
            )
            .map(drop),
        }
    }

    /// The pods whose probes are rewritten now; `None` when the rules are not (all) in place:
    /// no chain or table, no jump, or a rule not of ours.
    pub fn live(&self) -> Result<Option<BTreeSet<Ipv4Addr>>, Error> {
        match self.backend {
            Backend::Iptables => {
                let current = ipt_save(&self.netns, false, self.limit)?;
                let jump = format!("-A POSTROUTING -j {IPT_POSTROUTING}");
                if current.lines().filter(|l| *l == jump).count() != 1 {
                    return Ok(None);
                }
                let prefix = format!("-A {IPT_POSTROUTING} ");
                let mut pods = BTreeSet::new();
                for line in current.lines().filter(|l| l.starts_with(&prefix)) {
                    let ip = line
                        .split_whitespace()
                        .nth(3)
                        .and_then(|d| d.strip_suffix("/32"))
                        .and_then(|ip| ip.parse().ok());
                    match ip {
                        Some(ip) if line == Self::iptables_rule(ip) => {
                            pods.insert(ip);
                        }
                        _ => return Ok(None),
                    }
                }
                Ok(Some(pods))
            }
            Backend::Nftables => {
                let Ok(listed) = run(
                    &self.netns,
                    "nft",
                    &["list", "table", "ip", NFT_HOST_TABLE],
                    None,
                    self.limit,
                ) else {
                    return Ok(None);
                };
                if !listed.contains(&format!("snat to {PROBE_SOURCE}")) {
                    return Ok(None);
                }
                let pods = listed
                    .split_once("elements = {")
                    .map(|(_, rest)| rest.split('}').next().unwrap_or(""))
                    .unwrap_or("")
                    .split(',')
                    .filter_map(|ip| ip.trim().parse().ok())
                    .collect();
                Ok(Some(pods))
            }
        }
    }

    /// Removes every rule of ours (the jump, the chain; or the table).
    pub fn remove(&self) -> Result<(), Error> {
        match self.backend {
            Backend::Iptables => {
                let current = ipt_save(&self.netns, false, self.limit)?;
                let declared = format!(":{IPT_POSTROUTING} ");
                if !current.lines().any(|l| l.starts_with(&declared)) {
                    return Ok(());
                }
                let jump = format!("-A POSTROUTING -j {IPT_POSTROUTING}");
                let mut script = vec!["*nat".to_owned()];
                for _ in current.lines().filter(|l| *l == jump) {
                    script.push(format!("-D POSTROUTING -j {IPT_POSTROUTING}"));
                }
                script.push(format!("-F {IPT_POSTROUTING}"));
                script.push(format!("-X {IPT_POSTROUTING}"));
                script.push("COMMIT".to_owned());
                ipt_restore_noflush(&self.netns, false, &(script.join("\n") + "\n"), self.limit)
            }
            Backend::Nftables => run(
                &self.netns,
                "nft",
                &["-f", "-"],
                Some(&format!(
                    "add table ip {NFT_HOST_TABLE}\ndelete table ip {NFT_HOST_TABLE}\n"
                )),
                self.limit,
            )
            .map(drop),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_iptables_script_names_our_chain_only_and_keeps_one_jump() {
        let pods: BTreeSet<Ipv4Addr> = ["10.1.0.5".parse().unwrap()].into();
        let fresh = ProbeSnat::iptables_script("*nat\n:POSTROUTING ACCEPT [0:0]\nCOMMIT\n", &pods);
        assert_eq!(
            fresh,
            "*nat\n:ZTUNNEL_POSTRT - [0:0]\n-A ZTUNNEL_POSTRT -d 10.1.0.5/32 -p tcp -m addrtype --src-type LOCAL -j SNAT --to-source 169.254.7.127\n-I POSTROUTING -j ZTUNNEL_POSTRT\nCOMMIT\n"
        );
        let doubled = "-A POSTROUTING -j ZTUNNEL_POSTRT\n-A POSTROUTING -j ZTUNNEL_POSTRT\n";
        let again = ProbeSnat::iptables_script(doubled, &BTreeSet::new());
        assert!(again.contains("-D POSTROUTING -j ZTUNNEL_POSTRT\n"));
        assert!(!again.contains("-I POSTROUTING"));
    }

    #[test]
    fn the_nft_script_replaces_the_table_in_one_transaction() {
        let pods: BTreeSet<Ipv4Addr> =
            ["10.1.0.5".parse().unwrap(), "10.1.0.6".parse().unwrap()].into();
        let script = ProbeSnat::nft_script(&pods);
        assert!(script.starts_with("add table ip ztunnel-host\ndelete table ip ztunnel-host\n"));
        assert!(script.contains("elements = { 10.1.0.5, 10.1.0.6 }"));
        assert!(!ProbeSnat::nft_script(&BTreeSet::new()).contains("elements"));
    }
}
