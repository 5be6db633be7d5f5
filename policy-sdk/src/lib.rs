//! # Writing a cachegw policy
//!
//! A policy decides, for every request the gateway serves, how the entry is cached: under which
//! storage key, fresh for how long, how long it may be served stale, with what tags, whether to
//! cache at all, and which entries a write invalidates. It is a small Rust crate compiled to a
//! WebAssembly module; the gateway runs it in a sandbox with a deadline and a memory cap.
//! This crate is everything the author needs: implement [`Policy`] (one method), invoke
//! [`export_policy!`] once, test natively with [`testing`], build with `scripts/build-policies`.
//!
//! ## A complete policy
//!
//! `Cargo.toml`:
//! ```toml
//! [package]
//! name = "one-minute"
//! edition = "2024"
//!
//! [lib]
//! crate-type = ["cdylib", "rlib"]   # cdylib: the .wasm module; rlib: doc tests, native users
//!
//! [dependencies]
//! cachegw_policy = { package = "policy-sdk", path = "../../policy-sdk" }
//!
//! [profile.release]                  # in the workspace root
//! opt-level = "s"
//! lto = true
//! panic = "abort"                    # a panic must become a wasm trap
//! codegen-units = 1
//! strip = true
//! ```
//!
//! `src/lib.rs`:
//! ```
//! use std::time::Duration;
//! use cachegw_policy::{Decision, Operation, Policy, PolicyError, Request};
//!
//! /// Leaderboards are fresh for a minute, everything else keeps the namespace defaults.
//! #[derive(Default)]
//! pub struct OneMinute;
//!
//! impl Policy for OneMinute {
//!     fn decide(&self, req: &Request) -> Result<Decision, PolicyError> {
//!         if req.key().starts_with("leaderboard:") {
//!             Ok(Decision::cache(req.key()).fresh_for(Duration::from_secs(60)))
//!         } else {
//!             Ok(Decision::cache(req.key()))
//!         }
//!     }
//! }
//!
//! cachegw_policy::export_policy!(OneMinute);
//! # fn main() {
//! #     let decision = cachegw_policy::testing::request(Operation::Get, "games", "leaderboard:today")
//! #         .decide::<OneMinute>()
//! #         .unwrap();
//! #     assert_eq!(decision.fresh_ttl(), Some(Duration::from_secs(60)));
//! # }
//! ```
//!
//! and its tests, in the same file, run natively by `cargo test`:
//! ```ignore
//! #[cfg(test)]
//! mod tests {
//!     use super::*;
//!     use cachegw_policy::testing;
//!
//!     #[test]
//!     fn leaderboards_live_a_minute() {
//!         let decision = testing::request(Operation::Get, "games", "leaderboard:today")
//!             .decide::<OneMinute>()
//!             .unwrap();
//!         assert_eq!(decision.fresh_ttl(), Some(Duration::from_secs(60)));
//!     }
//! }
//! ```
//!
//! ## What a policy sees: [`Request`]
//! The [`Operation`] (`Get`, `Set`, `Delete`), the namespace, the key as the client sent it,
//! string attributes ([`Request::attr`], e.g. `req.attr("accept-language")`, names matched
//! ignoring ASCII case), the size of a written value, the gateway's clock ([`Request::now`]; a
//! policy has no clock of its own) and the binding's config bytes. Reading the clock or the
//! value size is recorded; see [Decision reuse](#decision-reuse).
//!
//! ## What a policy answers: [`Decision`]
//! [`Decision::cache`]`(key)` or [`Decision::bypass`]`()`, refined with
//! [`fresh_for`](Decision::fresh_for), [`stale_for`](Decision::stale_for),
//! [`jitter`](Decision::jitter), [`tag`](Decision::tag),
//! [`invalidate_key`](Decision::invalidate_key) / [`invalidate_pattern`](Decision::invalidate_pattern)
//! / [`invalidate_prefix`](Decision::invalidate_prefix) / [`invalidate_tag`](Decision::invalidate_tag),
//! [`compression`](Decision::compression), [`early_refresh_beta`](Decision::early_refresh_beta),
//! [`near_cache`](Decision::near_cache) and [`reusable_for`](Decision::reusable_for).
//! What is not set keeps the namespace's defaults (no fresh TTL = the namespace's default TTL).
//! Keys, patterns and tags are always scoped to the request's namespace by the gateway: a policy
//! cannot reach another namespace, whatever key it names. The SDK checks a decision before
//! sending it (non-empty key, fresh TTL of at least 1 ms, finite beta, no empty key/pattern, the
//! tag limits below), so a mistake shows up as a clear error rather than as a rejected decision
//! in the host.
//!
//! ## Patterns and tags
//! Pattern invalidation uses the glob syntax of Redis `SCAN MATCH` (`*`, `?`, `[a-z]`, `\x`).
//! Build patterns with [`Glob`], never by formatting request data into a string: its
//! [`literal`](Glob::literal) parts are escaped, so a user id like `*` matches only itself,
//! and wildcards are added explicitly with [`any`](Glob::any) / [`one`](Glob::one).
//! [`Decision::invalidate_prefix`] covers the common case:
//!
//! ```
//! use cachegw_policy::{Decision, Glob};
//!
//! let user_id = "*"; // from the request
//! let decision = Decision::bypass()
//!     .invalidate_prefix(format!("profile:{user_id}:"))
//!     .invalidate_pattern(Glob::new().literal("settings:").literal(user_id).literal(":").any());
//! assert_eq!(decision.invalidated_patterns(), ["profile:\\*:*", "settings:\\*:*"]);
//! ```
//!
//! The gateway stores an entry's tags inside the entry, so each tag (attached or invalidated)
//! is 1 to [`MAX_TAG_BYTES`] (255) bytes of UTF-8, and the tags attached to one entry take at
//! most [`MAX_TAG_SECTION_BYTES`] (65535) bytes together, counting one byte more per tag. A
//! decision outside these limits is an error, like any invalid decision, so bound the request
//! data that goes into a tag.
//!
//! ## Decision reuse
//! A policy keeps nothing between calls and has no capability but a bounded log, so its
//! decision depends only on its input. The gateway uses that: it remembers each decision of a
//! binding, keyed by the request's operation, namespace, key and attributes, and answers an
//! identical request with it instead of calling the policy again. Two inputs change between
//! otherwise identical requests, the time and the size of the value being written, so the
//! [`Request`] records whether `decide` read them ([`Request::now`], [`Request::now_unix_ms`],
//! [`Request::value_size`]; also [`Request::to_input`], `{:?}` and `==`), and the SDK sends that
//! with every decision:
//!
//! - read neither: the decision is reused for identical requests as long as the binding lasts;
//! - read the clock or the value size: never reused, unless the policy promises with
//!   [`Decision::reusable_for`] how long the decision holds; it is then reused that long (and,
//!   if it read the value size, only for the same size);
//! - a promise also bounds the reuse of a decision that read neither.
//!
//! So read the clock and the value size only where the answer needs them (a TTL that depends on
//! the time of day matters for a Set, not for a Get), and promise no more than holds: a
//! decision that changes at 18:00 promises at most the time left until 18:00
//! (`policies/business-hours` does exactly that). A reused decision does not run the policy, so
//! its log lines are not repeated. Errors and faults are never reused, and a new version or
//! config of the binding starts afresh. [`testing::Outcome::reuse`] shows what a decision read.
//!
//! ## Config
//! An operator binds a policy to a namespace with config bytes (JSON by convention).
//! [`Policy::from_config`] turns them into the policy value; override it to read your config,
//! typically with [`config::from_json`] into a `#[serde(deny_unknown_fields)]` struct whose
//! `Default` is the behaviour without config. The default implementation accepts only an empty
//! config. The gateway calls it through the `cachegw_init` export when the binding is created,
//! so a bad config is rejected before it goes live. Each decision runs in a fresh instance; a
//! gateway that pre-initialises bindings (`policy.preinit`, the default) starts every instance
//! from a snapshot taken after `cachegw_init`, and the SDK decides with the policy value
//! `cachegw_init` built there, so `from_config` runs once per binding. Elsewhere (a gateway
//! without pre-initialisation, or a module it could not snapshot) it runs before every decision,
//! so keep it cheap. Either way it must build the same policy from the same bytes, and `decide`
//! must not rely on state it changes: the instance is discarded after the call.
//!
//! ## When things go wrong
//! Returning `Err(`[`PolicyError`]`)` from `from_config` or `decide`, or returning an invalid
//! decision, makes the gateway apply the binding's fallback (fail-open: the namespace's
//! defaults; fail-closed: bypass), count the fault and log the message. So does a panic
//! (`panic = "abort"` turns it into a trap; the SDK logs the panic message first), running past
//! the deadline (a few milliseconds by default) or past the memory cap. The client's request
//! never fails because of the policy. Repeated faults roll the binding back to its previous
//! version.
//!
//! ## Helpers
//! - [`normalize_key`]: lower-case, trim, sort URL query parameters, so spellings share an entry;
//! - [`Glob`] to build invalidation patterns with request data escaped ([`escape_glob`] to
//!   escape by hand), [`glob_match`] to match the same syntax the gateway's pattern
//!   invalidation uses ([`GlobMatcher`] parses a pattern once, for the patterns of a config);
//! - [`tag`] to join tag parts unambiguously (`tag(["user", id])` → `user:{id}`);
//! - [`parse_duration`] for `"500ms"`, `"60s"`, `"5m"`, `"24h"`, `"1h30m"` in configs, with serde
//!   helpers in [`duration`];
//! - [`log`] to write to the gateway's log (bounded: 1 KiB per message, a few calls per decision).
//!
//! ## Testing
//! [`testing::request`] builds a request; [`testing::RequestBuilder::decide`] runs
//! `from_config` + `decide` natively; [`testing::RequestBuilder::round_trip`] runs the full
//! encode → allocate → decide → decode path of the wasm export, turning a panic into
//! [`testing::Outcome::Trapped`], and its [`reuse`](testing::Outcome::reuse) tells what the
//! decision read; [`testing::init`] runs the init export's path. Plain `cargo test`, no wasm
//! runtime needed.
//!
//! ## Building
//! `scripts/build-policies` in the repository builds every crate under `policies/` to
//! `wasm32-unknown-unknown` and copies the modules to `policies/dist/<crate-name>.wasm`.
//! Elsewhere: `rustup target add wasm32-unknown-unknown` and
//! `cargo build --release --target wasm32-unknown-unknown`.
//!
//! ## Inside this crate
//! `request` and `decision` are the typed views of the wire messages in [`proto`] (generated from
//! `proto/cachegw/policy/v1/policy.proto`); `abi` is the glue [`export_policy!`] expands to and
//! the one place that deals with linear memory. The ABI itself, for authors in other languages,
//! is `docs/POLICY_ABI.md`.

#![deny(missing_docs)]

mod abi;
pub mod config;
mod decision;
pub mod duration;
mod error;
mod keys;
pub mod log;
mod request;
#[cfg(not(target_arch = "wasm32"))]
pub mod testing;

/// The host <-> policy messages (`cachegw.policy.v1`), generated from `policy.proto`. Policies
/// normally use [`Request`] and [`Decision`] instead.
#[allow(missing_docs)]
pub mod proto {
    include!(concat!(env!("OUT_DIR"), "/cachegw.policy.v1.rs"));
}

pub use abi::ABI_VERSION;
pub use decision::{Compression, Decision, MAX_TAG_BYTES, MAX_TAG_SECTION_BYTES};
pub use duration::{DurationParseError, parse_duration};
pub use error::PolicyError;
pub use keys::{Glob, GlobMatcher, escape_glob, glob_match, normalize_key, tag};
pub use request::{Operation, Request};

/// A caching policy: the one trait an author implements.
///
/// `Default` is the policy without config (what [`from_config`](Policy::from_config) returns for
/// an empty config unless overridden).
pub trait Policy: Default {
    /// Builds the policy from the binding's config bytes (JSON by convention).
    ///
    /// Called when the binding is created (an `Err` rejects the binding, with this message).
    /// A gateway that pre-initialises the binding decides with that value in every call's fresh
    /// instance; otherwise it is called again before each decision: keep it cheap. An `Err` at
    /// decision time applies the binding's fallback.
    ///
    /// The default accepts an [empty](config::is_empty) config (no bytes, whitespace, `null`,
    /// `{}`) as `Self::default()` and rejects anything else, so that config given to a policy
    /// that ignores it does not go unnoticed.
    fn from_config(config: &[u8]) -> Result<Self, PolicyError> {
        if config::is_empty(config) {
            Ok(Self::default())
        } else {
            Err(PolicyError::new(format!(
                "this policy takes no config, got {} bytes",
                config.len()
            )))
        }
    }

    /// Decides how `req` is cached.
    ///
    /// An `Err` (or a panic) applies the binding's fallback: fail-open (namespace defaults) or
    /// fail-closed (bypass). The message goes to the gateway's log.
    fn decide(&self, req: &Request) -> Result<Decision, PolicyError>;
}

/// Exports a [`Policy`] type as the policy of this crate's wasm module: generates
/// `cachegw_abi_version`, `cachegw_alloc`, `cachegw_decide` and `cachegw_init`. Invoke it once,
/// at the crate root of a `cdylib`:
///
/// ```
/// # use cachegw_policy::{Decision, Policy, PolicyError, Request};
/// # #[derive(Default)] struct MyPolicy;
/// # impl Policy for MyPolicy {
/// #     fn decide(&self, req: &Request) -> Result<Decision, PolicyError> { Ok(Decision::cache(req.key())) }
/// # }
/// cachegw_policy::export_policy!(MyPolicy);
/// # fn main() {}
/// ```
///
/// The exports exist on `wasm32` only; on other targets the macro just checks that the type is a
/// [`Policy`], so the crate's native tests build.
#[macro_export]
macro_rules! export_policy {
    ($policy:ty) => {
        const _: () = $crate::__abi::assert_policy::<$policy>();

        /// ABI version implemented by this module.
        #[cfg(target_arch = "wasm32")]
        #[unsafe(no_mangle)]
        pub extern "C" fn cachegw_abi_version() -> i32 {
            $crate::__abi::ABI_VERSION
        }

        /// Reserves `len` bytes for the host's input; 0 on failure.
        #[cfg(target_arch = "wasm32")]
        #[unsafe(no_mangle)]
        pub extern "C" fn cachegw_alloc(len: i32) -> i32 {
            $crate::__abi::export_alloc(len)
        }

        /// Decides on the encoded `PolicyInput` at `ptr`/`len`; returns the packed location of
        /// the encoded `PolicyOutput`.
        #[cfg(target_arch = "wasm32")]
        #[unsafe(no_mangle)]
        pub extern "C" fn cachegw_decide(ptr: i32, len: i32) -> i64 {
            $crate::__abi::export_decide::<$policy>(ptr, len)
        }

        /// Validates the binding's config at `ptr`/`len`; returns the packed location of the
        /// encoded `InitOutput`.
        #[cfg(target_arch = "wasm32")]
        #[unsafe(no_mangle)]
        pub extern "C" fn cachegw_init(ptr: i32, len: i32) -> i64 {
            $crate::__abi::export_init::<$policy>(ptr, len)
        }
    };
}

#[doc(hidden)]
pub mod __abi {
    //! Re-exported for [`export_policy!`](crate::export_policy); not a public API.
    pub use crate::abi::{ABI_VERSION, assert_policy, export_alloc, export_decide, export_init};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct NoConfig;

    impl Policy for NoConfig {
        fn decide(&self, req: &Request) -> Result<Decision, PolicyError> {
            Ok(Decision::cache(req.key()))
        }
    }

    // The macro expands inside this crate too (no exports natively, only the type check).
    export_policy!(NoConfig);

    #[test]
    fn default_from_config_accepts_only_empty_configs() {
        for config in [&b""[..], b" ", b"{}", b"null"] {
            assert!(NoConfig::from_config(config).is_ok(), "{config:?}");
        }
        let err = NoConfig::from_config(b"{\"ttl\":\"5s\"}").err().unwrap();
        assert_eq!(err.message(), "this policy takes no config, got 12 bytes");
    }
}
