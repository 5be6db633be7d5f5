//! `hostile-loop`: never returns from `cachegw_decide` (a busy loop the optimiser cannot remove).
//! Only the host's epoch deadline ends it.
//!
//! Config: `{"spare_prefix": "..."}` (optional): keys starting with it get a normal decision
//! (the client's key, namespace defaults). Without it every decision loops.

#![forbid(unsafe_code)]

use cachegw_policy::{Decision, Policy, PolicyError, Request, config};
use serde::Deserialize;

/// The policy.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostileLoop {
    spare_prefix: Option<String>,
}

impl Policy for HostileLoop {
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
        let mut spins: u64 = 0;
        loop {
            spins = std::hint::black_box(spins.wrapping_add(1));
        }
    }
}

cachegw_policy::export_policy!(HostileLoop);

#[cfg(test)]
mod tests {
    use super::*;
    use cachegw_policy::{Operation, testing};

    // Only the spared path can run natively: the other one never ends.
    #[test]
    fn spared_keys_are_decided() {
        let spared = testing::request(Operation::Get, "ns", "dry:k")
            .config(r#"{"spare_prefix":"dry:"}"#)
            .round_trip::<HostileLoop>()
            .decision();
        assert_eq!(spared.storage_key, "dry:k");
    }
}
