//! `ztunnel redirect apply|remove|check|reconcile`.

use crate::args::CaptureBackend;
use clap::{Args, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

use redirect::{Backend, RuleSet};

use super::Error;

#[derive(Debug, Subcommand)]
pub(crate) enum RedirectCommand {
    /// Install (or replace) the capture rules; idempotent.
    Apply(RedirectArgs),
    /// Remove exactly the rules `apply` installed.
    Remove(RedirectArgs),
    /// Report drift between the live rules and what `apply` installs; exit 1 on drift.
    Check(RedirectArgs),
    /// Repair drift (reapply when `check` would report any).
    Reconcile(RedirectArgs),
}

#[derive(Debug, Args)]
pub(crate) struct RedirectArgs {
    /// The pod's network namespace: `/var/run/netns/NAME` or `/proc/PID/ns/net`.
    #[arg(long, value_name = "PATH")]
    pub(crate) netns: PathBuf,
    /// Rule engine.
    #[arg(long, value_enum, default_value_t = CaptureBackend::Iptables)]
    pub(crate) backend: CaptureBackend,
    /// Install IPv4 rules only.
    #[arg(long)]
    pub(crate) ipv4_only: bool,
}

fn parts(args: &RedirectArgs) -> (Backend, RuleSet) {
    let backend = args.backend.into();
    let mut rules = RuleSet::default();
    rules.ipv6 = !args.ipv4_only;
    (backend, rules)
}

pub(crate) fn apply(args: RedirectArgs) -> Result<ExitCode, Error> {
    let (backend, rules) = parts(&args);
    redirect::apply(&args.netns, backend, &rules)?;
    println!(
        "capture rules applied in {} ({})",
        args.netns.display(),
        args.backend
    );
    Ok(ExitCode::SUCCESS)
}

pub(crate) fn remove(args: RedirectArgs) -> Result<ExitCode, Error> {
    let (backend, rules) = parts(&args);
    redirect::remove(&args.netns, backend, &rules)?;
    println!(
        "capture rules removed from {} ({})",
        args.netns.display(),
        args.backend
    );
    Ok(ExitCode::SUCCESS)
}

pub(crate) fn check(args: RedirectArgs) -> Result<ExitCode, Error> {
    let (backend, rules) = parts(&args);
    let drift = redirect::check(&args.netns, backend, &rules)?;
    for line in &drift.missing {
        println!("missing: {line}");
    }
    for line in &drift.unexpected {
        println!("unexpected: {line}");
    }
    if drift.is_clean() {
        println!("capture rules in {} are as expected", args.netns.display());
        Ok(ExitCode::SUCCESS)
    } else {
        Ok(ExitCode::FAILURE)
    }
}

pub(crate) fn reconcile(args: RedirectArgs) -> Result<ExitCode, Error> {
    let (backend, rules) = parts(&args);
    let drift = redirect::reconcile(&args.netns, backend, &rules)?;
    println!(
        "{} drifted rule(s) repaired in {}",
        drift.missing.len() + drift.unexpected.len(),
        args.netns.display()
    );
    Ok(ExitCode::SUCCESS)
}
