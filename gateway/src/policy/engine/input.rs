//! What a call writes into its instance: the encoded `PolicyInput` (or, for
//! `cachegw_init`, the config bytes), laid straight into the memory the
//! instance reserved for it. A request's decision is encoded from the
//! request's own fields ([`BorrowedInput`]): no owned copy of its key,
//! namespace and attributes, no intermediate buffer.

use std::collections::HashMap;

use prost::{
    Message,
    encoding::{WireType, encode_key, encode_varint, encoded_len_varint, key_len},
};

use crate::api::proto::policy as pb;

/// Bytes a call writes into its instance as its input.
pub trait CallInput {
    /// How many bytes [`write`](Self::write) writes.
    fn encoded_len(&self) -> usize;
    /// Writes exactly [`encoded_len`](Self::encoded_len) bytes into `out`,
    /// which is that long.
    fn write(&self, out: &mut [u8]);
}

impl CallInput for [u8] {
    fn encoded_len(&self) -> usize {
        self.len()
    }

    fn write(&self, out: &mut [u8]) {
        out.copy_from_slice(self);
    }
}

impl CallInput for pb::PolicyInput {
    fn encoded_len(&self) -> usize {
        Message::encoded_len(self)
    }

    fn write(&self, mut out: &mut [u8]) {
        // `out` is `encoded_len` bytes: prost's only error, too small a
        // buffer, cannot happen.
        let encoded = self.encode(&mut out);
        debug_assert!(encoded.is_ok(), "{encoded:?}");
    }
}

/// A `PolicyInput` whose strings and bytes are borrowed: the decision
/// path's, encoded as prost would encode the owned message (proto3: a field
/// at its default value is left out; a map entry's empty key or value too).
#[derive(Debug, Clone, Copy)]
pub struct BorrowedInput<'a> {
    pub op: pb::Operation,
    pub namespace: &'a str,
    pub key: &'a str,
    pub attributes: &'a HashMap<String, String>,
    pub value_size: u64,
    pub now_unix_ms: u64,
    pub config: &'a [u8],
}

#[cfg(test)]
impl BorrowedInput<'_> {
    /// The owned message with the same encoding.
    fn owned(&self) -> pb::PolicyInput {
        pb::PolicyInput {
            op: self.op as i32,
            namespace: self.namespace.to_owned(),
            key: self.key.to_owned(),
            attributes: self.attributes.clone(),
            value_size: self.value_size,
            now_unix_ms: self.now_unix_ms,
            config: self.config.to_vec().into(),
        }
    }
}

/// Field numbers of `PolicyInput` (proto/cachegw/policy/v1/policy.proto).
mod field {
    pub const OP: u32 = 1;
    pub const NAMESPACE: u32 = 2;
    pub const KEY: u32 = 3;
    pub const ATTRIBUTES: u32 = 4;
    pub const VALUE_SIZE: u32 = 5;
    pub const NOW_UNIX_MS: u32 = 6;
    pub const CONFIG: u32 = 7;
}

/// Bytes of a length-delimited field holding `len` bytes (0 if empty).
fn delimited_len(tag: u32, len: usize) -> usize {
    if len == 0 {
        0
    } else {
        key_len(tag) + encoded_len_varint(len as u64) + len
    }
}

/// Bytes of a varint field (0 if 0).
fn varint_len(tag: u32, value: u64) -> usize {
    if value == 0 {
        0
    } else {
        key_len(tag) + encoded_len_varint(value)
    }
}

/// The body of one attribute's map entry.
fn entry_len(name: &str, value: &str) -> usize {
    delimited_len(1, name.len()) + delimited_len(2, value.len())
}

fn put_delimited(out: &mut &mut [u8], tag: u32, bytes: &[u8]) {
    if !bytes.is_empty() {
        encode_key(tag, WireType::LengthDelimited, out);
        encode_varint(bytes.len() as u64, out);
        put(out, bytes);
    }
}

fn put_varint(out: &mut &mut [u8], tag: u32, value: u64) {
    if value != 0 {
        encode_key(tag, WireType::Varint, out);
        encode_varint(value, out);
    }
}

fn put(out: &mut &mut [u8], bytes: &[u8]) {
    let (head, rest) = std::mem::take(out).split_at_mut(bytes.len());
    head.copy_from_slice(bytes);
    *out = rest;
}

impl CallInput for BorrowedInput<'_> {
    fn encoded_len(&self) -> usize {
        varint_len(field::OP, self.op as i32 as u64)
            + delimited_len(field::NAMESPACE, self.namespace.len())
            + delimited_len(field::KEY, self.key.len())
            + self
                .attributes
                .iter()
                .map(|(name, value)| {
                    // An entry is written even when both sides are empty.
                    let body = entry_len(name, value);
                    key_len(field::ATTRIBUTES) + encoded_len_varint(body as u64) + body
                })
                .sum::<usize>()
            + varint_len(field::VALUE_SIZE, self.value_size)
            + varint_len(field::NOW_UNIX_MS, self.now_unix_ms)
            + delimited_len(field::CONFIG, self.config.len())
    }

    fn write(&self, out: &mut [u8]) {
        let out = &mut &mut *out;
        // An enum is an int32: a negative one is ten bytes, sign-extended.
        put_varint(out, field::OP, self.op as i32 as u64);
        put_delimited(out, field::NAMESPACE, self.namespace.as_bytes());
        put_delimited(out, field::KEY, self.key.as_bytes());
        for (name, value) in self.attributes {
            encode_key(field::ATTRIBUTES, WireType::LengthDelimited, out);
            encode_varint(entry_len(name, value) as u64, out);
            put_delimited(out, 1, name.as_bytes());
            put_delimited(out, 2, value.as_bytes());
        }
        put_varint(out, field::VALUE_SIZE, self.value_size);
        put_varint(out, field::NOW_UNIX_MS, self.now_unix_ms);
        put_delimited(out, field::CONFIG, self.config);
        debug_assert!(out.is_empty(), "encoded_len and write disagree");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encoded(input: &(impl CallInput + ?Sized)) -> Vec<u8> {
        let mut out = vec![0; input.encoded_len()];
        input.write(&mut out);
        out
    }

    /// A small deterministic generator (no dependency for a test's dice).
    struct Dice(u64);

    impl Dice {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn text(&mut self) -> String {
            let len = match self.next() % 4 {
                0 => 0,
                1 => 1 + self.next() % 8,
                2 => 120 + self.next() % 20,
                _ => 200 + self.next() % 300,
            } as usize;
            (0..len)
                .map(|_| ['a', ':', 'é', '€', '\0'][(self.next() % 5) as usize])
                .collect()
        }

        fn number(&mut self) -> u64 {
            match self.next() % 4 {
                0 => 0,
                1 => self.next() % 128,
                2 => self.next() % 100_000,
                _ => self.next(),
            }
        }
    }

    #[test]
    fn a_borrowed_input_encodes_as_prost_encodes_the_owned_message() {
        let mut dice = Dice(0x9e37_79b9_7f4a_7c15);
        for _ in 0..5_000 {
            let attributes: HashMap<String, String> = (0..dice.next() % 4)
                .map(|_| (dice.text(), dice.text()))
                .collect();
            let (namespace, key, config) = (dice.text(), dice.text(), dice.text());
            let input = BorrowedInput {
                op: [
                    pb::Operation::Get,
                    pb::Operation::Set,
                    pb::Operation::Delete,
                ][(dice.next() % 3) as usize],
                namespace: &namespace,
                key: &key,
                attributes: &attributes,
                value_size: dice.number(),
                now_unix_ms: dice.number(),
                config: config.as_bytes(),
            };
            let owned = input.owned();
            // Byte for byte what prost writes (attributes in the same map's
            // order), and so what every policy decodes.
            assert_eq!(encoded(&input), owned.encode_to_vec(), "{owned:?}");
            assert_eq!(encoded(&owned), owned.encode_to_vec());
            assert_eq!(
                pb::PolicyInput::decode(encoded(&input).as_slice()).unwrap(),
                owned
            );
        }
    }

    #[test]
    fn bytes_are_written_as_they_are() {
        assert_eq!(encoded(&b"{\"a\":1}"[..]), b"{\"a\":1}");
        assert_eq!(encoded(&b""[..]), b"");
    }
}
