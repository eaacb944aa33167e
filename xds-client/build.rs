//! Generates the delta-ADS and istio.workload code from `proto/` with a pure-Rust protobuf
//! compiler (protox), so building needs no system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let descriptors =
        protox::compile(["proto/discovery.proto", "proto/workload.proto"], ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(descriptors)?;
    Ok(())
}
