//! `hostile-trap`: panics in `cachegw_decide`. Built with `panic = "abort"`, the panic is a wasm
//! trap (`unreachable`), after the SDK's panic hook has sent the message through `cachegw.log`.
//!
//! Config: `{"spare_prefix": "..."}` (optional): keys starting with it get a normal decision
//! (the client's key, namespace defaults), e.g. so that a validation dry run can pass.
//! Without it every decision traps. `cachegw_init` accepts any such config.

#![forbid(unsafe_code)]

use cachegw_policy::{Decision, Policy, PolicyError, Request, config};
use serde::Deserialize;

/// The policy.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostileTrap {
    spare_prefix: Option<String>,
}

impl Policy for HostileTrap {
    fn from_config(config: &[u8]) -> Result<Self, PolicyError> {
        config::from_json(config)
    }

    fn decide(&self, req: &Request) -> Result<Decision, PolicyError> {
        if self
            .spare_prefix
            .as_deref()
            .is_some_and(|prefix| req.key().starts_with(prefix))
        {
            return Ok(Decision::cache(req.key()));
        }
        panic!("hostile-trap: deliberate panic deciding {:?}", req.key());
    }
}

cachegw_policy::export_policy!(HostileTrap);

#[cfg(test)]
mod tests {
    use super::*;
    use cachegw_policy::Operation;
    use cachegw_policy::testing::{self, Outcome};

    #[test]
    fn traps_unless_spared() {
        let outcome = testing::request(Operation::Get, "ns", "k").round_trip::<HostileTrap>();
        assert!(
            matches!(outcome, Outcome::Trapped(ref m) if m.contains("deliberate panic")),
            "{outcome:?}"
        );
        let spared = testing::request(Operation::Get, "ns", "dry:k")
            .config(r#"{"spare_prefix":"dry:"}"#)
            .round_trip::<HostileTrap>()
            .decision();
        assert_eq!(spared.storage_key, "dry:k");
    }
}
