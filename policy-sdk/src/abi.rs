//! The ABI glue: what [`export_policy!`](crate::export_policy) expands to, and the only place
//! that knows about linear memory.
//!
//! The host's sequence for one call (docs/POLICY_ABI.md has the contract):
//! 1. `cachegw_alloc(len)`: [`alloc`] keeps a zeroed buffer of `len` bytes in [`PENDING`] and
//!    returns its address;
//! 2. the host writes the encoded input into that buffer through the module's memory;
//! 3. `cachegw_decide(ptr, len)` / `cachegw_init(ptr, len)`: [`decide_at`] / [`init_at`] take
//!    the buffer back out of [`PENDING`] by its address (an address that is not a pending
//!    buffer is answered with an error, never read), run the policy, and park the encoded
//!    output in [`OUTPUT`], where it stays valid until the next call.
//!
//! Because inputs come back as the `Vec`s they were handed out as, and outputs stay owned
//! by a `Vec`, no raw pointer is ever dereferenced here: addresses only cross the boundary as
//! integers. The host runs every call in a fresh instance (or one put back to its starting
//! state), but a host reusing an instance still sees flat memory: a consumed input buffer is kept
//! for the next `cachegw_alloc` ([`SPARE`]), and every output is encoded into the one
//! [`OUTPUT`] buffer, which `cachegw_init` leaves room in, so that the decisions of a
//! pre-initialised image allocate neither.
//!
//! `cachegw_init` keeps the policy value it built, with the config bytes it was built from, in
//! [`KEPT`]. A host that pre-initialises a binding snapshots the instance after `cachegw_init`
//! and starts every decision from that snapshot, so [`decide_into`] finds the value there and
//! skips `from_config` when the input carries the same config bytes. In an instance that never
//! ran `cachegw_init` (or ran it on other bytes) it builds the value from the input as before:
//! the answer is the same either way, only its cost differs.

use std::{any::Any, cell::RefCell};

use prost::Message;

use crate::request::Reads;
use crate::{Policy, Request, proto};

/// The ABI version this SDK implements (`cachegw_abi_version`).
pub const ABI_VERSION: i32 = 1;

thread_local! {
    /// Buffers handed out by `cachegw_alloc` and not yet consumed by a call.
    static PENDING: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
    /// The last call's encoded output; overwritten by the next call, which encodes into the
    /// same buffer (`cachegw_init` leaves room in it, so that a pre-initialised image's
    /// decisions allocate no output).
    static OUTPUT: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    /// A consumed input buffer, kept for the next `cachegw_alloc` that fits in it (a batch's
    /// calls in one instance then allocate no input).
    static SPARE: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    /// The policy the last successful `cachegw_init` built, and from which config.
    static KEPT: RefCell<Option<Kept>> = const { RefCell::new(None) };
}

/// A policy value built by `cachegw_init`, for the decisions on the same config.
struct Kept {
    config: Vec<u8>,
    /// The `P` of `init_bytes::<P>`; a decision for another type builds its own.
    policy: Box<dyn Any>,
}

/// Reserves `len` zeroed bytes for the host to write into and returns their address, or 0 when
/// memory is exhausted (the host treats 0 as a fault). Zero-length requests get one byte so
/// that every pending buffer has a distinct address.
pub fn alloc(len: usize) -> usize {
    let mut buffer = SPARE.take();
    buffer.clear();
    if buffer.try_reserve_exact(len.max(1)).is_err() {
        return 0;
    }
    buffer.resize(len.max(1), 0);
    let address = buffer.as_mut_ptr() as usize;
    PENDING.with(|pending| {
        let mut pending = pending.borrow_mut();
        if pending.try_reserve(1).is_err() {
            return 0;
        }
        pending.push(buffer);
        address
    })
}

/// Takes the pending buffer at `address` back, cut to the `len` bytes the host wrote.
fn take_input(address: usize, len: usize) -> Result<Vec<u8>, String> {
    let taken = PENDING.with(|pending| {
        let mut pending = pending.borrow_mut();
        let index = pending
            .iter()
            .position(|buffer| buffer.as_ptr() as usize == address)?;
        Some(pending.swap_remove(index))
    });
    match taken {
        Some(mut buffer) if len <= buffer.len() => {
            buffer.truncate(len);
            Ok(buffer)
        }
        Some(buffer) => Err(format!(
            "input length {len} exceeds the {} bytes allocated at {address:#x}",
            buffer.len()
        )),
        None if len == 0 => Ok(Vec::new()),
        None => Err(format!(
            "input address {address:#x} was not returned by cachegw_alloc"
        )),
    }
}

/// Runs `encode` on the output buffer (emptied first), which holds the result until the next
/// call; returns its address and length.
fn hold_output(encode: impl FnOnce(&mut Vec<u8>)) -> (usize, usize) {
    OUTPUT.with_borrow_mut(|held| {
        held.clear();
        encode(held);
        (held.as_ptr() as usize, held.len())
    })
}

/// Keeps a consumed input buffer for the next [`alloc`], unless a larger one is kept already.
fn keep_spare(buffer: Vec<u8>) {
    SPARE.with_borrow_mut(|spare| {
        if buffer.capacity() > spare.capacity() {
            *spare = buffer;
        }
    });
}

/// Emulates the host writing `bytes` at `address` (native round trips only). False if
/// `address` is not a pending buffer large enough.
#[cfg(not(target_arch = "wasm32"))]
pub(crate) fn host_write(address: usize, bytes: &[u8]) -> bool {
    PENDING.with(|pending| {
        let mut pending = pending.borrow_mut();
        match pending
            .iter_mut()
            .find(|buffer| buffer.as_ptr() as usize == address)
        {
            Some(buffer) if bytes.len() <= buffer.len() => {
                buffer[..bytes.len()].copy_from_slice(bytes);
                true
            }
            _ => false,
        }
    })
}

/// Emulates the host reading the output at `address` (native round trips only).
#[cfg(not(target_arch = "wasm32"))]
pub(crate) fn host_read(address: usize, len: usize) -> Option<Vec<u8>> {
    OUTPUT.with(|held| {
        let held = held.borrow();
        if len == 0 {
            Some(Vec::new())
        } else if held.as_ptr() as usize == address && len <= held.len() {
            Some(held[..len].to_vec())
        } else {
            None
        }
    })
}

/// Number of buffers allocated and not yet consumed (for tests of the memory protocol).
#[cfg(test)]
pub(crate) fn pending_buffers() -> usize {
    PENDING.with(|pending| pending.borrow().len())
}

fn declined(message: String, out: &mut Vec<u8>) {
    encode(
        &proto::PolicyOutput {
            result: Some(proto::policy_output::Result::Error(message)),
        },
        out,
    );
}

/// Appends `message` to `out` (which grows as needed, so encoding cannot fail).
fn encode(message: &impl Message, out: &mut Vec<u8>) {
    out.reserve(message.encoded_len());
    message.encode_raw(out);
}

/// Runs `P` on an encoded `PolicyInput` and appends the encoded `PolicyOutput` to `out`: the
/// decision, or an error when the input does not decode, `P::from_config` rejects the config,
/// `P::decide` declines, or the decision is invalid
/// ([`Decision::to_wire`](crate::Decision::to_wire)).
///
/// The policy is the one `cachegw_init` kept ([`KEPT`]) if it was built from the input's config
/// bytes, else `P::from_config` of them.
///
/// The decision always carries `reuse`: what `decide` read of the clock and the value size
/// (recorded by the [`Request`] it was given; `from_config` only sees the config bytes) and the
/// policy's [`reusable_for`](crate::Decision::reusable_for) promise. An error carries nothing.
fn decide_into<P: Policy + 'static>(input: &[u8], out: &mut Vec<u8>) {
    // The request borrows the input's bytes: no copy of the config or the strings.
    let reads = Reads::default();
    let req = match Request::decode(input, &reads) {
        Ok(req) => req,
        Err(err) => return declined(format!("cannot decode PolicyInput: {err}"), out),
    };
    KEPT.with_borrow(|kept| {
        let kept = kept
            .as_ref()
            .filter(|kept| same_bytes(&kept.config, req.config()))
            .and_then(|kept| kept.policy.downcast_ref::<P>());
        match kept {
            Some(policy) => decide_with(policy, &req, out),
            None => match P::from_config(req.config()) {
                Ok(policy) => decide_with(&policy, &req, out),
                Err(err) => declined(format!("config rejected: {err}"), out),
            },
        }
    })
}

/// `a == b`, eight bytes at a time. On wasm32 a slice comparison is compiler_builtins' `memcmp`,
/// a loop over single bytes; comparing the input's config with the kept one that way was a
/// fifth of ttl-by-route's own time per decision (docs/BENCHMARKS.md, "The floor"). The last
/// (partial) word is compared as the slices' last eight bytes, overlapping the one before.
fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let (Some(a_last), Some(b_last)) = (a.last_chunk::<8>(), b.last_chunk::<8>()) else {
        return a == b;
    };
    let ((a_words, _), (b_words, _)) = (a.as_chunks::<8>(), b.as_chunks::<8>());
    a_words
        .iter()
        .zip(b_words)
        .all(|(x, y)| u64::from_ne_bytes(*x) == u64::from_ne_bytes(*y))
        && u64::from_ne_bytes(*a_last) == u64::from_ne_bytes(*b_last)
}

fn decide_with<P: Policy>(policy: &P, req: &Request, out: &mut Vec<u8>) {
    let decision = match policy
        .decide(req)
        .and_then(|decision| decision.into_wire(req))
    {
        Ok(decision) => decision,
        Err(err) => return declined(err.to_string(), out),
    };
    encode(
        &proto::PolicyOutput {
            result: Some(proto::policy_output::Result::Decision(decision)),
        },
        out,
    );
}

/// Runs `P::from_config` on config bytes, keeps the policy it built for this instance's
/// decisions on the same bytes ([`KEPT`]), and returns the encoded `InitOutput`.
pub fn init_bytes<P: Policy + 'static>(config: &[u8]) -> Vec<u8> {
    let (kept, error) = match P::from_config(config) {
        Ok(policy) => (
            Some(Kept {
                config: config.to_vec(),
                policy: Box::new(policy),
            }),
            String::new(),
        ),
        Err(err) => (None, err.to_string()),
    };
    KEPT.set(kept);
    proto::InitOutput { error }.encode_to_vec()
}

/// `cachegw_decide` in terms of addresses: consumes the pending input, parks the output.
pub fn decide_at<P: Policy + 'static>(address: usize, len: usize) -> (usize, usize) {
    let input = take_input(address, len);
    let held = hold_output(|out| match &input {
        Ok(input) => decide_into::<P>(input, out),
        Err(err) => declined(err.clone(), out),
    });
    if let Ok(input) = input {
        keep_spare(input);
    }
    held
}

/// Room left in the output buffer by `cachegw_init`: more than an ordinary decision encodes to.
const OUTPUT_ROOM: usize = 1024;

/// `cachegw_init` in terms of addresses: consumes the pending config, parks the output.
pub fn init_at<P: Policy + 'static>(address: usize, len: usize) -> (usize, usize) {
    let output = match take_input(address, len) {
        Ok(config) => init_bytes::<P>(&config),
        Err(err) => proto::InitOutput { error: err }.encode_to_vec(),
    };
    hold_output(|out| {
        out.reserve(OUTPUT_ROOM.max(output.len()));
        out.extend_from_slice(&output);
    })
}

/// Packs an output address and length into the `i64` the entry points return: address in the
/// high 32 bits, length in the low 32 bits.
pub fn pack(address: u32, len: u32) -> i64 {
    ((u64::from(address) << 32) | u64::from(len)) as i64
}

/// Splits a packed `i64` back into (address, length), as the host does.
#[cfg(test)]
fn unpack(packed: i64) -> (u32, u32) {
    let packed = packed as u64;
    ((packed >> 32) as u32, packed as u32)
}

/// `cachegw_alloc`. A negative length is refused with 0.
pub fn export_alloc(len: i32) -> i32 {
    match usize::try_from(len) {
        // wasm32 addresses are 32-bit; the host reads the i32 as unsigned.
        Ok(len) => alloc(len) as i32,
        Err(_) => 0,
    }
}

/// `cachegw_decide`.
pub fn export_decide<P: Policy + 'static>(ptr: i32, len: i32) -> i64 {
    report_panics();
    let (address, len) = decide_at::<P>(ptr as u32 as usize, len as u32 as usize);
    pack(address as u32, len as u32)
}

/// `cachegw_init`.
pub fn export_init<P: Policy + 'static>(ptr: i32, len: i32) -> i64 {
    report_panics();
    let (address, len) = init_at::<P>(ptr as u32 as usize, len as u32 as usize);
    pack(address as u32, len as u32)
}

/// Sends a panic's message to the host log before `panic = "abort"` turns it into a trap, so
/// the operator sees why the policy faulted.
fn report_panics() {
    #[cfg(target_arch = "wasm32")]
    {
        static INSTALL: std::sync::Once = std::sync::Once::new();
        INSTALL.call_once(|| {
            std::panic::set_hook(Box::new(|info| {
                crate::log::error(&format!("policy panicked: {info}"));
            }));
        });
    }
}

/// Compile-time check used by [`export_policy!`](crate::export_policy) on every target.
pub const fn assert_policy<P: Policy + 'static>() {}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Decision, PolicyError};

    /// [`decide_into`] a new buffer.
    fn decide_bytes<P: Policy + 'static>(input: &[u8]) -> Vec<u8> {
        let mut output = Vec::new();
        decide_into::<P>(input, &mut output);
        output
    }

    #[derive(Default)]
    struct Echo;

    /// Reads what its key names; its config, a number of milliseconds, sets `reusable_for`.
    #[derive(Default)]
    struct Reader {
        promise_ms: u64,
    }

    impl Policy for Reader {
        fn from_config(config: &[u8]) -> Result<Self, PolicyError> {
            let text = std::str::from_utf8(config).map_err(|_| "config is not UTF-8")?;
            let promise_ms = match text {
                "" => 0,
                text => text.parse().map_err(|_| "config is not a number")?,
            };
            Ok(Self { promise_ms })
        }

        fn decide(&self, req: &Request) -> Result<Decision, PolicyError> {
            // Parsing the config again from the request is no read either.
            let again = Self::from_config(req.config())?;
            assert_eq!(again.promise_ms, self.promise_ms);
            let decision = Decision::cache(req.key())
                .reusable_for(std::time::Duration::from_millis(self.promise_ms));
            match req.key() {
                "now" => drop(req.now()),
                "now_unix_ms" => drop(req.now_unix_ms()),
                "value_size" => drop(req.value_size()),
                "both" => drop((req.now(), req.value_size())),
                "decline-after-reading" => {
                    req.now();
                    return Err(PolicyError::new("declined"));
                }
                _ => {}
            }
            Ok(decision)
        }
    }

    fn reuse_of(key: &str, config: &str) -> Option<proto::Reuse> {
        let input = proto::PolicyInput {
            key: key.into(),
            op: proto::Operation::Set as i32,
            value_size: 10,
            now_unix_ms: 1_700_000_000_000,
            config: config.as_bytes().to_vec(),
            ..Default::default()
        };
        match output(&decide_bytes::<Reader>(&input.encode_to_vec())) {
            proto::policy_output::Result::Decision(decision) => decision.reuse,
            other => panic!("{other:?}"),
        }
    }

    fn reuse(
        read_clock: bool,
        read_value_size: bool,
        reusable_for_ms: u64,
    ) -> Option<proto::Reuse> {
        Some(proto::Reuse {
            read_clock,
            read_value_size,
            reusable_for_ms,
        })
    }

    impl Policy for Echo {
        fn decide(&self, req: &Request) -> Result<Decision, PolicyError> {
            match req.key() {
                "decline" => Err(PolicyError::new("declined on purpose")),
                "zero" => Ok(Decision::cache("k").fresh_for(std::time::Duration::ZERO)),
                key => Ok(Decision::cache(key)),
            }
        }
    }

    fn input(key: &str) -> Vec<u8> {
        proto::PolicyInput {
            key: key.into(),
            ..Default::default()
        }
        .encode_to_vec()
    }

    fn output(bytes: &[u8]) -> proto::policy_output::Result {
        proto::PolicyOutput::decode(bytes).unwrap().result.unwrap()
    }

    #[test]
    fn packs_address_high_and_length_low() {
        assert_eq!(pack(0x1234, 0x56), 0x0000_1234_0000_0056);
        assert_eq!(
            unpack(pack(0xffff_fff0, 0xffff_ffff)),
            (0xffff_fff0, 0xffff_ffff)
        );
        assert!(pack(0x8000_0000, 1) < 0, "high addresses use the sign bit");
    }

    #[test]
    fn decides_on_encoded_input() {
        match output(&decide_bytes::<Echo>(&input("k1"))) {
            proto::policy_output::Result::Decision(d) => assert_eq!(d.storage_key, "k1"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_decision_that_reads_nothing_says_so() {
        assert_eq!(reuse_of("k", ""), reuse(false, false, 0));
    }

    #[test]
    fn reading_the_clock_is_reported() {
        assert_eq!(reuse_of("now", ""), reuse(true, false, 0));
        assert_eq!(reuse_of("now_unix_ms", ""), reuse(true, false, 0));
    }

    #[test]
    fn reading_the_value_size_is_reported() {
        assert_eq!(reuse_of("value_size", ""), reuse(false, true, 0));
        assert_eq!(reuse_of("both", ""), reuse(true, true, 0));
    }

    #[test]
    fn the_reuse_promise_is_sent_in_milliseconds() {
        let five_minutes = "300000";
        assert_eq!(reuse_of("now", five_minutes), reuse(true, false, 300_000));
        assert_eq!(reuse_of("k", five_minutes), reuse(false, false, 300_000));
    }

    #[test]
    fn same_bytes_is_slice_equality() {
        let base: Vec<u8> = (0..40u8).collect();
        for len in 0..=base.len() {
            let a = &base[..len];
            assert!(same_bytes(a, a), "{len}");
            assert!(!same_bytes(a, &base[..len.saturating_sub(1)]) || len == 0);
            for at in 0..len {
                let mut b = a.to_vec();
                b[at] ^= 0x80;
                assert!(!same_bytes(a, &b), "len {len}, byte {at} differs");
            }
        }
    }

    #[test]
    fn parsing_the_config_is_not_a_read() {
        // `Reader` parses its config in `from_config`, and again from `Request::config`.
        assert_eq!(reuse_of("k", "0"), reuse(false, false, 0));
    }

    #[test]
    fn a_declined_decision_carries_no_reuse() {
        match output(&decide_bytes::<Reader>(&input("decline-after-reading"))) {
            proto::policy_output::Result::Error(message) => assert_eq!(message, "declined"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_raw_answer_of_the_abi_doc_reads_nothing() {
        // docs/POLICY_ABI.md, "The raw exports, sketched in WAT".
        match output(b"\x0a\x0c\x0a\x06bypass\x30\x01\x5a\x00") {
            proto::policy_output::Result::Decision(decision) => {
                assert_eq!(decision.storage_key, "bypass");
                assert!(decision.bypass);
                assert_eq!(decision.reuse, reuse(false, false, 0));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn declines_instead_of_failing() {
        let expect_error = |bytes: Vec<u8>, needle: &str| match output(&bytes) {
            proto::policy_output::Result::Error(e) => assert!(e.contains(needle), "{e}"),
            other => panic!("{other:?}"),
        };
        expect_error(
            decide_bytes::<Echo>(&input("decline")),
            "declined on purpose",
        );
        expect_error(decide_bytes::<Echo>(&input("zero")), "zero fresh TTL");
        expect_error(
            decide_bytes::<Echo>(&[0x0f, 0xff]),
            "cannot decode PolicyInput",
        );
        // `Echo` takes no config.
        let with_config = proto::PolicyInput {
            key: "k".into(),
            config: b"{\"a\":1}".to_vec(),
            ..Default::default()
        };
        expect_error(
            decide_bytes::<Echo>(&with_config.encode_to_vec()),
            "config rejected",
        );
    }

    #[test]
    fn init_reports_config_errors() {
        let accepted = proto::InitOutput::decode(&init_bytes::<Echo>(b"")[..]).unwrap();
        assert_eq!(accepted.error, "");
        let rejected = proto::InitOutput::decode(&init_bytes::<Echo>(b"[1]")[..]).unwrap();
        assert!(
            rejected.error.contains("takes no config"),
            "{}",
            rejected.error
        );
    }

    #[test]
    fn memory_protocol_consumes_each_buffer_once() {
        let before = pending_buffers();
        let bytes = input("via-memory");
        let address = alloc(bytes.len());
        assert_ne!(address, 0);
        assert_eq!(pending_buffers(), before + 1);
        assert!(host_write(address, &bytes));
        let (out_address, out_len) = decide_at::<Echo>(address, bytes.len());
        assert_eq!(pending_buffers(), before);
        let out = host_read(out_address, out_len).unwrap();
        match output(&out) {
            proto::policy_output::Result::Decision(d) => assert_eq!(d.storage_key, "via-memory"),
            other => panic!("{other:?}"),
        }
        // The same address a second time is no longer a pending buffer.
        let (out_address, out_len) = decide_at::<Echo>(address, bytes.len());
        match output(&host_read(out_address, out_len).unwrap()) {
            proto::policy_output::Result::Error(e) => {
                assert!(e.contains("not returned by cachegw_alloc"), "{e}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn consecutive_calls_reuse_the_input_and_output_buffers() {
        let bytes = input("again");
        let call = || {
            let address = alloc(bytes.len());
            assert!(host_write(address, &bytes));
            let (out_address, out_len) = decide_at::<Echo>(address, bytes.len());
            match output(&host_read(out_address, out_len).unwrap()) {
                proto::policy_output::Result::Decision(d) => assert_eq!(d.storage_key, "again"),
                other => panic!("{other:?}"),
            }
            (address, out_address)
        };
        let first = call();
        assert_eq!(
            SPARE.with_borrow(|spare| spare.as_ptr() as usize),
            first.0,
            "the consumed input is kept"
        );
        assert_eq!(call(), first, "the second call allocated new buffers");
        // A larger input than the spare gets a buffer of its own, and then stays the spare.
        let long = proto::PolicyInput {
            key: "k".repeat(4096),
            ..Default::default()
        }
        .encode_to_vec();
        let address = alloc(long.len());
        assert!(host_write(address, &long));
        decide_at::<Echo>(address, long.len());
        assert_eq!(alloc(8), address);
    }

    #[test]
    fn init_leaves_room_for_a_decision_in_the_output_buffer() {
        let address = alloc(0);
        init_at::<Echo>(address, 0);
        let room = OUTPUT.with_borrow(Vec::capacity);
        assert!(room >= OUTPUT_ROOM, "{room}");
        let bytes = input("fits");
        let address = alloc(bytes.len());
        assert!(host_write(address, &bytes));
        decide_at::<Echo>(address, bytes.len());
        assert_eq!(
            OUTPUT.with_borrow(Vec::capacity),
            room,
            "the output was reallocated"
        );
    }

    #[test]
    fn memory_protocol_rejects_overlong_inputs_and_frees_them() {
        let before = pending_buffers();
        let address = alloc(4);
        let (out_address, out_len) = decide_at::<Echo>(address, 5);
        match output(&host_read(out_address, out_len).unwrap()) {
            proto::policy_output::Result::Error(e) => assert!(e.contains("exceeds"), "{e}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(pending_buffers(), before);
    }

    #[test]
    fn empty_input_is_a_valid_message() {
        // An all-default PolicyInput encodes to zero bytes; the key is then empty, so the
        // decision is invalid, but the memory protocol itself works.
        let address = alloc(0);
        assert_ne!(address, 0);
        let (out_address, out_len) = decide_at::<Echo>(address, 0);
        match output(&host_read(out_address, out_len).unwrap()) {
            proto::policy_output::Result::Error(e) => {
                assert!(e.contains("empty storage key"), "{e}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn negative_allocation_is_refused() {
        assert_eq!(export_alloc(-1), 0);
    }

    #[test]
    fn init_at_consumes_the_config_buffer() {
        let before = pending_buffers();
        let address = alloc(2);
        assert!(host_write(address, b"{}"));
        let (out_address, out_len) = init_at::<Echo>(address, 2);
        assert_eq!(out_len, 0, "an accepted config encodes an empty InitOutput");
        assert_eq!(host_read(out_address, out_len), Some(Vec::new()));
        assert_eq!(pending_buffers(), before);
    }

    thread_local! {
        static FROM_CONFIG_CALLS: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
    }

    /// Counts its `from_config` calls (on this thread); its config names its storage key.
    #[derive(Default)]
    struct Counted {
        key: String,
    }

    impl Policy for Counted {
        fn from_config(config: &[u8]) -> Result<Self, PolicyError> {
            FROM_CONFIG_CALLS.set(FROM_CONFIG_CALLS.get() + 1);
            match std::str::from_utf8(config) {
                Ok("reject") | Err(_) => Err(PolicyError::new("rejected")),
                Ok(key) => Ok(Self { key: key.into() }),
            }
        }

        fn decide(&self, _req: &Request) -> Result<Decision, PolicyError> {
            Ok(Decision::cache(&self.key))
        }
    }

    fn decide_on(config: &str) -> String {
        let input = proto::PolicyInput {
            key: "k".into(),
            config: config.as_bytes().to_vec(),
            ..Default::default()
        };
        match output(&decide_bytes::<Counted>(&input.encode_to_vec())) {
            proto::policy_output::Result::Decision(decision) => decision.storage_key,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_decision_on_the_config_init_saw_uses_the_policy_init_built() {
        init_bytes::<Counted>(b"kept");
        assert_eq!(FROM_CONFIG_CALLS.get(), 1);
        assert_eq!(decide_on("kept"), "kept");
        assert_eq!(decide_on("kept"), "kept");
        assert_eq!(FROM_CONFIG_CALLS.get(), 1, "decisions built no policy");
    }

    #[test]
    fn a_decision_on_other_config_builds_its_own_policy() {
        init_bytes::<Counted>(b"kept");
        assert_eq!(decide_on("other"), "other");
        assert_eq!(FROM_CONFIG_CALLS.get(), 2);
        // Without init, every decision builds one.
        KEPT.set(None);
        assert_eq!(decide_on("kept"), "kept");
        assert_eq!(FROM_CONFIG_CALLS.get(), 3);
    }

    #[test]
    fn a_rejected_config_keeps_nothing() {
        init_bytes::<Counted>(b"kept");
        let rejected = proto::InitOutput::decode(&init_bytes::<Counted>(b"reject")[..]).unwrap();
        assert_eq!(rejected.error, "rejected");
        assert!(KEPT.with_borrow(Option::is_none));
        assert_eq!(decide_on("kept"), "kept");
        assert_eq!(FROM_CONFIG_CALLS.get(), 3);
    }

    #[test]
    fn a_kept_policy_serves_only_its_own_type() {
        init_bytes::<Reader>(b"7");
        assert_eq!(
            decide_on("7"),
            "7",
            "Counted built its own policy from the config"
        );
        assert_eq!(FROM_CONFIG_CALLS.get(), 1);
    }
}
