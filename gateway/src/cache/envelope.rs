//! The value envelope: what the gateway stores under a key. It carries the
//! client's bytes plus what freshness, content negotiation and compression
//! need, behind a magic and a format version so that a foreign or corrupt
//! value is recognised, never misread.
//!
//! Layout (all integers little-endian):
//!
//! | offset | size | field                                       |
//! |--------|------|---------------------------------------------|
//! | 0      | 2    | magic `b"cg"`                               |
//! | 2      | 1    | format version (1)                          |
//! | 3      | 1    | flags (bit 0: value is compressed)          |
//! | 4      | 8    | created at, ms since the Unix epoch         |
//! | 12     | 8    | fresh until, ms since the Unix epoch        |
//! | 20     | 8    | stale until, ms since the Unix epoch        |
//! | 28     | 1    | content-type length `n` (0-255)             |
//! | 29     | n    | content type, UTF-8                         |
//! | 29 + n | rest | the value                                   |

use bytes::{BufMut, Bytes, BytesMut};

const MAGIC: &[u8; 2] = b"cg";
const FORMAT_VERSION: u8 = 1;
const FLAG_COMPRESSED: u8 = 0b0000_0001;
const KNOWN_FLAGS: u8 = FLAG_COMPRESSED;
const HEADER_LEN: usize = 29;

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
}

impl Envelope {
    /// Encodes the envelope into the bytes to store.
    ///
    /// # Panics
    /// Never for envelopes built by the cache layer, which bounds the content
    /// type to [`MAX_CONTENT_TYPE_BYTES`] before building one.
    pub fn encode(&self) -> Bytes {
        let content_type = self.content_type.as_bytes();
        let content_type_len =
            u8::try_from(content_type.len()).expect("content type length checked by the caller");
        let mut out = BytesMut::with_capacity(HEADER_LEN + content_type.len() + self.value.len());
        out.put_slice(MAGIC);
        out.put_u8(FORMAT_VERSION);
        out.put_u8(if self.compressed { FLAG_COMPRESSED } else { 0 });
        out.put_u64_le(self.created_at_ms);
        out.put_u64_le(self.fresh_until_ms);
        out.put_u64_le(self.stale_until_ms);
        out.put_u8(content_type_len);
        out.put_slice(content_type);
        out.put_slice(&self.value);
        out.freeze()
    }

    /// Decodes stored bytes; the value shares `bytes`' buffer (no copy).
    pub fn decode(bytes: Bytes) -> Result<Envelope, EnvelopeError> {
        if bytes.len() < HEADER_LEN {
            return Err(EnvelopeError::Truncated(bytes.len()));
        }
        if &bytes[0..2] != MAGIC {
            return Err(EnvelopeError::BadMagic);
        }
        if bytes[2] != FORMAT_VERSION {
            return Err(EnvelopeError::UnsupportedVersion(bytes[2]));
        }
        let flags = bytes[3];
        if flags & !KNOWN_FLAGS != 0 {
            return Err(EnvelopeError::UnknownFlags(flags));
        }
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
        let content_type_end = HEADER_LEN + usize::from(bytes[28]);
        if content_type_end > bytes.len() {
            return Err(EnvelopeError::BadContentType);
        }
        let content_type = std::str::from_utf8(&bytes[HEADER_LEN..content_type_end])
            .map_err(|_| EnvelopeError::BadContentType)?
            .to_owned();
        Ok(Envelope {
            created_at_ms: created,
            fresh_until_ms: fresh,
            stale_until_ms: stale,
            content_type,
            compressed: flags & FLAG_COMPRESSED != 0,
            value: bytes.slice(content_type_end..),
        })
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

    #[test]
    fn rejects_unknown_versions_flags_and_bad_fields() {
        let good = sample(b"v").encode().to_vec();
        let with = |index: usize, byte: u8| {
            let mut bytes = good.clone();
            bytes[index] = byte;
            Envelope::decode(Bytes::from(bytes))
        };
        assert_eq!(with(2, 9), Err(EnvelopeError::UnsupportedVersion(9)));
        assert_eq!(with(3, 0b100), Err(EnvelopeError::UnknownFlags(0b100)));
        assert_eq!(with(28, 200), Err(EnvelopeError::BadContentType));
        assert!(matches!(
            with(19, 0xFF),
            Err(EnvelopeError::InconsistentTimes { .. })
        ));
        let mut bad_utf8 = good.clone();
        bad_utf8[29] = 0xFF;
        assert_eq!(
            Envelope::decode(Bytes::from(bad_utf8)),
            Err(EnvelopeError::BadContentType)
        );
    }

    #[test]
    fn every_truncation_is_a_precise_error_or_a_shorter_value() {
        let envelope = sample(b"value");
        let good = envelope.encode();
        let value_start = HEADER_LEN + envelope.content_type.len();
        for len in 0..good.len() {
            let decoded = Envelope::decode(good.slice(..len));
            if len < HEADER_LEN {
                assert_eq!(decoded, Err(EnvelopeError::Truncated(len)));
            } else if len < value_start {
                assert_eq!(decoded, Err(EnvelopeError::BadContentType));
            } else {
                assert_eq!(decoded.unwrap().value, &b"value"[..len - value_start]);
            }
        }
    }
}
