//! The workspace's protobuf and gRPC code: generated from each crate's `proto/` directory with
//! a pure-Rust compiler (protox, then tonic-prost-build), and kept in that crate's
//! `src/generated/` so that building a crate needs neither a compiler nor a build script.
//!
//! - [`SETS`] lists which `.proto` files belong to which crate.
//! - [`generate`] produces a crate's files in memory; [`stale`] compares them with what the
//!   repository holds (the test `tests/generated.rs` fails on any difference); [`write()`] replaces
//!   them (`cargo run -p protogen`).
//! - [`schema`] compares our `.proto` files with Istio's, message by message and field by
//!   field (`cargo run -p protogen -- compare <istio proto dir>`; interop/proto_schema.sh).
//!
//! ```
//! let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
//! let zds = protogen::SETS.iter().find(|s| s.crate_dir == "redirect").unwrap();
//! let files = protogen::generate(root, zds).unwrap();
//! assert!(files["istio.workload.zds.rs"].contains("pub struct ZdsHello"));
//! ```
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

pub mod schema;

/// The `.proto` files of one crate.
#[derive(Debug, Clone, Copy)]
pub struct ProtoSet {
    /// The crate's directory in the workspace; its files are in `<crate_dir>/proto/`, the
    /// generated code goes to `<crate_dir>/src/generated/`.
    pub crate_dir: &'static str,
    /// The files to compile (their imports come along).
    pub files: &'static [&'static str],
    /// Whether to generate gRPC clients and servers for their services.
    pub grpc: bool,
}

/// Every crate's protos.
pub const SETS: &[ProtoSet] = &[
    ProtoSet {
        crate_dir: "identity",
        files: &["istio_ca.proto"],
        grpc: true,
    },
    ProtoSet {
        crate_dir: "authz",
        files: &["authorization.proto"],
        grpc: false,
    },
    ProtoSet {
        crate_dir: "xds-client",
        files: &["discovery.proto", "workload.proto"],
        grpc: true,
    },
    ProtoSet {
        crate_dir: "redirect",
        files: &["zds.proto"],
        grpc: false,
    },
    ProtoSet {
        crate_dir: "proxy",
        files: &["handoff.proto"],
        grpc: false,
    },
];

/// Why code could not be generated or compared.
#[derive(Debug)]
pub struct Error(pub String);

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Error {}

/// The directory of a set's generated code.
pub fn generated_dir(workspace: &Path, set: &ProtoSet) -> PathBuf {
    workspace.join(set.crate_dir).join("src/generated")
}

/// The descriptors of `files` in `dir` (with their imports; well-known types are built in).
pub fn compile(dir: &Path, files: &[&str]) -> Result<prost_types::FileDescriptorSet, Error> {
    protox::compile(files, [dir]).map_err(|e| Error(format!("{}: {e}", dir.display())))
}

/// Generates a set's code: file name (`<package>.rs`) -> contents.
pub fn generate(workspace: &Path, set: &ProtoSet) -> Result<BTreeMap<String, String>, Error> {
    static RUN: AtomicU32 = AtomicU32::new(0);
    let descriptors = compile(&workspace.join(set.crate_dir).join("proto"), set.files)?;
    let out = std::env::temp_dir().join(format!(
        "protogen-{}-{}-{}",
        std::process::id(),
        RUN.fetch_add(1, Ordering::Relaxed),
        set.crate_dir
    ));
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out).map_err(|e| Error(format!("{}: {e}", out.display())))?;
    let result = tonic_prost_build::configure()
        .build_client(set.grpc)
        .build_server(set.grpc)
        .emit_rerun_if_changed(false)
        .out_dir(&out)
        .compile_fds(descriptors)
        .map_err(|e| Error(format!("generating {}: {e}", set.crate_dir)))
        .and_then(|()| read_dir(&out));
    let _ = std::fs::remove_dir_all(&out);
    result
}

fn read_dir(dir: &Path) -> Result<BTreeMap<String, String>, Error> {
    let mut files = BTreeMap::new();
    let entries = std::fs::read_dir(dir).map_err(|e| Error(format!("{}: {e}", dir.display())))?;
    for entry in entries {
        let path = entry
            .map_err(|e| Error(format!("{}: {e}", dir.display())))?
            .path();
        if path.extension().is_some_and(|e| e == "rs") {
            let text = std::fs::read_to_string(&path)
                .map_err(|e| Error(format!("{}: {e}", path.display())))?;
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .ok_or_else(|| Error(format!("{}: not a UTF-8 name", path.display())))?;
            files.insert(name.to_owned(), text);
        }
    }
    Ok(files)
}

/// A generated file that differs from what the repository holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stale {
    /// The file in the repository.
    pub path: PathBuf,
    /// What is wrong: missing, differs, or not generated any more.
    pub reason: &'static str,
}

/// The files of every set that are not what generation gives now.
pub fn stale(workspace: &Path) -> Result<Vec<Stale>, Error> {
    let mut out = Vec::new();
    for set in SETS {
        let fresh = generate(workspace, set)?;
        out.extend(differences(&generated_dir(workspace, set), &fresh)?);
    }
    Ok(out)
}

/// How what `dir` holds differs from `fresh` (file name -> contents).
fn differences(dir: &Path, fresh: &BTreeMap<String, String>) -> Result<Vec<Stale>, Error> {
    let held = if dir.exists() {
        read_dir(dir)?
    } else {
        BTreeMap::new()
    };
    let mut out = Vec::new();
    for (name, text) in fresh {
        match held.get(name) {
            None => out.push(Stale {
                path: dir.join(name),
                reason: "missing",
            }),
            Some(h) if h != text => out.push(Stale {
                path: dir.join(name),
                reason: "differs from what its .proto files generate",
            }),
            Some(_) => {}
        }
    }
    for name in held.keys().filter(|n| !fresh.contains_key(*n)) {
        out.push(Stale {
            path: dir.join(name),
            reason: "no .proto file generates it any more",
        });
    }
    Ok(out)
}

/// Regenerates every set into the repository; returns the files written or removed.
pub fn write(workspace: &Path) -> Result<Vec<PathBuf>, Error> {
    let mut changed = Vec::new();
    for set in SETS {
        let dir = generated_dir(workspace, set);
        let fresh = generate(workspace, set)?;
        let stale = differences(&dir, &fresh)?;
        std::fs::create_dir_all(&dir).map_err(|e| Error(format!("{}: {e}", dir.display())))?;
        for file in &stale {
            let result = match file.path.file_name().and_then(|n| fresh.get(n.to_str()?)) {
                Some(text) => std::fs::write(&file.path, text),
                None => std::fs::remove_file(&file.path),
            };
            result.map_err(|e| Error(format!("{}: {e}", file.path.display())))?;
        }
        changed.extend(stale.into_iter().map(|s| s.path));
    }
    Ok(changed)
}
