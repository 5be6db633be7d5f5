//! Namespaces: the unit of configuration (TTL, value limit) and of isolation
//! (every storage key is scoped under its namespace).

use std::{collections::HashMap, sync::Arc, time::Duration};

use super::RequestError;
use crate::config::{Config, NamespaceConfig};

/// Longest namespace name.
pub const MAX_NAMESPACE_LEN: usize = 64;

/// Metric/log label shared by every namespace the template admits.
const TEMPLATE_LABEL: &str = "_default";

/// Checks a namespace name: 1-64 characters of `[A-Za-z0-9_.-]`. Names can
/// therefore never contain the `:` that separates namespace and key in
/// storage keys.
pub fn validate_namespace_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("must not be empty".to_owned());
    }
    if name.len() > MAX_NAMESPACE_LEN {
        return Err(format!(
            "is {} characters long; the limit is {MAX_NAMESPACE_LEN}",
            name.len()
        ));
    }
    // Checked by byte: every allowed character is ASCII, so the first byte
    // that is not allowed starts the first character that is not.
    if let Some(at) = name
        .bytes()
        .position(|b| !(b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-')))
    {
        let bad = name[at..].chars().next().unwrap_or_default();
        return Err(format!(
            "contains {bad:?}; namespace names use only letters, digits, `_`, `.` and `-`"
        ));
    }
    Ok(())
}

/// The settings a request's namespace resolves to.
#[derive(Clone)]
pub struct NamespaceSettings {
    label: Arc<str>,
    /// Fresh TTL when the policy does not decide one.
    pub default_ttl: Duration,
    /// Largest value accepted.
    pub max_value_bytes: usize,
    /// Values at least this large are compressed (unless the policy says never).
    pub compress_min_bytes: usize,
    /// Lease lifetime when the Get names none.
    pub lease_ttl: Duration,
    /// XFetch beta when the policy decides none.
    pub early_refresh_beta: f64,
    template: bool,
}

impl std::fmt::Debug for NamespaceSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NamespaceSettings")
            .field("label", &self.label)
            .field("default_ttl", &self.default_ttl)
            .field("max_value_bytes", &self.max_value_bytes)
            .finish()
    }
}

impl NamespaceSettings {
    /// Settings without a policy binding (the built-in default policy decides).
    pub fn new(label: &str, config: &NamespaceConfig) -> Self {
        Self {
            label: Arc::from(label),
            default_ttl: config.default_ttl,
            max_value_bytes: config.max_value_bytes,
            compress_min_bytes: config.compress_min_bytes,
            lease_ttl: config.lease_ttl,
            early_refresh_beta: config.early_refresh_beta,
            template: label == TEMPLATE_LABEL,
        }
    }

    /// Whether this namespace is admitted by the default-namespace template
    /// (rather than declared).
    pub fn is_template(&self) -> bool {
        self.template
    }

    /// The name used in metrics and logs: the declared name, or `_default`
    /// for every namespace admitted by the template (bounded cardinality).
    pub fn label(&self) -> Arc<str> {
        Arc::clone(&self.label)
    }
}

/// Declared namespaces plus the optional template for undeclared ones.
#[derive(Debug, Clone, Default)]
pub struct Namespaces {
    /// foldhash: looked up on every request, filled only from the config.
    declared: HashMap<String, NamespaceSettings, foldhash::fast::RandomState>,
    template: Option<NamespaceSettings>,
}

impl Namespaces {
    /// The namespaces `config` declares, and its template if enabled.
    pub fn from_config(config: &Config) -> Self {
        let declared = config
            .namespaces
            .iter()
            .map(|(name, settings)| (name.clone(), NamespaceSettings::new(name, settings)))
            .collect();
        let template = config
            .default_namespace
            .enabled
            .then(|| NamespaceSettings::new(TEMPLATE_LABEL, &config.default_namespace.settings));
        Self { declared, template }
    }

    /// The settings for `name`, or why there are none.
    pub fn resolve(&self, name: &str) -> Result<&NamespaceSettings, RequestError> {
        // A declared name was checked when the config was.
        if let Some(settings) = self.declared.get(name) {
            return Ok(settings);
        }
        validate_namespace_name(name)
            .map_err(|reason| RequestError::invalid("namespace", reason))?;
        self.template
            .as_ref()
            .ok_or_else(|| RequestError::UnknownNamespace(name.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_restricted_to_a_safe_alphabet() {
        for good in ["users", "a", "team-a.orders_v2", &"x".repeat(64)] {
            assert_eq!(validate_namespace_name(good), Ok(()), "{good}");
        }
        for bad in ["", "a:b", "a b", "ключ", "a*", &"x".repeat(65)] {
            assert!(validate_namespace_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn declared_namespaces_win_and_the_template_admits_the_rest() {
        let config = Config::from_toml(
            "[auth]\nenabled = false\n[namespaces.orders]\ndefault_ttl = \"90s\"\n[default_namespace]\ndefault_ttl = \"10s\"\n",
        )
        .unwrap();
        let namespaces = Namespaces::from_config(&config);
        let orders = namespaces.resolve("orders").unwrap();
        assert_eq!(orders.default_ttl, Duration::from_secs(90));
        assert_eq!(&*orders.label(), "orders");
        let other = namespaces.resolve("anything").unwrap();
        assert_eq!(other.default_ttl, Duration::from_secs(10));
        assert_eq!(&*other.label(), "_default");
    }

    #[test]
    fn without_the_template_undeclared_namespaces_are_not_found() {
        let config = Config::from_toml(
            "[auth]\nenabled = false\n[namespaces.orders]\n[default_namespace]\nenabled = false\n",
        )
        .unwrap();
        let namespaces = Namespaces::from_config(&config);
        assert!(namespaces.resolve("orders").is_ok());
        assert_eq!(
            namespaces.resolve("other").unwrap_err(),
            RequestError::UnknownNamespace("other".to_owned())
        );
        assert!(matches!(
            namespaces.resolve("bad name").unwrap_err(),
            RequestError::InvalidArgument {
                field: "namespace",
                ..
            }
        ));
    }
}
