//! What a policy is asked about: the typed view of `PolicyInput`, and the record of which of its
//! varying inputs (the clock, the value size) a decision read, which decides whether the gateway
//! may reuse the decision (docs/POLICY_ABI.md, "Decision reuse").

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::proto;

/// The cache operation a decision is asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Operation {
    /// A read. The decision's storage key is where the gateway looks.
    Get,
    /// A write. The decision's TTLs, tags and compression apply to the stored entry, and its
    /// invalidations run after the write succeeds.
    Set,
    /// A removal of the decision's storage key; its invalidations run after it.
    Delete,
    /// `OPERATION_UNSPECIFIED` (0) or an operation added by a newer gateway, by wire value.
    /// Deciding as for a [`Get`](Operation::Get) is the safe answer.
    Unknown(i32),
}

impl Operation {
    /// Whether the operation changes the cache ([`Set`](Operation::Set) or
    /// [`Delete`](Operation::Delete)): the operations whose invalidations run.
    pub fn is_write(self) -> bool {
        matches!(self, Operation::Set | Operation::Delete)
    }

    /// The wire value (`cachegw.policy.v1.Operation`).
    pub fn to_wire(self) -> i32 {
        match self {
            Operation::Get => proto::Operation::Get as i32,
            Operation::Set => proto::Operation::Set as i32,
            Operation::Delete => proto::Operation::Delete as i32,
            Operation::Unknown(value) => value,
        }
    }

    /// The operation for a wire value.
    pub fn from_wire(value: i32) -> Self {
        match proto::Operation::try_from(value) {
            Ok(proto::Operation::Get) => Operation::Get,
            Ok(proto::Operation::Set) => Operation::Set,
            Ok(proto::Operation::Delete) => Operation::Delete,
            Ok(proto::Operation::Unspecified) | Err(_) => Operation::Unknown(value),
        }
    }
}

/// One request as the gateway describes it to the policy.
///
/// Built by the SDK from the `PolicyInput` the host sends; in native tests, by
/// [`testing::request`](crate::testing::request).
///
/// # Reads of the clock and the value size
/// Two inputs differ between otherwise identical requests: the time and the size of the value
/// being written. The request records whether the decision looked at them, and the SDK sends
/// that with the decision, so that the gateway may reuse a decision that did not depend on them
/// (or, with [`Decision::reusable_for`](crate::Decision::reusable_for), for as long as the policy
/// promises it holds). Every way to see them counts as a read:
/// - the clock: [`now`](Request::now), [`now_unix_ms`](Request::now_unix_ms);
/// - the value size: [`value_size`](Request::value_size);
/// - both: [`to_input`](Request::to_input), `{:?}` formatting (the text contains them), and
///   `==` when every other field is equal (the result then depends on them).
///
/// Read them only where the decision needs them: a policy whose TTL depends on the time of day
/// only needs the clock for a Set, not for a Get. A clone shares the original's record, so a
/// read through a clone counts too. The operation, namespace, key, attributes and config are
/// part of what the gateway matches a reused decision on, and reading them is not recorded.
pub struct Request {
    op: Operation,
    namespace: String,
    key: String,
    attributes: BTreeMap<String, String>,
    value_size: u64,
    now_unix_ms: u64,
    config: Vec<u8>,
    reads: Arc<Reads>,
}

/// Whether the clock and the value size of a request were read. Shared by a request and its
/// clones; atomics only to keep [`Request`] `Send + Sync`, there is no concurrency on wasm.
#[derive(Debug, Default)]
struct Reads {
    clock: AtomicBool,
    value_size: AtomicBool,
}

impl Request {
    /// The operation.
    pub fn op(&self) -> Operation {
        self.op
    }

    /// The namespace the client addressed. The gateway scopes every key, pattern and tag of the
    /// decision under it; a policy cannot reach another namespace.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The key exactly as the client sent it.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The request attribute `name` (route, user id, headers the client forwarded...).
    /// Names are matched exactly first, then ignoring ASCII case, so `attr("accept-language")`
    /// also finds `Accept-Language`.
    pub fn attr(&self, name: &str) -> Option<&str> {
        if let Some(value) = self.attributes.get(name) {
            return Some(value);
        }
        self.attributes
            .iter()
            .find(|(candidate, _)| candidate.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_str())
    }

    /// Whether the attribute `name` is present (matched like [`attr`](Request::attr)).
    pub fn has_attr(&self, name: &str) -> bool {
        self.attr(name).is_some()
    }

    /// All attributes, ordered by name.
    pub fn attributes(&self) -> impl Iterator<Item = (&str, &str)> {
        self.attributes
            .iter()
            .map(|(name, value)| (name.as_str(), value.as_str()))
    }

    /// Size in bytes of the value being written (Set only; 0 otherwise).
    ///
    /// Recorded as a read of the value size: the gateway then reuses the decision only for the
    /// same size, and only as long as [`Decision::reusable_for`](crate::Decision::reusable_for)
    /// promises.
    pub fn value_size(&self) -> u64 {
        self.reads.value_size.store(true, Ordering::Relaxed);
        self.value_size
    }

    /// The gateway's wall-clock time for this request. (A policy has no clock of its own:
    /// `SystemTime::now()` is unavailable on `wasm32-unknown-unknown`.)
    ///
    /// Recorded as a read of the clock: the gateway then reuses the decision only as long as
    /// [`Decision::reusable_for`](crate::Decision::reusable_for) promises.
    pub fn now(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(self.now_unix_ms())
    }

    /// [`now`](Request::now) as milliseconds since the Unix epoch. Recorded as a read of the
    /// clock, like `now`.
    pub fn now_unix_ms(&self) -> u64 {
        self.reads.clock.store(true, Ordering::Relaxed);
        self.now_unix_ms
    }

    /// Whether the clock has been read through this request or one of its clones.
    pub(crate) fn clock_was_read(&self) -> bool {
        self.reads.clock.load(Ordering::Relaxed)
    }

    /// Whether the value size has been read through this request or one of its clones.
    pub(crate) fn value_size_was_read(&self) -> bool {
        self.reads.value_size.load(Ordering::Relaxed)
    }

    /// The binding's configuration bytes, verbatim (JSON by convention). The same bytes are
    /// passed to [`Policy::from_config`](crate::Policy::from_config).
    pub fn config(&self) -> &[u8] {
        &self.config
    }

    /// The binding's configuration parsed as JSON into `T`, an empty config meaning
    /// `T::default()`; see [`config::from_json`](crate::config::from_json).
    #[cfg(feature = "json")]
    pub fn config_json<T>(&self) -> Result<T, crate::PolicyError>
    where
        T: serde::de::DeserializeOwned + Default,
    {
        crate::config::from_json(&self.config)
    }

    /// The request as the wire message the host sends. It holds the clock and the value size,
    /// so it counts as reading both.
    pub fn to_input(&self) -> proto::PolicyInput {
        proto::PolicyInput {
            op: self.op.to_wire(),
            namespace: self.namespace.clone(),
            key: self.key.clone(),
            attributes: self.attributes.clone(),
            value_size: self.value_size(),
            now_unix_ms: self.now_unix_ms(),
            config: self.config.clone(),
        }
    }
}

impl Clone for Request {
    /// A copy that shares the original's record of reads: reading the clock through the clone
    /// is reading the clock of the same request.
    fn clone(&self) -> Self {
        Self {
            op: self.op,
            namespace: self.namespace.clone(),
            key: self.key.clone(),
            attributes: self.attributes.clone(),
            value_size: self.value_size,
            now_unix_ms: self.now_unix_ms,
            config: self.config.clone(),
            reads: Arc::clone(&self.reads),
        }
    }
}

impl PartialEq for Request {
    /// Compares the inputs, not the record of reads. The clock and the value size are compared
    /// last, through their accessors, so they count as read only when the answer depends on them.
    fn eq(&self, other: &Self) -> bool {
        self.op == other.op
            && self.namespace == other.namespace
            && self.key == other.key
            && self.attributes == other.attributes
            && self.config == other.config
            && self.value_size() == other.value_size()
            && self.now_unix_ms() == other.now_unix_ms()
    }
}

impl fmt::Debug for Request {
    /// Prints every input, the clock and the value size included, so it counts as reading both:
    /// log the fields a decision needs rather than the whole request.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Request")
            .field("op", &self.op)
            .field("namespace", &self.namespace)
            .field("key", &self.key)
            .field("attributes", &self.attributes)
            .field("value_size", &self.value_size())
            .field("now_unix_ms", &self.now_unix_ms())
            .field("config", &self.config)
            .finish()
    }
}

impl From<proto::PolicyInput> for Request {
    fn from(input: proto::PolicyInput) -> Self {
        Self {
            op: Operation::from_wire(input.op),
            namespace: input.namespace,
            key: input.key,
            attributes: input.attributes,
            value_size: input.value_size,
            now_unix_ms: input.now_unix_ms,
            config: input.config,
            reads: Arc::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Request {
        Request::from(proto::PolicyInput {
            op: proto::Operation::Set as i32,
            namespace: "shop".into(),
            key: "Key".into(),
            attributes: [("Accept-Language", "de"), ("route", "/p")]
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
            value_size: 12,
            now_unix_ms: 1_700_000_000_123,
            config: b"{}".to_vec(),
        })
    }

    #[test]
    fn exposes_the_input() {
        let req = sample();
        assert_eq!(req.op(), Operation::Set);
        assert!(req.op().is_write());
        assert_eq!(req.namespace(), "shop");
        assert_eq!(req.key(), "Key");
        assert_eq!(req.value_size(), 12);
        assert_eq!(req.now_unix_ms(), 1_700_000_000_123);
        assert_eq!(
            req.now().duration_since(UNIX_EPOCH).unwrap(),
            Duration::from_millis(1_700_000_000_123)
        );
        assert_eq!(req.config(), b"{}");
    }

    #[test]
    fn attributes_match_exactly_then_ignoring_case() {
        let req = sample();
        assert_eq!(req.attr("accept-language"), Some("de"));
        assert_eq!(req.attr("Accept-Language"), Some("de"));
        assert_eq!(req.attr("ROUTE"), Some("/p"));
        assert_eq!(req.attr("missing"), None);
        assert!(req.has_attr("route"));
        let names: Vec<_> = req.attributes().map(|(name, _)| name).collect();
        assert_eq!(names, ["Accept-Language", "route"]);
    }

    #[test]
    fn operations_round_trip_through_wire_values() {
        for op in [
            Operation::Get,
            Operation::Set,
            Operation::Delete,
            Operation::Unknown(0),
            Operation::Unknown(9),
        ] {
            assert_eq!(Operation::from_wire(op.to_wire()), op);
        }
        assert!(!Operation::Get.is_write());
        assert!(Operation::Delete.is_write());
        assert!(!Operation::Unknown(9).is_write());
    }

    #[test]
    fn converts_back_to_the_wire_message() {
        let req = sample();
        assert_eq!(Request::from(req.to_input()), req);
    }

    fn reads(req: &Request) -> (bool, bool) {
        (req.clock_was_read(), req.value_size_was_read())
    }

    #[test]
    fn records_reads_of_the_clock_and_the_value_size() {
        let req = sample();
        req.op();
        req.namespace();
        req.key();
        req.attr("route");
        req.attributes().count();
        req.config();
        assert_eq!(
            reads(&req),
            (false, false),
            "matched inputs are not recorded"
        );
        req.now();
        assert_eq!(reads(&req), (true, false));
        let req = sample();
        req.now_unix_ms();
        assert_eq!(reads(&req), (true, false));
        let req = sample();
        req.value_size();
        assert_eq!(reads(&req), (false, true));
    }

    #[test]
    fn every_view_of_the_clock_or_size_is_a_read() {
        let req = sample();
        req.to_input();
        assert_eq!(reads(&req), (true, true), "to_input");
        let req = sample();
        let _ = format!("{req:?}");
        assert_eq!(reads(&req), (true, true), "Debug");
        let original = sample();
        original.clone().now();
        assert_eq!(reads(&original), (true, false), "a clone shares the record");
        // Equality reads the clock and the size only when everything else is equal.
        let req = sample();
        let other_key = Request::from(proto::PolicyInput {
            key: "other".into(),
            ..sample().to_input()
        });
        assert_ne!(req, other_key);
        assert_eq!(reads(&req), (false, false));
        assert_eq!(req, sample());
        assert_eq!(reads(&req), (true, true));
    }
}
