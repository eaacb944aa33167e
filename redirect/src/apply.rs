//! Applying, removing and checking a pod's rules inside its network namespace.
//!
//! The tools run inside the namespace through `nsenter --net=PATH`, so this module needs no
//! `unsafe` and works with any netns path (`/var/run/netns/NAME`, `/proc/PID/ns/net`, or an open
//! namespace descriptor through [`fd_path`]). Every tool runs with a time limit
//! ([`RuleSet::tool_timeout`]); one that does not finish is killed and reported.
//!
//! iptables: our two chains (in the nat table, our output chain in the filter table (the guard
//! behind the capture, [`RuleSet::iptables_filter_lines`]), and with the return route in the
//! mangle table) are
//! written with `iptables-restore --noflush`, which touches only the chains a script names:
//! declaring our chain flushes and refills it, and the jumps from PREROUTING/OUTPUT are added
//! only when missing (extra copies deleted). Nothing else of a table is rewritten, so rules another program adds meanwhile are never lost. Applying twice
//! leaves one copy; removing deletes our jumps and chains and nothing else (an empty nat table
//! that iptables-nft created for us stays: deleting it could race with another writer). If the
//! IPv6 step fails after IPv4 succeeded, IPv4 is put back as it was.
//! nftables: our own `inet ztunnel` table, replaced or deleted in one `nft -f` transaction.
//! Either way, the return route ([`RuleSet::return_route`]) adds one routing rule and one route
//! in its own table per family, with `ip`; applying again adds nothing, removing deletes only
//! those.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::rules::{Backend, IPT_OUTPUT, IPT_PREROUTING, NFT_TABLE, RuleSet};

/// Errors of applying or inspecting rules.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A tool is not installed.
    #[error("`{tool}` is not installed; install the Debian package `{package}`")]
    MissingTool {
        /// The program.
        tool: &'static str,
        /// The package that provides it.
        package: &'static str,
    },
    /// A tool failed.
    #[error("`{command}` in network namespace {} failed: {stderr}", netns.display())]
    Tool {
        /// The command line.
        command: String,
        /// The namespace.
        netns: PathBuf,
        /// What it printed on stderr.
        stderr: String,
    },
    /// The namespace path does not exist.
    #[error("network namespace {} does not exist", .0.display())]
    NoNetns(PathBuf),
    /// A tool did not finish in time and was killed.
    #[error("`{command}` in network namespace {} did not finish within {after:?}; killed", netns.display())]
    Timeout {
        /// The command line.
        command: String,
        /// The namespace.
        netns: PathBuf,
        /// The limit ([`RuleSet::tool_timeout`]).
        after: Duration,
    },
}

/// What `check` found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Drift {
    /// Expected rules that are missing or altered.
    pub missing: Vec<String>,
    /// Rules of ours that should not be there.
    pub unexpected: Vec<String>,
}

impl Drift {
    /// No drift.
    pub fn is_clean(&self) -> bool {
        self.missing.is_empty() && self.unexpected.is_empty()
    }
}

/// Installs (or replaces) the rules in `netns`. A pod entering the mesh (no capture of ours in
/// its namespace yet) starts with conntrack's table emptied: an entry from before has no
/// redirect, and a new connection on its ports would be refused (see [`reapply`] for a pod
/// another capture held until now).
pub fn apply(netns: &Path, backend: Backend, rules: &RuleSet) -> Result<(), Error> {
    let entering = !captured(netns, backend, rules, rules.tool_timeout);
    install(netns, backend, rules, entering)
}

/// Installs the rules in `netns` keeping conntrack's table as it is: for a pod whose open
/// connections' entries carry redirects already, a capture being repaired ([`crate::reconcile`])
/// or one another capture held until now (istio-cni's rules, taken over).
pub fn reapply(netns: &Path, backend: Backend, rules: &RuleSet) -> Result<(), Error> {
    install(netns, backend, rules, false)
}

/// [`apply`], emptying conntrack's table after when `forget`.
fn install(netns: &Path, backend: Backend, rules: &RuleSet, forget: bool) -> Result<(), Error> {
    exists(netns)?;
    let limit = rules.tool_timeout;
    match backend {
        Backend::Iptables => {
            // Per family (IPv4, then IPv6) and table (nat, then mangle); if a later step fails,
            // the earlier ones are put back as they were, so a failed apply leaves nothing
            // half-installed.
            let mut done: Vec<(bool, &'static str, Vec<String>)> = Vec::new();
            for v6 in families(rules) {
                for (table, lines) in tables(rules, v6) {
                    let step = if lines.is_empty() {
                        // Nothing of ours belongs here: leftovers of an earlier rule set go.
                        remove_table(netns, v6, table, limit).map(|()| Vec::new())
                    } else {
                        ipt_save_table(netns, v6, table, limit).and_then(|current| {
                            let script = write_ours(table, &current, &lines);
                            ipt_restore_noflush(netns, v6, &script, limit)
                                .map(|()| ours_of(&current))
                        })
                    };
                    match step {
                        Ok(previous) => done.push((v6, table, previous)),
                        Err(e) => {
                            rollback(netns, done, limit);
                            return Err(e);
                        }
                    }
                }
            }
            if let Err(e) = apply_return_route(netns, rules) {
                rollback(netns, done, limit);
                return Err(e);
            }
        }
        Backend::Nftables => {
            run(netns, "nft", &["-f", "-"], Some(&rules.nft_script()), limit)?;
            apply_return_route(netns, rules)?;
        }
    }
    no_loose_pickup(netns, limit);
    if forget {
        forget_connections(netns);
    }
    Ok(())
}

/// Whether `netns` holds our capture already (this apply refreshes it: the node agent's
/// restart, a repair), as opposed to a pod entering the mesh.
fn captured(netns: &Path, backend: Backend, rules: &RuleSet, limit: Duration) -> bool {
    match backend {
        Backend::Iptables => families(rules).into_iter().any(|v6| {
            ipt_save_table(netns, v6, "nat", limit).is_ok_and(|t| !ours_of(&t).is_empty())
        }),
        Backend::Nftables => run(
            netns,
            "nft",
            &["list", "table", "inet", NFT_TABLE],
            None,
            limit,
        )
        .is_ok(),
    }
}

/// Empties conntrack's table in the namespace of a pod entering the mesh (see
/// `crate::conntrack`): an entry made while it was outside carries no redirect, and a new
/// connection that reuses its ports would be refused by the guard. Only on entering: a refreshed
/// capture's entries carry the redirects of connections the proxy serves. Best effort: where it
/// fails the capture stands (such a connection is refused, never let past) and the reason is
/// logged.
fn forget_connections(netns: &Path) {
    if let Err(e) = crate::conntrack::flush(netns) {
        tracing::warn!(netns = %netns.display(), error = %e, "cannot empty conntrack's table in the pod's namespace; a connection reusing the ports of one made before the capture may be refused");
    }
}

/// Stops conntrack in the pod's namespace from taking a connection up in its middle
/// (`nf_conntrack_tcp_loose` = 0). The capture redirects a connection's first packet (a SYN),
/// so an entry made from a later packet (a stray ACK after an entry went) has no redirect, and a
/// new connection that reuses its ports within the entry's five minutes would join it and go
/// out past the capture, in plaintext. Connections open before the capture still go on: their
/// packets without an entry are left alone, as before. Best effort: where the namespace's
/// `/proc/sys` cannot be written, the capture stands and the reason is logged.
fn no_loose_pickup(netns: &Path, limit: Duration) {
    let path = "/proc/sys/net/netfilter/nf_conntrack_tcp_loose";
    if let Err(e) = run(netns, "tee", &[path], Some("0\n"), limit) {
        tracing::warn!(netns = %netns.display(), error = %e, "cannot turn off conntrack's mid-connection pickup in the pod's namespace; a reused port could rarely slip past the capture");
    }
}

/// Puts back the iptables tables an [`apply`] changed before it failed.
fn rollback(netns: &Path, done: Vec<(bool, &'static str, Vec<String>)>, limit: Duration) {
    for (v6, table, previous) in done.into_iter().rev() {
        let undone = if previous.is_empty() {
            remove_table(netns, v6, table, limit)
        } else {
            ipt_save_table(netns, v6, table, limit).and_then(|now| {
                let script = write_ours(table, &now, &previous);
                ipt_restore_noflush(netns, v6, &script, limit)
            })
        };
        if let Err(undo) = undone {
            tracing::warn!(error = %undo, "could not roll back a failed apply");
        }
    }
}

/// The iptables tables we write for one family, with our lines in each (empty: none of ours
/// belongs there).
fn tables(rules: &RuleSet, v6: bool) -> [(&'static str, Vec<String>); 3] {
    [
        ("nat", rules.iptables_lines(v6)),
        ("filter", rules.iptables_filter_lines()),
        ("mangle", rules.iptables_mangle_lines()),
    ]
}

/// `ip` with the family flag.
fn ip(netns: &Path, v6: bool, args: &[&str], limit: Duration) -> Result<String, Error> {
    let mut all = Vec::with_capacity(args.len() + 1);
    if v6 {
        all.push("-6");
    }
    all.extend_from_slice(args);
    run(netns, "ip", &all, None, limit)
}

/// The return route's table and rule (when the rule set has one), in each family; idempotent.
fn apply_return_route(netns: &Path, rules: &RuleSet) -> Result<(), Error> {
    set_return_route(netns, rules, true)
}

/// Removes the return route's rule and table route (when the rule set has one); what is not
/// there is not an error.
fn remove_return_route(netns: &Path, rules: &RuleSet) -> Result<(), Error> {
    set_return_route(netns, rules, false)
}

/// Puts the return route in (`install`) or takes it out, in each family, changing only what
/// differs from what [`return_route_live`] finds.
fn set_return_route(netns: &Path, rules: &RuleSet, install: bool) -> Result<(), Error> {
    let (Some(ret), Some(selector)) = (rules.return_route, rules.return_rule()) else {
        return Ok(());
    };
    let limit = rules.tool_timeout;
    let table = ret.table.to_string();
    let priority = ret.priority.to_string();
    let route = ["local", "default", "dev", "lo", "table", &table];
    for v6 in families(rules) {
        if install && v6 && ipv6_disabled(netns, limit) {
            continue;
        }
        let (rule_in, route_in) = return_route_live(netns, v6, rules)?;
        if route_in != install {
            let verb = if install { "replace" } else { "del" };
            ip(netns, v6, &[&["route", verb][..], &route].concat(), limit)?;
        }
        if rule_in != install {
            let verb = if install { "add" } else { "del" };
            let mut args = vec!["rule", verb, "pref", &priority];
            args.extend(selector.split_whitespace().skip(2)); // without "from all"
            ip(netns, v6, &args, limit)?;
        }
    }
    Ok(())
}

/// Whether the return route's rule and its table's route are in place in one family.
fn return_route_live(netns: &Path, v6: bool, rules: &RuleSet) -> Result<(bool, bool), Error> {
    let (Some(ret), Some(selector)) = (rules.return_route, rules.return_rule()) else {
        return Ok((false, false));
    };
    let limit = rules.tool_timeout;
    let live = ip(
        netns,
        v6,
        &["rule", "show", "pref", &ret.priority.to_string()],
        limit,
    )?;
    let routes = match ip(
        netns,
        v6,
        &["route", "show", "table", &ret.table.to_string()],
        limit,
    ) {
        Ok(routes) => routes,
        // A table no route was ever put in does not exist: then neither does ours.
        Err(Error::Tool { stderr, .. }) if stderr.contains("FIB table does not exist") => {
            String::new()
        }
        Err(e) => return Err(e),
    };
    Ok((
        rule_listed(&live, &selector),
        routes.lines().any(is_return_route),
    ))
}

/// Whether IPv6 is off on the namespace's loopback interface (`disable_ipv6`, or no IPv6 in
/// the kernel): then it carries no IPv6 connection to return, and takes no IPv6 route.
pub(crate) fn ipv6_disabled(netns: &Path, limit: Duration) -> bool {
    run(
        netns,
        "cat",
        &["/proc/sys/net/ipv6/conf/lo/disable_ipv6"],
        None,
        limit,
    )
    .map_or(true, |v| v.trim() == "1")
}

/// Whether `ip rule show pref N` printed `selector`.
fn rule_listed(live: &str, selector: &str) -> bool {
    live.lines().any(|l| {
        l.split_once(':').is_some_and(|(_, rest)| {
            rest.split_whitespace().collect::<Vec<_>>().join(" ") == selector
        })
    })
}

/// Whether a line of `ip route show table N` is the return route.
fn is_return_route(line: &str) -> bool {
    line.starts_with("local default dev lo ")
}

/// A path through which the tools can enter the namespace open at `fd` (this process's
/// `/proc/PID/fd/N`), for callers that hold a namespace descriptor rather than a path.
pub fn fd_path(fd: std::os::fd::BorrowedFd<'_>) -> PathBuf {
    use std::os::fd::AsRawFd;
    PathBuf::from(format!(
        "/proc/{}/fd/{}",
        std::process::id(),
        fd.as_raw_fd()
    ))
}

/// Removes exactly what [`apply`] installed.
pub fn remove(netns: &Path, backend: Backend, rules: &RuleSet) -> Result<(), Error> {
    exists(netns)?;
    let limit = rules.tool_timeout;
    match backend {
        Backend::Iptables => {
            for v6 in families(rules) {
                for (table, _) in tables(rules, v6) {
                    remove_table(netns, v6, table, limit)?;
                }
            }
        }
        Backend::Nftables => {
            let script = format!("table inet {NFT_TABLE}\ndelete table inet {NFT_TABLE}\n");
            run(netns, "nft", &["-f", "-"], Some(&script), limit)?;
        }
    }
    remove_return_route(netns, rules)
}

/// Removes our iptables jumps and chains of one family from one table, touching nothing else.
fn remove_table(netns: &Path, v6: bool, table: &str, limit: Duration) -> Result<(), Error> {
    let current = ipt_save_table(netns, v6, table, limit)?;
    if !current.lines().any(is_ours) {
        return Ok(());
    }
    let mut script = vec![format!("*{table}")];
    for (chain, ours) in [("PREROUTING", IPT_PREROUTING), ("OUTPUT", IPT_OUTPUT)] {
        let jump = format!("-A {chain} -j {ours}");
        for _ in current.lines().filter(|l| *l == jump) {
            script.push(format!("-D {chain} -j {ours}"));
        }
    }
    for ours in [IPT_PREROUTING, IPT_OUTPUT] {
        if current.lines().any(|l| l.starts_with(&format!(":{ours} "))) {
            script.push(format!("-F {ours}"));
            script.push(format!("-X {ours}"));
        }
    }
    script.push("COMMIT".to_owned());
    ipt_restore_noflush(netns, v6, &(script.join("\n") + "\n"), limit)
}

/// Compares the live rules with what [`apply`] installs.
pub fn check(netns: &Path, backend: Backend, rules: &RuleSet) -> Result<Drift, Error> {
    exists(netns)?;
    let limit = rules.tool_timeout;
    let mut drift = Drift::default();
    match backend {
        Backend::Iptables => {
            for v6 in families(rules) {
                for (table, lines) in tables(rules, v6) {
                    let current = ipt_save_table(netns, v6, table, limit)?;
                    let live: Vec<String> = current
                        .lines()
                        .filter(|l| is_ours(l))
                        .map(normalize_decl)
                        .collect();
                    let want: Vec<String> = lines.iter().map(|l| normalize_decl(l)).collect();
                    diff(&want, &live, &mut drift);
                }
            }
        }
        Backend::Nftables => {
            let live = run(
                netns,
                "nft",
                &["list", "table", "inet", NFT_TABLE],
                None,
                limit,
            )
            .unwrap_or_default();
            let norm = |text: &str| -> Vec<String> {
                text.lines()
                    .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
                    .filter(|l| !l.is_empty() && l != "}")
                    .collect()
            };
            diff(&norm(&rules.nft_table()), &norm(&live), &mut drift);
        }
    }
    if let (Some(ret), Some(selector)) = (rules.return_route, rules.return_rule()) {
        for v6 in families(rules) {
            if v6 && ipv6_disabled(netns, limit) {
                continue;
            }
            let family = if v6 { "ip -6" } else { "ip" };
            let (rule_in, route_in) = return_route_live(netns, v6, rules)?;
            if !rule_in {
                drift
                    .missing
                    .push(format!("{family} rule {}: {selector}", ret.priority));
            }
            if !route_in {
                drift.missing.push(format!(
                    "{family} route table {}: local default dev lo",
                    ret.table
                ));
            }
        }
    }
    Ok(drift)
}

/// The families to handle.
fn families(rules: &RuleSet) -> Vec<bool> {
    if rules.ipv6 {
        vec![false, true]
    } else {
        vec![false]
    }
}

fn diff(want: &[String], live: &[String], drift: &mut Drift) {
    drift
        .missing
        .extend(want.iter().filter(|w| !live.contains(w)).cloned());
    drift
        .unexpected
        .extend(live.iter().filter(|l| !want.contains(l)).cloned());
}

/// Chain declarations carry counters; compare them by name.
fn normalize_decl(line: &str) -> String {
    match line.strip_prefix(':') {
        Some(rest) => format!(":{}", rest.split_whitespace().next().unwrap_or_default()),
        None => line.to_owned(),
    }
}

fn is_ours(line: &str) -> bool {
    line.starts_with(&format!(":{IPT_PREROUTING} "))
        || line.starts_with(&format!(":{IPT_OUTPUT} "))
        || line.starts_with(&format!("-A {IPT_PREROUTING} "))
        || line.starts_with(&format!("-A {IPT_OUTPUT} "))
        || line == format!("-A PREROUTING -j {IPT_PREROUTING}")
        || line == format!("-A OUTPUT -j {IPT_OUTPUT}")
}

/// Our lines (chain declarations, rules in our chains, jumps) of a saved nat table.
fn ours_of(saved: &str) -> Vec<String> {
    saved
        .lines()
        .filter(|l| is_ours(l))
        .map(str::to_owned)
        .collect()
}

/// An `iptables-restore --noflush` script that makes our part of `table` `ours` (chain
/// declarations, rules and jumps as [`RuleSet::iptables_lines`] renders them), given the table
/// as it is now: our chains are declared (which flushes them) and refilled, each jump is added
/// when missing and deleted when doubled. Nothing else is named, so nothing else changes.
fn write_ours(table: &str, current: &str, ours: &[String]) -> String {
    let mut script = vec![format!("*{table}")];
    let (decls, rules): (Vec<&String>, Vec<&String>) =
        ours.iter().partition(|l| l.starts_with(':'));
    script.extend(decls.into_iter().cloned());
    for rule in rules {
        let in_our_chain = [IPT_PREROUTING, IPT_OUTPUT]
            .iter()
            .any(|c| rule.starts_with(&format!("-A {c} ")));
        if in_our_chain {
            script.push(rule.clone());
            continue;
        }
        let present = current.lines().filter(|l| l == rule).count();
        if present == 0 {
            script.push(rule.clone());
        }
        for _ in 1..present {
            script.push(rule.replacen("-A ", "-D ", 1));
        }
    }
    script.push("COMMIT".to_owned());
    script.join("\n") + "\n"
}

pub(crate) fn ipt_save(netns: &Path, v6: bool, limit: Duration) -> Result<String, Error> {
    ipt_save_table(netns, v6, "nat", limit)
}

/// `iptables-save -t TABLE` (or ip6tables-save) inside `netns`.
pub(crate) fn ipt_save_table(
    netns: &Path,
    v6: bool,
    table: &str,
    limit: Duration,
) -> Result<String, Error> {
    let tool = if v6 {
        "ip6tables-save"
    } else {
        "iptables-save"
    };
    run(netns, tool, &["-t", table], None, limit)
}

pub(crate) fn ipt_restore_noflush(
    netns: &Path,
    v6: bool,
    text: &str,
    limit: Duration,
) -> Result<(), Error> {
    let tool = if v6 {
        "ip6tables-restore"
    } else {
        "iptables-restore"
    };
    // `--wait`: with iptables-legacy, the agent applies several namespaces at once and the
    // tools share one lock file.
    run(netns, tool, &["--noflush", "--wait"], Some(text), limit).map(drop)
}

fn exists(netns: &Path) -> Result<(), Error> {
    if netns.exists() {
        Ok(())
    } else {
        Err(Error::NoNetns(netns.to_owned()))
    }
}

/// Runs `tool args` inside `netns`, feeding `stdin`, returning stdout; killed after `limit`.
pub(crate) fn run(
    netns: &Path,
    tool: &'static str,
    args: &[&str],
    stdin: Option<&str>,
    limit: Duration,
) -> Result<String, Error> {
    let package = match tool {
        "nft" => "nftables",
        "ipset" => "ipset",
        "ip" => "iproute2",
        "cat" | "tee" => "coreutils",
        _ => "iptables",
    };
    let mut command = Command::new("nsenter");
    command
        .arg(format!("--net={}", netns.display()))
        .arg("--")
        .arg(tool)
        .args(args);
    let out = crate::process::output(command, stdin, limit).map_err(|e| match e {
        crate::process::Failure::Spawn(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Error::MissingTool {
                tool: "nsenter",
                package: "util-linux",
            }
        }
        crate::process::Failure::TimedOut => Error::Timeout {
            command: format!("{tool} {}", args.join(" ")),
            netns: netns.to_owned(),
            after: limit,
        },
        crate::process::Failure::Spawn(e) | crate::process::Failure::Wait(e) => Error::Tool {
            command: format!("nsenter {tool}"),
            netns: netns.to_owned(),
            stderr: e.to_string(),
        },
    })?;
    if out.status.success() {
        return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
    }
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
    if stderr.contains("No such file or directory") && stderr.contains(tool)
        || stderr.contains("failed to execute")
    {
        return Err(Error::MissingTool { tool, package });
    }
    Err(Error::Tool {
        command: format!("{tool} {}", args.join(" ")),
        netns: netns.to_owned(),
        stderr,
    })
}
