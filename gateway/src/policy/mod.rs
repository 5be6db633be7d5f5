//! Caching decisions: for every request, which key an entry lives under and
//! how long it stays fresh.
//!
//! Until a namespace is bound to a WebAssembly policy, the built-in
//! [`DefaultPolicy`] decides: the client's key, verbatim, and the namespace's
//! configured TTL.

use std::time::Duration;

use crate::cache::NamespaceSettings;

/// How one request is cached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// The key within the namespace (the cache layer scopes it).
    pub key: String,
    /// How long a written entry is fresh.
    pub fresh_ttl: Duration,
    /// How long after that it may still be served stale.
    pub stale_window: Duration,
    /// Skip the store entirely.
    pub bypass: bool,
}

/// The decision every namespace gets when no policy is bound to it.
#[derive(Debug, Clone, Copy, Default)]
pub struct DefaultPolicy;

impl DefaultPolicy {
    /// The client's key, the namespace's default TTL, no stale window.
    pub fn decide(&self, namespace: &NamespaceSettings, key: &str) -> Decision {
        Decision {
            key: key.to_owned(),
            fresh_ttl: namespace.default_ttl,
            stale_window: Duration::ZERO,
            bypass: false,
        }
    }
}
