//! The node's side of kubelet probes: connections the node itself opens to a captured pod (the
//! kubelet's health probes) leave with the source address [`PROBE_SOURCE`], 169.254.7.127, or
//! for IPv6 [`PROBE_SOURCE_V6`], `fd16:9254:7127:1337:ffff:ffff:ffff:ffff`, as istio-cni
//! rewrites them; the pod's own rules ([`crate::RuleSet::probe_sources`]) let that address
//! through to the app, so a probe reaches the app whatever policy the pod has.
//!
//! The rule set names the captured pods' addresses, and only TCP whose source is one of the
//! node's own addresses (locally originated: forwarded pod-to-pod traffic is never rewritten),
//! per family (IPv6 only where the node has it):
//!
//! - iptables: chain `ZTUNNEL_POSTRT` in the nat table (of `iptables` and `ip6tables`), one
//!   `SNAT` rule per pod, entered from the top of `POSTROUTING`; written with
//!   `iptables-restore --noflush` (declaring the chain flushes and refills it; nothing else of
//!   the table is rewritten).
//! - nftables: tables `ip ztunnel-host` and `ip6 ztunnel-host` with the pods in a set and one
//!   rule in a `srcnat - 1` postrouting chain (before other source NAT), each replaced in one
//!   transaction.
//!
//! [`ProbeSnat::apply`] sets the rules to exactly the given pods; [`ProbeSnat::live`] reads what
//! is in place (to repair drift); [`ProbeSnat::remove`] takes everything out.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use std::time::Duration;

use crate::apply::{Error, ipt_restore_noflush, ipt_save, ipv6_disabled, run};
use crate::rules::Backend;

/// The source address IPv4 probes are rewritten to (Istio's).
pub const PROBE_SOURCE: Ipv4Addr = Ipv4Addr::new(169, 254, 7, 127);
/// The source address IPv6 probes are rewritten to (Istio's).
pub const PROBE_SOURCE_V6: Ipv6Addr = Ipv6Addr::new(
    0xfd16, 0x9254, 0x7127, 0x1337, 0xffff, 0xffff, 0xffff, 0xffff,
);
/// Our chain in the node's nat table (iptables).
pub const IPT_POSTROUTING: &str = "ZTUNNEL_POSTRT";
/// Our table on the node (nftables, families `ip` and `ip6`).
pub const NFT_HOST_TABLE: &str = "ztunnel-host";

/// The probe rewrite in one network namespace (the node's).
#[derive(Debug, Clone)]
pub struct ProbeSnat {
    backend: Backend,
    netns: PathBuf,
    limit: Duration,
}

/// The address probes of a family are rewritten to.
fn source(v6: bool) -> IpAddr {
    if v6 {
        PROBE_SOURCE_V6.into()
    } else {
        PROBE_SOURCE.into()
    }
}

/// The nftables family of a family's table.
fn nft_family(v6: bool) -> &'static str {
    if v6 { "ip6" } else { "ip" }
}

/// The pods of `pods` of one family.
fn of_family(pods: &BTreeSet<IpAddr>, v6: bool) -> impl Iterator<Item = &IpAddr> {
    pods.iter().filter(move |ip| ip.is_ipv6() == v6)
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

    /// The families handled here: IPv4, and IPv6 where the namespace has it.
    fn families(&self) -> Vec<bool> {
        if ipv6_disabled(&self.netns, self.limit) {
            vec![false]
        } else {
            vec![false, true]
        }
    }

    /// The iptables rule for one pod, as `iptables-save` (or `ip6tables-save`) prints it.
    fn iptables_rule(ip: IpAddr) -> String {
        let len = if ip.is_ipv6() { 128 } else { 32 };
        format!(
            "-A {IPT_POSTROUTING} -d {ip}/{len} -p tcp -m addrtype --src-type LOCAL -j SNAT --to-source {}",
            source(ip.is_ipv6())
        )
    }

    /// The nftables transaction that makes the `v6` family's table hold exactly the pods of
    /// `pods` of that family.
    pub fn nft_script(pods: &BTreeSet<IpAddr>, v6: bool) -> String {
        let list: Vec<String> = of_family(pods, v6).map(IpAddr::to_string).collect();
        let elements = if list.is_empty() {
            String::new()
        } else {
            format!(" elements = {{ {} }}", list.join(", "))
        };
        let (family, kind) = if v6 {
            ("ip6", "ipv6_addr")
        } else {
            ("ip", "ipv4_addr")
        };
        let to = source(v6);
        format!(
            "add table {family} {NFT_HOST_TABLE}\ndelete table {family} {NFT_HOST_TABLE}\ntable {family} {NFT_HOST_TABLE} {{\n  set probe-pods {{ type {kind};{elements} }}\n  chain postrouting {{\n    type nat hook postrouting priority srcnat - 1; policy accept;\n    {family} daddr @probe-pods meta l4proto tcp fib saddr type local snat to {to}\n  }}\n}}\n"
        )
    }

    /// The `iptables-restore --noflush` script that makes our chain of the `v6` family hold
    /// exactly the pods of `pods` of that family, given the nat table as it is (`current`): the
    /// jump from `POSTROUTING` inserted when missing and doubled copies deleted.
    pub fn iptables_script(current: &str, pods: &BTreeSet<IpAddr>, v6: bool) -> String {
        let mut script = vec!["*nat".to_owned(), format!(":{IPT_POSTROUTING} - [0:0]")];
        script.extend(of_family(pods, v6).map(|ip| Self::iptables_rule(*ip)));
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

    /// Makes the rules rewrite probes to exactly `pods` (IPv6 ones only where the node has
    /// IPv6).
    pub fn apply(&self, pods: &BTreeSet<IpAddr>) -> Result<(), Error> {
        for v6 in self.families() {
            match self.backend {
                Backend::Iptables => {
                    let current = ipt_save(&self.netns, v6, self.limit)?;
                    ipt_restore_noflush(
                        &self.netns,
                        v6,
                        &Self::iptables_script(&current, pods, v6),
                        self.limit,
                    )?;
                }
                Backend::Nftables => {
                    run(
                        &self.netns,
                        "nft",
                        &["-f", "-"],
                        Some(&Self::nft_script(pods, v6)),
                        self.limit,
                    )?;
                }
            }
        }
        Ok(())
    }

    /// The pods whose probes are rewritten now; `None` when the rules are not (all) in place:
    /// no chain or table, no jump, or a rule not of ours, in a family handled.
    pub fn live(&self) -> Result<Option<BTreeSet<IpAddr>>, Error> {
        let mut pods = BTreeSet::new();
        for v6 in self.families() {
            match self.live_family(v6)? {
                Some(of) => pods.extend(of),
                None => return Ok(None),
            }
        }
        Ok(Some(pods))
    }

    fn live_family(&self, v6: bool) -> Result<Option<BTreeSet<IpAddr>>, Error> {
        match self.backend {
            Backend::Iptables => {
                let current = ipt_save(&self.netns, v6, self.limit)?;
                let jump = format!("-A POSTROUTING -j {IPT_POSTROUTING}");
                if current.lines().filter(|l| *l == jump).count() != 1 {
                    return Ok(None);
                }
                let prefix = format!("-A {IPT_POSTROUTING} ");
                let mut pods = BTreeSet::new();
                for line in current.lines().filter(|l| l.starts_with(&prefix)) {
                    let ip: Option<IpAddr> = line
                        .split_whitespace()
                        .nth(3)
                        .and_then(|d| d.split_once('/'))
                        .and_then(|(ip, _)| ip.parse().ok());
                    match ip {
                        Some(ip) if ip.is_ipv6() == v6 && line == Self::iptables_rule(ip) => {
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
                    &["list", "table", nft_family(v6), NFT_HOST_TABLE],
                    None,
                    self.limit,
                ) else {
                    return Ok(None);
                };
                if !listed.contains(&format!("snat to {}", source(v6))) {
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

    /// Removes every rule of ours (the jump, the chain; or the tables), in both families.
    pub fn remove(&self) -> Result<(), Error> {
        for v6 in self.families() {
            self.remove_family(v6)?;
        }
        Ok(())
    }

    fn remove_family(&self, v6: bool) -> Result<(), Error> {
        match self.backend {
            Backend::Iptables => {
                let current = ipt_save(&self.netns, v6, self.limit)?;
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
                ipt_restore_noflush(&self.netns, v6, &(script.join("\n") + "\n"), self.limit)
            }
            Backend::Nftables => {
                let family = nft_family(v6);
                run(
                    &self.netns,
                    "nft",
                    &["-f", "-"],
                    Some(&format!(
                        "add table {family} {NFT_HOST_TABLE}\ndelete table {family} {NFT_HOST_TABLE}\n"
                    )),
                    self.limit,
                )
                .map(drop)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_iptables_script_names_our_chain_only_and_keeps_one_jump() {
        let pods: BTreeSet<IpAddr> =
            ["10.1.0.5".parse().unwrap(), "fd00::5".parse().unwrap()].into();
        let fresh =
            ProbeSnat::iptables_script("*nat\n:POSTROUTING ACCEPT [0:0]\nCOMMIT\n", &pods, false);
        assert_eq!(
            fresh,
            "*nat\n:ZTUNNEL_POSTRT - [0:0]\n-A ZTUNNEL_POSTRT -d 10.1.0.5/32 -p tcp -m addrtype --src-type LOCAL -j SNAT --to-source 169.254.7.127\n-I POSTROUTING -j ZTUNNEL_POSTRT\nCOMMIT\n"
        );
        let doubled = "-A POSTROUTING -j ZTUNNEL_POSTRT\n-A POSTROUTING -j ZTUNNEL_POSTRT\n";
        let again = ProbeSnat::iptables_script(doubled, &BTreeSet::new(), false);
        assert!(again.contains("-D POSTROUTING -j ZTUNNEL_POSTRT\n"));
        assert!(!again.contains("-I POSTROUTING"));
        let v6 = ProbeSnat::iptables_script("", &pods, true);
        assert!(v6.contains("-A ZTUNNEL_POSTRT -d fd00::5/128 -p tcp -m addrtype --src-type LOCAL -j SNAT --to-source fd16:9254:7127:1337:ffff:ffff:ffff:ffff\n"), "{v6}");
        assert!(!v6.contains("10.1.0.5"), "{v6}");
    }

    #[test]
    fn the_nft_script_replaces_the_table_in_one_transaction() {
        let pods: BTreeSet<IpAddr> = [
            "10.1.0.5".parse().unwrap(),
            "10.1.0.6".parse().unwrap(),
            "fd00::5".parse().unwrap(),
        ]
        .into();
        let script = ProbeSnat::nft_script(&pods, false);
        assert!(script.starts_with("add table ip ztunnel-host\ndelete table ip ztunnel-host\n"));
        assert!(script.contains("elements = { 10.1.0.5, 10.1.0.6 }"));
        assert!(!ProbeSnat::nft_script(&BTreeSet::new(), false).contains("elements"));
        let v6 = ProbeSnat::nft_script(&pods, true);
        assert!(v6.starts_with("add table ip6 ztunnel-host\n"), "{v6}");
        assert!(
            v6.contains("type ipv6_addr; elements = { fd00::5 }"),
            "{v6}"
        );
        assert!(v6.contains("ip6 daddr @probe-pods meta l4proto tcp fib saddr type local snat to fd16:9254:7127:1337:ffff:ffff:ffff:ffff"), "{v6}");
    }
}
