//! What a policy is asked about: the typed view of `PolicyInput`.

use std::collections::BTreeMap;
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
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    op: Operation,
    namespace: String,
    key: String,
    attributes: BTreeMap<String, String>,
    value_size: u64,
    now_unix_ms: u64,
    config: Vec<u8>,
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
    pub fn value_size(&self) -> u64 {
        self.value_size
    }

    /// The gateway's wall-clock time for this request. (A policy has no clock of its own:
    /// `SystemTime::now()` is unavailable on `wasm32-unknown-unknown`.)
    pub fn now(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(self.now_unix_ms)
    }

    /// [`now`](Request::now) as milliseconds since the Unix epoch.
    pub fn now_unix_ms(&self) -> u64 {
        self.now_unix_ms
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

    /// The request as the wire message the host sends.
    pub fn to_input(&self) -> proto::PolicyInput {
        proto::PolicyInput {
            op: self.op.to_wire(),
            namespace: self.namespace.clone(),
            key: self.key.clone(),
            attributes: self.attributes.clone(),
            value_size: self.value_size,
            now_unix_ms: self.now_unix_ms,
            config: self.config.clone(),
        }
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
}
