//! Taking a node over from istio-cni: its rules out, so no pod ends up with two rule sets.
//!
//! What istio-cni's ambient mode leaves, and what is removed here (only what carries its names):
//!
//! - in each captured pod: iptables chains named `ISTIO_*` in the `nat`, `mangle` and `raw`
//!   tables (IPv4 and IPv6) with the jumps to them, and the nftables tables
//!   `inet istio-ambient-nat`, `inet istio-ambient-mangle` and `inet istio-ambient-raw`
//!   ([`remove_istio_pod_rules`], run by the agent before it captures a pod when
//!   [`crate::agent::NodeAgent::with_takeover`] is set);
//! - on the node: the `ISTIO_POSTRT` chain of the `nat` table with its jump, the ipsets
//!   `istio-inpod-probes-v4`/`-v6` it uses, and the nftables table `inet istio-ambient-nat`
//!   ([`remove_istio_host_rules`]);
//! - its chained CNI plugin (`crate::cni::install::unchain_type` with
//!   [`crate::cni::install::ISTIO_CNI_TYPE`]).
//!
//! Handing the node back is the reverse: our rules out of every pod, our host rules and our
//! plugin out; istio-cni, started again, captures the pods with its own.

use std::path::Path;
use std::time::Duration;

use crate::apply::{Error, ipt_restore_noflush, ipt_save_table, run};

/// The iptables tables istio-cni writes in a pod.
const ISTIO_TABLES: [&str; 3] = ["nat", "mangle", "raw"];
/// The nftables tables istio-cni writes (family `inet`), in a pod and (`nat`) on the node.
const ISTIO_NFT_TABLES: [&str; 3] = [
    "istio-ambient-nat",
    "istio-ambient-mangle",
    "istio-ambient-raw",
];
/// The ipsets of istio-cni's probe rule on the node.
const ISTIO_IPSETS: [&str; 2] = ["istio-inpod-probes-v4", "istio-inpod-probes-v6"];

/// How long each tool may take.
const LIMIT: Duration = Duration::from_secs(10);

/// An `iptables-restore --noflush` script for `table` that deletes the jumps to chains whose
/// names start with `prefix` and then those chains; `None` when there are none.
pub fn chain_removal(saved: &str, table: &str, prefix: &str) -> Option<String> {
    let chains: Vec<&str> = saved
        .lines()
        .filter_map(|l| l.strip_prefix(':'))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|name| name.starts_with(prefix))
        .collect();
    if chains.is_empty() {
        return None;
    }
    let mut script = vec![format!("*{table}")];
    // Every rule that jumps to one of them, wherever it is (built-in chains or their own).
    for line in saved.lines().filter(|l| l.starts_with("-A ")) {
        let target = line
            .split_whitespace()
            .skip_while(|w| *w != "-j")
            .nth(1)
            .unwrap_or("");
        let owner = line.split_whitespace().nth(1).unwrap_or("");
        if chains.contains(&target) && !chains.contains(&owner) {
            script.push(line.replacen("-A ", "-D ", 1));
        }
    }
    for chain in &chains {
        script.push(format!("-F {chain}"));
    }
    for chain in &chains {
        script.push(format!("-X {chain}"));
    }
    script.push("COMMIT".to_owned());
    Some(script.join("\n") + "\n")
}

/// Removes istio-cni's rules from the pod namespace at `netns`; returns what was removed (for
/// the log), empty when there was nothing.
pub fn remove_istio_pod_rules(netns: &Path) -> Result<Vec<String>, Error> {
    let mut removed = Vec::new();
    for v6 in [false, true] {
        for table in ISTIO_TABLES {
            removed.extend(remove_chains(netns, v6, table, "ISTIO_")?);
        }
    }
    removed.extend(remove_nft_tables(netns, &ISTIO_NFT_TABLES)?);
    Ok(removed)
}

/// Removes istio-cni's rules from the node's namespace at `netns` (its probe chain, the
/// ipsets, its nftables table); returns what was removed.
pub fn remove_istio_host_rules(netns: &Path) -> Result<Vec<String>, Error> {
    let mut removed = Vec::new();
    for v6 in [false, true] {
        removed.extend(remove_chains(netns, v6, "nat", "ISTIO_POSTRT")?);
    }
    removed.extend(remove_nft_tables(netns, &ISTIO_NFT_TABLES[..1])?);
    for set in ISTIO_IPSETS {
        // Absent sets and an absent ipset tool are both nothing to remove.
        if run(netns, "ipset", &["list", "-n", set], None, LIMIT).is_ok() {
            run(netns, "ipset", &["destroy", set], None, LIMIT)?;
            removed.push(format!("ipset {set}"));
        }
    }
    Ok(removed)
}

fn remove_chains(netns: &Path, v6: bool, table: &str, prefix: &str) -> Result<Vec<String>, Error> {
    let saved = match ipt_save_table(netns, v6, table, LIMIT) {
        Ok(saved) => saved,
        // A table the kernel does not have (raw without its module) holds nothing of theirs.
        Err(Error::Tool { stderr, .. }) if stderr.contains("does not exist") => {
            return Ok(Vec::new());
        }
        Err(e) => return Err(e),
    };
    let Some(script) = chain_removal(&saved, table, prefix) else {
        return Ok(Vec::new());
    };
    ipt_restore_noflush(netns, v6, &script, LIMIT)?;
    let family = if v6 { "ip6tables" } else { "iptables" };
    Ok(script
        .lines()
        .filter_map(|l| l.strip_prefix("-X "))
        .map(|chain| format!("{family} {table} {chain}"))
        .collect())
}

fn remove_nft_tables(netns: &Path, tables: &[&str]) -> Result<Vec<String>, Error> {
    let listed = run(netns, "nft", &["list", "tables"], None, LIMIT).unwrap_or_default();
    let present: Vec<&str> = tables
        .iter()
        .copied()
        .filter(|t| {
            listed
                .lines()
                .any(|l| l.trim() == format!("table inet {t}"))
        })
        .collect();
    if present.is_empty() {
        return Ok(Vec::new());
    }
    let script: String = present
        .iter()
        .map(|t| format!("delete table inet {t}\n"))
        .collect();
    run(netns, "nft", &["-f", "-"], Some(&script), LIMIT)?;
    Ok(present.iter().map(|t| format!("nft inet {t}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removal_names_only_the_prefixed_chains_and_the_jumps_to_them() {
        let saved = "*mangle\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:ISTIO_PRERT - [0:0]\n:ISTIO_OUTPUT - [0:0]\n:OTHER - [0:0]\n-A PREROUTING -j ISTIO_PRERT\n-A OUTPUT -j ISTIO_OUTPUT\n-A OUTPUT -j OTHER\n-A ISTIO_PRERT -p tcp -j ACCEPT\nCOMMIT\n";
        let script = chain_removal(saved, "mangle", "ISTIO_").unwrap();
        assert_eq!(
            script,
            "*mangle\n-D PREROUTING -j ISTIO_PRERT\n-D OUTPUT -j ISTIO_OUTPUT\n-F ISTIO_PRERT\n-F ISTIO_OUTPUT\n-X ISTIO_PRERT\n-X ISTIO_OUTPUT\nCOMMIT\n"
        );
        assert_eq!(
            chain_removal("*nat\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n", "nat", "ISTIO_"),
            None
        );
    }
}
