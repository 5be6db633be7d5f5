//! Generates the `cachegw.v1.Cache` gRPC client (no server) from `proto/` with
//! the vendored `protoc`, so a fresh machine needs no system protobuf compiler.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto_root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    // The contract lives outside this package: without saying so, cargo would
    // only rerun this script when a file of the package changes.
    println!("cargo:rerun-if-changed={}", proto_root.display());
    println!("cargo:rerun-if-changed=build.rs");

    let mut prost_config = prost_build::Config::new();
    prost_config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);

    tonic_prost_build::configure()
        .build_server(false)
        .build_client(true)
        .compile_with_config(
            prost_config,
            &[proto_root.join("cachegw/v1/cache.proto")],
            &[proto_root],
        )?;
    Ok(())
}
