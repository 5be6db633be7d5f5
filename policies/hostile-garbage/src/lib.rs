//! `hostile-garbage`: answers `cachegw_decide` with output the host must refuse. Raw exports, no
//! SDK. The answer depends on a marker anywhere in the raw input bytes (put it in the key):
//!
//! | marker    | returned (ptr, len)                                  |
//! |-----------|------------------------------------------------------|
//! | `oob`     | a pointer 16 bytes past the end of linear memory, 64  |
//! | `wrap`    | `0xFFFF_FFF0`, 256: `ptr + len` overflows 32 bits      |
//! | `invalid` | a valid `PolicyOutput` whose decision has an empty storage key |
//! | `empty`   | length 0: a `PolicyOutput` with no result             |
//! | (none)    | 4 bytes that are not protobuf (field 1, wire type 7)  |
//!
//! `cachegw_abi_version` (1) and `cachegw_alloc` behave.

use std::cell::RefCell;

thread_local! {
    static INPUT: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

static NOT_PROTOBUF: [u8; 4] = [0x0f, 0xff, 0xff, 0xff];
/// `PolicyOutput { decision: PolicyDecision {} }`: decodes, but the storage key is empty.
static EMPTY_KEY_DECISION: [u8; 2] = [0x0a, 0x00];

#[unsafe(no_mangle)]
pub extern "C" fn cachegw_abi_version() -> i32 {
    1
}

#[unsafe(no_mangle)]
pub extern "C" fn cachegw_alloc(len: i32) -> i32 {
    INPUT.with(|input| {
        let mut input = input.borrow_mut();
        *input = vec![0; len.max(1) as usize];
        input.as_mut_ptr() as i32
    })
}

#[unsafe(no_mangle)]
pub extern "C" fn cachegw_decide(_ptr: i32, len: i32) -> i64 {
    let (ptr, len): (u32, u32) = match marker(len.max(0) as usize) {
        Some("oob") => (memory_end().wrapping_add(16), 64),
        Some("wrap") => (0xFFFF_FFF0, 256),
        Some("invalid") => (EMPTY_KEY_DECISION.as_ptr() as u32, 2),
        Some(_) => (NOT_PROTOBUF.as_ptr() as u32, 0),
        None => (NOT_PROTOBUF.as_ptr() as u32, 4),
    };
    ((u64::from(ptr) << 32) | u64::from(len)) as i64
}

/// The first marker found in the input the host wrote.
fn marker(len: usize) -> Option<&'static str> {
    INPUT.with(|input| {
        let input = input.borrow();
        let input = &input[..len.min(input.len())];
        ["oob", "wrap", "invalid", "empty"]
            .into_iter()
            .find(|marker| {
                input
                    .windows(marker.len())
                    .any(|window| window == marker.as_bytes())
            })
    })
}

#[cfg(target_arch = "wasm32")]
fn memory_end() -> u32 {
    (core::arch::wasm32::memory_size(0) as u32).saturating_mul(65_536)
}

#[cfg(not(target_arch = "wasm32"))]
fn memory_end() -> u32 {
    0
}
