//! Installing `ztunnel-cni` on a node: chained into the first network configuration (a list,
//! or a single plugin made a list), again after the primary CNI rewrites its file, removed when
//! handing the node back; the binary copied executable.

mod common;

use common::TempDir;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use redirect::cni::install::{
    InstallError, PLUGIN_TYPE, chain, install_binary, plugin_entry, unchain,
};
use serde_json::{Value, json};

fn read(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

fn types(config: &Value) -> Vec<String> {
    config["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["type"].as_str().unwrap().to_owned())
        .collect()
}

fn calico() -> Value {
    json!({"cniVersion": "1.0.0", "name": "k8s-pod-network", "plugins": [
        {"type": "calico", "ipam": {"type": "calico-ipam"}},
        {"type": "portmap", "capabilities": {"portMappings": true}}
    ]})
}

#[test]
fn chained_into_the_first_list_once_and_again_after_a_rewrite() {
    let d = TempDir::new("cni-list");
    let first = d.0.join("10-calico.conflist");
    std::fs::write(&first, calico().to_string()).unwrap();
    std::fs::write(
        d.0.join("99-loopback.conf"),
        r#"{"cniVersion":"1.0.0","name":"lo","type":"loopback"}"#,
    )
    .unwrap();
    let entry = plugin_entry(Path::new("/var/run/ztunnel/cni.sock"), None);
    assert_eq!(chain(&d.0, &entry).unwrap(), Some(first.clone()));
    assert_eq!(types(&read(&first)), ["calico", "portmap", PLUGIN_TYPE]);
    assert_eq!(read(&first)["plugins"][2], entry);
    // Already there: nothing written.
    assert_eq!(chain(&d.0, &entry).unwrap(), None);
    // The primary CNI rewrites its file without us: chained again.
    std::fs::write(&first, calico().to_string()).unwrap();
    assert_eq!(chain(&d.0, &entry).unwrap(), Some(first.clone()));
    assert_eq!(types(&read(&first)), ["calico", "portmap", PLUGIN_TYPE]);
    // A changed entry (another socket) replaces ours, still once.
    let moved = plugin_entry(
        Path::new("/run/ztunnel/cni.sock"),
        Some(Path::new("/etc/cni/net.d/ztunnel-kubeconfig")),
    );
    assert_eq!(chain(&d.0, &moved).unwrap(), Some(first.clone()));
    let config = read(&first);
    assert_eq!(types(&config), ["calico", "portmap", PLUGIN_TYPE]);
    assert_eq!(
        config["plugins"][2]["kubernetes"]["kubeconfig"],
        "/etc/cni/net.d/ztunnel-kubeconfig"
    );
    // The other file is never touched; unchaining leaves the primary's list as it was.
    assert!(read(&d.0.join("99-loopback.conf")).get("plugins").is_none());
    assert_eq!(unchain(&d.0).unwrap(), vec![first.clone()]);
    assert_eq!(read(&first), calico());
}

#[test]
fn a_single_plugin_becomes_a_list_of_it_and_ours() {
    let d = TempDir::new("cni-single");
    let conf = d.0.join("10-flannel.conf");
    std::fs::write(&conf, r#"{"cniVersion":"0.4.0","name":"cbr0","type":"flannel","delegate":{"isDefaultGateway":true}}"#).unwrap();
    let entry = plugin_entry(Path::new("/var/run/ztunnel/cni.sock"), None);
    let list = d.0.join("10-flannel.conflist");
    assert_eq!(chain(&d.0, &entry).unwrap(), Some(list.clone()));
    assert!(
        !conf.exists(),
        "the single-plugin file is replaced by the list"
    );
    let config = read(&list);
    assert_eq!(config["cniVersion"], "0.4.0");
    assert_eq!(config["name"], "cbr0");
    assert_eq!(types(&config), ["flannel", PLUGIN_TYPE]);
    assert_eq!(config["plugins"][0]["delegate"]["isDefaultGateway"], true);
    assert!(config["plugins"][0].get("name").is_none());
}

#[test]
fn nothing_to_chain_into_or_a_broken_file_is_an_error_that_names_it() {
    let d = TempDir::new("cni-errors");
    let entry = plugin_entry(Path::new("/var/run/ztunnel/cni.sock"), None);
    assert!(matches!(
        chain(&d.0, &entry),
        Err(InstallError::NoConfiguration(_))
    ));
    std::fs::write(d.0.join("05-broken.conflist"), "{\"plugins\": [").unwrap();
    let error = chain(&d.0, &entry).unwrap_err();
    assert!(error.to_string().contains("05-broken.conflist"), "{error}");
    // Hidden files (our own temporaries, editors') are not configurations.
    std::fs::remove_file(d.0.join("05-broken.conflist")).unwrap();
    std::fs::write(d.0.join(".00-hidden.conflist"), calico().to_string()).unwrap();
    assert!(matches!(
        chain(&d.0, &entry),
        Err(InstallError::NoConfiguration(_))
    ));
}

#[test]
fn the_binary_is_copied_executable() {
    let d = TempDir::new("cni-bin");
    let source = d.0.join("built");
    std::fs::write(&source, b"#!/bin/sh\n").unwrap();
    let bin = d.0.join("bin");
    std::fs::create_dir(&bin).unwrap();
    let installed = install_binary(&source, &bin).unwrap();
    assert_eq!(installed, bin.join(PLUGIN_TYPE));
    let mode = std::fs::metadata(&installed).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o755);
    assert_eq!(std::fs::read(&installed).unwrap(), b"#!/bin/sh\n");
}
