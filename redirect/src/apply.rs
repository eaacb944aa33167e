//! Applying, removing and checking a pod's rules inside its network namespace.
//!
//! The tools run inside the namespace through `nsenter --net=PATH`, so this module needs no
//! `unsafe` and works with any netns path (`/var/run/netns/NAME`, `/proc/PID/ns/net`, or an open
//! namespace descriptor through [`fd_path`]).
//!
//! iptables: the namespace's whole nat table is read (`iptables-save -t nat`), our chains and
//! jumps are taken out and the current ones put in, and the table is written back with one
//! `iptables-restore` (which replaces only the nat table, atomically). So applying twice leaves
//! one copy, removing leaves exactly what was there before, and other rules are untouched. If
//! the IPv6 step fails after IPv4 succeeded, IPv4 is put back as it was.
//! nftables: our own `inet ztunnel` table, replaced or deleted in one `nft -f` transaction.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

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
    match backend {
        Backend::Iptables => {
            // Per family (IPv4, then IPv6); if a later family fails, the earlier ones are put
            // back as they were, so a failed apply leaves nothing half-installed.
            let mut done: Vec<(bool, String)> = Vec::new();
            for v6 in families(rules) {
                let step = ipt_save(netns, v6).and_then(|current| {
                    let ours = rules.iptables_lines(v6);
                    ipt_restore(netns, v6, &with_ours(&without_ours(&current), &ours))
                        .map(|()| current)
                });
                match step {
                    Ok(previous) => done.push((v6, previous)),
                    Err(e) => {
                        for (v6, previous) in done.into_iter().rev() {
                            let undone = if previous.lines().any(is_ours) {
                                ipt_restore(netns, v6, &previous)
                            } else {
                                remove_family(netns, v6)
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
        Backend::Nftables => run(netns, "nft", &["-f", "-"], Some(&rules.nft_script())).map(drop),
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
    match backend {
        Backend::Iptables => {
            for v6 in families(rules) {
                remove_family(netns, v6)?;
            }
            Ok(())
        }
        Backend::Nftables => {
            let script = format!("table inet {NFT_TABLE}\ndelete table inet {NFT_TABLE}\n");
            run(netns, "nft", &["-f", "-"], Some(&script)).map(drop)
        }
    }
}

/// Removes our iptables rules of one family.
fn remove_family(netns: &Path, v6: bool) -> Result<(), Error> {
    let current = ipt_save(netns, v6)?;
    let cleaned = without_ours(&current);
    if cleaned == without_ours(&strip_comments(&current)) && !current.lines().any(is_ours) {
        return Ok(());
    }
    if is_empty_nat(&cleaned) && nf_tables_based(netns) {
        // The table only exists because we created it: take it away too, so the rule set is
        // exactly as before (iptables recreates it on demand).
        let family = if v6 { "ip6" } else { "ip" };
        run(netns, "nft", &["delete", "table", family, "nat"], None)?;
    } else {
        ipt_restore(netns, v6, &cleaned)?;
    }
    Ok(())
}

/// Compares the live rules with what [`apply`] installs.
pub fn check(netns: &Path, backend: Backend, rules: &RuleSet) -> Result<Drift, Error> {
    exists(netns)?;
    let mut drift = Drift::default();
    match backend {
        Backend::Iptables => {
            for v6 in families(rules) {
                let current = ipt_save(netns, v6)?;
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
            let live =
                run(netns, "nft", &["list", "table", "inet", NFT_TABLE], None).unwrap_or_default();
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

/// The saved nat table without our chains and jumps (an empty nat table if there was none).
fn without_ours(saved: &str) -> String {
    let kept: Vec<&str> = saved
        .lines()
        .filter(|l| !is_ours(l) && !l.starts_with('#'))
        .collect();
    if !kept.contains(&"*nat") {
        return "*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\nCOMMIT\n".to_owned();
    }
    let mut out = kept.join("\n");
    out.push('\n');
    out
}

/// Inserts our declarations after the last chain declaration and our rules before COMMIT.
fn with_ours(base: &str, ours: &[String]) -> String {
    let lines: Vec<&str> = base.lines().collect();
    let last_decl = lines.iter().rposition(|l| l.starts_with(':')).unwrap_or(0);
    let commit = lines
        .iter()
        .rposition(|l| *l == "COMMIT")
        .unwrap_or(lines.len());
    let (decls, rules): (Vec<&String>, Vec<&String>) =
        ours.iter().partition(|l| l.starts_with(':'));
    let mut out = Vec::new();
    out.extend(lines[..=last_decl].iter().map(|l| l.to_string()));
    out.extend(decls.into_iter().cloned());
    out.extend(lines[last_decl + 1..commit].iter().map(|l| l.to_string()));
    out.extend(rules.into_iter().cloned());
    out.extend(lines[commit..].iter().map(|l| l.to_string()));
    out.join("\n") + "\n"
}

fn strip_comments(saved: &str) -> String {
    saved
        .lines()
        .filter(|l| !l.starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n")
        + "\n"
}

/// A nat table with only its built-in chains, ACCEPT policies and no rules.
fn is_empty_nat(saved: &str) -> bool {
    saved.lines().all(|l| {
        l == "*nat"
            || l == "COMMIT"
            || l.is_empty()
            || ["PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"]
                .iter()
                .any(|c| l.starts_with(&format!(":{c} ACCEPT")))
    })
}

/// Whether the iptables tools drive nftables (iptables-nft), so tables can be deleted.
fn nf_tables_based(netns: &Path) -> bool {
    run(netns, "iptables", &["--version"], None).is_ok_and(|v| v.contains("nf_tables"))
}

fn ipt_save(netns: &Path, v6: bool) -> Result<String, Error> {
    let tool = if v6 {
        "ip6tables-save"
    } else {
        "iptables-save"
    };
    run(netns, tool, &["-t", "nat"], None)
}

fn ipt_restore(netns: &Path, v6: bool, text: &str) -> Result<(), Error> {
    let tool = if v6 {
        "ip6tables-restore"
    } else {
        "iptables-restore"
    };
    // `--wait`: with iptables-legacy, the agent applies several namespaces at once and the
    // tools share one lock file.
    run(netns, tool, &["--wait"], Some(text)).map(drop)
}

fn exists(netns: &Path) -> Result<(), Error> {
    if netns.exists() {
        Ok(())
    } else {
        Err(Error::NoNetns(netns.to_owned()))
    }
}

/// Runs `tool args` inside `netns`, feeding `stdin`, returning stdout.
fn run(
    netns: &Path,
    tool: &'static str,
    args: &[&str],
    stdin: Option<&str>,
) -> Result<String, Error> {
    let package = match tool {
        "nft" => "nftables",
        _ => "iptables",
    };
    let mut child = Command::new("nsenter")
        .arg(format!("--net={}", netns.display()))
        .arg("--")
        .arg(tool)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => Error::MissingTool {
                tool: "nsenter",
                package: "util-linux",
            },
            _ => Error::Tool {
                command: format!("nsenter {tool}"),
                netns: netns.to_owned(),
                stderr: e.to_string(),
            },
        })?;
    if let Some(text) = stdin {
        let mut pipe = child.stdin.take().expect("piped stdin");
        let _ = pipe.write_all(text.as_bytes());
    }
    let out = child.wait_with_output().map_err(|e| Error::Tool {
        command: tool.to_owned(),
        netns: netns.to_owned(),
        stderr: e.to_string(),
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
