//! `ztunnel policy check` and `ztunnel policy lint`.

use std::process::ExitCode;

use authz::{Connection, PolicyStore, Principal, Translation, Workload};

use super::Error;
use crate::cli::{PolicyCheckArgs, PolicyFiles, PolicyLintArgs};

pub(crate) fn check(args: PolicyCheckArgs) -> Result<ExitCode, Error> {
    let translation = load(&args.policies)?;
    let mut store = PolicyStore::new(&args.policies.root_namespace);
    for policy in translation.policies {
        store.insert(policy);
    }
    let labels = authz::parse_labels(&args.labels).map_err(|reason| Error::Flag {
        flag: "--labels",
        value: args.labels.clone(),
        reason,
    })?;
    let workload = Workload {
        namespace: args.namespace,
        labels,
        policies: Vec::new(),
    };
    let connection = Connection {
        source: (args.source_ip, 0).into(),
        destination: (args.dest_ip, args.dest_port).into(),
        peer: args.source_principal.as_deref().map(Principal::parse),
    };
    let decision = if args.explain {
        let (decision, trace) = store.explain(&connection, &workload);
        print!("{trace}");
        decision
    } else {
        store.decide(&connection, &workload)
    };
    println!("{decision}");
    Ok(if decision.allowed {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

pub(crate) fn lint(args: PolicyLintArgs) -> Result<ExitCode, Error> {
    let translation = load(&args.policies)?;
    for warning in &translation.warnings {
        println!("warning: {warning}");
    }
    println!(
        "{} policies, {} warnings",
        translation.policies.len(),
        translation.warnings.len()
    );
    Ok(if translation.warnings.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn load(source: &PolicyFiles) -> Result<Translation, Error> {
    let mut all = Translation::default();
    for file in &source.files {
        let text = std::fs::read_to_string(file).map_err(|source| Error::Io {
            what: format!("cannot read {}", file.display()),
            source,
        })?;
        let t = authz::parse_policies(&text, &file.display().to_string(), &source.root_namespace)?;
        all.policies.extend(t.policies);
        all.warnings.extend(t.warnings);
    }
    Ok(all)
}
