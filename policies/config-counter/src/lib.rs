//! `config-counter`: shows whether a decision parsed the binding's config. `from_config` counts
//! its calls in the instance and logs `from_config ran`; each decision tags its entry with that
//! count (`from_config:N`) and with the config's `label` (`label:L`). In a fresh instance of the
//! module a decision parses the config itself (N = 1, and one log line per decision); in an
//! instance of the binding's pre-initialised image `cachegw_init` already did, before the
//! snapshot (N = 1, no log line); an image asked with another config parses it again (N = 2).
//! The gateway's tests (tests/preinit.rs) use it to check that decisions on a pre-initialised
//! binding do not re-run `from_config`.
//!
//! Config (JSON, optional): `{"label": "any text"}`.

#![forbid(unsafe_code)]

use std::sync::atomic::{AtomicU32, Ordering};

use cachegw_policy::{Decision, Policy, PolicyError, Request, config, log};
use serde::Deserialize;

/// `from_config` calls in this instance.
static FROM_CONFIG_CALLS: AtomicU32 = AtomicU32::new(0);

/// The policy: the config's label.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigCounter {
    #[serde(default)]
    label: String,
}

impl Policy for ConfigCounter {
    fn from_config(config: &[u8]) -> Result<Self, PolicyError> {
        let calls = FROM_CONFIG_CALLS.fetch_add(1, Ordering::Relaxed) + 1;
        log::info(&format!("from_config ran ({calls} in this instance)"));
        config::from_json(config)
    }

    fn decide(&self, req: &Request) -> Result<Decision, PolicyError> {
        let calls = FROM_CONFIG_CALLS.load(Ordering::Relaxed);
        Ok(Decision::cache(req.key())
            .tag(format!("from_config:{calls}"))
            .tag(format!("label:{}", self.label)))
    }
}

cachegw_policy::export_policy!(ConfigCounter);

#[cfg(test)]
mod tests {
    use super::*;
    use cachegw_policy::{Operation, testing};

    #[test]
    fn tags_the_parse_count_and_the_label() {
        let decision = testing::request(Operation::Get, "ns", "k")
            .config_json(r#"{"label":"one"}"#)
            .round_trip::<ConfigCounter>()
            .decision();
        assert_eq!(decision.tags[1], "label:one");
        assert!(decision.tags[0].starts_with("from_config:"), "{decision:?}");
    }
}
