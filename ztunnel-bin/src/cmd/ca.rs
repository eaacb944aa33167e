//! `ztunnel ca init` and `ztunnel ca issue`: the development CA on disk.

use crate::args::parse_duration;
use clap::{Args, Subcommand};
use identity::{DevCa, SpiffeId};
use std::path::PathBuf;

use super::Error;

#[derive(Debug, Subcommand)]
pub(crate) enum CaCommand {
    /// Create a development root CA in DIR (`root-cert.pem`, and `root-key.pem` readable by its
    /// owner only). Refuses to overwrite an existing one.
    Init(CaInitArgs),
    /// Issue a workload certificate from the CA in DIR; writes `cert-chain.pem`, `key.pem` and
    /// `root-cert.pem` into OUT.
    Issue(CaIssueArgs),
}

#[derive(Debug, Args)]
pub(crate) struct CaInitArgs {
    /// Directory for the CA files (created if missing).
    #[arg(long, value_name = "DIR")]
    pub(crate) dir: PathBuf,
    /// Trust domain of the mesh; recorded as the root's O= and checked by `issue`.
    #[arg(long, default_value = "cluster.local")]
    pub(crate) trust_domain: String,
}

#[derive(Debug, Args)]
pub(crate) struct CaIssueArgs {
    /// Directory of the CA made by `ztunnel ca init`.
    #[arg(long, value_name = "DIR")]
    pub(crate) dir: PathBuf,
    /// The workload's SPIFFE id, e.g. `spiffe://cluster.local/ns/default/sa/sleep`.
    #[arg(long, value_name = "SPIFFE_ID")]
    pub(crate) id: String,
    /// Lifetime: a number with a unit, `s`, `m`, `h` or `d` (e.g. `90s`, `24h`, `7d`).
    #[arg(long, default_value = "24h", value_parser = parse_duration)]
    pub(crate) ttl: std::time::Duration,
    /// Directory for the workload's files (created if missing).
    #[arg(long, value_name = "DIR")]
    pub(crate) out: PathBuf,
}

pub(crate) fn init(args: CaInitArgs) -> Result<(), Error> {
    let ca = DevCa::init(&args.dir, &args.trust_domain)?;
    println!(
        "created a development root CA for trust domain {} in {}",
        ca.trust_domain(),
        args.dir.display()
    );
    Ok(())
}

pub(crate) fn issue(args: CaIssueArgs) -> Result<(), Error> {
    let id = SpiffeId::parse(&args.id).map_err(|e| Error::Flag {
        flag: "--id",
        value: args.id.clone(),
        reason: e.to_string(),
    })?;
    let ca = DevCa::load(&args.dir)?;
    if id.trust_domain() != ca.trust_domain() {
        return Err(Error::Flag {
            flag: "--id",
            value: args.id,
            reason: format!(
                "the CA in {} is for trust domain {:?}",
                args.dir.display(),
                ca.trust_domain()
            ),
        });
    }
    ca.issue_to_dir(&id, args.ttl, &args.out)?;
    println!(
        "issued {id} for {:?}: {}/{{cert-chain,key,root-cert}}.pem",
        args.ttl,
        args.out.display()
    );
    Ok(())
}
