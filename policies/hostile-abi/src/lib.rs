//! `hostile-abi`: reports ABI version 999, which the host must refuse to load. Otherwise it
//! behaves (raw exports, no SDK): `cachegw_decide` returns a valid decision for storage key
//! `hostile-abi`, so only the version check can catch it.

/// `PolicyOutput { decision: PolicyDecision { storage_key: "hostile-abi" } }`.
static DECISION: [u8; 15] = *b"\x0a\x0d\x0a\x0bhostile-abi";

#[unsafe(no_mangle)]
pub extern "C" fn cachegw_abi_version() -> i32 {
    999
}

/// Hands out a leaked buffer (the instance is thrown away after the call).
#[unsafe(no_mangle)]
pub extern "C" fn cachegw_alloc(len: i32) -> i32 {
    Box::leak(vec![0u8; len.max(1) as usize].into_boxed_slice()).as_mut_ptr() as i32
}

#[unsafe(no_mangle)]
pub extern "C" fn cachegw_decide(_ptr: i32, _len: i32) -> i64 {
    ((u64::from(DECISION.as_ptr() as u32) << 32) | DECISION.len() as u64) as i64
}
