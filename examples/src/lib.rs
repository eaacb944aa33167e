//! Runnable examples live in this package; run one with `cargo run -p examples --example NAME`.
