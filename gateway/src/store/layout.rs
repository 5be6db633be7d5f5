//! Where things live in a store, shared by both implementations.
//!
//! | key                              | holds                                                 |
//! |----------------------------------|-------------------------------------------------------|
//! | `cg:{<ns>:<gen>:<key>}`          | an entry (an envelope), with the entry's expiry       |
//! | `cl:{<ns>:<gen>:<key>}`          | the entry's lease: `<token>:<tag sequence>`, expiring  |
//! | `cgt:{<ns>:<gen>:<tag>}`         | the tag index: entry keys scored by their expiry       |
//! | `cgv:{<ns>:<gen>:<tag>}`         | the tag sequence of the tag's last purge (voids leases) |
//! | `cgp:{<ns>:<gen>:<tag>}:<id>`    | a tag index taken over by a running tag purge          |
//! | `cgm:<ns>`                       | namespace state: `gen` (generation), `stale` (ms), `tagseq` |
//!
//! The braces are literal: they are Redis Cluster *hash tags*. A cluster puts
//! a key in the slot of the text between its first `{` and the next `}`, so an
//! entry and its lease always share a slot (the lease and fenced-write scripts
//! touch both), and so do a tag's index, marks and purge snapshots, while the
//! entries of one namespace spread over every slot. Both keys of a pair start
//! with the same number of bytes before `{` and hold the same bytes after it,
//! so they hash alike even when a key or tag itself contains `}`.
//!
//! Namespace names are `[A-Za-z0-9_.-]` (no `:`, `{` or `}`) and generations are
//! decimal, so `cg:{<ns>:<gen>:` is an unambiguous, glob-free prefix and the
//! closing `}` a fixed suffix: distinct (namespace, generation, key) triples
//! never collide, whatever bytes the key holds, and a pattern placed between
//! the prefix and the suffix cannot match outside them (Redis globs give `{`
//! and `}` no meaning). Policy sync (`cachegw:policy:*`) uses yet another prefix.

/// Fields of the namespace state hash.
pub const GENERATION_FIELD: &str = "gen";
/// Entries created at or before this time (ms) are stale (a soft flush).
pub const STALE_BEFORE_FIELD: &str = "stale";
/// The namespace's tag sequence: moves on at every tag purge.
pub const TAG_SEQUENCE_FIELD: &str = "tagseq";

/// What closes every entry and lease key (the end of the hash tag).
pub const KEY_SUFFIX: &[u8] = b"}";

/// `c[gl]:{<ns>:<gen>:`: matches the entries *and* the leases of a
/// generation, so that one pattern scan finds both. Put a pattern and
/// [`KEY_SUFFIX`] after it.
pub fn entry_or_lease_matcher(namespace: &str, generation: u64) -> Vec<u8> {
    format!("c[gl]:{{{namespace}:{generation}:").into_bytes()
}

/// The key of the lease on an entry.
pub fn lease_key(namespace: &str, generation: u64, key: &[u8]) -> Vec<u8> {
    let mut out = generation_prefix(b"cl:{", namespace, generation, key.len() + KEY_SUFFIX.len());
    out.extend_from_slice(key);
    out.extend_from_slice(KEY_SUFFIX);
    out
}

/// `cl:{<ns>:<gen>:`, the prefix of every lease of a generation.
pub fn lease_prefix(namespace: &str, generation: u64) -> Vec<u8> {
    generation_prefix(b"cl:{", namespace, generation, 0)
}

/// Whether a key found by [`entry_or_lease_matcher`] is a lease.
pub fn is_lease_key(key: &[u8]) -> bool {
    key.starts_with(b"cl:")
}

/// The entry key inside an entry or lease key of the generation whose
/// [`entry_prefix`] (or [`lease_prefix`], the same length) is `prefix_len`
/// bytes long.
pub fn inner_key(physical: &[u8], prefix_len: usize) -> Option<&[u8]> {
    physical
        .get(prefix_len..)
        .and_then(|rest| rest.strip_suffix(KEY_SUFFIX))
}

/// Where a tag's last purge records its tag sequence number: a leased write
/// carrying the tag is refused if its lease is older than that purge.
pub fn tag_void_key(namespace: &str, generation: u64, tag: &str) -> Vec<u8> {
    tagged(&format!("cgv:{{{namespace}:{generation}:"), tag, "")
}

/// `cg:{<ns>:<gen>:`, the prefix of every entry of a generation.
pub fn entry_prefix(namespace: &str, generation: u64) -> Vec<u8> {
    generation_prefix(ENTRY_PREFIX, namespace, generation, 0)
}

/// The key an entry is stored under: laid out on every read and write, so
/// without `format!`'s machinery (~500 instructions of a ~57 000-instruction Get).
pub fn entry_key(namespace: &str, generation: u64, key: &[u8]) -> Vec<u8> {
    let key = EntryKey {
        namespace,
        generation,
        key,
    };
    let mut out = Vec::with_capacity(key.byte_len());
    key.write_to(&mut out);
    out
}

/// An entry's key, `cg:{<ns>:<gen>:<key>}`: laid out in a buffer of its own
/// by [`entry_key`], or written straight into a command's buffer as its
/// argument, so that a read of a hundred entries lays out no key of its own
/// (an allocation, a copy and a free each, where a key is a few dozen bytes).
#[derive(Debug, Clone, Copy)]
pub struct EntryKey<'a> {
    pub namespace: &'a str,
    pub generation: u64,
    pub key: &'a [u8],
}

impl EntryKey<'_> {
    /// Its length in bytes.
    pub fn byte_len(&self) -> usize {
        let digits = self
            .generation
            .checked_ilog10()
            .map_or(1, |log| log as usize + 1);
        ENTRY_PREFIX.len()
            + self.namespace.len()
            + 1
            + digits
            + 1
            + self.key.len()
            + KEY_SUFFIX.len()
    }

    /// Appends its bytes to `out`.
    fn write_to(&self, out: &mut impl bytes::BufMut) {
        let mut digits = itoa::Buffer::new();
        let generation = digits.format(self.generation).as_bytes();
        for part in [
            ENTRY_PREFIX,
            self.namespace.as_bytes(),
            b":",
            generation,
            b":",
            self.key,
            KEY_SUFFIX,
        ] {
            out.put_slice(part);
        }
    }
}

impl redis::ToRedisArgs for EntryKey<'_> {
    fn write_redis_args<W>(&self, out: &mut W)
    where
        W: ?Sized + redis::RedisWrite,
    {
        self.write_to(&mut out.bufmut_for_next_arg(self.byte_len()));
    }
}

/// What every entry key starts with.
const ENTRY_PREFIX: &[u8] = b"cg:{";

/// `<kind><ns>:<gen>:`, with room for `more` bytes after it.
fn generation_prefix(kind: &[u8], namespace: &str, generation: u64, more: usize) -> Vec<u8> {
    let mut digits = itoa::Buffer::new();
    let generation = digits.format(generation).as_bytes();
    let mut out = Vec::with_capacity(kind.len() + namespace.len() + generation.len() + 2 + more);
    out.extend_from_slice(kind);
    out.extend_from_slice(namespace.as_bytes());
    out.push(b':');
    out.extend_from_slice(generation);
    out.push(b':');
    out
}

/// The sorted set indexing the entries of a generation that carry `tag`.
pub fn tag_index_key(namespace: &str, generation: u64, tag: &str) -> Vec<u8> {
    tagged(&format!("cgt:{{{namespace}:{generation}:"), tag, "")
}

/// Where a tag purge moves the index it works through (the index's slot).
pub fn tag_purge_key(namespace: &str, generation: u64, tag: &str, id: u64) -> Vec<u8> {
    tagged(
        &format!("cgp:{{{namespace}:{generation}:"),
        tag,
        &format!(":{id:016x}"),
    )
}

fn tagged(prefix: &str, tag: &str, after: &str) -> Vec<u8> {
    let mut out = String::with_capacity(prefix.len() + tag.len() + 1 + after.len());
    out.push_str(prefix);
    out.push_str(tag);
    out.push('}');
    out.push_str(after);
    out.into_bytes()
}

/// The hash holding a namespace's generation and soft-flush time.
pub fn namespace_state_key(namespace: &str) -> Vec<u8> {
    format!("cgm:{namespace}").into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An entry key written into a command is the one [`entry_key`] lays
    /// out, byte for byte, and as long as [`EntryKey::byte_len`] says.
    #[test]
    fn an_entry_key_written_into_a_command_is_the_entry_key() {
        let cases: [(&str, u64, &[u8]); 5] = [
            ("users", 0, b"k"),
            ("users", 9, b""),
            ("a.b-c_d", 10, b"k:*}{"),
            ("ns", 12_345, "caf\u{e9}/\u{1f600}".as_bytes()),
            ("ns", u64::MAX, &[0, 255, b'}', b'\n']),
        ];
        let mut command = redis::cmd("MGET");
        for (namespace, generation, key) in cases {
            let written = EntryKey {
                namespace,
                generation,
                key,
            };
            assert_eq!(
                written.byte_len(),
                entry_key(namespace, generation, key).len()
            );
            command.arg(written);
        }
        let args: Vec<Vec<u8>> = command
            .args_iter()
            .skip(1)
            .map(|arg| match arg {
                redis::Arg::Simple(bytes) => bytes.to_vec(),
                other => panic!("a key, not {other:?}"),
            })
            .collect();
        let expected: Vec<Vec<u8>> = cases
            .iter()
            .map(|&(namespace, generation, key)| entry_key(namespace, generation, key))
            .collect();
        assert_eq!(args, expected);
    }

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
        assert_eq!(entry_key("users", 3, b"k:*"), b"cg:{users:3:k:*}");
        for generation in [0, 9, 10, 12_345, u64::MAX] {
            assert_eq!(
                entry_key("users", generation, b"k"),
                format!("cg:{{users:{generation}:k}}").into_bytes()
            );
        }
        assert_eq!(lease_key("users", 3, b"k:*"), b"cl:{users:3:k:*}");
        let prefix = entry_prefix("users", 3);
        assert_eq!(
            inner_key(&entry_key("users", 3, b"a}b"), prefix.len()),
            Some(&b"a}b"[..])
        );
    }

    /// The slot a Redis Cluster puts `key` in: CRC16 (XMODEM) of its hash
    /// tag, or of the whole key without one. Only to check the layout.
    fn slot(key: &[u8]) -> u16 {
        let hashed = key
            .iter()
            .position(|&b| b == b'{')
            .and_then(|open| {
                let rest = &key[open + 1..];
                rest.iter()
                    .position(|&b| b == b'}')
                    .filter(|&close| close > 0)
                    .map(|close| &rest[..close])
            })
            .unwrap_or(key);
        let mut crc: u16 = 0;
        for &byte in hashed {
            crc ^= u16::from(byte) << 8;
            for _ in 0..8 {
                crc = if crc & 0x8000 != 0 {
                    (crc << 1) ^ 0x1021
                } else {
                    crc << 1
                };
            }
        }
        crc % 16384
    }

    #[test]
    fn the_slot_function_matches_redis() {
        // From the Redis Cluster specification.
        // CRC16/XMODEM("123456789") = 0x31C3, below 16384.
        assert_eq!(slot(b"123456789"), 0x31C3);
        assert_eq!(slot(b"{user1000}.following"), slot(b"{user1000}.followers"));
    }

    #[test]
    fn an_entry_shares_its_slot_with_its_lease_and_a_tag_with_its_marks() {
        for key in [&b"plain"[..], b"with}brace", b"{tag}", b"}", b"", b"a{b}c"] {
            assert_eq!(
                slot(&entry_key("ns", 7, key)),
                slot(&lease_key("ns", 7, key)),
                "{key:?}"
            );
        }
        for tag in ["t", "with}brace", "}", "user:1"] {
            let index = slot(&tag_index_key("ns", 7, tag));
            assert_eq!(index, slot(&tag_void_key("ns", 7, tag)), "{tag}");
            assert_eq!(index, slot(&tag_purge_key("ns", 7, tag, 42)), "{tag}");
        }
    }

    #[test]
    fn a_namespace_spreads_over_the_slots() {
        let slots: std::collections::HashSet<u16> = (0..10_000)
            .map(|i| {
                slot(&entry_key(
                    "one-namespace",
                    0,
                    format!("key-{i}").as_bytes(),
                ))
            })
            .collect();
        assert!(
            slots.len() > 4_000,
            "10 000 keys in only {} slots",
            slots.len()
        );
    }
}
