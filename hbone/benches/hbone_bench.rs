//! HBONE benchmarks (written next).
fn main() {}
