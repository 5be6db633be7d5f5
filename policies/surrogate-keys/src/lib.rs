//! `surrogate-keys`: tags (surrogate keys) chosen by the client, the way CDNs take a
//! `Surrogate-Key` header. One write of a product page can carry `product:42 category:7`, and
//! one purge of `category:7` later removes every entry that carried it, whatever its key.
//!
//! - Set: the `surrogate-key` attribute holds space-separated tags; each is attached to the
//!   entry (the gateway scopes tags to the namespace, so they never reach another one).
//! - Set or Delete: the `purge` attribute holds space-separated tags to invalidate once the
//!   write succeeded (write-through invalidation).
//! - Every entry is fresh for `ttl` (default: the namespace's) and then servable as stale for
//!   `stale` (default 0).
//! - With `near`, Gets let a gateway's near-cache (L1) keep the entry for that long: hot pages
//!   are then served from the gateway's memory, and a purge still reaches every gateway (the
//!   gateway caps it at its `near_cache.max_ttl`). Without it, every Get reads Redis.
//!
//! Config (JSON; every field optional): `{"ttl": "5m", "stale": "1m", "near": "2s"}`.

#![forbid(unsafe_code)]

use std::time::Duration;

use cachegw_policy::{Decision, Operation, Policy, PolicyError, Request, config, duration};
use serde::Deserialize;

/// Attribute listing the tags to attach on Set.
pub const SURROGATE_KEY_ATTR: &str = "surrogate-key";
/// Attribute listing the tags to invalidate after a Set or Delete.
pub const PURGE_ATTR: &str = "purge";

/// The policy.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SurrogateKeys {
    /// Fresh TTL (`None`: the namespace default).
    #[serde(default, deserialize_with = "duration::deserialize_option")]
    ttl: Option<Duration>,
    /// Stale window after the fresh TTL.
    #[serde(default, deserialize_with = "duration::deserialize")]
    stale: Duration,
    /// How long a gateway's near-cache may keep an entry after a Get (zero: not at all).
    #[serde(default, deserialize_with = "duration::deserialize")]
    near: Duration,
}

/// The space-separated words of attribute `name`.
fn words<'a>(req: &'a Request, name: &str) -> impl Iterator<Item = &'a str> {
    req.attr(name).unwrap_or_default().split_ascii_whitespace()
}

impl Policy for SurrogateKeys {
    fn from_config(config: &[u8]) -> Result<Self, PolicyError> {
        let policy: Self = config::from_json(config)?;
        if policy.ttl.is_some_and(|ttl| ttl.is_zero()) {
            return Err(PolicyError::new("`ttl` must be positive"));
        }
        Ok(policy)
    }

    fn decide(&self, req: &Request) -> Result<Decision, PolicyError> {
        let mut decision = Decision::cache(req.key()).stale_for(self.stale);
        if let Some(ttl) = self.ttl {
            decision = decision.fresh_for(ttl);
        }
        if req.op() == Operation::Set {
            decision = decision.with_tags(words(req, SURROGATE_KEY_ATTR));
        }
        if req.op() == Operation::Get {
            decision = decision.near_cache(self.near);
        }
        if req.op() != Operation::Get {
            for tag in words(req, PURGE_ATTR) {
                decision = decision.invalidate_tag(tag);
            }
        }
        Ok(decision)
    }
}

cachegw_policy::export_policy!(SurrogateKeys);

#[cfg(test)]
mod tests {
    use super::*;
    use cachegw_policy::testing;

    #[test]
    fn sets_carry_the_client_tags_and_purge_after_writing() {
        let decision = testing::request(Operation::Set, "catalog", "page:/p/42")
            .attr(SURROGATE_KEY_ATTR, " product:42  category:7 ")
            .attr(PURGE_ATTR, "search:shoes")
            .decide::<SurrogateKeys>()
            .unwrap();
        assert_eq!(decision.storage_key(), "page:/p/42");
        assert_eq!(decision.tags(), ["product:42", "category:7"]);
        assert_eq!(decision.invalidated_tags(), ["search:shoes"]);
        assert_eq!(decision.fresh_ttl(), None, "namespace default");
    }

    #[test]
    fn gets_are_near_cached_only_when_configured() {
        let get = || testing::request(Operation::Get, "catalog", "page:/p/42");
        let decision = get().decide::<SurrogateKeys>().unwrap();
        assert_eq!(decision.near_cache_ttl(), Duration::ZERO);
        let decision = get()
            .config_json(r#"{"near": "2s"}"#)
            .decide::<SurrogateKeys>()
            .unwrap();
        assert_eq!(decision.near_cache_ttl(), Duration::from_secs(2));
    }

    #[test]
    fn reads_neither_tag_nor_purge() {
        let decision = testing::request(Operation::Get, "catalog", "page:/p/42")
            .attr(SURROGATE_KEY_ATTR, "product:42")
            .attr(PURGE_ATTR, "product:42")
            .decide::<SurrogateKeys>()
            .unwrap();
        assert!(decision.tags().is_empty());
        assert!(decision.invalidated_tags().is_empty());
    }

    #[test]
    fn deletes_purge_and_config_sets_the_times() {
        let policy = br#"{"ttl": "2m", "stale": "30s"}"#;
        let decision = testing::request(Operation::Delete, "catalog", "page:/p/42")
            .attr(PURGE_ATTR, "category:7")
            .config(policy)
            .decide::<SurrogateKeys>()
            .unwrap();
        assert_eq!(decision.invalidated_tags(), ["category:7"]);
        assert_eq!(decision.fresh_ttl(), Some(Duration::from_secs(120)));
        assert_eq!(decision.stale_window(), Duration::from_secs(30));
        assert!(SurrogateKeys::from_config(br#"{"ttl": "0s"}"#).is_err());
        assert!(SurrogateKeys::from_config(br#"{"tll": "1m"}"#).is_err());
    }

    #[test]
    fn decisions_read_neither_the_clock_nor_the_value_size() {
        // So the gateway reuses every decision for identical requests while the binding lasts.
        for op in [Operation::Get, Operation::Set, Operation::Delete] {
            for key in ["page:/p/42", "search:shoes"] {
                let reuse = testing::request(op, "catalog", key)
                    .attr("field", "email")
                    .attr("accept-language", "de")
                    .value_size(2_048)
                    .config_json(r#"{"ttl":"10m","stale":"1m","near":"2s"}"#)
                    .round_trip::<SurrogateKeys>()
                    .reuse();
                assert!(
                    !reuse.read_clock && !reuse.read_value_size,
                    "{op:?} {key}: {reuse:?}"
                );
                assert_eq!(reuse.reusable_for_ms, 0);
            }
        }
    }
}
