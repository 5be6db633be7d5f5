//! `floor`: the cheapest policy there can be, for benchmarks. It reads nothing and answers every
//! request with the same decision, storage key `floor` and the namespace's TTLs, so a call costs
//! only what the gateway pays to run any policy at all: a fresh instance, the input written into
//! it, the call, the output read back, the instance's slot reset. Bound with `memo = false`, it
//! measures that floor per request (`scripts/bench-policy`, docs/BENCHMARKS.md). It sends no
//! `reuse`, so its decisions are never memoised anyway.
//!
//! Raw exports, no SDK: the SDK's decoding and encoding are part of what a real policy costs.

/// `PolicyOutput { decision: PolicyDecision { storage_key: "floor" } }`.
static DECISION: [u8; 9] = *b"\x0a\x07\x0a\x05floor";

/// Where every input is written (it is never read). 64 KiB: the largest input this module takes.
static mut INPUT: [u8; 65536] = [0; 65536];

#[unsafe(no_mangle)]
pub extern "C" fn cachegw_abi_version() -> i32 {
    1
}

/// The input buffer for any `len` it can hold, 0 (refused) for a larger one.
#[unsafe(no_mangle)]
pub extern "C" fn cachegw_alloc(len: i32) -> i32 {
    if !(0..=65536).contains(&len) {
        return 0;
    }
    core::ptr::addr_of_mut!(INPUT) as i32
}

#[unsafe(no_mangle)]
pub extern "C" fn cachegw_decide(_ptr: i32, _len: i32) -> i64 {
    ((u64::from(DECISION.as_ptr() as u32) << 32) | DECISION.len() as u64) as i64
}
