//! What a policy is asked about: the typed view of `PolicyInput`, and the record of which of its
//! varying inputs (the clock, the value size) a decision read, which decides whether the gateway
//! may reuse the decision (docs/POLICY_ABI.md, "Decision reuse").

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::proto;

mod wire;

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
///
/// # Borrowed from the input
/// In a module, a request borrows its namespace, key, attributes and config from the bytes the
/// host wrote (the lifetime `'a`): decoding one copies and allocates nothing but the list of
/// attributes, when there are any. `&Request` in [`Policy::decide`](crate::Policy::decide) needs
/// no lifetime written out; a function that returns one it built from owned data, as a test
/// helper might, names it `Request<'static>`.
pub struct Request<'a> {
    op: Operation,
    namespace: Cow<'a, str>,
    key: Cow<'a, str>,
    /// By name (byte order), each name once: the last value sent wins, as in a protobuf map.
    attributes: Vec<(Cow<'a, str>, Cow<'a, str>)>,
    value_size: u64,
    now_unix_ms: u64,
    config: Cow<'a, [u8]>,
    reads: ReadsRef<'a>,
}

/// Whether the clock and the value size of a request were read. Shared by a request and its
/// clones; atomics only to keep [`Request`] `Send + Sync`, there is no concurrency on wasm.
#[derive(Debug, Default)]
pub(crate) struct Reads {
    clock: AtomicBool,
    value_size: AtomicBool,
}

/// Where a request keeps its [`Reads`]: with the caller that decoded it (the ABI glue, which
/// reads them after the decision), or shared by its clones when it owns its data.
#[derive(Debug, Clone)]
enum ReadsRef<'a> {
    Borrowed(&'a Reads),
    Shared(Arc<Reads>),
}

impl std::ops::Deref for ReadsRef<'_> {
    type Target = Reads;

    fn deref(&self) -> &Reads {
        match self {
            ReadsRef::Borrowed(reads) => reads,
            ReadsRef::Shared(reads) => reads,
        }
    }
}

impl<'a> Request<'a> {
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
        if let Ok(at) = self
            .attributes
            .binary_search_by(|(candidate, _)| candidate.as_ref().cmp(name))
        {
            return Some(&self.attributes[at].1);
        }
        self.attributes
            .iter()
            .find(|(candidate, _)| candidate.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_ref())
    }

    /// Whether the attribute `name` is present (matched like [`attr`](Request::attr)).
    pub fn has_attr(&self, name: &str) -> bool {
        self.attr(name).is_some()
    }

    /// All attributes, ordered by name.
    pub fn attributes(&self) -> impl Iterator<Item = (&str, &str)> {
        self.attributes
            .iter()
            .map(|(name, value)| (name.as_ref(), value.as_ref()))
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
            namespace: self.namespace.clone().into_owned(),
            key: self.key.clone().into_owned(),
            attributes: self
                .attributes()
                .map(|(name, value)| (name.to_owned(), value.to_owned()))
                .collect(),
            value_size: self.value_size(),
            now_unix_ms: self.now_unix_ms(),
            config: self.config.clone().into_owned(),
        }
    }

    /// Decodes the `PolicyInput` the host wrote into `bytes`, borrowing its strings and config;
    /// the request records its reads in `reads`. Decodes what prost decodes, to the same values,
    /// and rejects what it rejects (see `wire`).
    pub(crate) fn decode(bytes: &'a [u8], reads: &'a Reads) -> Result<Self, wire::DecodeError> {
        let mut request = Request {
            op: Operation::from_wire(0),
            namespace: Cow::Borrowed(""),
            key: Cow::Borrowed(""),
            attributes: Vec::new(),
            value_size: 0,
            now_unix_ms: 0,
            config: Cow::Borrowed(&[]),
            reads: ReadsRef::Borrowed(reads),
        };
        let mut reader = wire::Reader::new(bytes);
        while let Some((field, wire_type)) = reader.tag()? {
            match field {
                1 => request.op = Operation::from_wire(reader.varint_field(wire_type)? as i32),
                2 => request.namespace = Cow::Borrowed(reader.string_field(wire_type)?),
                3 => request.key = Cow::Borrowed(reader.string_field(wire_type)?),
                4 => {
                    let (name, value) = reader.map_entry(wire_type)?;
                    request
                        .attributes
                        .push((Cow::Borrowed(name), Cow::Borrowed(value)));
                }
                5 => request.value_size = reader.varint_field(wire_type)?,
                6 => request.now_unix_ms = reader.varint_field(wire_type)?,
                7 => request.config = Cow::Borrowed(reader.bytes_field(wire_type)?),
                _ => reader.skip(field, wire_type)?,
            }
        }
        sort_attributes(&mut request.attributes);
        Ok(request)
    }
}

/// Orders attributes by name and keeps one per name, the last one sent (a protobuf map's rule).
fn sort_attributes(attributes: &mut Vec<(Cow<'_, str>, Cow<'_, str>)>) {
    if attributes.len() < 2 {
        return;
    }
    // Stable: among equal names the last sent stays last, and `dedup_by` moves its value into
    // the first, which it keeps.
    attributes.sort_by(|a, b| a.0.cmp(&b.0));
    attributes.dedup_by(|later, kept| {
        let same = later.0 == kept.0;
        if same {
            std::mem::swap(&mut later.1, &mut kept.1);
        }
        same
    });
}

impl Clone for Request<'_> {
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
            reads: self.reads.clone(),
        }
    }
}

impl PartialEq for Request<'_> {
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

impl fmt::Debug for Request<'_> {
    /// Prints every input, the clock and the value size included, so it counts as reading both:
    /// log the fields a decision needs rather than the whole request.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        /// The attributes as a map, `{"name": "value"}`.
        struct Attributes<'r>(&'r Request<'r>);
        impl fmt::Debug for Attributes<'_> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.debug_map().entries(self.0.attributes()).finish()
            }
        }
        f.debug_struct("Request")
            .field("op", &self.op)
            .field("namespace", &self.namespace)
            .field("key", &self.key)
            .field("attributes", &Attributes(self))
            .field("value_size", &self.value_size())
            .field("now_unix_ms", &self.now_unix_ms())
            .field("config", &self.config)
            .finish()
    }
}

impl From<proto::PolicyInput> for Request<'static> {
    /// A request that owns its data (the map's order is already by name, one value per name).
    fn from(input: proto::PolicyInput) -> Self {
        Self {
            op: Operation::from_wire(input.op),
            namespace: Cow::Owned(input.namespace),
            key: Cow::Owned(input.key),
            attributes: input
                .attributes
                .into_iter()
                .map(|(name, value)| (Cow::Owned(name), Cow::Owned(value)))
                .collect(),
            value_size: input.value_size,
            now_unix_ms: input.now_unix_ms,
            config: Cow::Owned(input.config),
            reads: ReadsRef::Shared(Arc::default()),
        }
    }
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;

    fn sample() -> Request<'static> {
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

    /// A small deterministic generator (xorshift64*), so the test needs no crate.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }

        fn text(&mut self) -> String {
            const PIECES: [&str; 8] = ["a", "Z", "-", ":", "*", "é", "日本", "\u{0}"];
            (0..self.below(6))
                .map(|_| PIECES[self.below(8) as usize])
                .collect()
        }
    }

    fn random_input(rng: &mut Rng) -> proto::PolicyInput {
        proto::PolicyInput {
            op: [0, 1, 2, 3, 7, -1][rng.below(6) as usize],
            namespace: rng.text(),
            key: rng.text(),
            attributes: (0..rng.below(4))
                .map(|_| (rng.text(), rng.text()))
                .collect(),
            value_size: rng.next() >> rng.below(64),
            now_unix_ms: rng.next() >> rng.below(64),
            config: rng.text().into_bytes(),
        }
    }

    /// Bytes prost also accepts but never writes: fields repeated (the last wins), out of
    /// order, unknown fields of every wire type, a group, map entries with fields missing or
    /// repeated, a name sent twice (the last value wins).
    fn unusual_encodings(rng: &mut Rng, input: &proto::PolicyInput) -> Vec<u8> {
        let mut bytes = Vec::new();
        let field = |bytes: &mut Vec<u8>, number: u32, payload: &[u8]| {
            prost::encoding::encode_key(number, prost::encoding::WireType::LengthDelimited, bytes);
            prost::encoding::encode_varint(payload.len() as u64, bytes);
            bytes.extend_from_slice(payload);
        };
        field(&mut bytes, 3, b"first key, replaced");
        bytes.extend_from_slice(&input.encode_to_vec());
        // An unknown varint, fixed64, fixed32, length-delimited field and a group.
        bytes.extend_from_slice(&[0x40, 0x96, 0x01]);
        bytes.extend_from_slice(&[0x49, 1, 2, 3, 4, 5, 6, 7, 8]);
        bytes.extend_from_slice(&[0x55, 1, 2, 3, 4]);
        field(&mut bytes, 9, b"unknown");
        bytes.extend_from_slice(&[0x5b, 0x08, 0x01, 0x5c]);
        // Entries: value only (empty name), name only (empty value), a repeated name.
        field(&mut bytes, 4, &[0x12, 0x01, b'v']);
        field(&mut bytes, 4, &[0x0a, 0x01, b'n']);
        let name = rng.text();
        for value in ["older", "newer"] {
            let mut entry = Vec::new();
            field(&mut entry, 1, name.as_bytes());
            field(&mut entry, 2, value.as_bytes());
            entry.extend_from_slice(&[0x18, 0x05]);
            field(&mut bytes, 4, &entry);
        }
        bytes
    }

    /// What prost makes of `bytes`, as a request; or that it refuses them.
    fn by_prost(bytes: &[u8]) -> Option<Request<'static>> {
        proto::PolicyInput::decode(bytes).ok().map(Request::from)
    }

    fn in_place(bytes: &[u8]) -> Option<Request<'_>> {
        let reads = Box::leak(Box::default());
        Request::decode(bytes, reads).ok()
    }

    #[test]
    fn decodes_in_place_what_prost_decodes() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for round in 0..20_000 {
            let input = random_input(&mut rng);
            let mut bytes = if round % 2 == 0 {
                input.encode_to_vec()
            } else {
                unusual_encodings(&mut rng, &input)
            };
            // Every fourth input damaged: truncated, a byte changed, or garbage appended.
            match round % 8 {
                3 if !bytes.is_empty() => bytes.truncate(rng.below(bytes.len() as u64) as usize),
                5 if !bytes.is_empty() => {
                    let at = rng.below(bytes.len() as u64) as usize;
                    bytes[at] = rng.next() as u8;
                }
                7 => bytes.extend((0..rng.below(4)).map(|_| rng.next() as u8)),
                _ => {}
            }
            let (expected, decoded) = (by_prost(&bytes), in_place(&bytes));
            assert_eq!(decoded, expected, "round {round}, bytes {bytes:02x?}");
            if let Some(decoded) = decoded {
                // Equal also in what only Debug shows: the attributes' order.
                assert_eq!(format!("{decoded:?}"), format!("{:?}", expected.unwrap()));
                assert_eq!(reads(&decoded), (true, true), "compared and printed");
            }
        }
    }

    #[test]
    fn refuses_what_prost_refuses() {
        for bytes in [
            &[0x08][..], // a varint cut short
            &[
                0x08, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02,
            ], // over 64 bits
            &[0x12, 0x05, b'a'], // a length past the end
            &[0x00, 0x01], // field 0
            &[0x0e],     // wire type 6
            &[0x10, 0x01], // a string sent as a varint
            &[0x12, 0x01, 0xff], // a string that is not UTF-8
            &[0x5b, 0x08, 0x01], // a group never closed
            &[0x5c],     // a group closed that was never opened
            &[0x22, 0x02, 0x0a, 0x01], // a map entry cut short
        ] {
            assert_eq!(by_prost(bytes), None, "prost accepts {bytes:02x?}");
            assert_eq!(in_place(bytes), None, "accepted {bytes:02x?}");
        }
    }

    #[test]
    fn a_decoded_request_borrows_the_input_and_records_reads_with_its_caller() {
        let bytes = sample().to_input().encode_to_vec();
        let reads = Reads::default();
        let req = Request::decode(&bytes, &reads).unwrap();
        assert!(matches!(req.key, Cow::Borrowed(_)));
        assert!(matches!(req.config, Cow::Borrowed(_)));
        req.clone().value_size();
        assert!(
            reads.value_size.load(Ordering::Relaxed),
            "a clone records with the caller"
        );
        assert!(!reads.clock.load(Ordering::Relaxed));
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
