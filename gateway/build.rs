//! Generates the gRPC and policy-contract code from `proto/` with the vendored
//! `protoc`, so a fresh machine needs no system protobuf compiler.

use std::{env, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Read when the script runs, not compiled in with `env!`: checkouts of this
    // repository (git worktrees) that share a target dir share this script's
    // binary, and each must generate from its own proto/.
    let proto_root = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?).join("../proto");
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    // The contracts live outside this package: without saying so, cargo would
    // only rerun this script when a file of the package changes, and every
    // build variant (lib, tests, release) could keep stale generated code.
    // Relative to the package, so cargo checks the proto/ of the checkout
    // being built, not of the one that ran the script last.
    println!("cargo:rerun-if-changed=../proto");
    println!("cargo:rerun-if-changed=build.rs");

    let mut prost_config = prost_build::Config::new();
    prost_config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    prost_config.bytes(["."]);

    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("cachegw_descriptor.bin"))
        .codec_path("crate::api::codec::RequestCodec")
        .compile_with_config(
            prost_config,
            &[
                proto_root.join("cachegw/v1/cache.proto"),
                proto_root.join("cachegw/v1/admin.proto"),
                proto_root.join("cachegw/policy/v1/policy.proto"),
            ],
            &[proto_root],
        )?;
    Ok(())
}
