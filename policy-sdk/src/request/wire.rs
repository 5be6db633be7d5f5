//! The protobuf wire format, read in place: what [`Request::decode`](super::Request::decode)
//! needs to take a `PolicyInput` apart without copying it.
//!
//! prost decodes a `PolicyInput` into owned strings, a byte vector and a `BTreeMap`: five
//! allocations and a copy of every byte (the config, the largest field, on every call) before
//! the policy runs, most of the SDK's own cost per decision (docs/BENCHMARKS.md). This reader
//! hands out slices of the input instead. It follows prost's decoding rules, so that the two
//! agree on every input (a unit test compares them on random and damaged messages):
//! - a field seen twice keeps its last value; a map entry's missing key or value is empty;
//! - unknown fields are skipped by their wire type, groups included;
//! - errors: a truncated varint or length, a varint over ten bytes (or one whose tenth byte
//!   sets bits beyond 64), a tag over `u32`, field number 0, wire types 6 and 7, a known field
//!   with the wrong wire type, a string that is not UTF-8, an end group tag that opens nothing.

use std::fmt;

/// Why a `PolicyInput` does not decode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DecodeError(&'static str);

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

/// Protobuf wire types.
const VARINT: u8 = 0;
const FIXED64: u8 = 1;
const LEN: u8 = 2;
const START_GROUP: u8 = 3;
const END_GROUP: u8 = 4;
const FIXED32: u8 = 5;

/// Nested groups an unknown field may hold before the input is refused (prost's limit).
const MAX_DEPTH: u32 = 100;

/// A cursor over one message's bytes.
pub(crate) struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    pub(crate) fn new(bytes: &'a [u8]) -> Self {
        Reader { bytes }
    }

    /// The next field's number and wire type, or `None` at the end of the message.
    pub(crate) fn tag(&mut self) -> Result<Option<(u32, u8)>, DecodeError> {
        if self.bytes.is_empty() {
            return Ok(None);
        }
        let tag = self.varint()?;
        let tag = u32::try_from(tag).map_err(|_| DecodeError("invalid key value"))?;
        let wire_type = (tag & 7) as u8;
        if wire_type > FIXED32 {
            return Err(DecodeError("invalid wire type value"));
        }
        match tag >> 3 {
            0 => Err(DecodeError("invalid tag value: 0")),
            field => Ok(Some((field, wire_type))),
        }
    }

    /// A base-128 varint, least significant group first, at most ten bytes.
    fn varint(&mut self) -> Result<u64, DecodeError> {
        let mut value = 0u64;
        for (at, &byte) in self.bytes.iter().enumerate().take(10) {
            if at == 9 && byte > 1 {
                return Err(DecodeError("invalid varint"));
            }
            value |= u64::from(byte & 0x7f) << (7 * at);
            if byte < 0x80 {
                self.bytes = &self.bytes[at + 1..];
                return Ok(value);
            }
        }
        Err(DecodeError("invalid varint"))
    }

    /// `len` bytes, taken off the front.
    fn take(&mut self, len: u64) -> Result<&'a [u8], DecodeError> {
        let len = usize::try_from(len)
            .ok()
            .filter(|len| *len <= self.bytes.len())
            .ok_or(DecodeError("buffer underflow"))?;
        let (taken, rest) = self.bytes.split_at(len);
        self.bytes = rest;
        Ok(taken)
    }

    fn expect(wire_type: u8, expected: u8) -> Result<(), DecodeError> {
        if wire_type == expected {
            Ok(())
        } else {
            Err(DecodeError("invalid wire type for this field"))
        }
    }

    /// An integer field (`uint64`, `int32`, an enum), as its 64 bits.
    pub(crate) fn varint_field(&mut self, wire_type: u8) -> Result<u64, DecodeError> {
        Self::expect(wire_type, VARINT)?;
        self.varint()
    }

    /// A `bytes` field, in place.
    pub(crate) fn bytes_field(&mut self, wire_type: u8) -> Result<&'a [u8], DecodeError> {
        Self::expect(wire_type, LEN)?;
        let len = self.varint()?;
        self.take(len)
    }

    /// A `string` field, in place.
    pub(crate) fn string_field(&mut self, wire_type: u8) -> Result<&'a str, DecodeError> {
        std::str::from_utf8(self.bytes_field(wire_type)?)
            .map_err(|_| DecodeError("invalid string value: data is not UTF-8 encoded"))
    }

    /// One entry of a `map<string, string>` field: its key and value.
    pub(crate) fn map_entry(&mut self, wire_type: u8) -> Result<(&'a str, &'a str), DecodeError> {
        let mut entry = Reader::new(self.bytes_field(wire_type)?);
        let (mut key, mut value) = ("", "");
        while let Some((field, wire_type)) = entry.tag()? {
            match field {
                1 => key = entry.string_field(wire_type)?,
                2 => value = entry.string_field(wire_type)?,
                _ => entry.skip(field, wire_type)?,
            }
        }
        Ok((key, value))
    }

    /// Passes over a field this reader does not know.
    pub(crate) fn skip(&mut self, field: u32, wire_type: u8) -> Result<(), DecodeError> {
        self.skip_nested(field, wire_type, MAX_DEPTH)
    }

    fn skip_nested(&mut self, field: u32, wire_type: u8, depth: u32) -> Result<(), DecodeError> {
        match wire_type {
            VARINT => self.varint().map(drop),
            FIXED64 => self.take(8).map(drop),
            FIXED32 => self.take(4).map(drop),
            LEN => {
                let len = self.varint()?;
                self.take(len).map(drop)
            }
            START_GROUP => {
                let depth = depth
                    .checked_sub(1)
                    .ok_or(DecodeError("recursion limit reached"))?;
                loop {
                    match self.tag()? {
                        None => return Err(DecodeError("unexpected end of group")),
                        Some((inner, END_GROUP)) if inner == field => return Ok(()),
                        Some((_, END_GROUP)) => {
                            return Err(DecodeError("unexpected end group tag"));
                        }
                        Some((inner, inner_type)) => self.skip_nested(inner, inner_type, depth)?,
                    }
                }
            }
            _ => Err(DecodeError("unexpected end group tag")),
        }
    }
}
