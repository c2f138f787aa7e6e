//! The document a record becomes: the `_bulk` action and source lines, the
//! plain JSON of each attribute for search, and reading a source back.

use serde_json::{Value, json};

use super::ids::document_id_in;
use super::purge::now_millis;
use super::{BACKEND, DELETED_AT_FIELD, DELETED_FIELD, ITEM_FIELD, KEY_FIELD, VERSION_FIELD};
use crate::error::{ConnectorError, ConnectorResult};
use crate::image::ValueRef;
use crate::traits::{SinkOp, SinkRecord};
use crate::value::{AttrValue, Item, KeySchema, Number};

/// The prefix of Tidemark's own fields, which no attribute may use.
const RESERVED: &[u8] = b"_tidemark_";

/// Appends to `out` the `_bulk` action and source lines that the sink sends
/// for `record` into `index`: an `index` action at the record's external
/// version, and the item as plain JSON plus the reserved fields (a
/// tombstone for a delete). Appends nothing when the record cannot be sent.
///
/// # Errors
/// Why the record cannot be sent (a key off the schema, a version above a
/// long, an attribute under the reserved prefix).
///
/// A tombstone also records when it was written ([`DELETED_AT_FIELD`], epoch
/// milliseconds), which is what the purge of old tombstones goes by.
pub fn bulk_lines(
    index: &str,
    schema: &KeySchema,
    record: &SinkRecord,
    out: &mut Vec<u8>,
) -> Result<(), String> {
    let id = document_id_in(schema, &record.key)?;
    bulk_lines_as(index, &id, record, out)
}

/// Like [`bulk_lines`] for a document id computed by the caller.
///
/// # Errors
/// A version above a long, an attribute under the reserved prefix.
pub fn bulk_lines_as(
    index: &str,
    id: &str,
    record: &SinkRecord,
    out: &mut Vec<u8>,
) -> Result<(), String> {
    let version = i64::try_from(record.version)
        .map_err(|_| format!("version {} exceeds a long", record.version))?;
    let start = out.len();
    out.extend_from_slice(b"{\"index\":{\"_index\":");
    json_str(out, index);
    out.extend_from_slice(b",\"_id\":");
    json_str(out, id);
    out.extend_from_slice(b",\"version\":");
    integer(out, version);
    out.extend_from_slice(b",\"version_type\":\"external\"}}\n{");
    let written = match &record.op {
        SinkOp::Upsert(item) => document(out, item.iter().map(|(n, v)| (n.as_bytes(), v.into()))),
        SinkOp::UpsertEncoded(item) => document(out, item.attributes()),
        SinkOp::Delete => {
            field(out, DELETED_FIELD);
            out.extend_from_slice(b"true,");
            field(out, DELETED_AT_FIELD);
            integer(out, now_millis());
            Ok(())
        }
    };
    if let Err(e) = written {
        out.truncate(start);
        return Err(e);
    }
    out.push(b',');
    field(out, VERSION_FIELD);
    integer(out, version);
    out.push(b',');
    field(out, KEY_FIELD);
    json_str(out, id);
    out.extend_from_slice(b"}\n");
    Ok(())
}

/// An upsert's source fields: each attribute as plain JSON, then the
/// item's DynamoDB JSON as the `_item` string (what
/// `json(out, &serde_json::to_string(item))` writes), in one pass, already
/// escaped: every quote of the JSON as `\"`, and the content of its
/// strings escaped twice (once as serde_json escapes a string, then once
/// more for the outer string).
///
/// # Errors
/// An attribute under the reserved prefix (with part of the document
/// written).
fn document<'a>(
    out: &mut Vec<u8>,
    attributes: impl Iterator<Item = (&'a [u8], ValueRef<'a>)> + Clone,
) -> Result<(), String> {
    for (name, value) in attributes.clone() {
        // The first byte first: most names are told by it alone.
        if name.first() == Some(&b'_') && name.starts_with(RESERVED) {
            return Err(format!(
                "attribute {:?} uses the reserved prefix _tidemark_",
                String::from_utf8_lossy(name)
            ));
        }
        json_bytes(out, name);
        out.push(b':');
        plain(out, value);
        out.push(b',');
    }
    field(out, ITEM_FIELD);
    out.push(b'"');
    attributes_escaped(out, attributes);
    out.push(b'"');
    Ok(())
}

fn attributes_escaped<'a>(
    out: &mut Vec<u8>,
    attributes: impl Iterator<Item = (&'a [u8], ValueRef<'a>)>,
) {
    json_map(out, attributes, string_escaped, value_escaped);
}

/// `[…]` of `items`, each written by `one`.
fn json_seq<T>(
    out: &mut Vec<u8>,
    items: impl IntoIterator<Item = T>,
    mut one: impl FnMut(&mut Vec<u8>, T),
) {
    out.push(b'[');
    for (i, item) in items.into_iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        one(out, item);
    }
    out.push(b']');
}

/// `{…}` of `attributes`, names written by `name` and values by `value`.
fn json_map<'a>(
    out: &mut Vec<u8>,
    attributes: impl Iterator<Item = (&'a [u8], ValueRef<'a>)>,
    name: impl Fn(&mut Vec<u8>, &[u8]),
    value: impl Fn(&mut Vec<u8>, ValueRef<'a>),
) {
    out.push(b'{');
    for (i, (n, v)) in attributes.enumerate() {
        if i > 0 {
            out.push(b',');
        }
        name(out, n);
        out.push(b':');
        value(out, v);
    }
    out.push(b'}');
}

/// One attribute value as serde writes [`AttrValue`] (`{"S":"x"}`,
/// numbers as strings, binary as base64), escaped for the outer string.
fn value_escaped(out: &mut Vec<u8>, value: ValueRef<'_>) {
    use base64::Engine as _;
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    // The opening `{"S":` of each type, already escaped for the outer
    // string.
    let open: &[u8] = match value {
        ValueRef::S(_) => br#"{\"S\":"#,
        ValueRef::N(_) => br#"{\"N\":"#,
        ValueRef::B(_) => br#"{\"B\":"#,
        ValueRef::Bool(_) => br#"{\"BOOL\":"#,
        ValueRef::Null(_) => br#"{\"NULL\":"#,
        ValueRef::Ss(_) => br#"{\"SS\":"#,
        ValueRef::Ns(_) => br#"{\"NS\":"#,
        ValueRef::Bs(_) => br#"{\"BS\":"#,
        ValueRef::L(_) => br#"{\"L\":"#,
        ValueRef::M(_) => br#"{\"M\":"#,
    };
    out.extend_from_slice(open);
    match value {
        ValueRef::S(text) | ValueRef::N(text) => string_escaped(out, text),
        ValueRef::B(b) => string_escaped(out, b64(b).as_bytes()),
        ValueRef::Bool(b) | ValueRef::Null(b) => {
            out.extend_from_slice(if b { b"true" } else { b"false" });
        }
        ValueRef::Ss(set) | ValueRef::Ns(set) => json_seq(out, set.iter(), string_escaped),
        ValueRef::Bs(set) => json_seq(out, set.iter(), |out, b| {
            string_escaped(out, b64(b).as_bytes());
        }),
        ValueRef::L(list) => json_seq(out, list.iter(), value_escaped),
        ValueRef::M(map) => attributes_escaped(out, map.iter()),
    }
    out.push(b'}');
}

/// A JSON string of `text` (escaped as serde_json escapes one), itself
/// escaped as the content of the outer string.
fn string_escaped(out: &mut Vec<u8>, text: &[u8]) {
    out.extend_from_slice(b"\\\"");
    // What serde_json writes for the byte, with each `\` and `"` of that
    // escaped again.
    escaped_with(out, text, |out, b| match b {
        b'"' => out.extend_from_slice(b"\\\\\\\""),
        b'\\' => out.extend_from_slice(b"\\\\\\\\"),
        _ => {
            out.push(b'\\');
            escape_once(out, b);
        }
    });
    out.extend_from_slice(b"\\\"");
}

/// `"name":` of one of the sink's own fields (plain ASCII, nothing to
/// escape).
fn field(out: &mut Vec<u8>, name: &str) {
    debug_assert!(name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'));
    out.push(b'"');
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b"\":");
}

/// An integer as JSON.
fn integer(out: &mut Vec<u8>, v: i64) {
    out.extend_from_slice(itoa::Buffer::new().format(v).as_bytes());
}

/// `v` as JSON, appended to `out` (writing into a `Vec` cannot fail, and
/// these values always serialise).
fn json<T: serde::Serialize + ?Sized>(out: &mut Vec<u8>, v: &T) {
    serde_json::to_writer(out, v).expect("plain values always serialise");
}

/// The length of the longest prefix of `text` that a JSON string holds as
/// it is: no `"`, `\` or control character. Eight bytes at a time, as
/// most text needs no escape at all.
fn clean_run(text: &[u8]) -> usize {
    const ONES: u64 = u64::from_ne_bytes([1; 8]);
    const HIGH: u64 = u64::from_ne_bytes([0x80; 8]);
    // Whether any byte of `w` is zero (exact for the word as a whole).
    let has_zero = |w: u64| w.wrapping_sub(ONES) & !w & HIGH != 0;
    let mut clean = 0;
    for chunk in text.chunks_exact(8) {
        let w = u64::from_ne_bytes(chunk.try_into().expect("eight bytes"));
        let control = w.wrapping_sub(ONES * 0x20) & !w & HIGH != 0;
        if control
            || has_zero(w ^ (ONES * u64::from(b'"')))
            || has_zero(w ^ (ONES * u64::from(b'\\')))
        {
            break;
        }
        clean += 8;
    }
    clean
        + text[clean..]
            .iter()
            .position(|&b| b == b'"' || b == b'\\' || b < 0x20)
            .unwrap_or(text.len() - clean)
}

/// `text` as a JSON string, escaped as serde_json escapes one.
fn json_str(out: &mut Vec<u8>, text: &str) {
    json_bytes(out, text.as_bytes());
}

/// [`json_str`] of UTF-8 bytes.
fn json_bytes(out: &mut Vec<u8>, text: &[u8]) {
    out.push(b'"');
    escaped_with(out, text, escape_once);
    out.push(b'"');
}

/// Appends `text`, each byte a JSON string may not hold as it is written
/// by `escape`.
fn escaped_with(out: &mut Vec<u8>, text: &[u8], escape: impl Fn(&mut Vec<u8>, u8)) {
    let mut start = 0;
    let mut i = 0;
    loop {
        i += clean_run(&text[i..]);
        let Some(&b) = text.get(i) else { break };
        out.extend_from_slice(&text[start..i]);
        escape(out, b);
        i += 1;
        start = i;
    }
    out.extend_from_slice(&text[start..]);
}

/// The escape serde_json writes for byte `b` of a string (`"`, `\` or a
/// control character).
fn escape_once(out: &mut Vec<u8>, b: u8) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let short: &[u8] = match b {
        b'"' => b"\\\"",
        b'\\' => b"\\\\",
        b'\n' => b"\\n",
        b'\r' => b"\\r",
        b'\t' => b"\\t",
        0x08 => b"\\b",
        0x0c => b"\\f",
        _ => {
            out.extend_from_slice(b"\\u00");
            out.push(HEX[usize::from(b >> 4)]);
            out.push(HEX[usize::from(b & 0xf)]);
            return;
        }
    };
    out.extend_from_slice(short);
}

/// An attribute value as [`to_plain_json`] renders it, written without
/// building the intermediate [`Value`].
fn plain(out: &mut Vec<u8>, value: ValueRef<'_>) {
    match value {
        ValueRef::S(text) => json_bytes(out, text),
        ValueRef::N(n) => plain_number(out, n),
        ValueRef::B(b) => base64_str(out, b),
        ValueRef::Bool(b) => out.extend_from_slice(if b { b"true" } else { b"false" }),
        ValueRef::Null(_) => out.extend_from_slice(b"null"),
        ValueRef::Ss(set) => json_seq(out, set.iter(), json_bytes),
        ValueRef::Ns(set) => json_seq(out, set.iter(), plain_number),
        ValueRef::Bs(set) => json_seq(out, set.iter(), base64_str),
        ValueRef::L(list) => json_seq(out, list.iter(), plain),
        ValueRef::M(map) => json_map(out, map.iter(), json_bytes, plain),
    }
}

/// A number (its normalised text) as [`number_json`] renders it. Where
/// that is a JSON number of the same value as the text (a long, or 15
/// significant digits or fewer, which an f64 holds exactly), the text is
/// written as it is.
fn plain_number(out: &mut Vec<u8>, text: &[u8]) {
    let long = || {
        std::str::from_utf8(text)
            .ok()
            .and_then(|t| t.parse::<i64>().ok())
            .is_some()
    };
    if significant_digits(text) <= 15 || long() {
        out.extend_from_slice(text);
    } else {
        let n = Number::from_normal(String::from_utf8_lossy(text).into_owned());
        json(out, &number_json(&n));
    }
}

/// Bytes as a base64 JSON string.
fn base64_str(out: &mut Vec<u8>, bytes: &[u8]) {
    use base64::Engine as _;
    out.push(b'"');
    let at = out.len();
    out.resize(at + bytes.len().div_ceil(3) * 4, 0);
    let written = base64::engine::general_purpose::STANDARD
        .encode_slice(bytes, &mut out[at..])
        .expect("sized for the encoding");
    out.truncate(at + written);
    out.push(b'"');
}

/// The live (version, item) of a document source, `None` for a tombstone.
pub(super) fn live_of(source: &Value) -> ConnectorResult<Option<(u64, Item)>> {
    if source.get(DELETED_FIELD).and_then(Value::as_bool) == Some(true) {
        return Ok(None);
    }
    let bad = |what: &str| {
        ConnectorError::terminal(
            BACKEND,
            format!("document without {what}: not written by this sink"),
        )
    };
    let version = source
        .get(VERSION_FIELD)
        .and_then(Value::as_u64)
        .ok_or_else(|| bad(VERSION_FIELD))?;
    let text = source
        .get(ITEM_FIELD)
        .and_then(Value::as_str)
        .ok_or_else(|| bad(ITEM_FIELD))?;
    let item: Item = serde_json::from_str(text)
        .map_err(|e| ConnectorError::terminal(BACKEND, format!("bad {ITEM_FIELD}: {e}")))?;
    Ok(Some((version, item)))
}

/// Plain JSON for search: numbers as numbers when exact, otherwise strings.
pub fn to_plain_json(value: &AttrValue) -> Value {
    use base64::Engine as _;
    let b64 = |b: &[u8]| Value::String(base64::engine::general_purpose::STANDARD.encode(b));
    match value {
        AttrValue::S(s) => Value::String(s.clone()),
        AttrValue::N(n) => number_json(n),
        AttrValue::B(b) => b64(b),
        AttrValue::Bool(b) => Value::Bool(*b),
        AttrValue::Null(_) => Value::Null,
        AttrValue::Ss(set) => set.iter().cloned().map(Value::String).collect(),
        AttrValue::Ns(set) => set.iter().map(number_json).collect(),
        AttrValue::Bs(set) => set.iter().map(|b| b64(b)).collect(),
        AttrValue::L(list) => list.iter().map(to_plain_json).collect(),
        AttrValue::M(map) => Value::Object(
            map.iter()
                .map(|(k, v)| (k.clone(), to_plain_json(v)))
                .collect(),
        ),
    }
}

fn number_json(n: &Number) -> Value {
    if let Some(i) = n.as_i64() {
        return json!(i);
    }
    // Exact only when the f64 prints back to the same normalised decimal,
    // which a decimal of at most 15 significant digits always does (an f64
    // keeps 15 decimal digits, and a number's exponent stays far inside an
    // f64's normal range): only longer ones need the check.
    if let Ok(f) = n.as_str().parse::<f64>()
        && f.is_finite()
        && (significant_digits(n.as_str().as_bytes()) <= 15
            || Number::parse(&f.to_string()).is_ok_and(|back| &back == n))
        && let Some(num) = serde_json::Number::from_f64(f)
    {
        return Value::Number(num);
    }
    Value::String(n.as_str().to_owned())
}

/// Digits of a normalised number from its first non-zero one (an
/// integer's trailing zeros count, which only sends it to the full check).
fn significant_digits(text: &[u8]) -> usize {
    text.iter()
        .filter(|b| b.is_ascii_digit())
        .skip_while(|&&b| b == b'0')
        .count()
}

#[cfg(test)]
mod tests {
    use serde_json::Map;

    use super::*;
    use crate::value::canonical_item;

    /// The `_item` string of an item.
    fn item_json_string(out: &mut Vec<u8>, item: &Item) {
        out.push(b'"');
        attributes_escaped(out, item.iter().map(|(n, v)| (n.as_bytes(), v.into())));
        out.push(b'"');
    }

    #[test]
    fn the_item_field_is_the_items_json_as_a_json_string() {
        let every_byte: String = (0u8..0x80).map(char::from).collect();
        let item: Item = [
            (
                "s",
                AttrValue::s(format!("{every_byte} \"quoted\" \\ é 😀")),
            ),
            ("n", AttrValue::n(7i64)),
            ("b", AttrValue::B(vec![0, 255])),
            (
                "m",
                AttrValue::M([("k\n\"".to_owned(), AttrValue::s("\u{1f}\u{7f}"))].into()),
            ),
            ("d", AttrValue::N(Number::parse("-0.125").unwrap())),
            ("t", AttrValue::Bool(false)),
            ("z", AttrValue::Null(true)),
            (
                "ss",
                AttrValue::Ss(["\"a\"".to_owned(), "b\\".to_owned()].into()),
            ),
            (
                "ns",
                AttrValue::Ns([Number::from(1i64), Number::from(-2i64)].into()),
            ),
            ("bs", AttrValue::Bs([vec![1], vec![2, 3]].into())),
            (
                "l",
                AttrValue::L(vec![
                    AttrValue::s("\t"),
                    AttrValue::L(vec![]),
                    AttrValue::M(Item::new()),
                ]),
            ),
            ("\u{0}\\", AttrValue::s("")),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        let mut fast = Vec::new();
        item_json_string(&mut fast, &item);
        let mut two_steps = Vec::new();
        json(&mut two_steps, canonical_item(&item).as_str());
        assert_eq!(
            String::from_utf8(fast).unwrap(),
            String::from_utf8(two_steps).unwrap()
        );
    }

    #[test]
    fn bulk_lines_are_the_action_and_the_plain_item_with_reserved_fields() {
        let schema = KeySchema::new("pk", Some("sk"));
        let item: Item = [
            ("pk", AttrValue::s("a#b")),
            ("sk", AttrValue::s("1")),
            ("n", AttrValue::n(42i64)),
            ("d", AttrValue::N(Number::parse("0.1").unwrap())),
            (
                "big",
                AttrValue::N(Number::parse("12345678901234567890123").unwrap()),
            ),
            ("b", AttrValue::B(vec![1, 2, 255])),
            ("t", AttrValue::Bool(true)),
            ("z", AttrValue::Null(true)),
            (
                "ss",
                AttrValue::Ss(["x".to_owned(), "y\"".to_owned()].into()),
            ),
            (
                "ns",
                AttrValue::Ns([Number::parse("1").unwrap(), Number::parse("2.5").unwrap()].into()),
            ),
            ("bs", AttrValue::Bs([vec![0u8], vec![9u8]].into())),
            (
                "l",
                AttrValue::L(vec![AttrValue::s("\u{e9}\n"), AttrValue::n(-7i64)]),
            ),
            (
                "m",
                AttrValue::M([("k".to_owned(), AttrValue::Bool(false))].into()),
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        let key = schema.key_of(&item).unwrap();
        let record = |op| SinkRecord {
            key: key.clone(),
            version: 7,
            op,
        };
        let mut out = Vec::new();
        bulk_lines(
            "i",
            &schema,
            &record(SinkOp::Upsert(item.clone())),
            &mut out,
        )
        .unwrap();
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let id = r"a\#b#1";
        let action = json!({"index": {
            "_index": "i", "_id": id, "version": 7, "version_type": "external",
        }});
        let mut source: Map<String, Value> = item
            .iter()
            .map(|(k, v)| (k.clone(), to_plain_json(v)))
            .collect();
        source.insert(ITEM_FIELD.into(), Value::String(canonical_item(&item)));
        source.insert(VERSION_FIELD.into(), json!(7));
        source.insert(KEY_FIELD.into(), json!(id));
        assert_eq!(lines, vec![action.clone(), Value::Object(source)]);
        assert!(text.ends_with('\n') && text.lines().count() == 2);

        let mut out = Vec::new();
        let before = now_millis();
        bulk_lines("i", &schema, &record(SinkOp::Delete), &mut out).unwrap();
        let mut lines: Vec<Value> = String::from_utf8(out)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let written = lines[1]
            .as_object_mut()
            .and_then(|o| o.remove(DELETED_AT_FIELD))
            .and_then(|v| v.as_i64())
            .expect("a tombstone records when it was written");
        assert!((before..=now_millis()).contains(&written), "{written}");
        let tombstone = json!({DELETED_FIELD: true, VERSION_FIELD: 7, KEY_FIELD: id});
        assert_eq!(lines, vec![action, tombstone]);

        let mut reserved = item;
        reserved.insert("_tidemark_x".into(), AttrValue::s("no"));
        let mut out = b"kept".to_vec();
        assert!(bulk_lines("i", &schema, &record(SinkOp::Upsert(reserved)), &mut out).is_err());
        assert_eq!(out, b"kept");
    }

    #[test]
    fn strings_are_escaped_as_serde_json_escapes_them() {
        // Every ASCII byte, and multi-byte characters, at every offset
        // from the eight-byte words the clean runs are read in.
        let every_byte: String = (0u8..0x80).map(char::from).collect();
        let text = format!("{every_byte} é 😀 plain text of some length \\ \"");
        for skip in 0..text.len() {
            let Some(part) = text.get(skip..) else {
                continue;
            };
            let nine = part.char_indices().nth(9).map_or(part, |(i, _)| &part[..i]);
            for cut in [part, nine, "", "12345678", "1234567\""] {
                let mut fast = Vec::new();
                json_str(&mut fast, cut);
                assert_eq!(fast, serde_json::to_vec(cut).unwrap(), "{cut:?}");
            }
        }
    }

    #[test]
    fn plain_values_are_written_as_to_plain_json_renders_them() {
        let numbers = [
            "0",
            "-7",
            "42",
            "1000",
            "0.1",
            "-0.125",
            "12.25",
            "123456789012345",
            "1234567890123456",
            "123456789012345678",
            "1234567890123456789",
            "12345678901234567890123",
            "0.000001",
            "1e-7",
            "1e-200",
            "1e190",
            "1.23456789012345",
            "1.234567890123456",
            "0.12345678901234567890123",
        ];
        let mut values: Vec<AttrValue> = numbers
            .iter()
            .map(|t| AttrValue::N(Number::parse(t).unwrap()))
            .collect();
        values.extend([
            AttrValue::s("a \"b\" \\ \u{1}"),
            AttrValue::B(vec![]),
            AttrValue::B(vec![0, 1, 2, 3, 255]),
            AttrValue::Bool(true),
            AttrValue::Null(true),
            AttrValue::Ss(["x".to_owned(), "y\n".to_owned()].into()),
            AttrValue::Ns(numbers.iter().map(|t| Number::parse(t).unwrap()).collect()),
            AttrValue::Bs([vec![1], vec![2, 3]].into()),
            AttrValue::L(vec![]),
            AttrValue::M(Item::new()),
        ]);
        let nested = AttrValue::M([("l".to_owned(), AttrValue::L(values.clone()))].into());
        values.push(nested);
        for value in &values {
            let mut out = Vec::new();
            plain(&mut out, value.into());
            let written: Value = serde_json::from_slice(&out).unwrap();
            assert_eq!(
                written,
                to_plain_json(value),
                "{}",
                String::from_utf8_lossy(&out)
            );
        }
    }

    #[test]
    fn numbers_are_json_numbers_only_when_exact() {
        let n = |t: &str| number_json(&Number::parse(t).unwrap());
        assert_eq!(n("42"), json!(42));
        assert_eq!(n("-7"), json!(-7));
        assert_eq!(n("1.5"), json!(1.5));
        assert_eq!(n("0.1"), json!(0.1));
        assert_eq!(
            n("12345678901234567890123"),
            json!("12345678901234567890123")
        );
        assert_eq!(
            n("0.12345678901234567890123"),
            json!("0.12345678901234567890123")
        );
    }

    #[test]
    fn decimals_of_fifteen_digits_or_fewer_print_back_exactly() {
        // What lets `number_json` skip its check for them: 15 random
        // digits or fewer, the point anywhere a number may put it.
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut checked = 0;
        for _ in 0..100_000 {
            let len = 1 + next() % 15;
            let digits: String = (0..len)
                .map(|_| char::from(b'0' + (next() % 10) as u8))
                .collect();
            let exponent = i64::try_from(next() % 390).unwrap() - 195;
            // An integer's trailing zeros count as significant, so some
            // of them take the full check instead.
            let Ok(n) = Number::parse(&format!("{digits}e{exponent}")) else {
                continue;
            };
            if significant_digits(n.as_str().as_bytes()) > 15 {
                continue;
            }
            checked += 1;
            let f: f64 = n.as_str().parse().unwrap();
            assert_eq!(Number::parse(&f.to_string()).unwrap(), n);
        }
        assert!(checked > 50_000, "only {checked} numbers checked");
    }

    #[test]
    fn an_encoded_image_is_written_as_its_item_is() {
        use crate::image::testing::{Rng, encoded, item};
        use crate::transform::of as transform;
        use crate::value::Key;

        let schema = KeySchema::new("id", None);
        let transforms = [
            transform(&[], &[]),
            transform(&["a", "title", "é", "zz"], &[]),
            // A swap, a rename onto a name the item may have, a chain.
            transform(&[], &[("a", "b"), ("b", "a")]),
            transform(&[], &[("zz", "a")]),
            transform(&["a", "b", "x y"], &[("a", "title"), ("x y", "a")]),
        ];
        let key = Key::new([("id".to_owned(), AttrValue::s("k#1"))]);
        let mut rng = Rng(0x853c_49e6_748f_ea9b);
        for _ in 0..1_000 {
            let item = item(&mut rng, 3);
            let image = encoded(&item);
            for t in &transforms {
                let record = |op| SinkRecord {
                    key: key.clone(),
                    version: 7,
                    op,
                };
                let want = record(SinkOp::Upsert(t.shape(&item, &schema)));
                let got = record(t.upsert(&image, &schema));
                assert!(matches!(got.op, SinkOp::UpsertEncoded(_)));
                let (mut a, mut b) = (Vec::new(), Vec::new());
                bulk_lines("index", &schema, &want, &mut a).unwrap();
                bulk_lines("index", &schema, &got, &mut b).unwrap();
                assert_eq!(
                    String::from_utf8(b).unwrap(),
                    String::from_utf8(a).unwrap(),
                    "{item:?}"
                );
            }
        }
        // The reserved prefix is refused as it is in an item, and nothing
        // of the record stays in the buffer.
        let reserved: Item = [("_tidemark_x".to_owned(), AttrValue::s("v"))].into();
        let record = SinkRecord {
            key,
            version: 1,
            op: transforms[0].upsert(&encoded(&reserved), &schema),
        };
        let mut out = b"before".to_vec();
        let err = bulk_lines("index", &schema, &record, &mut out).unwrap_err();
        assert!(err.contains("_tidemark_x"), "{err}");
        assert_eq!(out, b"before");
    }
}
