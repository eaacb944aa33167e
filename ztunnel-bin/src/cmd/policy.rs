//! `ztunnel policy check` and `ztunnel policy lint`.

use clap::{Args, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

use authz::{Connection, PolicyStore, Principal, Translation, Workload};

use super::Error;

#[derive(Debug, Subcommand)]
pub(crate) enum PolicyCommand {
    /// Decide one connection against AuthorizationPolicy YAML, as ztunnel would. Prints ALLOW or
    /// DENY with the reason; exit code 0 for ALLOW, 1 for DENY, 2 for an error.
    Check(PolicyCheckArgs),
    /// Print what an L4 proxy cannot honour in the policies (one warning per line); exit code 0
    /// when there is nothing to say, 1 when warnings were printed, 2 for an error.
    Lint(PolicyLintArgs),
}

/// Where policies come from, shared by `policy check` and `policy lint`.
#[derive(Debug, Args)]
pub(crate) struct PolicyFiles {
    /// Kubernetes YAML with AuthorizationPolicy documents (other kinds are ignored); repeatable.
    #[arg(
        short = 'f',
        long = "file",
        value_name = "POLICIES.yaml",
        required = true
    )]
    pub(crate) files: Vec<PathBuf>,
    /// The mesh's root namespace (policies there apply mesh-wide).
    #[arg(long, default_value = "istio-system")]
    pub(crate) root_namespace: String,
}

#[derive(Debug, Args)]
pub(crate) struct PolicyCheckArgs {
    #[command(flatten)]
    pub(crate) policies: PolicyFiles,
    /// Namespace of the destination workload.
    #[arg(long, value_name = "NS")]
    pub(crate) namespace: String,
    /// Labels of the destination workload, `k=v,k2=v2`.
    #[arg(long, value_name = "K=V,...", default_value = "")]
    pub(crate) labels: String,
    /// The client's identity (`spiffe://td/ns/NS/sa/SA` or `td/ns/NS/sa/SA`); omit for a
    /// plaintext client with no identity.
    #[arg(long, value_name = "PRINCIPAL")]
    pub(crate) source_principal: Option<String>,
    /// The client's IP address (default 0.0.0.0, which no ipBlock contains).
    #[arg(long, value_name = "IP", default_value = "0.0.0.0")]
    pub(crate) source_ip: std::net::IpAddr,
    /// The destination IP address (default 0.0.0.0).
    #[arg(long, value_name = "IP", default_value = "0.0.0.0")]
    pub(crate) dest_ip: std::net::IpAddr,
    /// The destination port.
    #[arg(long, value_name = "N")]
    pub(crate) dest_port: u16,
    /// Print every step: which policies applied and which rule, clause and match failed and why.
    #[arg(long)]
    pub(crate) explain: bool,
}

#[derive(Debug, Args)]
pub(crate) struct PolicyLintArgs {
    #[command(flatten)]
    pub(crate) policies: PolicyFiles,
}

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
