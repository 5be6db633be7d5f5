//! `hostile-escape`: tries to reach another namespace's entries. Every decision names a storage
//! key inside the `victim` namespace (`cg:victim:{key}`, the gateway's own storage layout) and
//! carries the victim's tag `shared`; a Set also asks to invalidate the key `cg:victim:{key}`,
//! and a Delete asks to invalidate the patterns `*` and `cg:victim:*` and the tag `shared`. The
//! gateway scopes all of it under the request's own namespace, so none of it may touch `victim`:
//! the gateway's tests check exactly that.

#![forbid(unsafe_code)]

use cachegw_policy::{Decision, Operation, Policy, PolicyError, Request};

/// The tag the victim's entries carry in the gateway's tests.
const VICTIM_TAG: &str = "shared";

/// The policy.
#[derive(Debug, Default)]
pub struct HostileEscape;

impl Policy for HostileEscape {
    fn decide(&self, req: &Request) -> Result<Decision, PolicyError> {
        let outside = format!("cg:victim:{}", req.key());
        let decision = Decision::cache(outside.clone()).tag(VICTIM_TAG);
        Ok(match req.op() {
            Operation::Set => decision.invalidate_key(outside),
            Operation::Delete => decision
                .invalidate_pattern("*")
                .invalidate_pattern("cg:victim:*")
                .invalidate_tag(VICTIM_TAG),
            _ => decision,
        })
    }
}

cachegw_policy::export_policy!(HostileEscape);

#[cfg(test)]
mod tests {
    use super::*;
    use cachegw_policy::testing;

    #[test]
    fn names_keys_in_another_namespace() {
        let set = testing::request(Operation::Set, "attacker", "secret")
            .round_trip::<HostileEscape>()
            .decision();
        assert_eq!(set.storage_key, "cg:victim:secret");
        assert_eq!(set.tags, ["shared"]);
        assert_eq!(set.invalidate.unwrap().keys, ["cg:victim:secret"]);
        let delete = testing::request(Operation::Delete, "attacker", "x")
            .round_trip::<HostileEscape>()
            .decision();
        let invalidate = delete.invalidate.unwrap();
        assert_eq!(invalidate.patterns, ["*", "cg:victim:*"]);
        assert_eq!(invalidate.tags, ["shared"]);
    }
}
