//! Conversions between the connector model and `tidemark.common.v1`: items,
//! keys and attribute values, and the `ChangeRecord` that every Kafka message
//! Tidemark publishes or consumes carries.
//!
//! Errors name the offending field relative to the value converted, so a
//! service can prefix its own path (`spec.value.n`) for a field violation.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use prost::Message as _;
use tidemark_proto::common::v1 as pb;
use tidemark_proto::common::v1::attribute_value::Value as PbValue;

use crate::image::{EncodedItem, Image};
use crate::traits::{ChangeKind, ChangeRecord, Position};
use crate::value::{AttrValue, Item, Key, Number};

pub(crate) mod view;
mod wire;

/// A value that does not convert: which field, and why.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct ProtoError {
    /// Path below the converted message, e.g. `attributes[\"a\"].n`.
    pub field: String,
    pub reason: String,
}

impl ProtoError {
    fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            reason: reason.into(),
        }
    }

    fn within(mut self, parent: &str) -> Self {
        self.field = if self.field.is_empty() {
            parent.to_owned()
        } else if self.field.starts_with('[') {
            format!("{parent}{}", self.field)
        } else {
            format!("{parent}.{}", self.field)
        };
        self
    }
}

fn number(text: &str, field: &str) -> Result<Number, ProtoError> {
    Number::parse(text).map_err(|e| ProtoError::new(field, e))
}

/// Converts a protobuf attribute value.
///
/// # Errors
/// No member set, a bad number, an empty or duplicate set.
pub fn value_from_proto(value: &pb::AttributeValue) -> Result<AttrValue, ProtoError> {
    value_from_proto_owned(value.clone())
}

/// Like [`value_from_proto`], taking the value: its strings and bytes move
/// into the result instead of being copied, which is what a feed decoding
/// every record does ([`decode_change`]).
///
/// # Errors
/// As [`value_from_proto`].
pub fn value_from_proto_owned(value: pb::AttributeValue) -> Result<AttrValue, ProtoError> {
    let Some(v) = value.value else {
        return Err(ProtoError::new("", "exactly one value member must be set"));
    };
    Ok(match v {
        PbValue::S(s) => AttrValue::S(s),
        PbValue::N(n) => AttrValue::N(number(&n, "n")?),
        PbValue::B(b) => AttrValue::B(b),
        PbValue::BoolValue(b) => AttrValue::Bool(b),
        PbValue::NullValue(_) => AttrValue::Null(true),
        PbValue::Ss(set) => AttrValue::Ss(distinct(set.values, "ss")?),
        PbValue::Ns(set) => AttrValue::Ns(number_set(set.values.iter().map(String::as_str))?),
        PbValue::Bs(set) => AttrValue::Bs(distinct(set.values, "bs")?),
        PbValue::L(list) => AttrValue::L(
            list.values
                .into_iter()
                .enumerate()
                .map(|(i, v)| {
                    value_from_proto_owned(v).map_err(|e| e.within(&format!("l.values[{i}]")))
                })
                .collect::<Result<_, _>>()?,
        ),
        PbValue::M(map) => {
            AttrValue::M(attributes_from_proto(map.attributes).map_err(|e| e.within("m"))?)
        }
    })
}

/// A number set from its members' text: each a number, none twice.
fn number_set<'a>(
    values: impl IntoIterator<Item = &'a str>,
) -> Result<BTreeSet<Number>, ProtoError> {
    let numbers = values
        .into_iter()
        .enumerate()
        .map(|(i, n)| number(n, &format!("ns.values[{i}]")))
        .collect::<Result<Vec<_>, _>>()?;
    distinct(numbers, "ns")
}

fn distinct<T: Ord>(
    values: impl IntoIterator<Item = T>,
    field: &str,
) -> Result<BTreeSet<T>, ProtoError> {
    let mut set = BTreeSet::new();
    for v in values {
        if !set.insert(v) {
            return Err(ProtoError::new(field, "a set must not hold duplicates"));
        }
    }
    if set.is_empty() {
        return Err(ProtoError::new(field, "a set must not be empty"));
    }
    Ok(set)
}

/// The attributes of a map, item or key, taken by value. prost decodes a
/// protobuf map into a `BTreeMap` already, so they come in key order and
/// the tree is built from a sorted run without comparisons between them.
fn attributes_from_proto(
    attributes: BTreeMap<String, pb::AttributeValue>,
) -> Result<BTreeMap<String, AttrValue>, ProtoError> {
    attributes
        .into_iter()
        .map(|(k, v)| match value_from_proto_owned(v) {
            Ok(v) => Ok((k, v)),
            Err(e) => Err(e.within(&format!("attributes[{k:?}]"))),
        })
        .collect()
}

pub fn value_to_proto(value: &AttrValue) -> pb::AttributeValue {
    let v = match value {
        AttrValue::S(s) => PbValue::S(s.clone()),
        AttrValue::N(n) => PbValue::N(n.as_str().to_owned()),
        AttrValue::B(b) => PbValue::B(b.clone()),
        AttrValue::Bool(b) => PbValue::BoolValue(*b),
        AttrValue::Null(_) => PbValue::NullValue(0),
        AttrValue::Ss(s) => PbValue::Ss(pb::StringSet {
            values: s.iter().cloned().collect(),
        }),
        AttrValue::Ns(s) => PbValue::Ns(pb::NumberSet {
            values: s.iter().map(|n| n.as_str().to_owned()).collect(),
        }),
        AttrValue::Bs(s) => PbValue::Bs(pb::BinarySet {
            values: s.iter().cloned().collect(),
        }),
        AttrValue::L(l) => PbValue::L(pb::ListValue {
            values: l.iter().map(value_to_proto).collect(),
        }),
        AttrValue::M(m) => PbValue::M(pb::MapValue {
            attributes: m
                .iter()
                .map(|(k, v)| (k.clone(), value_to_proto(v)))
                .collect(),
        }),
    };
    pb::AttributeValue { value: Some(v) }
}

/// # Errors
/// A value that does not convert (see [`value_from_proto`]).
pub fn item_from_proto(item: &pb::Item) -> Result<Item, ProtoError> {
    attributes_from_proto(item.attributes.clone())
}

pub fn item_to_proto(item: &Item) -> pb::Item {
    pb::Item {
        attributes: item
            .iter()
            .map(|(k, v)| (k.clone(), value_to_proto(v)))
            .collect(),
    }
}

/// # Errors
/// No attributes, or an attribute that is not a string, number or binary.
pub fn key_from_proto(key: &pb::Key) -> Result<Key, ProtoError> {
    key_from_proto_owned(key.clone())
}

fn key_from_proto_owned(key: pb::Key) -> Result<Key, ProtoError> {
    checked_key(key.attributes.is_empty(), || {
        attributes_from_proto(key.attributes)
    })
}

pub fn key_to_proto(key: &Key) -> pb::Key {
    pb::Key {
        attributes: key
            .0
            .iter()
            .map(|(k, v)| (k.clone(), value_to_proto(v)))
            .collect(),
    }
}

/// The Kafka message key of an item key: its values joined with `#`,
/// partition key first.
pub fn kafka_key(key: &Key, partition: &str) -> String {
    let mut parts = Vec::with_capacity(2);
    if let Some(v) = key.get(partition) {
        parts.push(v.key_text().unwrap_or_default());
    }
    for (name, v) in &key.0 {
        if name != partition {
            parts.push(v.key_text().unwrap_or_default());
        }
    }
    parts.join("#")
}

/// Encodes a change as the `ChangeRecord` of a Kafka message.
pub fn encode_change(
    key: &Key,
    new_image: Option<&Item>,
    version: u64,
    change_micros: i64,
) -> Vec<u8> {
    pb::ChangeRecord {
        key: Some(key_to_proto(key)),
        deleted: new_image.is_none(),
        new_image: new_image.map(item_to_proto),
        version,
        change_time: Some(prost_types::Timestamp {
            seconds: change_micros.div_euclid(1_000_000),
            nanos: i32::try_from(change_micros.rem_euclid(1_000_000) * 1000).unwrap_or(0),
        }),
    }
    .encode_to_vec()
}

/// A timestamp in microseconds, exact whenever it fits in an `i64` and
/// clamped otherwise: a record from a feed may carry any time. (Saturating
/// the seconds before adding the nanoseconds was off by up to a second next
/// to the limits, so a decoded record did not survive a re-encode; found by
/// the `change_record` fuzz target.)
fn timestamp_micros(t: &prost_types::Timestamp) -> i64 {
    let micros = i128::from(t.seconds) * 1_000_000 + i128::from(t.nanos) / 1000;
    i64::try_from(micros).unwrap_or(if micros < 0 { i64::MIN } else { i64::MAX })
}

/// Decodes a Kafka message's `ChangeRecord`, straight from the wire format
/// ([`wire`]): the same record [`decode_change_with_prost`] makes, without
/// building the generated message first.
///
/// # Errors
/// Bytes that are not a valid record (no key, zero version, an upsert
/// without image).
pub fn decode_change(bytes: &[u8], position: Position) -> Result<ChangeRecord, ProtoError> {
    let mut record = wire::read_change(bytes, false).map_err(wire::WireError::into_proto)?;
    let image = record.new_image.take();
    wire_record(
        record,
        || image.map(|i| i.finish().map(Image::Item)),
        position,
    )
}

/// The record of what [`wire::read_change`] read, its image given by `image`.
fn wire_record(
    record: wire::WireRecord<'_>,
    image: impl FnOnce() -> Option<Result<Image, ProtoError>>,
    position: Position,
) -> Result<ChangeRecord, ProtoError> {
    let key = record
        .key
        .ok_or_else(|| ProtoError::new("key", "required"))
        .and_then(|key| checked_key(key.is_empty(), || key.finish()))
        .map_err(|e| e.within("key"))?;
    let created_at_micros = record.change_time.map_or(0, |(seconds, nanos)| {
        timestamp_micros(&prost_types::Timestamp { seconds, nanos })
    });
    let change = (record.deleted, record.version, created_at_micros);
    change_record(key, change, image, position)
}

/// [`decode_change`] of a payload the record may keep: a new image in the
/// canonical form (what prost and every deterministic encoder write; see
/// [`view`]) stays encoded, an [`Image::Encoded`] reading `payload` in
/// place. Any other record is decoded as [`decode_change`] decodes it, so
/// the two give the same record or the same error.
///
/// # Errors
/// As [`decode_change`].
pub fn decode_change_encoded(
    payload: &Arc<[u8]>,
    position: Position,
) -> Result<ChangeRecord, ProtoError> {
    let record = match wire::read_change(payload, true) {
        Ok(record) if record.image_at.len() <= 1 => record,
        _ => return decode_change(payload, position),
    };
    let image = match record.image_at.first() {
        Some(at) => match EncodedItem::new(Arc::clone(payload), at.clone()) {
            Some(image) => Some(image),
            None => return decode_change(payload, position),
        },
        None => None,
    };
    wire_record(record, || image.map(|i| Ok(Image::Encoded(i))), position)
}

/// [`decode_change`] through prost's generated `ChangeRecord` and the
/// conversions above: the reference the wire decoder is held to (its
/// tests and the `change_record` fuzz target).
///
/// # Errors
/// As [`decode_change`].
#[doc(hidden)]
pub fn decode_change_with_prost(
    bytes: &[u8],
    position: Position,
) -> Result<ChangeRecord, ProtoError> {
    let record = pb::ChangeRecord::decode(bytes).map_err(|e| ProtoError::new("", e.to_string()))?;
    let key = record
        .key
        .ok_or_else(|| ProtoError::new("key", "required"))
        .and_then(key_from_proto_owned)
        .map_err(|e| e.within("key"))?;
    let created_at_micros = record.change_time.as_ref().map_or(0, timestamp_micros);
    let image = || {
        record
            .new_image
            .map(|image| attributes_from_proto(image.attributes).map(Image::Item))
    };
    let change = (record.deleted, record.version, created_at_micros);
    change_record(key, change, image, position)
}

/// A record's key from its attributes: at least one, each a string,
/// number or binary.
fn checked_key(
    empty: bool,
    attributes: impl FnOnce() -> Result<BTreeMap<String, AttrValue>, ProtoError>,
) -> Result<Key, ProtoError> {
    if empty {
        return Err(ProtoError::new(
            "attributes",
            "a key needs its key attributes",
        ));
    }
    let attrs = attributes()?;
    for (name, v) in &attrs {
        if !v.is_key_scalar() {
            return Err(ProtoError::new(
                format!("attributes[{name:?}]"),
                "a key attribute must be a string, number or binary",
            ));
        }
    }
    Ok(Key(attrs))
}

/// The record of a checked key, its (deleted, version, change time) and
/// its new image, read only for an upsert: a version above 0, an image
/// unless the record is a delete.
fn change_record(
    key: Key,
    (deleted, version, created_at_micros): (bool, u64, i64),
    image: impl FnOnce() -> Option<Result<Image, ProtoError>>,
    position: Position,
) -> Result<ChangeRecord, ProtoError> {
    if version == 0 {
        return Err(ProtoError::new("version", "must not be 0"));
    }
    let new_image = if deleted {
        None
    } else {
        let image =
            image().ok_or_else(|| ProtoError::new("new_image", "required unless deleted"))?;
        Some(image.map_err(|e| e.within("new_image"))?)
    };
    Ok(ChangeRecord {
        key,
        kind: if new_image.is_some() {
            ChangeKind::Modify
        } else {
            ChangeKind::Remove
        },
        new_image,
        old_image: None,
        version,
        created_at_micros,
        position,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_change_time_at_the_edge_of_i64_saturates() {
        // A Kafka record is outside input: its time must not overflow (found
        // by the e2e RPC fuzzer in the same conversion elsewhere).
        let record = pb::ChangeRecord {
            key: Some(pb::Key {
                attributes: [("id".to_owned(), value_to_proto(&AttrValue::s("a")))].into(),
            }),
            deleted: true,
            new_image: None,
            version: 1,
            change_time: Some(prost_types::Timestamp {
                seconds: i64::MAX,
                nanos: 999_999_999,
            }),
        };
        let position = Position {
            partition: "p".to_owned(),
            sequence: "1".to_owned(),
        };
        let decoded = decode_change(&record.encode_to_vec(), position).unwrap();
        assert_eq!(decoded.created_at_micros, i64::MAX);
    }

    #[test]
    fn change_times_next_to_the_limits_survive_a_re_encode() {
        // A time whose seconds times 10^6 leaves i64 but whose sum with the
        // nanoseconds does not: decoded as i64::MIN, then re-encoded, it came
        // back 0.22 s later (fuzz/corpus/change_record/early_time).
        let key = Key::new([("id".to_owned(), AttrValue::s("a"))]);
        let position = || Position {
            partition: "p".to_owned(),
            sequence: "1".to_owned(),
        };
        for micros in [i64::MIN, i64::MIN + 1, -1, 0, i64::MAX - 1, i64::MAX] {
            let decoded = decode_change(&encode_change(&key, None, 1, micros), position()).unwrap();
            assert_eq!(decoded.created_at_micros, micros);
        }
        let early = prost_types::Timestamp {
            seconds: i64::MIN / 1_000_000 - 1,
            nanos: 0,
        };
        assert_eq!(timestamp_micros(&early), i64::MIN);
        let late_but_fits = prost_types::Timestamp {
            seconds: i64::MAX / 1_000_000 + 1,
            nanos: -999_999_999,
        };
        // 9_223_372_036_855 s is past i64 in µs; less 999_999 µs it is not.
        assert_eq!(timestamp_micros(&late_but_fits), 9_223_372_036_854_000_001);
    }

    #[test]
    fn values_round_trip() {
        let item: Item = [
            ("s".to_owned(), AttrValue::s("x")),
            ("n".to_owned(), AttrValue::N(Number::parse("1.50").unwrap())),
            (
                "l".to_owned(),
                AttrValue::L(vec![AttrValue::Bool(true), AttrValue::Null(true)]),
            ),
            (
                "m".to_owned(),
                AttrValue::M(
                    [("b".to_owned(), AttrValue::B(vec![1, 2]))]
                        .into_iter()
                        .collect(),
                ),
            ),
            (
                "ss".to_owned(),
                AttrValue::Ss(["a".to_owned(), "b".to_owned()].into()),
            ),
        ]
        .into_iter()
        .collect();
        assert_eq!(item_from_proto(&item_to_proto(&item)).unwrap(), item);
    }

    #[test]
    fn bad_values_name_their_field() {
        let bad = pb::Item {
            attributes: [(
                "a".to_owned(),
                pb::AttributeValue {
                    value: Some(PbValue::L(pb::ListValue {
                        values: vec![pb::AttributeValue {
                            value: Some(PbValue::N("NaN".to_owned())),
                        }],
                    })),
                },
            )]
            .into_iter()
            .collect(),
        };
        let err = item_from_proto(&bad).unwrap_err();
        assert_eq!(err.field, "attributes[\"a\"].l.values[0].n");
    }

    #[test]
    fn change_records_round_trip() {
        let key = Key::new([
            ("documentType".to_owned(), AttrValue::s("post")),
            ("documentId".to_owned(), AttrValue::s("7")),
        ]);
        assert_eq!(kafka_key(&key, "documentType"), "post#7");
        let image: Item = key.0.clone();
        let position = Position {
            partition: "t/0".to_owned(),
            sequence: "5".to_owned(),
        };
        let bytes = encode_change(&key, Some(&image), 42, 1_700_000_000_123_456);
        let record = decode_change(&bytes, position.clone()).unwrap();
        assert_eq!(record.new_image, Some(Image::Item(image)));
        assert_eq!(
            (record.version, record.created_at_micros),
            (42, 1_700_000_000_123_456)
        );
        let deleted = decode_change(&encode_change(&key, None, 43, 0), position).unwrap();
        assert_eq!(deleted.kind, ChangeKind::Remove);
    }
}
