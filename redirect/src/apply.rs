//! Applying, removing and checking a pod's rules inside its network namespace.
//!
//! The tools run inside the namespace through `nsenter --net=PATH`, so this module needs no
//! `unsafe` and works with any netns path (`/var/run/netns/NAME`, `/proc/PID/ns/net`, or an open
//! namespace descriptor through [`fd_path`]). Every tool runs with a time limit
//! ([`RuleSet::tool_timeout`]); one that does not finish is killed and reported.
//!
//! iptables: our two chains are written with `iptables-restore --noflush`, which touches only the
//! chains a script names: declaring our chain flushes and refills it, and the jumps from
//! PREROUTING/OUTPUT are added only when missing (extra copies deleted). Nothing else of the nat
//! table is rewritten, so rules another program adds meanwhile are never lost. Applying twice
//! leaves one copy; removing deletes our jumps and chains and nothing else (an empty nat table
//! that iptables-nft created for us stays: deleting it could race with another writer). If the
//! IPv6 step fails after IPv4 succeeded, IPv4 is put back as it was.
//! nftables: our own `inet ztunnel` table, replaced or deleted in one `nft -f` transaction.

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

/// Installs (or replaces) the rules in `netns`.
pub fn apply(netns: &Path, backend: Backend, rules: &RuleSet) -> Result<(), Error> {
    exists(netns)?;
    let limit = rules.tool_timeout;
    match backend {
        Backend::Iptables => {
            // Per family (IPv4, then IPv6); if a later family fails, the earlier ones are put
            // back as they were, so a failed apply leaves nothing half-installed.
            let mut done: Vec<(bool, Vec<String>)> = Vec::new();
            for v6 in families(rules) {
                let step = ipt_save(netns, v6, limit).and_then(|current| {
                    let script = write_ours(&current, &rules.iptables_lines(v6));
                    ipt_restore_noflush(netns, v6, &script, limit).map(|()| ours_of(&current))
                });
                match step {
                    Ok(previous) => done.push((v6, previous)),
                    Err(e) => {
                        for (v6, previous) in done.into_iter().rev() {
                            let undone = if previous.is_empty() {
                                remove_family(netns, v6, limit)
                            } else {
                                ipt_save(netns, v6, limit).and_then(|now| {
                                    let script = write_ours(&now, &previous);
                                    ipt_restore_noflush(netns, v6, &script, limit)
                                })
                            };
                            if let Err(undo) = undone {
                                tracing::warn!(error = %undo, "could not roll back a failed apply");
                            }
                        }
                        return Err(e);
                    }
                }
            }
            Ok(())
        }
        Backend::Nftables => {
            run(netns, "nft", &["-f", "-"], Some(&rules.nft_script()), limit).map(drop)
        }
    }
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
                remove_family(netns, v6, limit)?;
            }
            Ok(())
        }
        Backend::Nftables => {
            let script = format!("table inet {NFT_TABLE}\ndelete table inet {NFT_TABLE}\n");
            run(netns, "nft", &["-f", "-"], Some(&script), limit).map(drop)
        }
    }
}

/// Removes our iptables jumps and chains of one family, touching nothing else.
fn remove_family(netns: &Path, v6: bool, limit: Duration) -> Result<(), Error> {
    let current = ipt_save(netns, v6, limit)?;
    if !current.lines().any(is_ours) {
        return Ok(());
    }
    let mut script = vec!["*nat".to_owned()];
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
                let current = ipt_save(netns, v6, limit)?;
                let live: Vec<String> = current
                    .lines()
                    .filter(|l| is_ours(l))
                    .map(normalize_decl)
                    .collect();
                let want: Vec<String> = rules
                    .iptables_lines(v6)
                    .iter()
                    .map(|l| normalize_decl(l))
                    .collect();
                diff(&want, &live, &mut drift);
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

/// An `iptables-restore --noflush` script that makes our part of the nat table `ours` (chain
/// declarations, rules and jumps as [`RuleSet::iptables_lines`] renders them), given the table
/// as it is now: our chains are declared (which flushes them) and refilled, each jump is added
/// when missing and deleted when doubled. Nothing else is named, so nothing else changes.
fn write_ours(current: &str, ours: &[String]) -> String {
    let mut script = vec!["*nat".to_owned()];
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
