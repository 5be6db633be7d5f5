//! `hostile-memory`: allocates (and writes) 1 MiB after 1 MiB in `cachegw_decide`, keeping all
//! of it, until the allocator fails. The linear memory grows until the host's cap refuses a
//! `memory.grow` (or traps it); the failed allocation then aborts, which is a trap.
//!
//! Config: `{"spare_prefix": "..."}` (optional): keys starting with it get a normal decision
//! (the client's key, namespace defaults). Without it every decision exhausts memory.

#![forbid(unsafe_code)]

use cachegw_policy::{Decision, Policy, PolicyError, Request, config};
use serde::Deserialize;

/// The policy.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostileMemory {
    spare_prefix: Option<String>,
}

impl Policy for HostileMemory {
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
        let mut hoard: Vec<Vec<u8>> = Vec::new();
        loop {
            hoard.push(vec![0xA5; 1 << 20]);
            std::hint::black_box(&hoard);
        }
    }
}

cachegw_policy::export_policy!(HostileMemory);

#[cfg(test)]
mod tests {
    use super::*;
    use cachegw_policy::{Operation, testing};

    // Only the spared path runs natively: the other one would exhaust the test machine.
    #[test]
    fn spared_keys_are_decided() {
        let spared = testing::request(Operation::Get, "ns", "dry:k")
            .config(r#"{"spare_prefix":"dry:"}"#)
            .round_trip::<HostileMemory>()
            .decision();
        assert_eq!(spared.storage_key, "dry:k");
    }
}
