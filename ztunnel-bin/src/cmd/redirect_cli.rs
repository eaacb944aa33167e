//! `ztunnel redirect apply|remove|check|reconcile`.

use std::process::ExitCode;

use redirect::{Backend, RuleSet};

use super::Error;
use crate::cli::RedirectArgs;

fn parts(args: &RedirectArgs) -> (Backend, RuleSet) {
    let backend = args.backend.parse().expect("clap restricts the values");
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
