//! Reading the binding's configuration bytes.
//!
//! The config is whatever the operator bound the policy with, verbatim; JSON by convention.
//! It reaches the policy through the init export when the binding is created (so a bad config is
//! rejected before the binding goes live) and again with every request, because each decision
//! runs in a fresh instance. When that instance starts from the binding's pre-initialised image,
//! the SDK decides with the policy the init export built from the same bytes instead of parsing
//! them again.

/// Whether a config is empty: no bytes, only whitespace, or the JSON `null` or `{}`.
/// Policies treat an empty config as "use the built-in defaults".
pub fn is_empty(config: &[u8]) -> bool {
    let trimmed = config.trim_ascii();
    trimmed.is_empty() || trimmed == b"null" || trimmed == b"{}"
}

/// Parses a JSON config into `T`; an [empty](is_empty) config is `T::default()`. Put `#[serde(deny_unknown_fields)]` on `T` so that a misspelt field is
/// rejected at binding time rather than silently ignored.
///
/// ```
/// use cachegw_policy::config;
///
/// #[derive(Default, serde::Deserialize)]
/// #[serde(deny_unknown_fields)]
/// struct Config {
///     #[serde(default)]
///     vary: Vec<String>,
/// }
///
/// let config: Config = config::from_json(br#"{"vary":["accept-language"]}"#).unwrap();
/// assert_eq!(config.vary, ["accept-language"]);
/// assert!(config::from_json::<Config>(b"").unwrap().vary.is_empty());
/// assert!(config::from_json::<Config>(br#"{"vray":[]}"#).is_err());
/// ```
#[cfg(feature = "json")]
pub fn from_json<T>(config: &[u8]) -> Result<T, crate::PolicyError>
where
    T: serde::de::DeserializeOwned + Default,
{
    if is_empty(config) {
        return Ok(T::default());
    }
    Ok(serde_json::from_slice(config)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_configs() {
        for config in [&b""[..], b"  \n", b"null", b" {} "] {
            assert!(is_empty(config), "{config:?}");
        }
        assert!(!is_empty(b"{\"a\":1}"));
        assert!(!is_empty(b"[]"));
    }

    #[cfg(feature = "json")]
    #[test]
    fn parses_json_or_defaults() {
        #[derive(Debug, Default, PartialEq, serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Config {
            #[serde(default)]
            n: u32,
        }
        assert_eq!(from_json::<Config>(b" ").unwrap(), Config::default());
        assert_eq!(from_json::<Config>(b"null").unwrap(), Config::default());
        assert_eq!(from_json::<Config>(b"{\"n\":3}").unwrap(), Config { n: 3 });
        let err = from_json::<Config>(b"{\"m\":3}").unwrap_err();
        assert!(
            err.message()
                .starts_with("invalid JSON config: unknown field `m`"),
            "{err}"
        );
        assert!(from_json::<Config>(b"{").is_err());
    }
}
