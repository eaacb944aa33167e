//! `ztunnel ca init` and `ztunnel ca issue`: the development CA on disk.

use identity::{DevCa, SpiffeId};

use super::Error;
use crate::cli::{CaInitArgs, CaIssueArgs};

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
