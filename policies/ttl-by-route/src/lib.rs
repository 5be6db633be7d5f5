//! `ttl-by-route`: different data needs different expiration. Each key gets the fresh TTL of the
//! first rule that matches it (a key prefix or a glob), else the configured default, else the
//! namespace's default TTL.
//!
//! Config (JSON; every field optional):
//! ```json
//! {
//!   "rules": [
//!     {"prefix": "leaderboard:", "ttl": "60s"},
//!     {"glob": "ref:countr[iy]*", "ttl": "24h", "stale": "1h", "jitter": "5m"}
//!   ],
//!   "default_ttl": "5m"
//! }
//! ```
//! Without `rules` the built-in rules apply: `leaderboard*` 60 s, `country[-_]codes*` and
//! `ref:*` 24 h. Without `default_ttl`, unmatched keys keep the namespace default.

#![forbid(unsafe_code)]

use std::time::Duration;

use cachegw_policy::{Decision, GlobMatcher, Policy, PolicyError, Request, config, duration};
use serde::Deserialize;

/// The policy: ordered rules and an optional default.
#[derive(Debug, Clone, PartialEq)]
pub struct TtlByRoute {
    rules: Vec<Rule>,
    default_ttl: Option<Duration>,
}

#[derive(Debug, Clone, PartialEq)]
struct Rule {
    matcher: Matcher,
    ttl: Duration,
    stale: Duration,
    jitter: Duration,
}

#[derive(Debug, Clone, PartialEq)]
enum Matcher {
    Prefix(String),
    /// Parsed once, from the config: a decision matches without parsing the pattern again.
    Glob(GlobMatcher),
}

impl Matcher {
    fn matches(&self, key: &str) -> bool {
        match self {
            Matcher::Prefix(prefix) => key.starts_with(prefix.as_str()),
            Matcher::Glob(glob) => glob.is_match(key),
        }
    }
}

impl Rule {
    fn new(matcher: Matcher, ttl: Duration) -> Self {
        Self {
            matcher,
            ttl,
            stale: Duration::ZERO,
            jitter: Duration::ZERO,
        }
    }
}

impl Default for TtlByRoute {
    /// The tutorial's TTL strategy: leaderboards change often (60 s), reference data such as
    /// country codes rarely (24 h).
    fn default() -> Self {
        let glob = |pattern: &str| Matcher::Glob(GlobMatcher::new(pattern));
        Self {
            rules: vec![
                Rule::new(glob("leaderboard*"), Duration::from_secs(60)),
                Rule::new(glob("country[-_]codes*"), Duration::from_secs(86_400)),
                Rule::new(
                    Matcher::Prefix("ref:".to_owned()),
                    Duration::from_secs(86_400),
                ),
            ],
            default_ttl: None,
        }
    }
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    rules: Option<Vec<RuleConfig>>,
    #[serde(default, deserialize_with = "duration::deserialize_option")]
    default_ttl: Option<Duration>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleConfig {
    prefix: Option<String>,
    glob: Option<String>,
    #[serde(deserialize_with = "duration::deserialize")]
    ttl: Duration,
    #[serde(default, deserialize_with = "duration::deserialize_option")]
    stale: Option<Duration>,
    #[serde(default, deserialize_with = "duration::deserialize_option")]
    jitter: Option<Duration>,
}

impl RuleConfig {
    fn into_rule(self) -> Result<Rule, PolicyError> {
        let matcher = match (self.prefix, self.glob) {
            (Some(prefix), None) => Matcher::Prefix(prefix),
            (None, Some(glob)) => Matcher::Glob(GlobMatcher::new(&glob)),
            _ => return Err(PolicyError::new("give exactly one of `prefix` and `glob`")),
        };
        if self.ttl.is_zero() {
            return Err(PolicyError::new("`ttl` must be positive"));
        }
        Ok(Rule {
            matcher,
            ttl: self.ttl,
            stale: self.stale.unwrap_or_default(),
            jitter: self.jitter.unwrap_or_default(),
        })
    }
}

impl Policy for TtlByRoute {
    fn from_config(config: &[u8]) -> Result<Self, PolicyError> {
        let config: Config = config::from_json(config)?;
        if config.default_ttl.is_some_and(|ttl| ttl.is_zero()) {
            return Err(PolicyError::new("`default_ttl` must be positive"));
        }
        let rules = match config.rules {
            None => Self::default().rules,
            Some(rules) => rules
                .into_iter()
                .enumerate()
                .map(|(i, rule)| {
                    rule.into_rule()
                        .map_err(|err| err.context(format!("rules[{i}]")))
                })
                .collect::<Result<_, _>>()?,
        };
        Ok(Self {
            rules,
            default_ttl: config.default_ttl,
        })
    }

    fn decide(&self, req: &Request) -> Result<Decision, PolicyError> {
        let decision = Decision::cache(req.key());
        if let Some(rule) = self
            .rules
            .iter()
            .find(|rule| rule.matcher.matches(req.key()))
        {
            return Ok(decision
                .fresh_for(rule.ttl)
                .stale_for(rule.stale)
                .jitter(rule.jitter));
        }
        Ok(match self.default_ttl {
            Some(ttl) => decision.fresh_for(ttl),
            None => decision,
        })
    }
}

cachegw_policy::export_policy!(TtlByRoute);

#[cfg(test)]
mod tests {
    use super::*;
    use cachegw_policy::Operation;
    use cachegw_policy::testing::{self, Outcome};

    const HOUR: u64 = 3_600;

    fn ttl(key: &str, config: &str) -> Option<Duration> {
        testing::request(Operation::Get, "ns", key)
            .config(config)
            .decide::<TtlByRoute>()
            .unwrap()
            .fresh_ttl()
    }

    #[test]
    fn built_in_rules_follow_the_tutorial() {
        assert_eq!(ttl("leaderboard:today", ""), Some(Duration::from_secs(60)));
        assert_eq!(ttl("leaderboard", ""), Some(Duration::from_secs(60)));
        assert_eq!(
            ttl("country_codes", ""),
            Some(Duration::from_secs(24 * HOUR))
        );
        assert_eq!(
            ttl("country-codes:eu", ""),
            Some(Duration::from_secs(24 * HOUR))
        );
        assert_eq!(
            ttl("ref:currencies", ""),
            Some(Duration::from_secs(24 * HOUR))
        );
        assert_eq!(
            ttl("profile:42", ""),
            None,
            "unmatched keys keep the namespace default"
        );
    }

    #[test]
    fn configured_rules_replace_the_built_ins_and_the_first_match_wins() {
        let config = r#"{"rules":[{"prefix":"leaderboard:","ttl":"60s"},
                                  {"prefix":"ref:countries","ttl":"24h"},
                                  {"glob":"ref:*","ttl":"1h"}],
                        "default_ttl":"5m"}"#;
        assert_eq!(
            ttl("leaderboard:today", config),
            Some(Duration::from_secs(60))
        );
        assert_eq!(
            ttl("ref:countries", config),
            Some(Duration::from_secs(24 * HOUR))
        );
        assert_eq!(
            ttl("ref:currencies", config),
            Some(Duration::from_secs(HOUR))
        );
        assert_eq!(
            ttl("country_codes", config),
            Some(Duration::from_secs(300)),
            "built-ins are replaced"
        );
        assert_eq!(ttl("anything", config), Some(Duration::from_secs(300)));
    }

    #[test]
    fn default_ttl_alone_keeps_the_built_in_rules() {
        let config = r#"{"default_ttl":"10m"}"#;
        assert_eq!(ttl("leaderboard:x", config), Some(Duration::from_secs(60)));
        assert_eq!(ttl("other", config), Some(Duration::from_secs(600)));
        assert_eq!(ttl("other", r#"{"rules":[]}"#), None);
    }

    #[test]
    fn rules_may_set_stale_window_and_jitter() {
        let decision = testing::request(Operation::Set, "ns", "ref:x")
            .config_json(r#"{"rules":[{"prefix":"ref:","ttl":"24h","stale":"1h","jitter":"5m"}]}"#)
            .decide::<TtlByRoute>()
            .unwrap();
        assert_eq!(decision.storage_key(), "ref:x");
        assert_eq!(decision.stale_window(), Duration::from_secs(HOUR));
        assert_eq!(decision.ttl_jitter(), Duration::from_secs(300));
    }

    #[test]
    fn keeps_the_client_key_for_every_operation() {
        for op in [Operation::Get, Operation::Set, Operation::Delete] {
            let decision = testing::request(op, "ns", "Leaderboard:Today")
                .decide::<TtlByRoute>()
                .unwrap();
            assert_eq!(decision.storage_key(), "Leaderboard:Today");
            assert!(!decision.is_bypass());
        }
    }

    #[test]
    fn rejects_bad_configs_at_init() {
        let cases = [
            (r#"{"rules":[{"prefix":"a","ttl":"60"}]}"#, "missing unit"),
            (
                r#"{"rules":[{"prefix":"a","glob":"b","ttl":"1s"}]}"#,
                "rules[0]: give exactly one",
            ),
            (r#"{"rules":[{"ttl":"1s"}]}"#, "rules[0]: give exactly one"),
            (
                r#"{"rules":[{"prefix":"a","ttl":"0s"}]}"#,
                "`ttl` must be positive",
            ),
            (r#"{"default_ttl":"0ms"}"#, "`default_ttl` must be positive"),
            (r#"{"rulez":[]}"#, "unknown field `rulez`"),
            (
                r#"{"rules":[{"prefix":"a","ttl":"1s","tll":"2s"}]}"#,
                "unknown field `tll`",
            ),
            ("not json", "invalid JSON config"),
        ];
        for (config, expected) in cases {
            let err = testing::init::<TtlByRoute>(config.as_bytes()).unwrap_err();
            assert!(err.contains(expected), "{config}: {err}");
        }
        assert_eq!(testing::init::<TtlByRoute>(b""), Ok(()));
    }

    #[test]
    fn round_trips_through_the_wasm_glue() {
        let wire = testing::request(Operation::Get, "ns", "leaderboard:today")
            .round_trip::<TtlByRoute>()
            .decision();
        assert_eq!(wire.storage_key, "leaderboard:today");
        assert_eq!(wire.fresh_ttl_ms, Some(60_000));
        let declined = testing::request(Operation::Get, "ns", "k")
            .config(r#"{"default_ttl":"soon"}"#)
            .round_trip::<TtlByRoute>();
        assert!(
            matches!(declined, Outcome::Declined(ref e) if e.contains("config rejected")),
            "{declined:?}"
        );
    }

    #[test]
    fn decisions_read_neither_the_clock_nor_the_value_size() {
        // So the gateway reuses every decision for identical requests while the binding lasts.
        for op in [Operation::Get, Operation::Set, Operation::Delete] {
            for key in ["leaderboard:today", "ref:countries", "other"] {
                let reuse = testing::request(op, "api", key)
                    .attr("field", "email")
                    .attr("accept-language", "de")
                    .value_size(2_048)
                    .config_json(
                        r#"{"rules":[{"prefix":"leaderboard:","ttl":"60s"}],"default_ttl":"5m"}"#,
                    )
                    .round_trip::<TtlByRoute>()
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
