//! `hostile-noexport`: has no `cachegw_decide` export (only a near miss, `cachegw_decision`),
//! which the host must refuse to load. Raw exports, no SDK; `cachegw_abi_version` (1) and
//! `cachegw_alloc` are present.

#[unsafe(no_mangle)]
pub extern "C" fn cachegw_abi_version() -> i32 {
    1
}

/// Hands out a leaked buffer (the instance is thrown away after the call).
#[unsafe(no_mangle)]
pub extern "C" fn cachegw_alloc(len: i32) -> i32 {
    Box::leak(vec![0u8; len.max(1) as usize].into_boxed_slice()).as_mut_ptr() as i32
}

/// Not the entry point the host looks for.
#[unsafe(no_mangle)]
pub extern "C" fn cachegw_decision(_ptr: i32, _len: i32) -> i64 {
    0
}
