//! `user-profile`: the tutorial's user caching with pattern-based invalidation.
//!
//! Keys: `profile:{user_id}` (the whole profile), `profile:{user_id}:{field}` (one field, e.g.
//! `profile:42:email`) and `settings:{user_id}:{...}`. A user id is the text between the first
//! and second `:`, and must not be empty.
//!
//! - Every user key is cached under the client's key, fresh for `ttl` (default 5 minutes, the
//!   tutorial's 300 s), tagged `user:{user_id}` (see [`cachegw_policy::tag`]).
//! - An email change invalidates `profile:{user_id}:*` and `settings:{user_id}:*` (the user id
//!   glob-escaped, so an id like `*` cannot reach other users). An email change is a Set of
//!   `profile:{user_id}` whose `field` attribute lists `email` (comma-separated, any case),
//!   which is cached as usual; or a Set of `profile:{user_id}:email`, which is not cached,
//!   since the pattern it triggers would remove it right away.
//! - Any other key keeps the namespace defaults.
//!
//! Config: `{"ttl": "5m"}` (optional).

#![forbid(unsafe_code)]

use std::time::Duration;

use cachegw_policy::{
    Decision, Glob, Operation, Policy, PolicyError, Request, config, duration, tag,
};
use serde::Deserialize;

/// The policy.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserProfile {
    /// Fresh TTL of user entries.
    #[serde(default = "default_ttl", deserialize_with = "duration::deserialize")]
    ttl: Duration,
}

fn default_ttl() -> Duration {
    Duration::from_secs(300)
}

impl Default for UserProfile {
    fn default() -> Self {
        Self { ttl: default_ttl() }
    }
}

/// A key that belongs to one user.
#[derive(Debug, PartialEq)]
struct UserKey<'a> {
    kind: &'a str,
    user_id: &'a str,
    /// What follows `{kind}:{user_id}:`, if anything.
    field: Option<&'a str>,
}

impl<'a> UserKey<'a> {
    fn parse(key: &'a str) -> Option<Self> {
        let (kind, rest) = key.split_once(':')?;
        if kind != "profile" && kind != "settings" {
            return None;
        }
        let (user_id, field) = match rest.split_once(':') {
            Some((user_id, field)) => (user_id, Some(field)),
            None => (rest, None),
        };
        (!user_id.is_empty()).then_some(Self {
            kind,
            user_id,
            field,
        })
    }

    fn is_email_change(&self, req: &Request) -> bool {
        if req.op() != Operation::Set || self.kind != "profile" {
            return false;
        }
        match self.field {
            Some(field) => field == "email",
            None => req.attr("field").is_some_and(|fields| {
                fields
                    .split(',')
                    .any(|field| field.trim().eq_ignore_ascii_case("email"))
            }),
        }
    }
}

impl Policy for UserProfile {
    fn from_config(config: &[u8]) -> Result<Self, PolicyError> {
        let policy: Self = config::from_json(config)?;
        if policy.ttl.is_zero() {
            return Err(PolicyError::new("`ttl` must be positive"));
        }
        Ok(policy)
    }

    fn decide(&self, req: &Request) -> Result<Decision, PolicyError> {
        let Some(user_key) = UserKey::parse(req.key()) else {
            return Ok(Decision::cache(req.key()));
        };
        if !user_key.is_email_change(req) {
            return Ok(self.cache_for_user(req, &user_key));
        }
        let decision = if user_key.field.is_some() {
            Decision::bypass()
        } else {
            self.cache_for_user(req, &user_key)
        };
        Ok(decision
            .invalidate_pattern(user_entries("profile:", user_key.user_id))
            .invalidate_pattern(user_entries("settings:", user_key.user_id)))
    }
}

impl UserProfile {
    fn cache_for_user(&self, req: &Request, user_key: &UserKey<'_>) -> Decision {
        Decision::cache(req.key())
            .fresh_for(self.ttl)
            .tag(tag(["user", user_key.user_id]))
    }
}

/// Every key of one kind (`kind` with its `:`) under `user_id`: `{kind}{user_id}:*`, the user
/// id escaped so that an id like `*` cannot reach other users.
fn user_entries(kind: &str, user_id: &str) -> Glob {
    Glob::new()
        .literal(kind)
        .literal(user_id)
        .literal(":")
        .any()
}

cachegw_policy::export_policy!(UserProfile);

#[cfg(test)]
mod tests {
    use super::*;
    use cachegw_policy::{glob_match, testing};

    fn decide(op: Operation, key: &str) -> Decision {
        testing::request(op, "users", key)
            .decide::<UserProfile>()
            .unwrap()
    }

    #[test]
    fn parses_user_keys() {
        let key = UserKey::parse("profile:42:email").unwrap();
        assert_eq!(
            (key.kind, key.user_id, key.field),
            ("profile", "42", Some("email"))
        );
        let key = UserKey::parse("settings:7").unwrap();
        assert_eq!((key.kind, key.user_id, key.field), ("settings", "7", None));
        assert_eq!(UserKey::parse("profile:").map(|k| k.user_id), None);
        assert_eq!(UserKey::parse("profile::x").map(|k| k.user_id), None);
        assert!(UserKey::parse("orders:42").is_none());
        assert!(UserKey::parse("profile").is_none());
    }

    #[test]
    fn user_entries_are_tagged_and_live_five_minutes() {
        for key in ["profile:42", "profile:42:name", "settings:42:theme"] {
            let decision = decide(Operation::Get, key);
            assert_eq!(decision.storage_key(), key);
            assert_eq!(decision.fresh_ttl(), Some(Duration::from_secs(300)));
            assert_eq!(decision.tags(), ["user:42"]);
            assert!(decision.invalidated_patterns().is_empty());
        }
    }

    #[test]
    fn other_keys_keep_the_namespace_defaults() {
        let decision = decide(Operation::Set, "orders:42");
        assert_eq!(decision, Decision::cache("orders:42"));
    }

    #[test]
    fn setting_the_email_field_invalidates_the_users_entries() {
        let decision = decide(Operation::Set, "profile:42:email");
        assert!(
            decision.is_bypass(),
            "the written key would be removed by its own pattern"
        );
        assert_eq!(
            decision.invalidated_patterns(),
            ["profile:42:*", "settings:42:*"]
        );
    }

    #[test]
    fn a_profile_write_marked_as_email_change_is_cached_and_invalidates() {
        for field in ["email", "name, Email"] {
            let decision = testing::request(Operation::Set, "users", "profile:42")
                .attr("field", field)
                .decide::<UserProfile>()
                .unwrap();
            assert!(!decision.is_bypass());
            assert_eq!(decision.fresh_ttl(), Some(Duration::from_secs(300)));
            assert_eq!(decision.tags(), ["user:42"]);
            assert_eq!(
                decision.invalidated_patterns(),
                ["profile:42:*", "settings:42:*"]
            );
        }
    }

    #[test]
    fn the_patterns_reach_exactly_that_users_entries() {
        let decision = decide(Operation::Set, "profile:42:email");
        let reached = |key: &str| {
            decision
                .invalidated_patterns()
                .iter()
                .any(|p| glob_match(p, key))
        };
        for key in ["profile:42:email", "profile:42:name", "settings:42:theme"] {
            assert!(reached(key), "{key}");
        }
        for key in [
            "profile:42",
            "profile:420:name",
            "settings:4:x",
            "profile:4:2",
            "orders:42:x",
        ] {
            assert!(!reached(key), "{key}");
        }
    }

    #[test]
    fn hostile_user_ids_are_escaped() {
        let decision = decide(Operation::Set, "profile:*:email");
        assert_eq!(
            decision.invalidated_patterns(),
            ["profile:\\*:*", "settings:\\*:*"]
        );
        assert!(!glob_match(
            &decision.invalidated_patterns()[0],
            "profile:42:name"
        ));
        let decision = decide(Operation::Get, "profile:[a]");
        assert_eq!(decision.tags(), ["user:[a]"]);
    }

    #[test]
    fn only_email_writes_invalidate() {
        let not_changes = [
            testing::request(Operation::Get, "users", "profile:42:email"),
            testing::request(Operation::Delete, "users", "profile:42:email"),
            testing::request(Operation::Set, "users", "profile:42:name"),
            testing::request(Operation::Set, "users", "profile:42"),
            testing::request(Operation::Set, "users", "profile:42").attr("field", "emails"),
            testing::request(Operation::Set, "users", "settings:42:email"),
            testing::request(Operation::Get, "users", "profile:42").attr("field", "email"),
        ];
        for req in not_changes {
            let decision = req.decide::<UserProfile>().unwrap();
            assert!(decision.invalidated_patterns().is_empty(), "{req:?}");
            assert!(!decision.is_bypass(), "{req:?}");
        }
    }

    #[test]
    fn ttl_is_configurable() {
        let decision = testing::request(Operation::Get, "users", "profile:1")
            .config_json(r#"{"ttl":"30s"}"#)
            .decide::<UserProfile>()
            .unwrap();
        assert_eq!(decision.fresh_ttl(), Some(Duration::from_secs(30)));
        assert!(
            testing::init::<UserProfile>(br#"{"ttl":"0s"}"#)
                .unwrap_err()
                .contains("positive")
        );
        assert!(
            testing::init::<UserProfile>(br#"{"tll":"1s"}"#)
                .unwrap_err()
                .contains("unknown field")
        );
    }

    #[test]
    fn round_trips_through_the_wasm_glue() {
        let wire = testing::request(Operation::Set, "users", "profile:42:email")
            .round_trip::<UserProfile>()
            .decision();
        assert!(wire.bypass);
        assert_eq!(wire.storage_key, "profile:42:email");
        assert_eq!(
            wire.invalidate.unwrap().patterns,
            ["profile:42:*", "settings:42:*"]
        );
    }

    #[test]
    fn decisions_read_neither_the_clock_nor_the_value_size() {
        // So the gateway reuses every decision for identical requests while the binding lasts.
        for op in [Operation::Get, Operation::Set, Operation::Delete] {
            for key in ["profile:42", "profile:42:email", "settings:42:theme"] {
                let reuse = testing::request(op, "users", key)
                    .attr("field", "email")
                    .attr("accept-language", "de")
                    .value_size(2_048)
                    .round_trip::<UserProfile>()
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
