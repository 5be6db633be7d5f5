//! The value envelope: what the gateway stores under a key. It carries the
//! client's bytes plus what freshness, tags, content negotiation and
//! compression need, behind a magic and a format version so that a foreign or
//! corrupt value is recognised, never misread.
//!
//! Layout of format version 2 (all integers little-endian):
//!
//! | offset     | size | field                                          |
//! |------------|------|------------------------------------------------|
//! | 0          | 2    | magic `b"cg"`                                  |
//! | 2          | 1    | format version (2)                             |
//! | 3          | 1    | flags (bit 0: value is compressed)             |
//! | 4          | 8    | created at, ms since the Unix epoch            |
//! | 12         | 8    | fresh until, ms since the Unix epoch           |
//! | 20         | 8    | stale until, ms since the Unix epoch           |
//! | 28         | 2    | tag section length `t`                         |
//! | 30         | t    | tags, each a length byte (1-255) and its UTF-8 |
//! | 30 + t     | 4    | fill time, ms (0: unknown), for early refresh  |
//! | 34 + t     | 1    | content-type length `n` (0-255)                |
//! | 35 + t     | n    | content type, UTF-8                            |
//! | 35 + t + n | rest | the value                                      |
//!
//! Version 1 (written by earlier gateways, still read) has no tag section: the
//! content-type length sits at offset 28.
//!
//! The fixed offsets are a contract with the store: the Redis store's purge
//! script (`store/redis.rs`) reads the tag section and rewrites "fresh until"
//! and "stale until" in place to mark an entry stale (see [`Times::soft_purged`]),
//! without decoding the value.

use bytes::{BufMut, Bytes, BytesMut};

const MAGIC: &[u8; 2] = b"cg";
const FORMAT_VERSION: u8 = 2;
const FORMAT_VERSION_1: u8 = 1;
const FLAG_COMPRESSED: u8 = 0b0000_0001;
const KNOWN_FLAGS: u8 = FLAG_COMPRESSED;
/// Bytes before the tag section (version 2) or the content type (version 1).
const FIXED_LEN: usize = 28;
/// The shortest possible envelope (version 1, no content type, empty value).
const HEADER_LEN: usize = FIXED_LEN + 1;

/// Offset of "fresh until", rewritten in place by a soft purge (with "stale
/// until", the 8 bytes after it).
pub const FRESH_UNTIL_OFFSET: usize = 12;
/// Longest tag an envelope can carry.
pub const MAX_TAG_BYTES: usize = u8::MAX as usize;
/// Longest tag section (all tags with their length bytes).
pub const MAX_TAG_SECTION_BYTES: usize = u16::MAX as usize;

/// Longest content type an envelope can carry.
pub const MAX_CONTENT_TYPE_BYTES: usize = u8::MAX as usize;

/// A stored entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    /// When the entry was written, ms since the Unix epoch.
    pub created_at_ms: u64,
    /// Until when the entry is fresh, ms since the Unix epoch.
    pub fresh_until_ms: u64,
    /// Until when the entry may be served stale (>= `fresh_until_ms`).
    pub stale_until_ms: u64,
    /// The entry's tags (surrogate keys), each 1-255 bytes.
    pub tags: Vec<String>,
    /// How long the fill that wrote the entry took (lease grant to Set), in
    /// ms; 0 when unknown. Early refresh (XFetch) scales with it.
    pub fill_ms: u32,
    /// The media type given at write time (may be empty).
    pub content_type: String,
    /// Whether `value` is compressed.
    pub compressed: bool,
    /// The value's bytes as stored.
    pub value: Bytes,
}

/// Why stored bytes are not an envelope.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    /// Shorter than the fixed header.
    #[error("entry is {0} bytes, shorter than the {HEADER_LEN}-byte envelope header")]
    Truncated(usize),
    /// Does not start with the envelope magic: not written by cachegw.
    #[error("entry does not start with the envelope magic")]
    BadMagic,
    /// Written by a format this gateway does not know.
    #[error(
        "envelope format version {0} is not supported (this gateway reads version {FORMAT_VERSION})"
    )]
    UnsupportedVersion(u8),
    /// Flag bits this gateway does not know.
    #[error("envelope has unknown flags {0:#010b}")]
    UnknownFlags(u8),
    /// The timestamps contradict each other.
    #[error(
        "envelope times are inconsistent (created {created}, fresh until {fresh}, stale until {stale})"
    )]
    InconsistentTimes {
        /// created_at_ms
        created: u64,
        /// fresh_until_ms
        fresh: u64,
        /// stale_until_ms
        stale: u64,
    },
    /// The content type runs past the end or is not UTF-8.
    #[error("envelope content type is malformed")]
    BadContentType,
    /// The tag section runs past the end, or a tag is empty or not UTF-8.
    #[error("envelope tag section is malformed")]
    BadTags,
    /// The entry ends before its fill time.
    #[error("envelope is truncated before its fill time")]
    BadFillTime,
}

impl Envelope {
    /// Encodes the envelope into the bytes to store.
    ///
    /// # Panics
    /// Never for envelopes built by the cache layer, which bounds the content
    /// type to [`MAX_CONTENT_TYPE_BYTES`] and each tag to [`MAX_TAG_BYTES`]
    /// (and their total to [`MAX_TAG_SECTION_BYTES`]) before building one.
    pub fn encode(&self) -> Bytes {
        let content_type = self.content_type.as_bytes();
        let content_type_len =
            u8::try_from(content_type.len()).expect("content type length checked by the caller");
        let tags_len: usize = self.tags.iter().map(|tag| 1 + tag.len()).sum();
        let tags_len = u16::try_from(tags_len).expect("tag section length checked by the caller");
        let mut out = BytesMut::with_capacity(
            FIXED_LEN + 7 + usize::from(tags_len) + content_type.len() + self.value.len(),
        );
        out.put_slice(MAGIC);
        out.put_u8(FORMAT_VERSION);
        out.put_u8(if self.compressed { FLAG_COMPRESSED } else { 0 });
        out.put_u64_le(self.created_at_ms);
        out.put_u64_le(self.fresh_until_ms);
        out.put_u64_le(self.stale_until_ms);
        out.put_u16_le(tags_len);
        for tag in &self.tags {
            out.put_u8(u8::try_from(tag.len()).expect("tag length checked by the caller"));
            out.put_slice(tag.as_bytes());
        }
        out.put_u32_le(self.fill_ms);
        out.put_u8(content_type_len);
        out.put_slice(content_type);
        out.put_slice(&self.value);
        out.freeze()
    }

    /// The entry's times.
    pub fn times(&self) -> Times {
        Times {
            created_at_ms: self.created_at_ms,
            fresh_until_ms: self.fresh_until_ms,
            stale_until_ms: self.stale_until_ms,
        }
    }

    /// Decodes stored bytes; the value shares `bytes`' buffer (no copy).
    pub fn decode(bytes: Bytes) -> Result<Envelope, EnvelopeError> {
        Self::decode_keeping(bytes, true)
    }

    /// [`decode`](Self::decode) for a read, which has no use for the tags:
    /// `tags` is left empty, so that a tagged entry's read copies none of
    /// them, and the tag section is checked for what locates the value (its
    /// length and each tag's), not for its text. Bytes that decode fails
    /// only for a tag that is not UTF-8 read as their value here; everything
    /// else fails the same way in both.
    pub fn decode_untagged(bytes: Bytes) -> Result<Envelope, EnvelopeError> {
        Self::decode_keeping(bytes, false)
    }

    fn decode_keeping(bytes: Bytes, keep_tags: bool) -> Result<Envelope, EnvelopeError> {
        let version = check_header(&bytes)?;
        let u64_at = |offset: usize| {
            let mut word = [0u8; 8];
            word.copy_from_slice(&bytes[offset..offset + 8]);
            u64::from_le_bytes(word)
        };
        let (created, fresh, stale) = (u64_at(4), u64_at(12), u64_at(20));
        if !(created <= fresh && fresh <= stale) {
            return Err(EnvelopeError::InconsistentTimes {
                created,
                fresh,
                stale,
            });
        }
        let (tags, fill_ms, content_type_at) = if version == FORMAT_VERSION_1 {
            (Vec::new(), 0, FIXED_LEN)
        } else {
            let section = tag_section(&bytes).ok_or(EnvelopeError::BadTags)?;
            let mut tags = Vec::new();
            for tag in Tags(section) {
                let tag = tag.ok_or(EnvelopeError::BadTags)?;
                if keep_tags {
                    let tag = std::str::from_utf8(tag).map_err(|_| EnvelopeError::BadTags)?;
                    tags.push(tag.to_owned());
                }
            }
            let fill_at = FIXED_LEN + 2 + section.len();
            let fill_ms = bytes
                .get(fill_at..fill_at + 4)
                .and_then(|word| word.try_into().ok())
                .map(u32::from_le_bytes)
                .ok_or(EnvelopeError::BadFillTime)?;
            (tags, fill_ms, fill_at + 4)
        };
        let content_type_len = *bytes
            .get(content_type_at)
            .ok_or(EnvelopeError::BadContentType)?;
        let content_type_start = content_type_at + 1;
        let content_type_end = content_type_start + usize::from(content_type_len);
        if content_type_end > bytes.len() {
            return Err(EnvelopeError::BadContentType);
        }
        let content_type = std::str::from_utf8(&bytes[content_type_start..content_type_end])
            .map_err(|_| EnvelopeError::BadContentType)?
            .to_owned();
        Ok(Envelope {
            created_at_ms: created,
            fresh_until_ms: fresh,
            stale_until_ms: stale,
            tags,
            fill_ms,
            content_type,
            compressed: flags_of(&bytes) & FLAG_COMPRESSED != 0,
            value: bytes.slice(content_type_end..),
        })
    }
}

/// Whether the stored bytes are an envelope that carries `tag`. Reads only
/// the header and the tag section; anything malformed carries no tag.
pub fn carries_tag(bytes: &[u8], tag: &str) -> bool {
    matches!(check_header(bytes), Ok(FORMAT_VERSION))
        && tag_section(bytes)
            .is_some_and(|section| Tags(section).any(|candidate| candidate == Some(tag.as_bytes())))
}

/// An envelope's times, read from its header alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Times {
    /// When the entry was written, ms since the Unix epoch.
    pub created_at_ms: u64,
    /// Until when it is fresh.
    pub fresh_until_ms: u64,
    /// Until when it may be served stale.
    pub stale_until_ms: u64,
}

impl Times {
    /// The stale window the entry was written with (what follows its fresh
    /// time), in ms.
    pub fn stale_window_ms(&self) -> u64 {
        self.stale_until_ms.saturating_sub(self.fresh_until_ms)
    }

    /// These times once a soft purge at `purged_at_ms` applies: an entry
    /// created by then and still fresh then stops being fresh at the purge,
    /// and its stale window starts at the purge instead of at its fresh end.
    /// So it is stale for at most that window from the purge, and an entry
    /// without one is over at once. Entries created after the purge, and
    /// those no longer fresh at it (already in their window, which ends
    /// sooner), keep their times.
    ///
    /// The one statement of the rule: the Redis store's purge script applies
    /// the same to the stored bytes (`store/redis.rs`), the read path to a
    /// namespace's soft-flush time.
    pub fn soft_purged(self, purged_at_ms: u64) -> Times {
        if self.created_at_ms > purged_at_ms || self.fresh_until_ms <= purged_at_ms {
            return self;
        }
        Times {
            created_at_ms: self.created_at_ms,
            fresh_until_ms: purged_at_ms,
            stale_until_ms: purged_at_ms.saturating_add(self.stale_window_ms()),
        }
    }
}

/// The times in the header of stored bytes; `None` if they are not an
/// envelope.
pub fn times(bytes: &[u8]) -> Option<Times> {
    check_header(bytes).ok()?;
    let u64_at = |offset: usize| {
        Some(u64::from_le_bytes(
            bytes[offset..offset + 8].try_into().ok()?,
        ))
    };
    Some(Times {
        created_at_ms: u64_at(4)?,
        fresh_until_ms: u64_at(FRESH_UNTIL_OFFSET)?,
        stale_until_ms: u64_at(FRESH_UNTIL_OFFSET + 8)?,
    })
}

/// What a soft purge does to one stored entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SoftPurge {
    /// Not an envelope, not fresh at the purge, or created after it: left
    /// alone.
    Untouched,
    /// Fresh, with no stale window: it is over, the store removes it.
    Remove,
    /// Fresh, with a stale window: these bytes (fresh and stale until moved
    /// to the purge, see [`Times::soft_purged`]) replace it, and the store
    /// drops it at most `stale_for_ms` from now.
    Rewrite {
        /// The entry with its new times.
        bytes: Bytes,
        /// Its stale window, ms.
        stale_for_ms: u64,
    },
}

/// What a soft purge at `now_ms` does to the stored bytes.
pub fn soft_purge(bytes: &[u8], now_ms: u64) -> SoftPurge {
    let Some(before) = times(bytes) else {
        return SoftPurge::Untouched;
    };
    let after = before.soft_purged(now_ms);
    if after == before {
        return SoftPurge::Untouched;
    }
    let stale_for_ms = after.stale_window_ms();
    if stale_for_ms == 0 {
        return SoftPurge::Remove;
    }
    let mut out = BytesMut::from(bytes);
    let offset = FRESH_UNTIL_OFFSET;
    out[offset..offset + 8].copy_from_slice(&after.fresh_until_ms.to_le_bytes());
    out[offset + 8..offset + 16].copy_from_slice(&after.stale_until_ms.to_le_bytes());
    SoftPurge::Rewrite {
        bytes: out.freeze(),
        stale_for_ms,
    }
}

/// Checks length, magic, version and flags; returns the version.
fn check_header(bytes: &[u8]) -> Result<u8, EnvelopeError> {
    if bytes.len() < HEADER_LEN {
        return Err(EnvelopeError::Truncated(bytes.len()));
    }
    if &bytes[0..2] != MAGIC {
        return Err(EnvelopeError::BadMagic);
    }
    let version = bytes[2];
    if version != FORMAT_VERSION && version != FORMAT_VERSION_1 {
        return Err(EnvelopeError::UnsupportedVersion(version));
    }
    let flags = flags_of(bytes);
    if flags & !KNOWN_FLAGS != 0 {
        return Err(EnvelopeError::UnknownFlags(flags));
    }
    Ok(version)
}

fn flags_of(bytes: &[u8]) -> u8 {
    bytes[3]
}

/// The tag section of a version 2 envelope whose header was checked.
fn tag_section(bytes: &[u8]) -> Option<&[u8]> {
    let len = u16::from_le_bytes([*bytes.get(FIXED_LEN)?, *bytes.get(FIXED_LEN + 1)?]);
    bytes.get(FIXED_LEN + 2..FIXED_LEN + 2 + usize::from(len))
}

/// The tags of a tag section; `None` for a malformed one (then stops).
struct Tags<'a>(&'a [u8]);

impl<'a> Iterator for Tags<'a> {
    type Item = Option<&'a [u8]>;

    fn next(&mut self) -> Option<Self::Item> {
        let (&len, rest) = self.0.split_first()?;
        let len = usize::from(len);
        if len == 0 || len > rest.len() {
            self.0 = &[];
            return Some(None);
        }
        let (tag, rest) = rest.split_at(len);
        self.0 = rest;
        Some(Some(tag))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(value: &[u8]) -> Envelope {
        Envelope {
            created_at_ms: 1_700_000_000_000,
            fresh_until_ms: 1_700_000_060_000,
            stale_until_ms: 1_700_000_090_000,
            tags: vec!["user:42".to_owned(), "ünïcode tag".to_owned()],
            fill_ms: 1234,
            content_type: "application/json".to_owned(),
            compressed: false,
            value: Bytes::copy_from_slice(value),
        }
    }

    #[test]
    fn round_trips_every_field_and_any_bytes() {
        for value in [&b""[..], b"x", &[0u8, 255, 0, 10, 13], &vec![0xAB; 70_000]] {
            let envelope = sample(value);
            assert_eq!(Envelope::decode(envelope.encode()).unwrap(), envelope);
        }
        let mut compressed = sample(b"zz");
        compressed.compressed = true;
        compressed.content_type.clear();
        compressed.tags.clear();
        assert_eq!(Envelope::decode(compressed.encode()).unwrap(), compressed);
    }

    #[test]
    fn rejects_what_cachegw_did_not_write() {
        assert_eq!(
            Envelope::decode(Bytes::from_static(b"hello")),
            Err(EnvelopeError::Truncated(5))
        );
        let plain = Bytes::from(vec![b'{'; 64]);
        assert_eq!(Envelope::decode(plain), Err(EnvelopeError::BadMagic));
    }

    /// Where `sample`'s fill time starts.
    fn fill_at(envelope: &Envelope) -> usize {
        FIXED_LEN + 2 + envelope.tags.iter().map(|t| 1 + t.len()).sum::<usize>()
    }

    /// Where `sample`'s content-type length byte sits.
    fn content_type_at(envelope: &Envelope) -> usize {
        fill_at(envelope) + 4
    }

    #[test]
    fn rejects_unknown_versions_flags_and_bad_fields() {
        let envelope = sample(b"v");
        let good = envelope.encode().to_vec();
        let at = content_type_at(&envelope);
        let with = |index: usize, byte: u8| {
            let mut bytes = good.clone();
            bytes[index] = byte;
            let decoded = Envelope::decode(Bytes::from(bytes.clone()));
            assert_eq!(
                Envelope::decode_untagged(Bytes::from(bytes)).err(),
                decoded.clone().err(),
                "a read checks what decode checks (byte {index} = {byte})"
            );
            decoded
        };
        assert_eq!(with(2, 9), Err(EnvelopeError::UnsupportedVersion(9)));
        assert_eq!(with(3, 0b100), Err(EnvelopeError::UnknownFlags(0b100)));
        assert_eq!(with(at, 200), Err(EnvelopeError::BadContentType));
        assert_eq!(with(at + 1, 0xFF), Err(EnvelopeError::BadContentType));
        assert!(matches!(
            with(19, 0xFF),
            Err(EnvelopeError::InconsistentTimes { .. })
        ));
        assert_eq!(with(FIXED_LEN + 1, 0xFF), Err(EnvelopeError::BadTags));
        assert_eq!(
            with(FIXED_LEN + 2, 0),
            Err(EnvelopeError::BadTags),
            "empty tag"
        );
        assert_eq!(with(FIXED_LEN + 2, 200), Err(EnvelopeError::BadTags));
        // A tag that is not UTF-8: decode refuses it; a read, which does not
        // look at the tags' text, finds the value all the same.
        let mut not_utf8 = good.clone();
        not_utf8[FIXED_LEN + 3] = 0xFF;
        assert_eq!(
            Envelope::decode(Bytes::from(not_utf8.clone())),
            Err(EnvelopeError::BadTags)
        );
        assert_eq!(
            Envelope::decode_untagged(Bytes::from(not_utf8)).map(|read| read.value),
            Ok(envelope.value)
        );
    }

    #[test]
    fn a_read_decodes_everything_but_the_tags() {
        let envelope = sample(b"value");
        assert!(!envelope.tags.is_empty());
        let read = Envelope::decode_untagged(envelope.encode()).unwrap();
        assert_eq!(
            read,
            Envelope {
                tags: Vec::new(),
                ..envelope
            }
        );
    }

    #[test]
    fn every_truncation_is_a_precise_error_or_a_shorter_value() {
        let envelope = sample(b"value");
        let good = envelope.encode();
        let fill_end = content_type_at(&envelope);
        let value_start = fill_end + 1 + envelope.content_type.len();
        for len in 0..good.len() {
            let decoded = Envelope::decode(good.slice(..len));
            if len < HEADER_LEN {
                assert_eq!(decoded, Err(EnvelopeError::Truncated(len)));
            } else if len < fill_at(&envelope) {
                assert_eq!(decoded, Err(EnvelopeError::BadTags), "at {len}");
            } else if len < fill_end {
                assert_eq!(decoded, Err(EnvelopeError::BadFillTime), "at {len}");
            } else if len < value_start {
                assert_eq!(decoded, Err(EnvelopeError::BadContentType), "at {len}");
            } else {
                assert_eq!(decoded.unwrap().value, &b"value"[..len - value_start]);
            }
        }
    }

    #[test]
    fn still_reads_version_1_entries() {
        let mut v1 = vec![b'c', b'g', 1, 0];
        for time in [10u64, 20, 30] {
            v1.extend_from_slice(&time.to_le_bytes());
        }
        v1.push(4);
        v1.extend_from_slice(b"text");
        v1.extend_from_slice(b"old value");
        let decoded = Envelope::decode(Bytes::from(v1.clone())).unwrap();
        assert_eq!(decoded.value, &b"old value"[..]);
        assert_eq!(decoded.content_type, "text");
        assert!(decoded.tags.is_empty());
        assert!(!carries_tag(&v1, "text"));
    }

    #[test]
    fn finds_exactly_the_tags_it_carries() {
        let bytes = sample(b"v").encode();
        assert!(carries_tag(&bytes, "user:42"));
        assert!(carries_tag(&bytes, "ünïcode tag"));
        for absent in ["user:4", "user:42x", "ser:42", "", "application/json", "v"] {
            assert!(!carries_tag(&bytes, absent), "{absent:?}");
        }
        assert!(!carries_tag(
            b"plain bytes that are no envelope at all",
            "user:42"
        ));
    }

    #[test]
    fn a_soft_purge_starts_the_stale_window_at_the_purge() {
        let envelope = sample(b"v");
        let window = envelope.stale_until_ms - envelope.fresh_until_ms;
        let now = envelope.fresh_until_ms - 5_000;
        let SoftPurge::Rewrite {
            bytes,
            stale_for_ms,
        } = soft_purge(&envelope.encode(), now)
        else {
            panic!("a fresh entry with a stale window is rewritten");
        };
        assert_eq!(stale_for_ms, window);
        let marked = Envelope::decode(bytes).unwrap();
        assert_eq!(
            (marked.fresh_until_ms, marked.stale_until_ms),
            (now, now + window),
            "stale for its window from the purge, not to its old stale end"
        );
        assert_eq!(
            Envelope {
                fresh_until_ms: envelope.fresh_until_ms,
                stale_until_ms: envelope.stale_until_ms,
                ..marked
            },
            envelope,
            "nothing else moves"
        );
    }

    #[test]
    fn a_soft_purge_ends_an_entry_without_a_stale_window() {
        let mut envelope = sample(b"v");
        envelope.stale_until_ms = envelope.fresh_until_ms;
        assert_eq!(
            soft_purge(&envelope.encode(), envelope.fresh_until_ms - 5_000),
            SoftPurge::Remove
        );
    }

    #[test]
    fn a_soft_purge_leaves_stale_later_and_foreign_entries_alone() {
        let envelope = sample(b"v");
        let bytes = envelope.encode();
        assert_eq!(
            soft_purge(&bytes, envelope.fresh_until_ms),
            SoftPurge::Untouched,
            "already stale"
        );
        assert_eq!(
            soft_purge(&bytes, envelope.created_at_ms - 1),
            SoftPurge::Untouched,
            "written after the purge"
        );
        assert_eq!(
            soft_purge(b"not an envelope, long enough to have a header", 1),
            SoftPurge::Untouched
        );
    }

    #[test]
    fn soft_purged_times_never_outlast_the_window_from_the_purge() {
        let times = sample(b"v").encode();
        let times = super::times(&times).unwrap();
        let window = times.stale_window_ms();
        for purged_at in [
            times.created_at_ms,
            times.fresh_until_ms - 1,
            times.fresh_until_ms,
            times.fresh_until_ms + 10_000,
            times.stale_until_ms + 1,
        ] {
            let after = times.soft_purged(purged_at);
            assert!(after.fresh_until_ms <= purged_at.max(times.created_at_ms));
            assert!(
                after.stale_until_ms <= purged_at + window,
                "purged at {purged_at}: {after:?}"
            );
            assert!(after.stale_until_ms <= times.stale_until_ms);
        }
    }
}
