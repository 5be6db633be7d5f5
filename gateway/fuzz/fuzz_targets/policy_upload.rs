//! Policy uploads: the bytes of a PutPolicy (or a module file, or one shared
//! by the fleet through Redis) go through `PolicyRegistry::validate`, what
//! `put` checks before accepting a version: the size limit, wasmtime's
//! compilation, the import allow-list, the ABI exports and version, and the
//! dry run (three probe decisions read back and validated). Nothing may panic
//! the gateway, whatever the module does.
//!
//! Inputs that start with the wasm magic are taken as a module as they are
//! (the corpus is seeded with the example and hostile policies); any other
//! input drives `wasm-smith` to generate a valid module with the policy ABI's
//! import and exports, so the calls get past validation and run random code.

#![no_main]

use std::sync::LazyLock;

use arbitrary::Unstructured;
use gateway::{Config, policy::PolicyRegistry, policy::engine};
use libfuzzer_sys::fuzz_target;

/// One registry for the whole run: it builds the engine (and its epoch
/// ticker and instance pool) once; `validate` keeps nothing.
static REGISTRY: LazyLock<PolicyRegistry> =
    LazyLock::new(|| PolicyRegistry::new(&Config::default()));

/// The one import a policy may have.
static IMPORTS: LazyLock<Vec<u8>> = LazyLock::new(|| {
    wat::parse_str(r#"(module (import "cachegw" "log" (func (param i32 i32 i32))))"#)
        .expect("valid wat")
});

/// The ABI's exports (docs/POLICY_ABI.md), with and without the optional init.
static EXPORTS: LazyLock<[Vec<u8>; 2]> = LazyLock::new(|| {
    let abi = r#"
        (memory (export "memory") 1)
        (func (export "cachegw_abi_version") (result i32) i32.const 1)
        (func (export "cachegw_alloc") (param i32) (result i32) i32.const 0)
        (func (export "cachegw_decide") (param i32 i32) (result i64) i64.const 0)"#;
    let init = r#"(func (export "cachegw_init") (param i32 i32) (result i64) i64.const 0)"#;
    [
        wat::parse_str(format!("(module {abi})")).expect("valid wat"),
        wat::parse_str(format!("(module {abi} {init})")).expect("valid wat"),
    ]
});

fuzz_target!(|data: &[u8]| {
    if data.starts_with(b"\0asm") {
        upload(data);
    } else if let Some(module) = generated(data) {
        upload(&module);
    }
});

fn upload(bytes: &[u8]) {
    let Ok(module) = REGISTRY.validate("fuzz", bytes) else {
        return;
    };
    assert!(module.abi().is_ok());
    assert_eq!(module.version(), engine::content_version(bytes));
    assert_eq!(module.size(), bytes.len());
    // Binding runs the init export on the binding's config.
    let _ = module.init(b"{}");
}

/// A module with the ABI's shape and random contents.
fn generated(data: &[u8]) -> Option<Vec<u8>> {
    let mut u = Unstructured::new(data);
    let with_init = u.arbitrary::<bool>().ok()?;
    // Trapping code stops at the ABI version check; code that cannot trap
    // gets to the dry run more often.
    let disallow_traps = u.arbitrary::<bool>().ok()?;
    let mut config = wasm_smith::Config {
        available_imports: Some(IMPORTS.clone()),
        exports: Some(EXPORTS[usize::from(with_init)].clone()),
        // Proposals the gateway's engine does not enable are compile errors,
        // which the raw inputs cover; generate what can run.
        gc_enabled: false,
        // externref needs wasmtime's gc feature, which the gateway leaves out.
        reference_types_enabled: false,
        threads_enabled: false,
        exceptions_enabled: false,
        memory64_enabled: false,
        custom_page_sizes_enabled: false,
        tail_call_enabled: false,
        // The exported memory is the one the pool allows; no others.
        max_memories: 0,
        // Some over the 16 MiB cap, most under.
        max_memory32_bytes: 32 << 20,
        disallow_traps,
        ..wasm_smith::Config::default()
    };
    config.min_funcs = 1;
    let module = wasm_smith::Module::new(config, &mut u).ok()?;
    Some(module.to_bytes())
}
