//! The policy's decision bytes: what `cachegw_decide` returns is read by
//! `engine::decode_output` (a `PolicyOutput`) and validated by
//! `Decision::from_wire` against the default limits. A policy is untrusted
//! code: nothing it returns may panic the host, and a decision that passes
//! validation must respect every bound the cache layer relies on, including
//! the envelope's, which `Envelope::encode` asserts. The init export's
//! `InitOutput` is decoded here too.

#![no_main]

use bytes::Bytes;
use gateway::{
    Config,
    api::proto::policy as pb,
    cache::{Envelope, MAX_TAG_BYTES, MAX_TAG_SECTION_BYTES, NamespaceSettings},
    policy::{Decision, DecisionLimits, Label, Millis, engine},
};
use libfuzzer_sys::fuzz_target;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    let _ = pb::InitOutput::decode(data);
    let Ok(wire) = engine::decode_output(data) else {
        return;
    };
    let config = Config::default();
    let limits = DecisionLimits {
        max_key_bytes: config.limits.max_key_bytes,
        max_ttl: config.policy.max_ttl,
        max_items: config.policy.max_decision_items,
    };
    let namespace = NamespaceSettings::new("fuzz", &Default::default());
    let decided_by = Label::intern("fuzz@0");
    let Ok(decision) = Decision::from_wire(wire, &namespace, &limits, decided_by) else {
        return;
    };
    check(&decision, &limits);
});

fn check(decision: &Decision, limits: &DecisionLimits) {
    assert!(!decision.key.is_empty() && decision.key.len() <= limits.max_key_bytes);
    let max_ttl = Millis::from_duration(limits.max_ttl);
    assert!(!decision.fresh_ttl.is_zero() && decision.fresh_ttl <= max_ttl);
    assert!(decision.stale_window <= max_ttl);
    assert!(decision.ttl_jitter <= max_ttl);
    assert!(decision.early_refresh_beta.is_finite() && decision.early_refresh_beta >= 0.0);
    let invalidate = decision.invalidation();
    for items in [
        &decision.tags[..],
        &invalidate.keys,
        &invalidate.patterns,
        &invalidate.tags,
    ] {
        assert!(items.len() <= limits.max_items);
        assert!(
            items
                .iter()
                .all(|item| !item.is_empty() && item.len() <= limits.max_key_bytes)
        );
    }
    for tags in [&decision.tags[..], &invalidate.tags] {
        assert!(tags.iter().all(|tag| tag.len() <= MAX_TAG_BYTES));
    }
    let section: usize = decision.tags.iter().map(|tag| 1 + tag.len()).sum();
    assert!(section <= MAX_TAG_SECTION_BYTES);
    // The entry the cache layer writes with these tags encodes (no panic) and
    // reads back with them.
    let entry = Envelope {
        created_at_ms: 0,
        fresh_until_ms: decision.fresh_ttl.as_millis(),
        stale_until_ms: decision.fresh_ttl.as_millis() + decision.stale_window.as_millis(),
        tags: decision.tags.to_vec(),
        fill_ms: 0,
        content_type: String::new(),
        compressed: false,
        value: Bytes::from_static(b"v"),
    };
    assert_eq!(
        Envelope::decode(entry.encode()).map(|e| e.tags),
        Ok(decision.tags.to_vec())
    );
}
