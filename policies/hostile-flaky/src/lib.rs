//! `hostile-flaky`: passes validation, fails in production. It decides normally for the
//! gateway's dry-run probes (keys starting with `cachegw-dry-run:`) and panics on every other
//! key, like a policy whose bug only real traffic reaches. The gateway's tests use it to check
//! that an active version that starts faulting is rolled back automatically.

#![forbid(unsafe_code)]

use cachegw_policy::{Decision, Policy, PolicyError, Request};

/// The policy.
#[derive(Debug, Default)]
pub struct HostileFlaky;

impl Policy for HostileFlaky {
    fn decide(&self, req: &Request) -> Result<Decision, PolicyError> {
        if req.key().starts_with("cachegw-dry-run:") {
            return Ok(Decision::cache(req.key()));
        }
        panic!(
            "hostile-flaky: real traffic ({:?}) reaches the bug",
            req.key()
        );
    }
}

cachegw_policy::export_policy!(HostileFlaky);

#[cfg(test)]
mod tests {
    use super::*;
    use cachegw_policy::{
        Operation,
        testing::{self, Outcome},
    };

    #[test]
    fn passes_probes_and_traps_on_traffic() {
        let probe = testing::request(Operation::Get, "ns", "cachegw-dry-run:probe")
            .round_trip::<HostileFlaky>();
        assert_eq!(probe.decision().storage_key, "cachegw-dry-run:probe");
        let real = testing::request(Operation::Get, "ns", "user:1").round_trip::<HostileFlaky>();
        assert!(matches!(real, Outcome::Trapped(_)), "{real:?}");
    }
}
