//! Native unit tests for policies: build a request, call the policy, inspect the decision.
//!
//! ```
//! use std::time::Duration;
//! use cachegw_policy::testing::{self, Outcome};
//! use cachegw_policy::{Decision, Operation, Policy, PolicyError, Request};
//!
//! #[derive(Default)]
//! struct OneMinute;
//!
//! impl Policy for OneMinute {
//!     fn decide(&self, req: &Request) -> Result<Decision, PolicyError> {
//!         Ok(Decision::cache(req.key()).fresh_for(Duration::from_secs(60)))
//!     }
//! }
//!
//! // Straight to the trait method, through `from_config` like the gateway does:
//! let req = testing::request(Operation::Get, "shop", "leaderboard:today");
//! let decision = req.decide::<OneMinute>().unwrap();
//! assert_eq!(decision.fresh_ttl(), Some(Duration::from_secs(60)));
//!
//! // Or the whole wasm path natively: encode, allocate, decide, decode.
//! match req.round_trip::<OneMinute>() {
//!     Outcome::Decision(wire) => assert_eq!(wire.fresh_ttl_ms, Some(60_000)),
//!     other => panic!("{other:?}"),
//! }
//!
//! // What the decision read, and so whether the gateway may reuse it: nothing here.
//! let reuse = req.round_trip::<OneMinute>().reuse();
//! assert!(!reuse.read_clock && !reuse.read_value_size);
//! assert_eq!(reuse.reusable_for_ms, 0);
//! ```

use std::collections::BTreeMap;
use std::panic::{self, AssertUnwindSafe};

use prost::Message;

use crate::log::Level;
use crate::{Decision, Operation, Policy, PolicyError, Request, abi, proto};

/// The fixed clock of test requests unless [`RequestBuilder::now_unix_ms`] says otherwise:
/// 2023-11-14T22:13:20Z.
pub const DEFAULT_NOW_UNIX_MS: u64 = 1_700_000_000_000;

/// Starts a test request for `op` on `key` in `namespace`, with no attributes, no value, no
/// config and the clock at [`DEFAULT_NOW_UNIX_MS`].
pub fn request(op: Operation, namespace: &str, key: &str) -> RequestBuilder {
    RequestBuilder {
        input: proto::PolicyInput {
            op: op.to_wire(),
            namespace: namespace.to_owned(),
            key: key.to_owned(),
            attributes: BTreeMap::new(),
            value_size: 0,
            now_unix_ms: DEFAULT_NOW_UNIX_MS,
            config: Vec::new(),
        },
    }
}

/// A test request under construction; see [`request`].
#[derive(Debug, Clone, PartialEq)]
pub struct RequestBuilder {
    input: proto::PolicyInput,
}

impl RequestBuilder {
    /// Adds (or replaces) the attribute `name`.
    pub fn attr(mut self, name: &str, value: &str) -> Self {
        self.input
            .attributes
            .insert(name.to_owned(), value.to_owned());
        self
    }

    /// Sets the size of the value being written.
    pub fn value_size(mut self, bytes: u64) -> Self {
        self.input.value_size = bytes;
        self
    }

    /// Sets the gateway's clock for this request.
    pub fn now_unix_ms(mut self, ms: u64) -> Self {
        self.input.now_unix_ms = ms;
        self
    }

    /// Sets the binding's config bytes verbatim.
    pub fn config(mut self, config: impl Into<Vec<u8>>) -> Self {
        self.input.config = config.into();
        self
    }

    /// Sets the binding's config from JSON text, e.g. `r#"{"vary":["accept-language"]}"#`.
    ///
    /// # Panics
    /// If `json` is not valid JSON: a typo in a test's config should fail loudly, not test the
    /// policy's rejection path by accident.
    #[cfg(feature = "json")]
    pub fn config_json(self, json: &str) -> Self {
        if let Err(err) = serde_json::from_str::<serde_json::Value>(json) {
            panic!("config_json: invalid JSON {json:?}: {err}");
        }
        self.config(json)
    }

    /// The typed request a policy sees.
    pub fn build(&self) -> Request<'static> {
        Request::from(self.input.clone())
    }

    /// The wire message the host would send.
    pub fn to_input(&self) -> proto::PolicyInput {
        self.input.clone()
    }

    /// Builds `P` from this request's config with [`Policy::from_config`] and calls
    /// [`Policy::decide`], as one call of the gateway does (minus the wire encoding).
    pub fn decide<P: Policy>(&self) -> Result<Decision, PolicyError> {
        let req = self.build();
        P::from_config(req.config())?.decide(&req)
    }

    /// Runs this request through the same glue as the wasm export; see [`round_trip`].
    pub fn round_trip<P: Policy + 'static>(&self) -> Outcome {
        round_trip::<P>(&self.input)
    }
}

/// What the host would make of one decision call.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// A decision that passed the SDK's checks, as it travels on the wire.
    Decision(proto::PolicyDecision),
    /// `PolicyOutput.error`: the config was rejected, `decide` returned an error, or the
    /// decision was invalid. The host applies the binding's fallback.
    Declined(String),
    /// The policy panicked: on wasm, a trap. The host applies the binding's fallback.
    Trapped(String),
}

impl Outcome {
    /// The decision.
    ///
    /// # Panics
    /// If the outcome is not a decision.
    pub fn decision(self) -> proto::PolicyDecision {
        match self {
            Outcome::Decision(decision) => decision,
            other => panic!("expected a decision, got {other:?}"),
        }
    }

    /// What the decision read of the clock and the value size, and how long the policy
    /// promised it holds ([`Decision::reusable_for`]): whether and how long the gateway may
    /// reuse it (docs/POLICY_ABI.md, "Decision reuse").
    ///
    /// # Panics
    /// If the outcome is not a decision, or the decision has no `reuse` (this SDK always sets
    /// it).
    pub fn reuse(self) -> proto::Reuse {
        self.decision()
            .reuse
            .expect("the SDK sets `reuse` on every decision")
    }

    /// The error message of a declined call.
    ///
    /// # Panics
    /// If the outcome is not [`Outcome::Declined`].
    pub fn declined(self) -> String {
        match self {
            Outcome::Declined(message) => message,
            other => panic!("expected the policy to decline, got {other:?}"),
        }
    }
}

/// Runs `input` through the glue `cachegw_decide` uses: encodes it, allocates a buffer as
/// `cachegw_alloc` does, writes the bytes as the host does, decides, reads and decodes the
/// `PolicyOutput`. Only the 32-bit address packing is left out (native addresses are 64-bit).
/// A panic in the policy becomes [`Outcome::Trapped`].
pub fn round_trip<P: Policy + 'static>(input: &proto::PolicyInput) -> Outcome {
    let bytes = input.encode_to_vec();
    let output = panic::catch_unwind(AssertUnwindSafe(|| {
        let address = abi::alloc(bytes.len());
        assert!(
            abi::host_write(address, &bytes),
            "cachegw_alloc returned an unusable buffer"
        );
        let (out_address, out_len) = abi::decide_at::<P>(address, bytes.len());
        abi::host_read(out_address, out_len).expect("cachegw_decide returned an unreadable output")
    }));
    let output = match output {
        Ok(output) => output,
        Err(payload) => return Outcome::Trapped(panic_message(payload.as_ref())),
    };
    let output = proto::PolicyOutput::decode(&output[..]).expect("the SDK encodes valid outputs");
    match output.result {
        Some(proto::policy_output::Result::Decision(decision)) => Outcome::Decision(decision),
        Some(proto::policy_output::Result::Error(message)) => Outcome::Declined(message),
        None => Outcome::Declined(String::from("empty PolicyOutput")),
    }
}

/// Runs `config` through the glue `cachegw_init` uses: `Ok` if the policy accepts it, else the
/// error the host would reject the binding with.
pub fn init<P: Policy + 'static>(config: &[u8]) -> Result<(), String> {
    let address = abi::alloc(config.len());
    assert!(
        abi::host_write(address, config),
        "cachegw_alloc returned an unusable buffer"
    );
    let (out_address, out_len) = abi::init_at::<P>(address, config.len());
    let output =
        abi::host_read(out_address, out_len).expect("cachegw_init returned an unreadable output");
    let output = proto::InitOutput::decode(&output[..]).expect("the SDK encodes valid outputs");
    if output.error.is_empty() {
        Ok(())
    } else {
        Err(output.error)
    }
}

/// Takes the messages this thread's policy code logged so far (oldest first).
pub fn take_logs() -> Vec<(Level, String)> {
    crate::log::sink::take()
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(message) = payload.downcast_ref::<&str>() {
        (*message).to_owned()
    } else if let Some(message) = payload.downcast_ref::<String>() {
        message.clone()
    } else {
        String::from("panic with a non-string payload")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[derive(Default)]
    struct ByKey {
        ttl: Option<Duration>,
    }

    impl Policy for ByKey {
        fn from_config(config: &[u8]) -> Result<Self, PolicyError> {
            if config.is_empty() {
                return Ok(Self::default());
            }
            let text = std::str::from_utf8(config).map_err(|_| "config is not UTF-8")?;
            Ok(Self {
                ttl: Some(crate::parse_duration(text.trim_matches('"'))?),
            })
        }

        fn decide(&self, req: &Request) -> Result<Decision, PolicyError> {
            crate::log::info(&format!("deciding {}", req.key()));
            match req.key() {
                "panic" => panic!("boom"),
                "error" => Err(PolicyError::new("nope")),
                key => {
                    let decision = Decision::cache(key).tag(req.attr("tag").unwrap_or("none"));
                    Ok(match self.ttl {
                        Some(ttl) => decision.fresh_for(ttl),
                        None => decision,
                    })
                }
            }
        }
    }

    #[test]
    fn builder_sets_every_input_field() {
        let input = request(Operation::Set, "ns", "k")
            .attr("a", "1")
            .attr("a", "2")
            .value_size(10)
            .now_unix_ms(5)
            .config("cfg")
            .to_input();
        assert_eq!(input.op, proto::Operation::Set as i32);
        assert_eq!(input.namespace, "ns");
        assert_eq!(input.key, "k");
        assert_eq!(input.attributes.get("a").map(String::as_str), Some("2"));
        assert_eq!(input.value_size, 10);
        assert_eq!(input.now_unix_ms, 5);
        assert_eq!(input.config, b"cfg");
        let req = request(Operation::Get, "ns", "k").build();
        assert_eq!(req.now_unix_ms(), DEFAULT_NOW_UNIX_MS);
    }

    #[test]
    fn decide_builds_the_policy_from_config() {
        let decision = request(Operation::Get, "ns", "k")
            .config("\"2m\"")
            .decide::<ByKey>()
            .unwrap();
        assert_eq!(decision.fresh_ttl(), Some(Duration::from_secs(120)));
        let err = request(Operation::Get, "ns", "k")
            .config("\"2\"")
            .decide::<ByKey>()
            .unwrap_err();
        assert!(err.message().contains("missing unit"), "{err}");
    }

    #[test]
    fn round_trip_returns_the_wire_decision() {
        let decision = request(Operation::Get, "ns", "k")
            .attr("tag", "t")
            .config("\"1s\"")
            .round_trip::<ByKey>()
            .decision();
        assert_eq!(decision.storage_key, "k");
        assert_eq!(decision.fresh_ttl_ms, Some(1_000));
        assert_eq!(decision.tags, ["t"]);
    }

    /// Big values are fresh for 10 s (the value size is read on Sets only); the key `daily` is
    /// promised to hold until midnight UTC (a read of the clock).
    #[derive(Default)]
    struct Tracked;

    impl Policy for Tracked {
        fn decide(&self, req: &Request) -> Result<Decision, PolicyError> {
            let mut decision = Decision::cache(req.key());
            if req.key() == "daily" {
                let left_today = 86_400_000 - req.now_unix_ms() % 86_400_000;
                decision = decision.reusable_for(Duration::from_millis(left_today));
            }
            if req.op() == Operation::Set && req.value_size() > 1_000 {
                decision = decision.fresh_for(Duration::from_secs(10));
            }
            Ok(decision)
        }
    }

    #[test]
    fn round_trip_shows_what_the_decision_read() {
        let get = request(Operation::Get, "ns", "k").round_trip::<Tracked>();
        assert_eq!(
            get.reuse(),
            proto::Reuse {
                read_clock: false,
                read_value_size: false,
                reusable_for_ms: 0,
            }
        );
        let set = request(Operation::Set, "ns", "k").value_size(5_000);
        let reuse = set.round_trip::<Tracked>().reuse();
        assert!(!reuse.read_clock && reuse.read_value_size, "{reuse:?}");
        let daily = request(Operation::Get, "ns", "daily")
            .now_unix_ms(DEFAULT_NOW_UNIX_MS)
            .round_trip::<Tracked>()
            .reuse();
        // 2023-11-14T22:13:20Z: 1 h 46 min 40 s to midnight.
        assert!(daily.read_clock && !daily.read_value_size, "{daily:?}");
        assert_eq!(daily.reusable_for_ms, 6_400_000);
    }

    #[test]
    #[should_panic(expected = "expected a decision")]
    fn reuse_of_a_declined_call_panics() {
        request(Operation::Get, "ns", "error")
            .round_trip::<ByKey>()
            .reuse();
    }

    #[cfg(feature = "json")]
    #[test]
    fn parsing_a_json_config_is_not_a_read() {
        #[derive(Default, serde::Deserialize)]
        struct Ttl {
            ttl_s: u64,
        }
        #[derive(Default)]
        struct FromJson(Ttl);
        impl Policy for FromJson {
            fn from_config(config: &[u8]) -> Result<Self, PolicyError> {
                crate::config::from_json(config).map(FromJson)
            }
            fn decide(&self, req: &Request) -> Result<Decision, PolicyError> {
                let again: Ttl = req.config_json()?;
                assert_eq!(again.ttl_s, self.0.ttl_s);
                Ok(Decision::cache(req.key()).fresh_for(Duration::from_secs(self.0.ttl_s)))
            }
        }
        let reuse = request(Operation::Set, "ns", "k")
            .config_json(r#"{"ttl_s": 30}"#)
            .round_trip::<FromJson>()
            .reuse();
        assert!(!reuse.read_clock && !reuse.read_value_size, "{reuse:?}");
    }

    #[test]
    fn round_trip_reports_declines_and_traps() {
        let declined = request(Operation::Get, "ns", "error")
            .round_trip::<ByKey>()
            .declined();
        assert_eq!(declined, "nope");
        let declined = request(Operation::Get, "ns", "k")
            .config("\"1\"")
            .round_trip::<ByKey>()
            .declined();
        assert!(
            declined.starts_with("config rejected: invalid duration"),
            "{declined}"
        );
        assert_eq!(
            request(Operation::Get, "ns", "panic").round_trip::<ByKey>(),
            Outcome::Trapped("boom".into())
        );
    }

    #[test]
    fn round_trip_leaves_no_pending_buffers() {
        let before = abi::pending_buffers();
        for key in ["a", "error", "panic"] {
            request(Operation::Get, "ns", key).round_trip::<ByKey>();
        }
        // The trapped call's buffer was consumed before the panic, like any other.
        assert_eq!(abi::pending_buffers(), before);
    }

    #[test]
    fn init_accepts_or_rejects_config() {
        assert_eq!(init::<ByKey>(b""), Ok(()));
        assert_eq!(init::<ByKey>(b"5m"), Ok(()));
        assert!(
            init::<ByKey>(b"soon")
                .unwrap_err()
                .contains("invalid duration")
        );
    }

    #[test]
    fn logs_are_captured_per_thread() {
        take_logs();
        request(Operation::Get, "ns", "hello").round_trip::<ByKey>();
        assert_eq!(take_logs(), [(Level::Info, "deciding hello".to_owned())]);
    }

    #[cfg(feature = "json")]
    #[test]
    fn config_json_keeps_valid_json() {
        let req = request(Operation::Get, "ns", "k")
            .config_json(r#"{"a": 1}"#)
            .build();
        assert_eq!(req.config(), br#"{"a": 1}"#);
    }

    #[cfg(feature = "json")]
    #[test]
    #[should_panic(expected = "invalid JSON")]
    fn config_json_panics_on_invalid_json() {
        let _ = request(Operation::Get, "ns", "k").config_json("{a: 1}");
    }
}
