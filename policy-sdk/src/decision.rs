//! What a policy answers: the typed, builder-style view of `PolicyDecision`.

use std::time::Duration;

use crate::{Glob, PolicyError, Request, proto};

/// Longest tag, in bytes of UTF-8, for both [`Decision::tag`] and [`Decision::invalidate_tag`]:
/// the gateway stores each of an entry's tags inside the entry behind a one-byte length. Tags
/// must also not be empty. [`Decision::to_wire`] rejects a decision with a tag outside
/// 1..=`MAX_TAG_BYTES` bytes.
pub const MAX_TAG_BYTES: usize = 255;

/// Most bytes the tags attached to one entry ([`Decision::tag`]) may take together, counting
/// each tag's length plus one byte for its length prefix: the entry's tag section has a two-byte
/// length. With tags of the full [`MAX_TAG_BYTES`], that is 255 tags.
/// [`Decision::to_wire`] rejects a decision over it. Invalidated tags are not stored and do not
/// count.
pub const MAX_TAG_SECTION_BYTES: usize = 65_535;

/// How the gateway should treat the value's bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum Compression {
    /// Let the gateway decide (by size).
    #[default]
    Auto,
    /// Never compress: already-compressed or tiny values.
    Never,
    /// Compress whenever it saves space.
    Prefer,
}

impl Compression {
    fn to_wire(self) -> proto::CompressionHint {
        match self {
            Compression::Auto => proto::CompressionHint::Auto,
            Compression::Never => proto::CompressionHint::Never,
            Compression::Prefer => proto::CompressionHint::Prefer,
        }
    }
}

/// A policy's answer for one request, built from [`Decision::cache`] or [`Decision::bypass`]
/// and refined with the builder methods:
///
/// ```
/// use std::time::Duration;
/// use cachegw_policy::{Compression, Decision};
///
/// let decision = Decision::cache("leaderboard:today")
///     .fresh_for(Duration::from_secs(60))
///     .stale_for(Duration::from_secs(30))
///     .jitter(Duration::from_secs(5))
///     .tag("leaderboard")
///     .compression(Compression::Prefer);
/// assert_eq!(decision.fresh_ttl(), Some(Duration::from_secs(60)));
/// assert!(!decision.is_bypass());
/// ```
///
/// Everything not set keeps the namespace's defaults: no fresh TTL means the namespace's
/// default TTL, zero stale window, no jitter, no tags, automatic compression, no
/// invalidations, the namespace's early-refresh beta.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    storage_key: String,
    fresh_ttl: Option<Duration>,
    stale_window: Duration,
    ttl_jitter: Duration,
    tags: Vec<String>,
    bypass: bool,
    compression: Compression,
    invalidate_keys: Vec<String>,
    invalidate_patterns: Vec<String>,
    invalidate_tags: Vec<String>,
    early_refresh_beta: f64,
    near_cache: Duration,
    reusable_for: Duration,
}

impl Decision {
    /// Cache the entry under `storage_key` (the gateway scopes it under the request's namespace).
    /// Pass `req.key()` to keep the client's key, or a normalised or varied key so that several
    /// requests share or split entries. Must not be empty.
    pub fn cache(storage_key: impl Into<String>) -> Self {
        Self {
            storage_key: storage_key.into(),
            fresh_ttl: None,
            stale_window: Duration::ZERO,
            ttl_jitter: Duration::ZERO,
            tags: Vec::new(),
            bypass: false,
            compression: Compression::Auto,
            invalidate_keys: Vec::new(),
            invalidate_patterns: Vec::new(),
            invalidate_tags: Vec::new(),
            early_refresh_beta: 0.0,
            near_cache: Duration::ZERO,
            reusable_for: Duration::ZERO,
        }
    }

    /// Do not read or write the cache for this request. Invalidations added to a bypass
    /// decision still run after a write. The SDK sends the client's key as the storage key.
    pub fn bypass() -> Self {
        Self {
            bypass: true,
            ..Self::cache(String::new())
        }
    }

    /// How long the entry is fresh. Rounded up to whole milliseconds; zero is rejected when the
    /// decision is sent (use [`Decision::bypass`] not to cache).
    pub fn fresh_for(mut self, ttl: Duration) -> Self {
        self.fresh_ttl = Some(ttl);
        self
    }

    /// How long after its fresh TTL the entry may still be served as stale (while it is being
    /// refreshed). Truncated to whole milliseconds.
    pub fn stale_for(mut self, window: Duration) -> Self {
        self.stale_window = window;
        self
    }

    /// Up to this much is added at random to the fresh TTL, so that entries written together do
    /// not expire together. Truncated to whole milliseconds.
    pub fn jitter(mut self, max: Duration) -> Self {
        self.ttl_jitter = max;
        self
    }

    /// Attaches a tag (surrogate key) to the entry when it is written; see [`crate::tag`] to build
    /// one from parts. A tag must be 1 to [`MAX_TAG_BYTES`] bytes, and all of the entry's tags
    /// together at most [`MAX_TAG_SECTION_BYTES`] (one byte more per tag); a decision outside
    /// these limits is rejected when it is sent.
    pub fn tag(mut self, tag: impl Into<String>) -> Self {
        self.tags.push(tag.into());
        self
    }

    /// Attaches several tags; see [`Decision::tag`].
    pub fn with_tags<I, S>(mut self, tags: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.tags.extend(tags.into_iter().map(Into::into));
        self
    }

    /// After the write succeeds, remove the entry stored under this key (a policy-side key,
    /// scoped to the namespace like the storage key).
    pub fn invalidate_key(mut self, key: impl Into<String>) -> Self {
        self.invalidate_keys.push(key.into());
        self
    }

    /// After the write succeeds, remove the namespace's entries whose keys match this glob.
    ///
    /// Build the pattern with [`Glob`], which escapes every literal part, so that request data
    /// (a user id like `*`) cannot reach other entries; a `Glob` is passed as it is. A plain
    /// string is sent verbatim: escape anything taken from the request in it with
    /// [`crate::escape_glob`].
    ///
    /// ```
    /// use cachegw_policy::{Decision, Glob};
    ///
    /// let user_id = "7*";
    /// let decision = Decision::bypass()
    ///     .invalidate_pattern(Glob::new().literal("profile:").literal(user_id).literal(":").any());
    /// assert_eq!(decision.invalidated_patterns(), ["profile:7\\*:*"]);
    /// ```
    pub fn invalidate_pattern(mut self, pattern: impl Into<String>) -> Self {
        self.invalidate_patterns.push(pattern.into());
        self
    }

    /// After the write succeeds, remove the namespace's entries whose keys start with `prefix`:
    /// the same as [`invalidate_pattern`](Decision::invalidate_pattern)`(`[`Glob::prefix`]`(prefix))`,
    /// with `prefix` escaped, so it may come from the request.
    ///
    /// End the prefix with its separator (`"profile:4:"`, not `"profile:4"`, which also reaches
    /// `profile:42:...`). An empty prefix reaches every entry of the namespace.
    ///
    /// ```
    /// use cachegw_policy::Decision;
    ///
    /// let decision = Decision::bypass().invalidate_prefix("profile:7*:");
    /// assert_eq!(decision.invalidated_patterns(), ["profile:7\\*:*"]);
    /// ```
    pub fn invalidate_prefix(self, prefix: impl AsRef<str>) -> Self {
        self.invalidate_pattern(Glob::prefix(prefix))
    }

    /// After the write succeeds, remove the namespace's entries carrying this tag. A tag must be
    /// 1 to [`MAX_TAG_BYTES`] bytes; a longer one is rejected when the decision is sent.
    pub fn invalidate_tag(mut self, tag: impl Into<String>) -> Self {
        self.invalidate_tags.push(tag.into());
        self
    }

    /// How the gateway should treat the value's bytes.
    pub fn compression(mut self, hint: Compression) -> Self {
        self.compression = hint;
        self
    }

    /// XFetch early-refresh beta: above 0, readers refresh an entry early with a probability
    /// growing as it nears expiry (1.0 is the paper's recommended value); 0 keeps the namespace
    /// default. Must be finite and not negative.
    pub fn early_refresh_beta(mut self, beta: f64) -> Self {
        self.early_refresh_beta = beta;
        self
    }

    /// Lets a gateway that runs a near-cache (its in-process L1, `[near_cache]` in its config) keep
    /// the entry for up to `ttl` after reading it from the store, and serve it from memory without
    /// a Redis round trip. Worth it for hot, rarely written keys (reference data, feature flags);
    /// the gateway caps it at `near_cache.max_ttl` and at the entry's remaining fresh time, and
    /// drops it on every gateway when the entry is written or invalidated. Zero (the default)
    /// keeps the entry out of the near-cache. Applies to Gets; truncated to whole milliseconds.
    pub fn near_cache(mut self, ttl: Duration) -> Self {
        self.near_cache = ttl;
        self
    }

    /// Promises that this decision holds for `period` from the request's time, for any request
    /// that differs from this one only in its time (and, if `decide` read it, not in its value
    /// size): the gateway may reuse the decision that long instead of asking the policy again,
    /// although `decide` read the clock ([`Request::now`]) or the value size
    /// ([`Request::value_size`]). Truncated to whole milliseconds.
    ///
    /// Zero (the default) promises nothing: a decision that read the clock or the value size is
    /// then never reused. A decision that read neither is reused for identical requests as long
    /// as its binding lasts; a promise bounds that too. Promise no more than holds: a decision
    /// that changes at 18:00 promises at most the time left until 18:00.
    ///
    /// ```
    /// use std::time::Duration;
    /// use cachegw_policy::{Decision, Request};
    ///
    /// /// Fresh for 5 minutes until a quarter past the hour, then for a minute.
    /// fn decide(req: &Request) -> Decision {
    ///     let into_hour_ms = req.now_unix_ms() % 3_600_000;
    ///     let (ttl, until_change_ms) = if into_hour_ms < 900_000 {
    ///         (Duration::from_secs(300), 900_000 - into_hour_ms)
    ///     } else {
    ///         (Duration::from_secs(60), 3_600_000 - into_hour_ms)
    ///     };
    ///     Decision::cache(req.key())
    ///         .fresh_for(ttl)
    ///         .reusable_for(Duration::from_millis(until_change_ms))
    /// }
    /// # let req = cachegw_policy::testing::request(cachegw_policy::Operation::Set, "ns", "k")
    /// #     .now_unix_ms(3_600_000 * 10 + 840_000)
    /// #     .build();
    /// # assert_eq!(decide(&req).reuse_promise(), Duration::from_secs(60));
    /// ```
    pub fn reusable_for(mut self, period: Duration) -> Self {
        self.reusable_for = period;
        self
    }

    /// The storage key; empty for [`Decision::bypass`] (the SDK then sends the client's key).
    pub fn storage_key(&self) -> &str {
        &self.storage_key
    }

    /// The fresh TTL, if set; `None` means the namespace default.
    pub fn fresh_ttl(&self) -> Option<Duration> {
        self.fresh_ttl
    }

    /// The stale window.
    pub fn stale_window(&self) -> Duration {
        self.stale_window
    }

    /// The maximum TTL jitter.
    pub fn ttl_jitter(&self) -> Duration {
        self.ttl_jitter
    }

    /// Tags attached to the entry.
    pub fn tags(&self) -> &[String] {
        &self.tags
    }

    /// Whether the request skips the cache.
    pub fn is_bypass(&self) -> bool {
        self.bypass
    }

    /// The compression hint.
    pub fn compression_hint(&self) -> Compression {
        self.compression
    }

    /// Keys to invalidate after a write.
    pub fn invalidated_keys(&self) -> &[String] {
        &self.invalidate_keys
    }

    /// Patterns to invalidate after a write.
    pub fn invalidated_patterns(&self) -> &[String] {
        &self.invalidate_patterns
    }

    /// Tags to invalidate after a write.
    pub fn invalidated_tags(&self) -> &[String] {
        &self.invalidate_tags
    }

    /// The early-refresh beta (0: namespace default).
    pub fn refresh_beta(&self) -> f64 {
        self.early_refresh_beta
    }

    /// How long a gateway's near-cache may keep the entry (zero: not eligible).
    pub fn near_cache_ttl(&self) -> Duration {
        self.near_cache
    }

    /// How long the policy promised this decision holds ([`Decision::reusable_for`]; zero: no
    /// promise).
    pub fn reuse_promise(&self) -> Duration {
        self.reusable_for
    }

    /// The wire message for this decision, answering `req`, after the checks the host would
    /// otherwise fail it for: a non-empty storage key (a bypass takes the client's key), a fresh
    /// TTL of at least 1 ms when set, a finite non-negative beta, no empty key or pattern, every
    /// tag and invalidated tag 1 to [`MAX_TAG_BYTES`] bytes, and the attached tags within
    /// [`MAX_TAG_SECTION_BYTES`]. The host still validates (it also caps absurd TTLs and the
    /// number and size of items).
    ///
    /// Its `reuse` is always set: whether the clock and the value size were read through `req`
    /// (or a clone of it) so far, and the [`reusable_for`](Decision::reusable_for) promise.
    /// Call it after `decide` has run on `req`, as the SDK does.
    pub fn to_wire(&self, req: &Request) -> Result<proto::PolicyDecision, PolicyError> {
        self.clone().into_wire(req)
    }

    /// [`to_wire`](Self::to_wire), taking the decision: its strings move into the message
    /// instead of being copied (what the SDK's exports use).
    pub(crate) fn into_wire(self, req: &Request) -> Result<proto::PolicyDecision, PolicyError> {
        let storage_key = if self.storage_key.is_empty() && self.bypass {
            req.key().to_owned()
        } else {
            self.storage_key
        };
        if storage_key.is_empty() {
            return Err(PolicyError::new("decision has an empty storage key"));
        }
        let fresh_ttl_ms = self.fresh_ttl.map(ceil_millis);
        if fresh_ttl_ms == Some(0) {
            return Err(PolicyError::new(
                "decision has a zero fresh TTL; use Decision::bypass() not to cache",
            ));
        }
        if !self.early_refresh_beta.is_finite() || self.early_refresh_beta < 0.0 {
            return Err(PolicyError::new(format!(
                "decision has an invalid early-refresh beta {} (must be finite and >= 0)",
                self.early_refresh_beta
            )));
        }
        for (what, list) in [
            ("invalidated key", &self.invalidate_keys),
            ("invalidated pattern", &self.invalidate_patterns),
        ] {
            if list.iter().any(String::is_empty) {
                return Err(PolicyError::new(format!("decision has an empty {what}")));
            }
        }
        check_tag_sizes("tag", &self.tags)?;
        check_tag_sizes("invalidated tag", &self.invalidate_tags)?;
        check_tag_section(&self.tags)?;
        let has_invalidations = !(self.invalidate_keys.is_empty()
            && self.invalidate_patterns.is_empty()
            && self.invalidate_tags.is_empty());
        Ok(proto::PolicyDecision {
            storage_key,
            fresh_ttl_ms,
            stale_window_ms: floor_millis(self.stale_window),
            ttl_jitter_ms: floor_millis(self.ttl_jitter),
            tags: self.tags,
            bypass: self.bypass,
            compression: self.compression.to_wire() as i32,
            invalidate: has_invalidations.then_some(proto::Invalidation {
                keys: self.invalidate_keys,
                patterns: self.invalidate_patterns,
                tags: self.invalidate_tags,
            }),
            early_refresh_beta: self.early_refresh_beta,
            near_cache_ttl_ms: floor_millis(self.near_cache),
            reuse: Some(proto::Reuse {
                read_clock: req.clock_was_read(),
                read_value_size: req.value_size_was_read(),
                // Truncated: a promise is never stretched.
                reusable_for_ms: floor_millis(self.reusable_for),
            }),
        })
    }
}

/// Rejects a tag in `tags` that is empty or longer than [`MAX_TAG_BYTES`]; `what` names the
/// field in the error.
fn check_tag_sizes(what: &str, tags: &[String]) -> Result<(), PolicyError> {
    let Some(bad) = tags
        .iter()
        .find(|tag| tag.is_empty() || tag.len() > MAX_TAG_BYTES)
    else {
        return Ok(());
    };
    let problem = if bad.is_empty() {
        format!("an empty {what}")
    } else {
        format!("an oversized {what} of {} bytes", bad.len())
    };
    Err(PolicyError::new(format!(
        "decision has {problem} (tags are 1 to {MAX_TAG_BYTES} bytes)"
    )))
}

/// Rejects attached tags that would not fit the entry's tag section: each tag's length plus
/// its one-byte length prefix, over [`MAX_TAG_SECTION_BYTES`].
fn check_tag_section(tags: &[String]) -> Result<(), PolicyError> {
    let section_bytes = tags
        .iter()
        .fold(0usize, |sum, tag| sum.saturating_add(tag.len() + 1));
    if section_bytes > MAX_TAG_SECTION_BYTES {
        return Err(PolicyError::new(format!(
            "decision has tags taking {section_bytes} bytes (each tag's length + 1), over the \
             {MAX_TAG_SECTION_BYTES}-byte limit of an entry's tags"
        )));
    }
    Ok(())
}

/// Whole milliseconds, saturating. Without 128-bit arithmetic: on wasm32 `as_millis`'s `u128`,
/// and the overflow check of a `u64` multiplication, are software multiplications
/// (`__multi3`), 3% of a decision's instructions for the four fields a decision converts.
fn floor_millis(duration: Duration) -> u64 {
    const MAX_SECS: u64 = u64::MAX / 1_000;
    match duration.as_secs() {
        secs if secs > MAX_SECS => u64::MAX,
        secs => (secs * 1_000).saturating_add(u64::from(duration.subsec_millis())),
    }
}

fn ceil_millis(duration: Duration) -> u64 {
    let floor = floor_millis(duration);
    if duration.subsec_nanos().is_multiple_of(1_000_000) {
        floor
    } else {
        floor.saturating_add(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Operation;
    use crate::testing;

    fn req() -> Request<'static> {
        testing::request(Operation::Set, "ns", "client-key").build()
    }

    #[test]
    fn cache_defaults_leave_everything_to_the_namespace() {
        let wire = Decision::cache("k").to_wire(&req()).unwrap();
        assert_eq!(
            wire,
            proto::PolicyDecision {
                storage_key: "k".into(),
                fresh_ttl_ms: None,
                stale_window_ms: 0,
                ttl_jitter_ms: 0,
                tags: vec![],
                bypass: false,
                compression: proto::CompressionHint::Auto as i32,
                invalidate: None,
                early_refresh_beta: 0.0,
                near_cache_ttl_ms: 0,
                reuse: Some(proto::Reuse {
                    read_clock: false,
                    read_value_size: false,
                    reusable_for_ms: 0,
                }),
            }
        );
    }

    #[test]
    fn reuse_reports_the_reads_of_the_request_and_the_promise() {
        let wire = |decision: Decision, req: &Request| decision.to_wire(req).unwrap().reuse;
        let reuse = |read_clock, read_value_size, reusable_for_ms| {
            Some(proto::Reuse {
                read_clock,
                read_value_size,
                reusable_for_ms,
            })
        };
        let untouched = req();
        assert_eq!(
            wire(Decision::cache("k"), &untouched),
            reuse(false, false, 0)
        );
        let clock = req();
        clock.now();
        assert_eq!(wire(Decision::bypass(), &clock), reuse(true, false, 0));
        let size = req();
        size.value_size();
        let promised = Decision::cache("k").reusable_for(Duration::from_micros(2_999_999));
        assert_eq!(promised.reuse_promise(), Duration::from_micros(2_999_999));
        assert_eq!(wire(promised, &size), reuse(false, true, 2_999));
        assert_eq!(Decision::cache("k").reuse_promise(), Duration::ZERO);
        let five_minutes = Decision::cache("k").reusable_for(Duration::from_secs(5 * 60));
        assert_eq!(wire(five_minutes, &req()), reuse(false, false, 300_000));
    }

    #[test]
    fn builder_fills_every_field() {
        let decision = Decision::cache("k")
            .fresh_for(Duration::from_secs(60))
            .stale_for(Duration::from_millis(1_500))
            .jitter(Duration::from_secs(2))
            .tag("a")
            .with_tags(["b", "c"])
            .invalidate_key("k2")
            .invalidate_pattern("p:*")
            .invalidate_tag("t")
            .compression(Compression::Never)
            .early_refresh_beta(1.0);
        assert_eq!(decision.storage_key(), "k");
        assert_eq!(decision.stale_window(), Duration::from_millis(1_500));
        assert_eq!(decision.ttl_jitter(), Duration::from_secs(2));
        assert_eq!(decision.tags(), ["a", "b", "c"]);
        assert_eq!(decision.invalidated_keys(), ["k2"]);
        assert_eq!(decision.invalidated_patterns(), ["p:*"]);
        assert_eq!(decision.invalidated_tags(), ["t"]);
        assert_eq!(decision.compression_hint(), Compression::Never);
        assert_eq!(decision.refresh_beta(), 1.0);
        let wire = decision.to_wire(&req()).unwrap();
        assert_eq!(wire.fresh_ttl_ms, Some(60_000));
        assert_eq!(wire.stale_window_ms, 1_500);
        assert_eq!(wire.ttl_jitter_ms, 2_000);
        assert_eq!(wire.compression, proto::CompressionHint::Never as i32);
        assert_eq!(
            wire.invalidate,
            Some(proto::Invalidation {
                keys: vec!["k2".into()],
                patterns: vec!["p:*".into()],
                tags: vec!["t".into()],
            })
        );
        assert_eq!(wire.early_refresh_beta, 1.0);
    }

    #[test]
    fn bypass_sends_the_client_key_and_keeps_invalidations() {
        let decision = Decision::bypass().invalidate_pattern("x:*");
        assert!(decision.is_bypass());
        assert_eq!(decision.storage_key(), "");
        let wire = decision.to_wire(&req()).unwrap();
        assert!(wire.bypass);
        assert_eq!(wire.storage_key, "client-key");
        assert_eq!(wire.invalidate.unwrap().patterns, ["x:*"]);
    }

    #[test]
    fn near_cache_is_opt_in_and_sent_in_milliseconds() {
        assert_eq!(Decision::cache("k").near_cache_ttl(), Duration::ZERO);
        let decision = Decision::cache("k").near_cache(Duration::from_micros(2_500_900));
        assert_eq!(decision.near_cache_ttl(), Duration::from_micros(2_500_900));
        assert_eq!(decision.to_wire(&req()).unwrap().near_cache_ttl_ms, 2_500);
        let wire = Decision::cache("k").to_wire(&req()).unwrap();
        assert_eq!(wire.near_cache_ttl_ms, 0, "not eligible unless asked for");
    }

    #[test]
    fn milliseconds_are_those_of_as_millis_saturated() {
        let max_secs = u64::MAX / 1_000;
        for duration in [
            Duration::ZERO,
            Duration::from_nanos(999_999),
            Duration::from_nanos(1_999_999),
            Duration::from_millis(1_234),
            Duration::new(max_secs, 0),
            Duration::new(max_secs, 614_999_999),
            Duration::new(max_secs, 615_000_000),
            Duration::new(max_secs, 999_999_999),
            Duration::new(max_secs + 1, 0),
            Duration::MAX,
        ] {
            let expected = u64::try_from(duration.as_millis()).unwrap_or(u64::MAX);
            assert_eq!(floor_millis(duration), expected, "{duration:?}");
        }
    }

    #[test]
    fn ttls_round_to_milliseconds() {
        let wire = Decision::cache("k")
            .fresh_for(Duration::from_micros(1))
            .stale_for(Duration::from_micros(1_999))
            .to_wire(&req())
            .unwrap();
        assert_eq!(wire.fresh_ttl_ms, Some(1));
        assert_eq!(wire.stale_window_ms, 1);
        let wire = Decision::cache("k")
            .fresh_for(Duration::MAX)
            .to_wire(&req())
            .unwrap();
        assert_eq!(wire.fresh_ttl_ms, Some(u64::MAX));
    }

    #[test]
    fn rejects_what_the_host_would_reject() {
        let cases = [
            (Decision::cache(""), "empty storage key"),
            (
                Decision::cache("k").fresh_for(Duration::ZERO),
                "zero fresh TTL",
            ),
            (Decision::cache("k").early_refresh_beta(f64::NAN), "beta"),
            (Decision::cache("k").early_refresh_beta(-1.0), "beta"),
            (Decision::cache("k").tag(""), "empty tag"),
            (
                Decision::cache("k").invalidate_key(""),
                "empty invalidated key",
            ),
            (
                Decision::cache("k").invalidate_pattern(""),
                "empty invalidated pattern",
            ),
            (
                Decision::cache("k").invalidate_tag(""),
                "empty invalidated tag",
            ),
        ];
        for (decision, expected) in cases {
            let err = decision.to_wire(&req()).unwrap_err();
            assert!(err.message().contains(expected), "{err} vs {expected}");
        }
        let no_key = testing::request(Operation::Get, "ns", "").build();
        assert!(Decision::bypass().to_wire(&no_key).is_err());
    }

    #[test]
    fn invalidate_pattern_takes_a_glob() {
        let decision = Decision::bypass()
            .invalidate_pattern(
                Glob::new()
                    .literal("profile:")
                    .literal("7*")
                    .literal(":")
                    .any(),
            )
            .invalidate_pattern(Glob::exact("a?"));
        assert_eq!(decision.invalidated_patterns(), ["profile:7\\*:*", "a\\?"]);
        let wire = decision.to_wire(&req()).unwrap();
        assert_eq!(
            wire.invalidate.unwrap().patterns,
            ["profile:7\\*:*", "a\\?"]
        );
    }

    #[test]
    fn invalidate_prefix_escapes_the_prefix_and_adds_a_star() {
        let user_id = String::from("[4]*");
        let decision = Decision::cache("k")
            .invalidate_prefix(format!("profile:{user_id}:"))
            .invalidate_prefix("settings:42:")
            .invalidate_prefix(&user_id);
        assert_eq!(
            decision.invalidated_patterns(),
            ["profile:\\[4\\]\\*:*", "settings:42:*", "\\[4\\]\\**"]
        );
        assert_eq!(
            decision,
            Decision::cache("k")
                .invalidate_pattern(Glob::prefix("profile:[4]*:"))
                .invalidate_pattern(Glob::prefix("settings:42:"))
                .invalidate_pattern(Glob::prefix("[4]*"))
        );
        let pattern = &decision.invalidated_patterns()[0];
        assert!(crate::glob_match(pattern, "profile:[4]*:email"));
        assert!(!crate::glob_match(pattern, "profile:4x:email"));
    }

    /// A tag of exactly `len` bytes, multi-byte characters included.
    fn tag_of(len: usize) -> String {
        let mut tag = "é".repeat(len / 2);
        if len % 2 == 1 {
            tag.push('x');
        }
        assert_eq!(tag.len(), len);
        tag
    }

    #[test]
    fn tags_up_to_the_limit_are_sent() {
        let longest = tag_of(MAX_TAG_BYTES);
        let wire = Decision::cache("k")
            .tag(longest.clone())
            .tag("a")
            .invalidate_tag(longest.clone())
            .to_wire(&req())
            .unwrap();
        assert_eq!(wire.tags, [longest.as_str(), "a"]);
        assert_eq!(wire.invalidate.unwrap().tags, [longest]);
    }

    #[test]
    fn tags_outside_one_to_255_bytes_are_rejected() {
        let too_long = tag_of(MAX_TAG_BYTES + 1);
        let cases = [
            (
                Decision::cache("k").tag("a").tag(too_long.clone()),
                "decision has an oversized tag of 256 bytes (tags are 1 to 255 bytes)",
            ),
            (
                Decision::cache("k").invalidate_tag(too_long),
                "decision has an oversized invalidated tag of 256 bytes (tags are 1 to 255 bytes)",
            ),
            (
                Decision::cache("k").tag("a").tag(""),
                "decision has an empty tag (tags are 1 to 255 bytes)",
            ),
            (
                Decision::bypass().invalidate_tag(""),
                "decision has an empty invalidated tag (tags are 1 to 255 bytes)",
            ),
        ];
        for (decision, expected) in cases {
            let err = decision.to_wire(&req()).unwrap_err();
            assert_eq!(err.message(), expected);
        }
    }

    #[test]
    fn the_tag_section_is_limited() {
        // 255 tags of 255 bytes and one of 254: (255 + 1) * 255 + (254 + 1) = 65535 bytes.
        let full: Vec<String> = (0..255).map(|_| tag_of(MAX_TAG_BYTES)).collect();
        let fits = Decision::cache("k")
            .with_tags(full.clone())
            .tag(tag_of(254));
        assert_eq!(fits.to_wire(&req()).unwrap().tags.len(), 256);
        // One byte more.
        let over = Decision::cache("k")
            .with_tags(full.clone())
            .tag(tag_of(255));
        let err = over.to_wire(&req()).unwrap_err();
        assert_eq!(
            err.message(),
            "decision has tags taking 65536 bytes (each tag's length + 1), over the \
             65535-byte limit of an entry's tags"
        );
        // The length bytes count: 32768 one-byte tags take 65536 bytes.
        let short = Decision::cache("k").with_tags(vec!["t"; 32_768]);
        assert!(
            short
                .to_wire(&req())
                .unwrap_err()
                .message()
                .contains("65536 bytes")
        );
        assert!(
            Decision::cache("k")
                .with_tags(vec!["t"; 32_767])
                .to_wire(&req())
                .is_ok()
        );
        // Invalidated tags are not stored in the entry and do not count.
        let invalidating = full
            .iter()
            .chain(&full)
            .fold(Decision::bypass(), |d, t| d.invalidate_tag(t.clone()));
        assert!(invalidating.to_wire(&req()).is_ok());
    }
}
