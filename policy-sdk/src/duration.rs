//! Human-written durations in configs: `"500ms"`, `"60s"`, `"5m"`, `"24h"`, `"7d"`, `"1h30m"`.

use std::fmt;
use std::time::Duration;

/// Why a duration string was rejected; the message quotes the input and says what is accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DurationParseError {
    input: String,
    reason: &'static str,
}

impl fmt::Display for DurationParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid duration {:?}: {} (expected e.g. \"500ms\", \"60s\", \"5m\", \"24h\", \"7d\" or \"1h30m\")",
            self.input, self.reason
        )
    }
}

impl std::error::Error for DurationParseError {}

/// Parses a duration written as one or more `<integer><unit>` parts, units `ms`, `s`, `m`, `h`
/// and `d` (lower case), parts adding up: `"1h30m"` is 90 minutes. Surrounding whitespace is
/// ignored. A bare number is rejected because its unit would be a guess.
///
/// ```
/// use std::time::Duration;
/// use cachegw_policy::parse_duration;
///
/// assert_eq!(parse_duration("60s"), Ok(Duration::from_secs(60)));
/// assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
/// assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
/// assert!(parse_duration("60").is_err());
/// ```
pub fn parse_duration(text: &str) -> Result<Duration, DurationParseError> {
    let error = |reason| DurationParseError {
        input: text.to_owned(),
        reason,
    };
    let mut rest = text.trim();
    if rest.is_empty() {
        return Err(error("empty"));
    }
    let mut total = Duration::ZERO;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(error("each part must start with a whole number"));
        }
        let (number, after) = rest.split_at(digits);
        let number: u64 = number.parse().map_err(|_| error("number too large"))?;
        let unit_len = after.bytes().take_while(u8::is_ascii_alphabetic).count();
        if unit_len == 0 {
            return Err(error("missing unit"));
        }
        let (unit, after) = after.split_at(unit_len);
        let part = match unit {
            "ms" => Some(Duration::from_millis(number)),
            "s" => Some(Duration::from_secs(number)),
            "m" => number.checked_mul(60).map(Duration::from_secs),
            "h" => number.checked_mul(3_600).map(Duration::from_secs),
            "d" => number.checked_mul(86_400).map(Duration::from_secs),
            _ => return Err(error("unknown unit")),
        };
        total = part
            .and_then(|part| total.checked_add(part))
            .ok_or_else(|| error("too large"))?;
        rest = after;
    }
    Ok(total)
}

/// Serde helpers so config structs can hold [`Duration`]s written as strings:
/// `#[serde(deserialize_with = "cachegw_policy::duration::deserialize")]`, or
/// `deserialize_option` (with `#[serde(default)]`) for an optional one.
#[cfg(feature = "json")]
mod serde_support {
    use super::parse_duration;
    use serde::Deserialize;
    use std::time::Duration;

    /// Deserializes a duration string such as `"60s"` (see [`parse_duration`]).
    pub fn deserialize<'de, D>(deserializer: D) -> Result<Duration, D::Error>
    where
        D: serde::Deserializer<'de>,
    {
        let text = String::deserialize(deserializer)?;
        parse_duration(&text).map_err(serde::de::Error::custom)
    }

    /// Deserializes an optional duration string; `null` is `None`.
    pub fn deserialize_option<'de, D>(deserializer: D) -> Result<Option<Duration>, D::Error>
    where
        D: serde::Deserializer<'de>,
    {
        Option::<String>::deserialize(deserializer)?
            .map(|text| parse_duration(&text).map_err(serde::de::Error::custom))
            .transpose()
    }
}

#[cfg(feature = "json")]
pub use serde_support::{deserialize, deserialize_option};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_each_unit() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("60s"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("24h"), Ok(Duration::from_secs(86_400)));
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(7 * 86_400)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
    }

    #[test]
    fn adds_up_parts_and_ignores_surrounding_space() {
        assert_eq!(parse_duration(" 1h30m "), Ok(Duration::from_secs(5_400)));
        assert_eq!(parse_duration("1m500ms"), Ok(Duration::from_millis(60_500)));
    }

    #[test]
    fn rejects_what_it_would_have_to_guess() {
        for bad in [
            "", "  ", "60", "s", "5 m", "1.5h", "5M", "10us", "-5s", "h1", "1h 30m",
        ] {
            let err = parse_duration(bad).expect_err(bad);
            assert!(err.to_string().contains(&format!("{bad:?}")), "{err}");
        }
    }

    #[test]
    fn rejects_overflow() {
        assert!(parse_duration("99999999999999999999s").is_err());
        assert!(parse_duration(&format!("{}d", u64::MAX / 2)).is_err());
    }

    #[cfg(feature = "json")]
    #[test]
    fn deserializes_from_json_strings() {
        #[derive(serde::Deserialize)]
        struct Config {
            #[serde(deserialize_with = "deserialize")]
            ttl: Duration,
            #[serde(default, deserialize_with = "deserialize_option")]
            stale: Option<Duration>,
        }
        let config: Config = serde_json::from_str(r#"{"ttl":"24h"}"#).unwrap();
        assert_eq!(config.ttl, Duration::from_secs(86_400));
        assert_eq!(config.stale, None);
        let config: Config = serde_json::from_str(r#"{"ttl":"1s","stale":"5m"}"#).unwrap();
        assert_eq!(config.stale, Some(Duration::from_secs(300)));
        let err = serde_json::from_str::<Config>(r#"{"ttl":60}"#)
            .err()
            .unwrap();
        assert!(err.to_string().contains("string"), "{err}");
        let err = serde_json::from_str::<Config>(r#"{"ttl":"60"}"#)
            .err()
            .unwrap();
        assert!(err.to_string().contains("missing unit"), "{err}");
    }
}
