//! Protobuf wire format for the few OTLP messages the agent writes on its
//! hot path, written straight into a byte buffer.
//!
//! Building owned `opentelemetry-proto` structs (a `String` per attribute key
//! and value, a `Vec` per span) and then encoding them cost more than
//! everything else the reader does per record. Here a span is written once,
//! field by field, as protobuf; the export request is assembled by
//! concatenating those bytes. Encoding follows prost's canonical form (fields
//! in tag order, proto3 defaults omitted, shortest varints), so a request
//! written here is byte-identical to prost encoding the same structs — the
//! tests check exactly that.
//!
//! Varints are written here rather than with `prost::encoding::encode_varint`:
//! that one goes through `BufMut` byte by byte, out of line, and took a fifth
//! of the reader's time in `--bench drain_convert`. The tests compare every
//! shape written here with prost's encoding.

/// Protobuf wire types.
#[derive(Clone, Copy, Debug)]
#[repr(u8)]
pub(crate) enum WireType {
    Varint = 0,
    SixtyFourBit = 1,
    LengthDelimited = 2,
    ThirtyTwoBit = 5,
}

/// A varint.
#[inline]
pub(crate) fn put_varint(buf: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        buf.push(value as u8 | 0x80);
        value >>= 7;
    }
    buf.push(value as u8);
}

/// A field key.
#[inline]
fn put_key(buf: &mut Vec<u8>, tag: u32, wire_type: WireType) {
    put_varint(buf, u64::from(tag << 3 | wire_type as u32));
}

/// A length-delimited field of `len` bytes, with its key (tags < 16, as all
/// of ours are).
pub(crate) const fn field_len(len: usize) -> usize {
    1 + varint_len(len as u64) + len
}

/// Bytes a varint of `value` takes.
pub(crate) const fn varint_len(value: u64) -> usize {
    let bits = u64::BITS - (value | 1).leading_zeros();
    (bits as usize * 9 + 64) / 64
}

/// Key and length of a length-delimited field whose body follows.
#[inline]
pub(crate) fn len_prefix(buf: &mut Vec<u8>, tag: u32, len: usize) {
    put_key(buf, tag, WireType::LengthDelimited);
    put_varint(buf, len as u64);
}

/// A bytes or string field, omitted when empty (proto3 default).
pub(crate) fn bytes_field(buf: &mut Vec<u8>, tag: u32, bytes: &[u8]) {
    if !bytes.is_empty() {
        len_prefix(buf, tag, bytes.len());
        buf.extend_from_slice(bytes);
    }
}

/// A `fixed64` field, omitted when zero.
pub(crate) fn fixed64_field(buf: &mut Vec<u8>, tag: u32, value: u64) {
    if value != 0 {
        put_key(buf, tag, WireType::SixtyFourBit);
        buf.extend_from_slice(&value.to_le_bytes());
    }
}

/// A `fixed32` field, omitted when zero.
pub(crate) fn fixed32_field(buf: &mut Vec<u8>, tag: u32, value: u32) {
    if value != 0 {
        put_key(buf, tag, WireType::ThirtyTwoBit);
        buf.extend_from_slice(&value.to_le_bytes());
    }
}

/// A varint (`uint32`, `int32` enum) field, omitted when zero.
pub(crate) fn varint_field(buf: &mut Vec<u8>, tag: u32, value: u64) {
    if value != 0 {
        put_key(buf, tag, WireType::Varint);
        put_varint(buf, value);
    }
}

/// A message field whose length is known only once written: one byte is
/// reserved for the length and the body moved up in the rare case it needs
/// more (a span body over 127 bytes: one short `memmove`).
pub(crate) fn message(buf: &mut Vec<u8>, tag: u32, write: impl FnOnce(&mut Vec<u8>)) {
    put_key(buf, tag, WireType::LengthDelimited);
    let at = buf.len();
    buf.push(0);
    write(buf);
    let len = buf.len() - at - 1;
    let width = varint_len(len as u64);
    if width > 1 {
        buf.resize(buf.len() + width - 1, 0);
        buf.copy_within(at + 1..at + 1 + len, at + width);
    }
    // `width` is the varint's exact length: every byte but the last carries
    // the continuation bit.
    let mut rest = len as u64;
    for byte in &mut buf[at..at + width] {
        *byte = rest as u8 | 0x80;
        rest >>= 7;
    }
    buf[at + width - 1] &= 0x7f;
}

/// An attribute value (`AnyValue`) of the kinds the agent emits.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Value<'a> {
    /// `string_value` (1).
    Str(&'a str),
    /// `int_value` (3).
    Int(i64),
    /// `double_value` (4).
    Double(f64),
    /// `array_value` (5) of string values.
    StrArray(&'a [&'a str]),
}

impl Value<'_> {
    /// The `AnyValue` message's length. A oneof member is written even when
    /// it holds its type's default: a zero stays a zero on the wire.
    fn encoded_len(&self) -> usize {
        match self {
            Value::Str(s) => field_len(s.len()),
            Value::Int(i) => 1 + varint_len(*i as u64),
            Value::Double(_) => 9,
            Value::StrArray(values) => field_len(Self::array_len(values)),
        }
    }

    fn array_len(values: &[&str]) -> usize {
        values.iter().map(|v| field_len(field_len(v.len()))).sum()
    }

    fn encode(&self, buf: &mut Vec<u8>) {
        match self {
            Value::Str(s) => {
                len_prefix(buf, 1, s.len());
                buf.extend_from_slice(s.as_bytes());
            }
            Value::Int(i) => {
                put_key(buf, 3, WireType::Varint);
                put_varint(buf, *i as u64);
            }
            Value::Double(d) => {
                put_key(buf, 4, WireType::SixtyFourBit);
                buf.extend_from_slice(&d.to_le_bytes());
            }
            Value::StrArray(values) => {
                len_prefix(buf, 5, Self::array_len(values));
                for v in *values {
                    // ArrayValue.values (1) → AnyValue.string_value (1).
                    len_prefix(buf, 1, field_len(v.len()));
                    len_prefix(buf, 1, v.len());
                    buf.extend_from_slice(v.as_bytes());
                }
            }
        }
    }
}

/// A `KeyValue` in field `tag` of the enclosing message, its length computed
/// up front (no reserve-and-move).
pub(crate) fn key_value(buf: &mut Vec<u8>, tag: u32, key: &str, value: Value<'_>) {
    let value_len = value.encoded_len();
    len_prefix(buf, tag, field_len(key.len()) + field_len(value_len));
    len_prefix(buf, 1, key.len());
    buf.extend_from_slice(key.as_bytes());
    len_prefix(buf, 2, value_len);
    value.encode(buf);
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry_proto::tonic::common::v1::{AnyValue, ArrayValue, KeyValue, any_value};
    use prost::Message;

    fn prost_kv(key: &str, value: any_value::Value) -> Vec<u8> {
        KeyValue {
            key: key.into(),
            value: Some(AnyValue { value: Some(value) }),
            ..KeyValue::default()
        }
        .encode_to_vec()
    }

    fn ours(key: &str, value: Value<'_>) -> Vec<u8> {
        let mut buf = Vec::new();
        key_value(&mut buf, 1, key, value);
        // Strip our key and length: prost encoded the bare message.
        let mut rest = &buf[1..];
        let len = prost::encoding::decode_varint(&mut rest).unwrap();
        assert_eq!(rest.len() as u64, len);
        rest.to_vec()
    }

    #[test]
    fn varints_match_prost() {
        for v in [
            0u64,
            1,
            127,
            128,
            16_383,
            16_384,
            1 << 21,
            1 << 28,
            1 << 63,
            u64::MAX,
        ] {
            assert_eq!(varint_len(v), prost::encoding::encoded_len_varint(v), "{v}");
            let mut ours = Vec::new();
            put_varint(&mut ours, v);
            let mut theirs = Vec::new();
            prost::encoding::encode_varint(v, &mut theirs);
            assert_eq!(ours, theirs, "{v}");
        }
    }

    #[test]
    fn attribute_values_encode_as_prost_does_zeros_included() {
        use any_value::Value as V;
        let long = "x".repeat(300);
        let cases: Vec<(Value<'_>, V)> = vec![
            (Value::Str(""), V::StringValue(String::new())),
            (Value::Str(&long), V::StringValue(long.clone())),
            (Value::Int(0), V::IntValue(0)),
            (Value::Int(-1), V::IntValue(-1)),
            (Value::Int(i64::MAX), V::IntValue(i64::MAX)),
            (Value::Double(0.0), V::DoubleValue(0.0)),
            (Value::Double(-0.25), V::DoubleValue(-0.25)),
            (
                Value::StrArray(&[]),
                V::ArrayValue(ArrayValue { values: vec![] }),
            ),
            (
                Value::StrArray(&["stop", "length"]),
                V::ArrayValue(ArrayValue {
                    values: ["stop", "length"]
                        .iter()
                        .map(|s| AnyValue {
                            value: Some(V::StringValue((*s).into())),
                        })
                        .collect(),
                }),
            ),
        ];
        for (value, expected) in cases {
            assert_eq!(
                ours("gen_ai.k", value),
                prost_kv("gen_ai.k", expected),
                "{value:?}"
            );
        }
    }

    #[test]
    fn a_message_longer_than_127_bytes_moves_up_for_its_length() {
        for len in [0usize, 1, 127, 128, 300, 20_000] {
            let mut buf = vec![0xee];
            message(&mut buf, 5, |b| b.extend(std::iter::repeat_n(7u8, len)));
            let mut expected = vec![0xee];
            len_prefix(&mut expected, 5, len);
            expected.extend(std::iter::repeat_n(7u8, len));
            assert_eq!(buf, expected, "{len}");
        }
    }
}
