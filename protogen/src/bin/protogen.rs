//! `protogen`: regenerates the workspace's protobuf code, checks it, or compares our schema with
//! Istio's.
//!
//! ```text
//! cargo run -p protogen                      # rewrite every crate's src/generated/
//! cargo run -p protogen -- --check           # exit 1 if any generated file is stale
//! cargo run -p protogen -- compare DIR       # compare with Istio's protos in DIR (exit 1 on a difference)
//! ```

use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// What Istio declares that we deliberately do not: the state-of-the-world xDS messages and RPC
/// (a ztunnel speaks delta xDS only).
const NOT_DECLARED_ON_PURPOSE: &[&str] = &[
    ".envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources",
    ".envoy.service.discovery.v3.DiscoveryRequest",
    ".envoy.service.discovery.v3.DiscoveryResponse",
];

/// Istio's files that hold what we declare.
const ISTIO_FILES: &[&str] = &[
    "workload.proto",
    "authorization.proto",
    "zds.proto",
    "xds.proto",
    "citadel.proto",
];

fn main() -> ExitCode {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("protogen is in the workspace")
        .to_path_buf();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        [] => regenerate(&workspace),
        ["--check"] => check(&workspace),
        ["compare", dir] => compare(&workspace, &PathBuf::from(dir)),
        ["-h" | "--help"] => {
            println!("{}", USAGE);
            Ok(true)
        }
        _ => Err(format!("unexpected arguments {args:?}\n{USAGE}")),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("protogen: {e}");
            ExitCode::from(2)
        }
    }
}

const USAGE: &str = "usage: protogen [--check | compare ISTIO_PROTO_DIR]
  (no arguments)  regenerate every crate's src/generated/ from its proto/
  --check         list generated files that are stale; exit 1 if any
  compare DIR     compare our .proto schemas with Istio's (ztunnel's proto/ directory);
                  exit 1 on any difference";

fn regenerate(workspace: &Path) -> Result<bool, String> {
    let changed = protogen::write(workspace).map_err(|e| e.to_string())?;
    for path in &changed {
        println!("rewrote {}", path.display());
    }
    if changed.is_empty() {
        println!("every generated file was current");
    }
    Ok(true)
}

fn check(workspace: &Path) -> Result<bool, String> {
    let stale = protogen::stale(workspace).map_err(|e| e.to_string())?;
    for s in &stale {
        println!("{}: {}", s.path.display(), s.reason);
    }
    Ok(stale.is_empty())
}

fn compare(workspace: &Path, istio: &Path) -> Result<bool, String> {
    let mut ours = prost_types::FileDescriptorSet::default();
    for set in protogen::SETS {
        let dir = workspace.join(set.crate_dir).join("proto");
        ours.file.extend(
            protogen::compile(&dir, set.files)
                .map_err(|e| e.to_string())?
                .file,
        );
    }
    let theirs = protogen::compile(istio, ISTIO_FILES).map_err(|e| e.to_string())?;
    let report = protogen::schema::compare(&ours, &theirs);
    for d in &report.differences {
        println!("DIFFERENT {d}");
    }
    let mut unexpected = 0;
    for name in &report.only_theirs {
        if NOT_DECLARED_ON_PURPOSE.contains(&name.as_str()) {
            println!("not declared (on purpose) {name}");
        } else {
            unexpected += 1;
            println!("MISSING {name}");
        }
    }
    println!(
        "{} differences, {} of Istio's items missing",
        report.differences.len(),
        unexpected
    );
    Ok(report.differences.is_empty() && unexpected == 0)
}
