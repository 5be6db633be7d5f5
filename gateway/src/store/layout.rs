//! Where things live in a store, shared by both implementations.
//!
//! | key                            | holds                                                |
//! |--------------------------------|------------------------------------------------------|
//! | `cg:{namespace}:{gen}:{key}`   | an entry (an envelope), with the entry's expiry      |
//! | `cl:{namespace}:{gen}:{key}`   | the entry's lease: `{token}:{tag sequence}`, expiring |
//! | `cgv:{namespace}:{gen}:{tag}`  | the tag sequence of the tag's last purge (voids leases) |
//! | `cgt:{namespace}:{gen}:{tag}`  | the tag index: entry keys scored by their expiry      |
//! | `cgp:{namespace}:{gen}:{id}`   | a tag index taken over by a running tag purge         |
//! | `cgm:{namespace}`              | namespace state: `gen` (generation), `stale` (ms), `tagseq` |
//!
//! Namespace names are `[A-Za-z0-9_.-]` (no `:`) and generations are decimal,
//! so `cg:{namespace}:{gen}:` is an unambiguous, glob-free prefix: distinct
//! (namespace, generation, key) triples never collide, whatever bytes the key
//! holds, and a pattern appended to the prefix cannot match outside it.
//! Policy sync (`cachegw:policy:*`) uses yet another prefix.

use std::fmt::Write as _;

/// Fields of the namespace state hash.
pub const GENERATION_FIELD: &str = "gen";
/// Entries created at or before this time (ms) are stale (a soft flush).
pub const STALE_BEFORE_FIELD: &str = "stale";

/// `c[gl]:{namespace}:{generation}:`: matches the entries *and* the leases of
/// a generation, so that one pattern scan finds both.
pub fn entry_or_lease_matcher(namespace: &str, generation: u64) -> Vec<u8> {
    format!("c[gl]:{namespace}:{generation}:").into_bytes()
}

/// The key of the lease on an entry.
pub fn lease_key(namespace: &str, generation: u64, key: &[u8]) -> Vec<u8> {
    let mut out = format!("cl:{namespace}:{generation}:").into_bytes();
    out.extend_from_slice(key);
    out
}

/// Whether a key found by [`entry_or_lease_matcher`] is a lease.
pub fn is_lease_key(key: &[u8]) -> bool {
    key.starts_with(b"cl:")
}

/// Where a tag's last purge records its tag sequence number: a leased write
/// carrying the tag is refused if its lease is older than that purge.
pub fn tag_void_key(namespace: &str, generation: u64, tag: &str) -> Vec<u8> {
    format!("cgv:{namespace}:{generation}:{tag}").into_bytes()
}

/// `cg:{namespace}:{generation}:`, the prefix of every entry of a generation.
pub fn entry_prefix(namespace: &str, generation: u64) -> Vec<u8> {
    let mut prefix = String::with_capacity(namespace.len() + 24);
    // Writing to a String cannot fail.
    let _ = write!(prefix, "cg:{namespace}:{generation}:");
    prefix.into_bytes()
}

/// The key an entry is stored under.
pub fn entry_key(namespace: &str, generation: u64, key: &[u8]) -> Vec<u8> {
    let mut out = entry_prefix(namespace, generation);
    out.extend_from_slice(key);
    out
}

/// The sorted set indexing the entries of a generation that carry `tag`.
pub fn tag_index_key(namespace: &str, generation: u64, tag: &str) -> Vec<u8> {
    format!("cgt:{namespace}:{generation}:{tag}").into_bytes()
}

/// Where a tag purge moves the index it works through.
pub fn tag_purge_key(namespace: &str, generation: u64, id: u64) -> Vec<u8> {
    format!("cgp:{namespace}:{generation}:{id:016x}").into_bytes()
}

/// The hash holding a namespace's generation and soft-flush time.
pub fn namespace_state_key(namespace: &str) -> Vec<u8> {
    format!("cgm:{namespace}").into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_of_neighbouring_namespaces_and_generations_never_overlap() {
        let prefixes = [
            entry_prefix("a", 0),
            entry_prefix("a", 1),
            entry_prefix("a", 10),
            entry_prefix("a.b", 0),
            entry_prefix("a-0", 0),
            entry_prefix("ab", 1),
        ];
        for (i, one) in prefixes.iter().enumerate() {
            for (j, other) in prefixes.iter().enumerate() {
                if i != j {
                    assert!(!other.starts_with(one), "{one:?} is a prefix of {other:?}");
                }
            }
        }
        assert_eq!(entry_key("users", 3, b"k:*"), b"cg:users:3:k:*");
    }
}
