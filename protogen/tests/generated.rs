//! The generated code in each crate's `src/generated/` is exactly what its `.proto` files give
//! now: a changed `.proto` file (or a new generator) without `cargo run -p protogen` fails here.

use std::path::Path;

#[test]
fn every_generated_file_is_what_its_protos_generate() {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let stale = protogen::stale(workspace).expect("the protos compile");
    assert!(
        stale.is_empty(),
        "stale generated code (run `cargo run -p protogen` and commit the result):\n{}",
        stale
            .iter()
            .map(|s| format!("  {}: {}", s.path.display(), s.reason))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

#[test]
fn a_changed_proto_makes_the_check_fail() {
    // Work on a copy of one crate's protos and generated code, so the check is seen to fail.
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let copy = std::env::temp_dir().join(format!("protogen-check-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&copy);
    for set in protogen::SETS {
        for sub in ["proto", "src/generated"] {
            let from = workspace.join(set.crate_dir).join(sub);
            let to = copy.join(set.crate_dir).join(sub);
            std::fs::create_dir_all(&to).unwrap();
            for entry in std::fs::read_dir(&from).unwrap() {
                let path = entry.unwrap().path();
                if path.is_file() {
                    std::fs::copy(&path, to.join(path.file_name().unwrap())).unwrap();
                }
            }
        }
    }
    let zds = copy.join("redirect/proto/zds.proto");
    let text = std::fs::read_to_string(&zds).unwrap();
    std::fs::write(
        &zds,
        text.replace("string error = 1;", "string error = 1;\n  uint32 code = 2;"),
    )
    .unwrap();
    let stale = protogen::stale(&copy).unwrap();
    std::fs::remove_dir_all(&copy).unwrap();
    assert_eq!(stale.len(), 1, "{stale:?}");
    assert!(
        stale[0]
            .path
            .ends_with("redirect/src/generated/istio.workload.zds.rs")
    );
}

#[test]
fn the_schema_comparison_names_each_difference() {
    let dir = std::env::temp_dir().join(format!("protogen-schema-{}", std::process::id()));
    let (ours, theirs) = (dir.join("ours"), dir.join("theirs"));
    std::fs::create_dir_all(&ours).unwrap();
    std::fs::create_dir_all(&theirs).unwrap();
    let write = |at: &Path, body: &str| {
        std::fs::write(
            at.join("w.proto"),
            format!("syntax = \"proto3\";\npackage istio.workload;\n{body}"),
        )
        .unwrap()
    };
    write(
        &ours,
        "message A { string name = 1; uint32 port = 2; }\nenum E { X = 0; }",
    );
    write(
        &theirs,
        "message A { string name = 1; uint64 port = 2; bool more = 3; }\nenum E { X = 0; Y = 1; }\nmessage B {}",
    );
    let report = protogen::schema::compare(
        &protogen::compile(&ours, &["w.proto"]).unwrap(),
        &protogen::compile(&theirs, &["w.proto"]).unwrap(),
    );
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(report.only_theirs, vec![".istio.workload.B".to_owned()]);
    let text = report.differences.join("\n");
    assert_eq!(report.differences.len(), 3, "{text}");
    assert!(
        text.contains(".istio.workload.A #2: ours is port"),
        "{text}"
    );
    assert!(text.contains(".istio.workload.A #3 (more"), "{text}");
    assert!(text.contains(".istio.workload.E #1 (Y)"), "{text}");
}
