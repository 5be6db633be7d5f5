//! Where things live in a store, shared by both implementations.
//!
//! | key                            | holds                                                |
//! |--------------------------------|------------------------------------------------------|
//! | `cg:{namespace}:{gen}:{key}`   | an entry (an envelope), with the entry's expiry      |
//! | `cgt:{namespace}:{gen}:{tag}`  | the tag index: entry keys scored by their expiry      |
//! | `cgp:{namespace}:{gen}:{id}`   | a tag index taken over by a running tag purge         |
//! | `cgm:{namespace}`              | namespace state: `gen` (generation), `stale` (ms)     |
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
