//! Links the `ztunnel` binary with its functions in the order `symbol-order.txt` lists them.
//!
//! The list holds the functions a proxy runs from start to serving (startup, the idle event
//! loop, the forwarding path), hottest first; the linker puts them next to each other at the
//! start of `.text`. The code a proxy touches then fills a few hundred contiguous pages instead
//! of being scattered over the whole 15 MB section, where every touched page also maps its
//! neighbours (the kernel's fault-around): idle RSS drops by about 4.5 MiB per process, and the
//! forwarding path shares cache lines and TLB entries (BENCHMARKS.md, issue 12, lever 23).
//!
//! Names in the list that a build does not have (code changed since the list was made) are
//! skipped without a warning; `scripts/profile.sh order` writes a fresh list. Only rust-lld
//! (rustc's default linker on x86_64 Linux since 1.90; GNU ld rejects the option) understands
//! it, so the list is used only there: not with an older rustc, not when a linker is configured
//! (`RUSTC_LINKER`, or `linker` in the flags), and not when `ZTUNNEL_SYMBOL_ORDER=0`.

use std::env;
use std::path::Path;

fn main() {
    let list = Path::new(env!("CARGO_MANIFEST_DIR")).join("symbol-order.txt");
    println!("cargo:rerun-if-changed={}", list.display());
    println!("cargo:rerun-if-env-changed=ZTUNNEL_SYMBOL_ORDER");
    println!("cargo:rerun-if-env-changed=RUSTC_LINKER");
    let var = |name: &str| env::var(name).unwrap_or_default();
    let default_lld = var("CARGO_CFG_TARGET_ARCH") == "x86_64"
        && var("CARGO_CFG_TARGET_OS") == "linux"
        && var("CARGO_CFG_TARGET_ENV") == "gnu";
    let custom_linker =
        env::var_os("RUSTC_LINKER").is_some() || var("CARGO_ENCODED_RUSTFLAGS").contains("linker");
    if !default_lld
        || custom_linker
        || !rustc_links_with_lld()
        || var("ZTUNNEL_SYMBOL_ORDER") == "0"
        || !list.exists()
    {
        return;
    }
    println!(
        "cargo:rustc-link-arg-bins=-Wl,--symbol-ordering-file={}",
        list.display()
    );
    println!("cargo:rustc-link-arg-bins=-Wl,--no-warn-symbol-ordering");
}

/// Whether the compiler building us is 1.90 or later, the first to link x86_64 Linux binaries
/// with its own lld by default.
fn rustc_links_with_lld() -> bool {
    let rustc = env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let Ok(out) = std::process::Command::new(rustc).arg("--version").output() else {
        return false;
    };
    // "rustc 1.95.0 (59807616e 2026-04-14)"
    let text = String::from_utf8_lossy(&out.stdout);
    let mut parts = text
        .split_whitespace()
        .nth(1)
        .unwrap_or("")
        .split(['.', '-'])
        .map(|p| p.parse::<u32>().ok());
    matches!((parts.next(), parts.next()), (Some(Some(major)), Some(Some(minor))) if (major, minor) >= (1, 90))
}
