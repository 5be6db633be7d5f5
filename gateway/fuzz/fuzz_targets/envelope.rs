//! The value envelope: bytes read back from the store (Redis is shared
//! infrastructure; anything may sit under a key) must decode or be refused,
//! never panic, in `Envelope::decode` and in the header-only readers the read
//! path and the purge use (`times`, `soft_purge`, `carries_tag`). What decodes
//! re-encodes to the same bytes, and an envelope built from the input
//! round-trips through encode and decode.

#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use bytes::Bytes;
use gateway::cache::{
    Envelope, EnvelopeError, MAX_CONTENT_TYPE_BYTES, MAX_TAG_BYTES, MAX_TAG_SECTION_BYTES,
    envelope::{self, FRESH_UNTIL_OFFSET, SoftPurge},
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    stored_bytes(data);
    if let Ok(built) = built_envelope(&mut Unstructured::new(data)) {
        round_trip(&built);
    }
});

/// Arbitrary bytes as the store hands them back.
fn stored_bytes(data: &[u8]) {
    let decoded = Envelope::decode(Bytes::copy_from_slice(data));
    // What a read decodes is the same, tags aside, and fails the same way;
    // except that a read does not check the tags' text: bytes that decode
    // refuses only for a tag that is not UTF-8 get past the tag section in a
    // read, to its value or to a later field's error.
    let read = Envelope::decode_untagged(Bytes::copy_from_slice(data));
    if decoded == Err(EnvelopeError::BadTags) && only_the_tags_text_is_bad(data) {
        assert_ne!(read, Err(EnvelopeError::BadTags));
    } else {
        assert_eq!(
            read,
            decoded.clone().map(|decoded| Envelope {
                tags: Vec::new(),
                ..decoded
            })
        );
    }
    let times = envelope::times(data);
    let now_ms = data.get(4..12).map_or(0, |word| {
        u64::from_le_bytes(word.try_into().expect("8 bytes")).wrapping_add(7)
    });
    let purged = envelope::soft_purge(data, now_ms);
    let probe = data.get(31..).map(String::from_utf8_lossy);
    let carries = probe.as_deref().map(|tag| envelope::carries_tag(data, tag));
    let Ok(decoded) = decoded else {
        return;
    };
    // Decoding checked the header that the readers check.
    let times = times.expect("a decodable envelope has times");
    assert_eq!(times.created_at_ms, decoded.created_at_ms);
    assert_eq!(times.fresh_until_ms, decoded.fresh_until_ms);
    let reencoded = decoded.encode();
    if data[2] == 2 {
        assert_eq!(&reencoded[..], data, "version 2 re-encodes byte for byte");
    }
    assert_eq!(Envelope::decode(reencoded).as_ref(), Ok(&decoded));
    for tag in &decoded.tags {
        assert_eq!(envelope::carries_tag(data, tag), data[2] == 2, "{tag:?}");
    }
    if let (Some(probe), Some(carries)) = (probe, carries) {
        assert_eq!(
            carries,
            data[2] == 2 && decoded.tags.iter().any(|t| *t == probe)
        );
    }
    check_purged(&decoded, data, now_ms, purged);
}

/// Whether the tag section of `data` (a version 2 envelope whose header
/// decode accepted) is well formed, and some tag in it is not UTF-8.
fn only_the_tags_text_is_bad(data: &[u8]) -> bool {
    let Some(&[low, high]) = data.get(28..30) else {
        return false;
    };
    let Some(mut section) = data.get(30..30 + usize::from(u16::from_le_bytes([low, high]))) else {
        return false;
    };
    let mut text_ok = true;
    while let Some((&len, rest)) = section.split_first() {
        let len = usize::from(len);
        if len == 0 || len > rest.len() {
            return false;
        }
        let (tag, rest) = rest.split_at(len);
        text_ok &= std::str::from_utf8(tag).is_ok();
        section = rest;
    }
    !text_ok
}

/// A soft purge at `now_ms` leaves an entry created after it or no longer
/// fresh alone, removes a fresh one without a stale window, and otherwise
/// rewrites only its fresh and stale times: stale from the purge, for its
/// stale window, not a millisecond longer.
fn check_purged(decoded: &Envelope, data: &[u8], now_ms: u64, purged: SoftPurge) {
    let window = decoded
        .stale_until_ms
        .saturating_sub(decoded.fresh_until_ms);
    if decoded.created_at_ms > now_ms || decoded.fresh_until_ms <= now_ms {
        assert_eq!(purged, SoftPurge::Untouched, "created later, or not fresh");
        return;
    }
    if window == 0 {
        assert_eq!(purged, SoftPurge::Remove, "fresh, no stale window");
        return;
    }
    let SoftPurge::Rewrite {
        bytes,
        stale_for_ms,
    } = purged
    else {
        panic!("a fresh entry with a stale window is rewritten, not {purged:?}");
    };
    assert_eq!(stale_for_ms, window);
    assert_eq!(bytes.len(), data.len());
    let times_end = FRESH_UNTIL_OFFSET + 16;
    assert_eq!(bytes[..FRESH_UNTIL_OFFSET], data[..FRESH_UNTIL_OFFSET]);
    assert_eq!(bytes[times_end..], data[times_end..]);
    let stale = Envelope::decode(bytes).expect("a purged envelope still decodes");
    assert_eq!(stale.fresh_until_ms, now_ms);
    assert_eq!(stale.stale_until_ms, now_ms.saturating_add(window));
    assert_eq!(
        Envelope {
            fresh_until_ms: decoded.fresh_until_ms,
            stale_until_ms: decoded.stale_until_ms,
            ..stale
        },
        *decoded
    );
}

/// An envelope within the bounds the cache layer enforces before building one.
fn built_envelope(u: &mut Unstructured<'_>) -> arbitrary::Result<Envelope> {
    let created_at_ms = u64::arbitrary(u)?;
    let fresh_until_ms = created_at_ms.saturating_add(u64::arbitrary(u)?);
    let stale_until_ms = fresh_until_ms.saturating_add(u64::arbitrary(u)?);
    let mut tags = Vec::new();
    let mut section = 0;
    while bool::arbitrary(u)? {
        let tag = truncated(String::arbitrary(u)?, MAX_TAG_BYTES);
        if tag.is_empty() || section + 1 + tag.len() > MAX_TAG_SECTION_BYTES {
            break;
        }
        section += 1 + tag.len();
        tags.push(tag);
    }
    Ok(Envelope {
        created_at_ms,
        fresh_until_ms,
        stale_until_ms,
        tags,
        fill_ms: u32::arbitrary(u)?,
        content_type: truncated(String::arbitrary(u)?, MAX_CONTENT_TYPE_BYTES),
        compressed: bool::arbitrary(u)?,
        value: Bytes::copy_from_slice(u.bytes(u.len())?),
    })
}

/// `text` cut to at most `max` bytes, on a character boundary.
fn truncated(mut text: String, max: usize) -> String {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.truncate(end);
    text
}

fn round_trip(built: &Envelope) {
    let bytes = built.encode();
    assert_eq!(Envelope::decode(bytes.clone()).as_ref(), Ok(built));
    let times = envelope::times(&bytes).expect("an encoded envelope has times");
    assert_eq!(times.created_at_ms, built.created_at_ms);
    assert_eq!(times.fresh_until_ms, built.fresh_until_ms);
    for tag in &built.tags {
        assert!(envelope::carries_tag(&bytes, tag), "{tag:?}");
    }
    let now_ms = built.created_at_ms.saturating_add(1);
    check_purged(built, &bytes, now_ms, envelope::soft_purge(&bytes, now_ms));
}
