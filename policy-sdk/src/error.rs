//! The one error type a policy returns, whatever went wrong inside it.

use std::fmt;

/// Why a policy could not build itself from its config or could not decide.
///
/// The gateway never fails a client's request because of it: a `PolicyError` from
/// [`Policy::from_config`](crate::Policy::from_config) or [`Policy::decide`](crate::Policy::decide)
/// is sent to the host as `PolicyOutput.error`, which counts it as a policy fault, logs the
/// message with the policy's name and version, and applies the binding's fallback (fail-open with
/// the namespace defaults, or fail-closed = bypass). From the init export the same message rejects
/// the binding's config before the binding goes live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyError {
    message: String,
}

impl PolicyError {
    /// An error with this message (shown to operators in the gateway's log).
    pub fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
        }
    }

    /// The message.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The same error with `context` in front: `"{context}: {message}"`.
    pub fn context(self, context: impl fmt::Display) -> Self {
        Self::new(format!("{context}: {}", self.message))
    }
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for PolicyError {}

impl From<String> for PolicyError {
    fn from(message: String) -> Self {
        Self::new(message)
    }
}

impl From<&str> for PolicyError {
    fn from(message: &str) -> Self {
        Self::new(message)
    }
}

impl From<crate::duration::DurationParseError> for PolicyError {
    fn from(err: crate::duration::DurationParseError) -> Self {
        Self::new(err.to_string())
    }
}

#[cfg(feature = "json")]
impl From<serde_json::Error> for PolicyError {
    fn from(err: serde_json::Error) -> Self {
        Self::new(format!("invalid JSON config: {err}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn context_prefixes_the_message() {
        let err = PolicyError::from("bad ttl").context("rule 2");
        assert_eq!(err.to_string(), "rule 2: bad ttl");
        assert_eq!(err.message(), "rule 2: bad ttl");
    }

    #[test]
    fn converts_from_strings() {
        assert_eq!(PolicyError::from(String::from("x")), PolicyError::new("x"));
    }
}
