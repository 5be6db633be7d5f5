//! `business-hours`: data changes while people work, so an entry written during business hours
//! is fresh for a short time, and one written outside them for longer.
//!
//! - A Set at a local time from `open` (included) to `close` (excluded) is fresh for `open_ttl`;
//!   any other Set for `closed_ttl`. With `open` after `close` the hours run over midnight
//!   (`"22:00"` to `"06:00"`). The storage key is the client's key.
//! - A Set reads the gateway's clock, so it promises ([`Decision::reusable_for`]) to hold until
//!   the next `open` or `close`, and no longer than the TTL it chose: a decision the gateway
//!   reuses never crosses a boundary.
//! - Gets and Deletes use only the storage key, not the TTL, so they do not read the clock, and
//!   the gateway reuses them for as long as the binding lasts.
//!
//! Config (JSON; every field optional, the defaults shown except `utc_offset`, `"+00:00"`):
//! ```json
//! {"open": "08:00", "close": "18:00", "utc_offset": "+01:00", "open_ttl": "1m", "closed_ttl": "30m"}
//! ```
//! Times are `HH:MM`, 24-hour. The offset is fixed: a module has no time zone database, so a
//! daylight-saving change is a config change (rebind with the new offset). Every day is a
//! business day.

#![forbid(unsafe_code)]

use std::time::Duration;

use cachegw_policy::{Decision, Operation, Policy, PolicyError, Request, config, duration};
use serde::Deserialize;

const MINUTE_MS: u64 = 60_000;
const HOUR_MS: u64 = 60 * MINUTE_MS;
const DAY_MS: u64 = 24 * HOUR_MS;
/// The widest offset in use (UTC+14, Line Islands; the farthest west is UTC-12).
const MAX_OFFSET_MS: u64 = 14 * HOUR_MS;

/// The policy.
#[derive(Debug, Clone, PartialEq)]
pub struct BusinessHours {
    /// Opening time, milliseconds after local midnight.
    open_ms: u64,
    /// Closing time, milliseconds after local midnight; never equal to `open_ms`.
    close_ms: u64,
    /// Local time minus UTC.
    utc_offset_ms: i64,
    /// Fresh TTL of entries written during business hours.
    open_ttl: Duration,
    /// Fresh TTL of entries written outside them.
    closed_ttl: Duration,
}

impl Default for BusinessHours {
    /// 08:00 to 18:00 UTC: a minute during business hours, half an hour outside them.
    fn default() -> Self {
        Self {
            open_ms: 8 * HOUR_MS,
            close_ms: 18 * HOUR_MS,
            utc_offset_ms: 0,
            open_ttl: Duration::from_secs(60),
            closed_ttl: Duration::from_secs(30 * 60),
        }
    }
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    open: Option<String>,
    close: Option<String>,
    utc_offset: Option<String>,
    #[serde(default, deserialize_with = "duration::deserialize_option")]
    open_ttl: Option<Duration>,
    #[serde(default, deserialize_with = "duration::deserialize_option")]
    closed_ttl: Option<Duration>,
}

impl Policy for BusinessHours {
    fn from_config(config: &[u8]) -> Result<Self, PolicyError> {
        let config: Config = config::from_json(config)?;
        let defaults = Self::default();
        let time = |field: &str, text: Option<String>, default: u64| match text {
            Some(text) => parse_time_of_day(&text).map_err(|err| err.context(format!("`{field}`"))),
            None => Ok(default),
        };
        let ttl = |field: &str, ttl: Option<Duration>, default: Duration| match ttl {
            Some(ttl) if ttl.is_zero() => {
                Err(PolicyError::new(format!("`{field}` must be positive")))
            }
            ttl => Ok(ttl.unwrap_or(default)),
        };
        let policy = Self {
            open_ms: time("open", config.open, defaults.open_ms)?,
            close_ms: time("close", config.close, defaults.close_ms)?,
            utc_offset_ms: match config.utc_offset {
                Some(text) => parse_utc_offset(&text).map_err(|err| err.context("`utc_offset`"))?,
                None => defaults.utc_offset_ms,
            },
            open_ttl: ttl("open_ttl", config.open_ttl, defaults.open_ttl)?,
            closed_ttl: ttl("closed_ttl", config.closed_ttl, defaults.closed_ttl)?,
        };
        if policy.open_ms == policy.close_ms {
            return Err(PolicyError::new(
                "`open` and `close` are the same time; business hours need both ends",
            ));
        }
        Ok(policy)
    }

    fn decide(&self, req: &Request) -> Result<Decision, PolicyError> {
        let decision = Decision::cache(req.key());
        if req.op() != Operation::Set {
            return Ok(decision);
        }
        let (is_open, until_boundary) = self.hours_at(req.now_unix_ms());
        let ttl = if is_open {
            self.open_ttl
        } else {
            self.closed_ttl
        };
        Ok(decision
            .fresh_for(ttl)
            .reusable_for(until_boundary.min(ttl)))
    }
}

impl BusinessHours {
    /// Whether `now_unix_ms` falls in business hours, and how long until the next `open` or
    /// `close` (more than zero, less than a day).
    fn hours_at(&self, now_unix_ms: u64) -> (bool, Duration) {
        let local_ms = i128::from(now_unix_ms) + i128::from(self.utc_offset_ms);
        let time_of_day = local_ms.rem_euclid(i128::from(DAY_MS)) as u64;
        let is_open = if self.open_ms < self.close_ms {
            (self.open_ms..self.close_ms).contains(&time_of_day)
        } else {
            time_of_day >= self.open_ms || time_of_day < self.close_ms
        };
        let next = if is_open { self.close_ms } else { self.open_ms };
        let until_ms = (next + DAY_MS - time_of_day) % DAY_MS;
        (is_open, Duration::from_millis(until_ms))
    }
}

/// `HH:MM` (24-hour) as milliseconds after midnight.
fn parse_time_of_day(text: &str) -> Result<u64, PolicyError> {
    let invalid = || {
        PolicyError::new(format!(
            "{text:?} is not a time of day (HH:MM, 00:00 to 23:59)"
        ))
    };
    let (hours, minutes) = text.split_once(':').ok_or_else(invalid)?;
    let (hours, minutes) = (
        two_digits(hours).ok_or_else(invalid)?,
        two_digits(minutes).ok_or_else(invalid)?,
    );
    if hours > 23 || minutes > 59 {
        return Err(invalid());
    }
    Ok(hours * HOUR_MS + minutes * MINUTE_MS)
}

/// `+HH:MM` or `-HH:MM` as signed milliseconds, at most 14 hours either way.
fn parse_utc_offset(text: &str) -> Result<i64, PolicyError> {
    let invalid = || {
        PolicyError::new(format!(
            "{text:?} is not a UTC offset (+HH:MM or -HH:MM, up to 14:00)"
        ))
    };
    let (sign, magnitude) = match text.split_at_checked(1) {
        Some(("+", rest)) => (1, rest),
        Some(("-", rest)) => (-1, rest),
        _ => return Err(invalid()),
    };
    let (hours, minutes) = magnitude.split_once(':').ok_or_else(invalid)?;
    let (hours, minutes) = (
        two_digits(hours).ok_or_else(invalid)?,
        two_digits(minutes).ok_or_else(invalid)?,
    );
    let offset_ms = hours * HOUR_MS + minutes * MINUTE_MS;
    if minutes > 59 || offset_ms > MAX_OFFSET_MS {
        return Err(invalid());
    }
    Ok(sign * offset_ms as i64)
}

/// Exactly two ASCII digits.
fn two_digits(text: &str) -> Option<u64> {
    (text.len() == 2 && text.bytes().all(|b| b.is_ascii_digit()))
        .then(|| text.parse().ok())
        .flatten()
}

cachegw_policy::export_policy!(BusinessHours);

#[cfg(test)]
mod tests {
    use super::*;
    use cachegw_policy::proto;
    use cachegw_policy::testing::{self, RequestBuilder};

    /// 2024-03-04T00:00:00Z.
    const MIDNIGHT_UTC_MS: u64 = 1_709_510_400_000;

    const CONFIG: &str = r#"{"open": "08:00", "close": "18:00", "utc_offset": "+01:00",
                             "open_ttl": "1m", "closed_ttl": "30m"}"#;

    /// Milliseconds since the epoch of `hh:mm:ss.mmm` local time at UTC+1 on 2024-03-04.
    fn local(hh: u64, mm: u64, ss: u64, ms: u64) -> u64 {
        MIDNIGHT_UTC_MS + hh * HOUR_MS + mm * MINUTE_MS + ss * 1_000 + ms - HOUR_MS
    }

    fn set_at(now_unix_ms: u64) -> RequestBuilder {
        testing::request(Operation::Set, "hours", "opening-times")
            .config_json(CONFIG)
            .now_unix_ms(now_unix_ms)
    }

    /// The fresh TTL and the reuse promise of a Set at `now_unix_ms`, through the wasm glue.
    fn ttl_and_reuse(now_unix_ms: u64) -> (Duration, Duration) {
        let wire = set_at(now_unix_ms).round_trip::<BusinessHours>().decision();
        let reuse = wire.reuse.expect("the SDK always sets reuse");
        assert!(reuse.read_clock && !reuse.read_value_size, "{reuse:?}");
        (
            Duration::from_millis(wire.fresh_ttl_ms.expect("a Set sets a fresh TTL")),
            Duration::from_millis(reuse.reusable_for_ms),
        )
    }

    const MINUTE: Duration = Duration::from_secs(60);
    const HALF_HOUR: Duration = Duration::from_secs(30 * 60);

    #[test]
    fn business_hours_are_fresh_for_a_minute_the_rest_for_half_an_hour() {
        assert_eq!(ttl_and_reuse(local(12, 0, 0, 0)).0, MINUTE);
        assert_eq!(ttl_and_reuse(local(8, 0, 0, 0)).0, MINUTE, "open at 08:00");
        assert_eq!(ttl_and_reuse(local(17, 59, 59, 999)).0, MINUTE);
        assert_eq!(
            ttl_and_reuse(local(18, 0, 0, 0)).0,
            HALF_HOUR,
            "closed at 18:00"
        );
        assert_eq!(ttl_and_reuse(local(23, 0, 0, 0)).0, HALF_HOUR);
        assert_eq!(ttl_and_reuse(local(3, 0, 0, 0)).0, HALF_HOUR);
    }

    #[test]
    fn reuse_ends_at_closing_time() {
        assert_eq!(
            ttl_and_reuse(local(17, 59, 30, 0)),
            (MINUTE, Duration::from_secs(30))
        );
        assert_eq!(
            ttl_and_reuse(local(17, 59, 59, 999)),
            (MINUTE, Duration::from_millis(1))
        );
        // Across the boundary: the closed TTL, reusable for all of it.
        assert_eq!(ttl_and_reuse(local(18, 0, 0, 0)), (HALF_HOUR, HALF_HOUR));
    }

    #[test]
    fn reuse_ends_at_opening_time() {
        assert_eq!(
            ttl_and_reuse(local(7, 45, 0, 0)),
            (HALF_HOUR, Duration::from_secs(15 * 60))
        );
        assert_eq!(ttl_and_reuse(local(8, 0, 0, 0)), (MINUTE, MINUTE));
    }

    #[test]
    fn reuse_is_capped_by_the_ttl() {
        assert_eq!(ttl_and_reuse(local(12, 0, 0, 0)), (MINUTE, MINUTE));
        assert_eq!(ttl_and_reuse(local(2, 0, 0, 0)), (HALF_HOUR, HALF_HOUR));
    }

    #[test]
    fn a_reused_decision_never_crosses_a_boundary() {
        // Every 7 s of a day: the last instant the decision may be reused at still decides the
        // same way, and no boundary lies in between.
        let policy = BusinessHours::from_config(CONFIG.as_bytes()).unwrap();
        for step in 0..(DAY_MS / 7_000) {
            let now = local(0, 0, 0, 0) + step * 7_000;
            let (ttl, reusable) = ttl_and_reuse(now);
            assert!(!reusable.is_zero() && reusable <= ttl, "at {now}");
            let last = now + reusable.as_millis() as u64 - 1;
            assert_eq!(ttl_and_reuse(last).0, ttl, "at {now}, reused until {last}");
            let (open_now, until_boundary) = policy.hours_at(now);
            assert!(reusable <= until_boundary, "at {now}");
            assert_eq!(policy.hours_at(last).0, open_now, "at {now}");
        }
    }

    #[test]
    fn gets_and_deletes_do_not_read_the_clock() {
        for op in [Operation::Get, Operation::Delete] {
            let wire = testing::request(op, "hours", "opening-times")
                .config_json(CONFIG)
                .now_unix_ms(local(17, 59, 30, 0))
                .round_trip::<BusinessHours>()
                .decision();
            assert_eq!(wire.storage_key, "opening-times");
            assert_eq!(wire.fresh_ttl_ms, None);
            assert_eq!(
                wire.reuse,
                Some(proto::Reuse {
                    read_clock: false,
                    read_value_size: false,
                    reusable_for_ms: 0,
                }),
                "{op:?}: reused as long as the binding lasts"
            );
        }
    }

    #[test]
    fn the_utc_offset_shifts_the_hours() {
        let at = |offset: &str, utc_hour: u64| {
            testing::request(Operation::Set, "hours", "k")
                .config_json(&format!(r#"{{"utc_offset": "{offset}"}}"#))
                .now_unix_ms(MIDNIGHT_UTC_MS + utc_hour * HOUR_MS)
                .decide::<BusinessHours>()
                .unwrap()
                .fresh_ttl()
        };
        assert_eq!(at("+00:00", 7), Some(HALF_HOUR));
        assert_eq!(at("+01:00", 7), Some(MINUTE), "08:00 local");
        assert_eq!(at("-05:00", 12), Some(HALF_HOUR), "07:00 local");
        assert_eq!(at("-05:00", 13), Some(MINUTE), "08:00 local");
        // 22:00 UTC is 08:00 the next day at UTC+10.
        assert_eq!(at("+10:00", 22), Some(MINUTE));
    }

    #[test]
    fn hours_may_run_over_midnight() {
        let night_shift = r#"{"open": "22:00", "close": "06:00", "open_ttl": "10s"}"#;
        let at = |hour: u64| {
            let wire = testing::request(Operation::Set, "hours", "k")
                .config_json(night_shift)
                .now_unix_ms(MIDNIGHT_UTC_MS + hour * HOUR_MS)
                .round_trip::<BusinessHours>()
                .decision();
            (wire.fresh_ttl_ms, wire.reuse.unwrap().reusable_for_ms)
        };
        assert_eq!(at(23), (Some(10_000), 10_000));
        assert_eq!(at(3), (Some(10_000), 10_000));
        assert_eq!(at(12), (Some(1_800_000), 1_800_000));
        // 21:00: closed, and the opening an hour away is further than the default closed TTL.
        assert_eq!(at(21), (Some(1_800_000), 1_800_000));
        let policy = BusinessHours::from_config(night_shift.as_bytes()).unwrap();
        assert_eq!(
            policy.hours_at(MIDNIGHT_UTC_MS + 21 * HOUR_MS + 45 * MINUTE_MS),
            (false, Duration::from_secs(15 * 60))
        );
        assert_eq!(
            policy.hours_at(MIDNIGHT_UTC_MS + 23 * HOUR_MS),
            (true, Duration::from_secs(7 * 3_600))
        );
    }

    #[test]
    fn without_config_the_hours_are_eight_to_six_utc() {
        assert_eq!(
            BusinessHours::from_config(b"").unwrap(),
            BusinessHours::default()
        );
        assert_eq!(testing::init::<BusinessHours>(b"{}"), Ok(()));
        assert_eq!(testing::init::<BusinessHours>(CONFIG.as_bytes()), Ok(()));
        let default = BusinessHours::default();
        assert_eq!(
            default.hours_at(MIDNIGHT_UTC_MS + 17 * HOUR_MS),
            (true, Duration::from_secs(3_600))
        );
    }

    #[test]
    fn bad_configs_are_rejected_naming_the_field() {
        let cases = [
            (
                r#"{"open": "8:00"}"#,
                "`open`: \"8:00\" is not a time of day",
            ),
            (
                r#"{"close": "24:00"}"#,
                "`close`: \"24:00\" is not a time of day",
            ),
            (
                r#"{"open": "08:60"}"#,
                "`open`: \"08:60\" is not a time of day",
            ),
            (
                r#"{"open": "08h00"}"#,
                "`open`: \"08h00\" is not a time of day",
            ),
            (
                r#"{"utc_offset": "01:00"}"#,
                "`utc_offset`: \"01:00\" is not a UTC offset",
            ),
            (
                r#"{"utc_offset": "+1"}"#,
                "`utc_offset`: \"+1\" is not a UTC offset",
            ),
            (
                r#"{"utc_offset": "+14:30"}"#,
                "`utc_offset`: \"+14:30\" is not a UTC offset",
            ),
            (
                r#"{"utc_offset": "-05:75"}"#,
                "`utc_offset`: \"-05:75\" is not a UTC offset",
            ),
            (r#"{"open": "09:00", "close": "09:00"}"#, "the same time"),
            (r#"{"open_ttl": "0s"}"#, "`open_ttl` must be positive"),
            (r#"{"closed_ttl": "0ms"}"#, "`closed_ttl` must be positive"),
            (r#"{"open_ttl": "soon"}"#, "invalid duration"),
            (r#"{"opens": "08:00"}"#, "unknown field `opens`"),
        ];
        for (config, expected) in cases {
            let err = testing::init::<BusinessHours>(config.as_bytes()).unwrap_err();
            assert!(err.contains(expected), "{config}: {err}");
        }
    }
}
