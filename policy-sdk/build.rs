//! Generates the host <-> policy messages from `proto/cachegw/policy/v1/policy.proto`, the one
//! source of truth shared with the gateway.

use std::path::PathBuf;

fn main() {
    let manifest_dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let proto_root = manifest_dir.join("../proto");
    let proto = proto_root.join("cachegw/policy/v1/policy.proto");
    println!("cargo:rerun-if-changed={}", proto.display());

    // The vendored protoc keeps the build free of system packages, whichever toolchain runs this
    // script (the Debian wasm route runs it too). Passed directly rather than through `PROTOC`, which
    // would need the `unsafe` `set_var`.
    let protoc = protoc_bin_vendored::protoc_bin_path()
        .expect("protoc-bin-vendored ships no protoc for this host");

    prost_build::Config::new()
        .protoc_executable(protoc)
        // Deterministic attribute order: the same input always encodes to the same bytes.
        .btree_map(["."])
        .compile_protos(&[proto], &[proto_root])
        .expect("compile policy.proto");
}
