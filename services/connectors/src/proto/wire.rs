//! [`decode_change`](super::decode_change) straight from the protobuf wire
//! format into the connector model: every record a Kafka feed delivers goes
//! through here, so the intermediate `tidemark.common.v1` message (a second
//! tree of strings and maps, built only to be taken apart) is skipped.
//!
//! It accepts exactly what prost's generated decoder followed by the
//! conversions of [`super`] accepts, and decodes it to the same record:
//! later scalars replace earlier ones, a message field seen twice is merged,
//! a oneof member replaces another member and merges into itself, a map's
//! later entry for a key replaces the earlier one, unknown fields are
//! skipped, and nesting stops at prost's recursion limit. Errors in values
//! are kept until the value they belong to is complete (a later member may
//! still replace the bad one) and then reported as [`super`] reports them.
//! The test `the_wire_decoder_agrees_with_prost` and the `change_record`
//! fuzz target hold the two to each other.

use std::collections::BTreeMap;

use super::{ProtoError, distinct, number, number_set};
use crate::value::AttrValue;

/// A structural fault of the bytes (what prost's `DecodeError` reports).
#[derive(Debug)]
pub(super) struct WireError(&'static str);

impl WireError {
    pub(super) fn into_proto(self) -> ProtoError {
        ProtoError::new("", format!("not a valid ChangeRecord: {}", self.0))
    }
}

type Wire<T> = Result<T, WireError>;

/// prost's recursion limit (as in the C++ implementation).
const RECURSION_LIMIT: u32 = 100;

const VARINT: u8 = 0;
const FIXED64: u8 = 1;
const LEN: u8 = 2;
const START_GROUP: u8 = 3;
const END_GROUP: u8 = 4;
const FIXED32: u8 = 5;

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn done(&self) -> bool {
        self.pos >= self.buf.len()
    }

    fn varint(&mut self) -> Wire<u64> {
        // Keys and lengths are mostly one byte.
        if let Some(&b) = self.buf.get(self.pos)
            && b < 0x80
        {
            self.pos += 1;
            return Ok(u64::from(b));
        }
        let mut value = 0u64;
        for i in 0..10 {
            let Some(&b) = self.buf.get(self.pos) else {
                return Err(WireError("invalid varint"));
            };
            self.pos += 1;
            if i == 9 && b > 1 {
                return Err(WireError("invalid varint"));
            }
            value |= u64::from(b & 0x7f) << (7 * i);
            if b < 0x80 {
                return Ok(value);
            }
        }
        Err(WireError("invalid varint"))
    }

    /// A field key: (field number, wire type).
    fn key(&mut self) -> Wire<(u32, u8)> {
        let key = self.varint()?;
        let key = u32::try_from(key).map_err(|_| WireError("invalid key value"))?;
        let wire_type = u8::try_from(key & 7).unwrap_or(u8::MAX);
        if wire_type > FIXED32 {
            return Err(WireError("invalid wire type value"));
        }
        let tag = key >> 3;
        if tag == 0 {
            return Err(WireError("invalid tag value: 0"));
        }
        Ok((tag, wire_type))
    }

    /// The next `len` bytes.
    fn take(&mut self, len: u64) -> Wire<&'a [u8]> {
        let remaining = self.buf.len() - self.pos;
        let len = usize::try_from(len)
            .ok()
            .filter(|&len| len <= remaining)
            .ok_or(WireError("buffer underflow"))?;
        let bytes = &self.buf[self.pos..self.pos + len];
        self.pos += len;
        Ok(bytes)
    }

    /// A length-delimited field's content.
    fn delimited(&mut self, wire_type: u8) -> Wire<&'a [u8]> {
        expect(LEN, wire_type)?;
        let len = self.varint()?;
        self.take(len)
    }

    fn string(&mut self, wire_type: u8) -> Wire<&'a str> {
        std::str::from_utf8(self.delimited(wire_type)?)
            .map_err(|_| WireError("invalid string value: data is not UTF-8 encoded"))
    }

    fn scalar(&mut self, wire_type: u8) -> Wire<u64> {
        expect(VARINT, wire_type)?;
        self.varint()
    }

    /// Skips a field of a number this decoder does not know.
    fn skip(&mut self, wire_type: u8, tag: u32, budget: u32) -> Wire<()> {
        limit(budget)?;
        let len = match wire_type {
            VARINT => self.varint().map(|_| 0)?,
            FIXED64 => 8,
            LEN => self.varint()?,
            START_GROUP => loop {
                let (inner_tag, inner_type) = self.key()?;
                if inner_type == END_GROUP {
                    if inner_tag != tag {
                        return Err(WireError("unexpected end group tag"));
                    }
                    break 0;
                }
                self.skip(inner_type, inner_tag, budget - 1)?;
            },
            END_GROUP => return Err(WireError("unexpected end group tag")),
            _ => 4,
        };
        self.take(len).map(|_| ())
    }
}

fn expect(want: u8, got: u8) -> Wire<()> {
    if want == got {
        Ok(())
    } else {
        Err(WireError("invalid wire type"))
    }
}

fn limit(budget: u32) -> Wire<()> {
    if budget == 0 {
        Err(WireError("recursion limit reached"))
    } else {
        Ok(())
    }
}

/// The content of a nested message field, after prost's checks (wire
/// type, recursion budget); its fields are read with `budget - 1`.
fn nested<'a>(r: &mut Reader<'a>, wire_type: u8, budget: u32) -> Wire<Reader<'a>> {
    expect(LEN, wire_type)?;
    limit(budget)?;
    let len = r.varint()?;
    Ok(Reader {
        buf: r.take(len)?,
        pos: 0,
    })
}

/// The entries of a protobuf map (an item, a key, a map value) as read so
/// far, in wire order, each value already converted or its error.
pub(super) struct Attributes<'a>(Vec<(&'a str, Result<AttrValue, ProtoError>)>);

impl<'a> Attributes<'a> {
    fn with_capacity(n: usize) -> Self {
        Self(Vec::with_capacity(n))
    }

    /// Whether the map has no entries (an entry with a bad value counts).
    pub(super) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Reads one map entry (field 1 the name, field 2 the value).
    fn entry(&mut self, r: &mut Reader<'a>, wire_type: u8, budget: u32) -> Wire<()> {
        let mut e = nested(r, wire_type, budget)?;
        let mut name = "";
        let mut value = Pending::None;
        while !e.done() {
            match e.key()? {
                (1, t) => name = e.string(t)?,
                (2, t) => value.merge_message(&mut e, t, budget - 1)?,
                (tag, t) => e.skip(t, tag, budget - 1)?,
            }
        }
        self.0.push((name, value.finish()));
        Ok(())
    }

    /// The map, a later entry for a name replacing an earlier one, or the
    /// error of the first bad value in name order (what converting prost's
    /// `BTreeMap` reports).
    pub(super) fn finish(self) -> Result<BTreeMap<String, AttrValue>, ProtoError> {
        let mut entries = self.0;
        // Encoders write a map in name order, once per name; only the
        // others need sorting.
        if !entries.is_sorted_by(|a, b| a.0 < b.0) {
            // Stable, so of equal names the last read is last; it takes
            // the place of the earlier ones.
            entries.sort_by(|a, b| a.0.cmp(b.0));
            entries.dedup_by(|later, earlier| {
                let same = later.0 == earlier.0;
                if same {
                    std::mem::swap(later, earlier);
                }
                same
            });
        }
        if let Some((name, Err(e))) = entries.iter_mut().find(|e| e.1.is_err()) {
            let e = std::mem::replace(e, ProtoError::new("", ""));
            return Err(e.within(&format!("attributes[{name:?}]")));
        }
        // `map`, not `filter_map`: the collect sizes its buffer once.
        Ok(entries
            .into_iter()
            .map(|(name, v)| {
                let Ok(v) = v else {
                    unreachable!("no value is an error after the check above");
                };
                (name.to_owned(), v)
            })
            .collect())
    }
}

/// Reads a message holding one map at field 1 (`Item`, `Key`, `MapValue`)
/// into `into`, merging with what it holds.
fn merge_map<'a>(
    into: &mut Attributes<'a>,
    r: &mut Reader<'a>,
    wire_type: u8,
    budget: u32,
) -> Wire<()> {
    let mut m = nested(r, wire_type, budget)?;
    while !m.done() {
        match m.key()? {
            (1, t) => into.entry(&mut m, t, budget - 1)?,
            (tag, t) => m.skip(t, tag, budget - 1)?,
        }
    }
    Ok(())
}

/// An `AttributeValue`'s member as read so far: members of a oneof replace
/// each other, a message member read twice merges (sets and lists append,
/// maps add entries).
enum Pending<'a> {
    None,
    S(&'a str),
    N(&'a str),
    B(&'a [u8]),
    Bool(bool),
    Null,
    Ss(Vec<&'a str>),
    Ns(Vec<&'a str>),
    Bs(Vec<&'a [u8]>),
    /// The elements so far; once one is bad, its error (with its index)
    /// and the count, and no more values.
    L(Vec<AttrValue>, usize, Option<ProtoError>),
    M(Attributes<'a>),
}

impl<'a> Pending<'a> {
    /// Reads an `AttributeValue` message into this one.
    fn merge_message(&mut self, r: &mut Reader<'a>, wire_type: u8, budget: u32) -> Wire<()> {
        let mut v = nested(r, wire_type, budget)?;
        let budget = budget - 1;
        while !v.done() {
            let (tag, t) = v.key()?;
            match tag {
                1 => *self = Pending::S(v.string(t)?),
                2 => *self = Pending::N(v.string(t)?),
                3 => *self = Pending::B(v.delimited(t)?),
                4 => *self = Pending::Bool(v.scalar(t)? != 0),
                5 => {
                    v.scalar(t)?;
                    *self = Pending::Null;
                }
                6..=8 => {
                    let mut set = nested(&mut v, t, budget)?;
                    if !matches!(
                        (tag, &*self),
                        (6, Pending::Ss(_)) | (7, Pending::Ns(_)) | (8, Pending::Bs(_))
                    ) {
                        *self = match tag {
                            6 => Pending::Ss(Vec::new()),
                            7 => Pending::Ns(Vec::new()),
                            _ => Pending::Bs(Vec::new()),
                        };
                    }
                    while !set.done() {
                        match (set.key()?, &mut *self) {
                            ((1, t), Pending::Ss(values) | Pending::Ns(values)) => {
                                values.push(set.string(t)?);
                            }
                            ((1, t), Pending::Bs(values)) => values.push(set.delimited(t)?),
                            ((tag, t), _) => set.skip(t, tag, budget - 1)?,
                        }
                    }
                }
                9 => {
                    let mut list = nested(&mut v, t, budget)?;
                    if !matches!(self, Pending::L(..)) {
                        *self = Pending::L(Vec::new(), 0, None);
                    }
                    let Pending::L(values, count, error) = self else {
                        unreachable!("just set");
                    };
                    while !list.done() {
                        match list.key()? {
                            (1, t) => {
                                let mut element = Pending::None;
                                element.merge_message(&mut list, t, budget - 1)?;
                                match element.finish() {
                                    Ok(value) if error.is_none() => values.push(value),
                                    Ok(_) => {}
                                    Err(e) if error.is_none() => {
                                        *error = Some(e.within(&format!("l.values[{count}]")));
                                    }
                                    Err(_) => {}
                                }
                                *count += 1;
                            }
                            (tag, t) => list.skip(t, tag, budget - 1)?,
                        }
                    }
                }
                10 => {
                    if !matches!(self, Pending::M(_)) {
                        *self = Pending::M(Attributes::with_capacity(4));
                    }
                    let Pending::M(attributes) = self else {
                        unreachable!("just set");
                    };
                    merge_map(attributes, &mut v, t, budget)?;
                }
                _ => v.skip(t, tag, budget)?,
            }
        }
        Ok(())
    }

    /// The value, checked as [`super::value_from_proto`] checks it.
    fn finish(self) -> Result<AttrValue, ProtoError> {
        Ok(match self {
            Pending::None => {
                return Err(ProtoError::new("", "exactly one value member must be set"));
            }
            Pending::S(s) => AttrValue::S(s.to_owned()),
            Pending::N(n) => AttrValue::N(number(n, "n")?),
            Pending::B(b) => AttrValue::B(b.to_vec()),
            Pending::Bool(b) => AttrValue::Bool(b),
            Pending::Null => AttrValue::Null(true),
            Pending::Ss(values) => {
                AttrValue::Ss(distinct(values.into_iter().map(str::to_owned), "ss")?)
            }
            Pending::Ns(values) => AttrValue::Ns(number_set(values)?),
            Pending::Bs(values) => {
                AttrValue::Bs(distinct(values.into_iter().map(<[u8]>::to_vec), "bs")?)
            }
            Pending::L(_, _, Some(e)) => return Err(e),
            Pending::L(values, _, None) => AttrValue::L(values),
            Pending::M(attributes) => AttrValue::M(attributes.finish().map_err(|e| e.within("m"))?),
        })
    }
}

/// A `ChangeRecord` as read off the wire, its values converted; the checks
/// across fields are [`super::decode_change`]'s.
#[derive(Default)]
pub(super) struct WireRecord<'a> {
    pub key: Option<Attributes<'a>>,
    pub deleted: bool,
    pub new_image: Option<Attributes<'a>>,
    pub version: u64,
    /// (seconds, nanos)
    pub change_time: Option<(i64, i32)>,
    /// Read with `keep_image`: where each `new_image` field's content is
    /// (`new_image` stays `None`).
    pub image_at: Vec<std::ops::Range<usize>>,
}

/// Reads a `ChangeRecord`; with `keep_image`, its `new_image` is only
/// located, not read.
pub(super) fn read_change(bytes: &[u8], keep_image: bool) -> Wire<WireRecord<'_>> {
    let mut r = Reader { buf: bytes, pos: 0 };
    let mut record = WireRecord::default();
    let budget = RECURSION_LIMIT;
    while !r.done() {
        let (tag, t) = r.key()?;
        match tag {
            1 => merge_map(
                record
                    .key
                    .get_or_insert_with(|| Attributes::with_capacity(2)),
                &mut r,
                t,
                budget,
            )?,
            2 => record.deleted = r.scalar(t)? != 0,
            3 if keep_image => {
                let content = nested(&mut r, t, budget)?;
                record.image_at.push(r.pos - content.buf.len()..r.pos);
            }
            3 => merge_map(
                record
                    .new_image
                    .get_or_insert_with(|| Attributes::with_capacity(16)),
                &mut r,
                t,
                budget,
            )?,
            4 => record.version = r.scalar(t)?,
            5 => {
                let mut ts = nested(&mut r, t, budget)?;
                let time = record.change_time.get_or_insert((0, 0));
                while !ts.done() {
                    match ts.key()? {
                        // int64 and int32 as protobuf reads them: the
                        // varint's bits, truncated for an int32.
                        #[allow(clippy::cast_possible_wrap)]
                        (1, t) => time.0 = ts.scalar(t)? as i64,
                        #[allow(clippy::cast_possible_truncation)]
                        (2, t) => time.1 = ts.scalar(t)? as i32,
                        (tag, t) => ts.skip(t, tag, budget - 1)?,
                    }
                }
            }
            _ => r.skip(t, tag, budget)?,
        }
    }
    Ok(record)
}

#[cfg(test)]
mod tests {
    use super::super::{decode_change, decode_change_encoded, decode_change_with_prost};
    use crate::traits::Position;

    /// A small deterministic generator (xorshift), so a failing case is
    /// found again from its seed.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }

        fn chance(&mut self, percent: u64) -> bool {
            self.below(100) < percent
        }
    }

    fn varint(out: &mut Vec<u8>, mut v: u64) {
        while v >= 0x80 {
            out.push(u8::try_from(v & 0x7f).unwrap() | 0x80);
            v >>= 7;
        }
        out.push(u8::try_from(v).unwrap());
    }

    fn field(out: &mut Vec<u8>, tag: u32, payload: &[u8]) {
        varint(out, u64::from(tag) << 3 | 2);
        varint(out, payload.len() as u64);
        out.extend_from_slice(payload);
    }

    fn scalar(out: &mut Vec<u8>, tag: u32, v: u64) {
        varint(out, u64::from(tag) << 3);
        varint(out, v);
    }

    const NAMES: [&str; 5] = ["a", "b", "id", "sk", "\u{e9}"];
    const NUMBERS: [&str; 7] = [
        "1",
        "1.50",
        "-0",
        "1e3",
        "NaN",
        "",
        "12345678901234567890123456789012345678901",
    ];

    /// A number's text, one in ten of them bad.
    fn number(rng: &mut Rng) -> &'static [u8] {
        let i = if rng.chance(10) {
            4 + rng.below(3)
        } else {
            rng.below(4)
        };
        NUMBERS[usize::try_from(i).unwrap()].as_bytes()
    }

    /// Something a producer might send in an unknown field.
    fn unknown(rng: &mut Rng, out: &mut Vec<u8>) {
        match rng.below(4) {
            0 => scalar(out, 15, rng.next()),
            1 => field(out, 16, b"zz"),
            2 => {
                varint(out, 17 << 3 | 5);
                out.extend_from_slice(&[1, 2, 3, 4]);
            }
            _ => {
                varint(out, 18 << 3 | 3);
                scalar(out, 1, 7);
                varint(out, 18 << 3 | 4);
            }
        }
    }

    /// An `AttributeValue`: usually one member, sometimes none, several
    /// (replacing or merging) or a bad one.
    fn value(rng: &mut Rng, depth: u32, out: &mut Vec<u8>) {
        let members = match rng.below(40) {
            0 => 0,
            1..=6 => 2,
            _ => 1,
        };
        for _ in 0..members {
            let top = if depth == 0 { 8 } else { 10 };
            match rng.below(top) + 1 {
                1 => field(out, 1, NAMES[rng.below(5) as usize].as_bytes()),
                2 => field(out, 2, number(rng)),
                3 => field(out, 3, &[0, 1, 2][..rng.below(3) as usize]),
                4 => scalar(out, 4, rng.below(3)),
                5 => scalar(out, 5, rng.below(2)),
                tag @ 6..=8 => {
                    let mut set = Vec::new();
                    for _ in 0..rng.below(4) + u64::from(!rng.chance(10)) {
                        let v: &[u8] = match tag {
                            7 => number(rng),
                            _ => NAMES[rng.below(3) as usize].as_bytes(),
                        };
                        field(&mut set, 1, v);
                    }
                    field(out, u32::try_from(tag).unwrap(), &set);
                }
                9 => {
                    let mut list = Vec::new();
                    for _ in 0..rng.below(4) {
                        let mut element = Vec::new();
                        value(rng, depth - 1, &mut element);
                        field(&mut list, 1, &element);
                    }
                    field(out, 9, &list);
                }
                _ => {
                    let mut map = Vec::new();
                    attributes(rng, depth - 1, &mut map);
                    field(out, 10, &map);
                }
            }
            if rng.chance(5) {
                unknown(rng, out);
            }
        }
    }

    /// The entries of a map message (`Item`, `Key`, `MapValue`): names may
    /// repeat, out of order.
    fn attributes(rng: &mut Rng, depth: u32, out: &mut Vec<u8>) {
        for _ in 0..rng.below(5) {
            let mut entry = Vec::new();
            if !rng.chance(3) {
                field(&mut entry, 1, NAMES[rng.below(5) as usize].as_bytes());
            }
            let mut v = Vec::new();
            value(rng, depth, &mut v);
            field(&mut entry, 2, &v);
            if rng.chance(5) {
                unknown(rng, &mut entry);
            }
            field(out, 1, &entry);
        }
    }

    fn record(rng: &mut Rng) -> Vec<u8> {
        let mut out = Vec::new();
        for _ in 0..=rng.below(2) {
            if !rng.chance(5) {
                let mut key = Vec::new();
                let mut entry = Vec::new();
                field(&mut entry, 1, NAMES[rng.below(5) as usize].as_bytes());
                let mut v = Vec::new();
                if rng.chance(90) {
                    field(&mut v, 1, b"k");
                } else {
                    value(rng, 0, &mut v);
                }
                field(&mut entry, 2, &v);
                field(&mut key, 1, &entry);
                if rng.chance(20) {
                    attributes(rng, 0, &mut key);
                }
                field(&mut out, 1, &key);
            }
            if rng.chance(30) {
                scalar(&mut out, 2, rng.below(2));
            }
            if !rng.chance(10) {
                let mut image = Vec::new();
                attributes(rng, 2, &mut image);
                field(&mut out, 3, &image);
            }
            if !rng.chance(5) {
                scalar(&mut out, 4, rng.below(3));
            }
            if rng.chance(50) {
                let mut time = Vec::new();
                scalar(&mut time, 1, rng.next() >> rng.below(64));
                scalar(&mut time, 2, rng.next() >> rng.below(64));
                field(&mut out, 5, &time);
            }
            if rng.chance(5) {
                unknown(rng, &mut out);
            }
        }
        out
    }

    fn position() -> Position {
        Position {
            partition: "t/0".to_owned(),
            sequence: "1".to_owned(),
        }
    }

    /// Same record, or both refused; for values, the same reason. Kept
    /// encoded or not, the wire decoder gives the same record or error.
    fn agree(bytes: &[u8]) -> bool {
        let fast = decode_change(bytes, position());
        assert_eq!(
            decode_change_encoded(&bytes.into(), position()),
            fast,
            "{bytes:?}"
        );
        let reference = decode_change_with_prost(bytes, position());
        match (&fast, &reference) {
            (Ok(a), Ok(b)) => assert_eq!(a, b, "{bytes:?}"),
            (Err(a), Err(b)) if b.field.is_empty() => {
                assert!(a.field.is_empty(), "{bytes:?}: {a} where prost: {b}");
            }
            (Err(a), Err(b)) => assert_eq!(a, b, "{bytes:?}"),
            _ => panic!("{bytes:?}: {fast:?} where prost: {reference:?}"),
        }
        fast.is_ok()
    }

    #[test]
    fn the_wire_decoder_agrees_with_prost() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut decoded = 0;
        for _ in 0..20_000 {
            let mut bytes = record(&mut rng);
            decoded += usize::from(agree(&bytes));
            // Damaged: a flipped byte, a cut, a doubled tail.
            if !bytes.is_empty() {
                let at = rng.below(bytes.len() as u64) as usize;
                let mut flipped = bytes.clone();
                flipped[at] ^= 1 << rng.below(8);
                agree(&flipped);
                agree(&bytes[..at]);
                bytes.extend_from_within(at..);
                agree(&bytes);
            }
        }
        // The generator must reach both outcomes, or it tests little.
        assert!(decoded > 2_000, "only {decoded} records decoded");
    }

    #[test]
    fn the_wire_decoder_agrees_with_prost_around_the_fuzz_corpus() {
        // The `change_record` fuzz target's seeds (real records of every
        // kind), each with every bit flipped in turn and cut at every byte.
        let dir = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../fuzz/corpus/change_record"
        );
        let mut seeds = 0;
        for entry in std::fs::read_dir(dir).expect("the fuzz corpus is in the repository") {
            let bytes = std::fs::read(entry.unwrap().path()).unwrap();
            assert!(agree(&bytes), "a corpus seed decodes");
            seeds += 1;
            for at in 0..bytes.len() {
                agree(&bytes[..at]);
                for bit in 0..8 {
                    let mut flipped = bytes.clone();
                    flipped[at] ^= 1 << bit;
                    agree(&flipped);
                }
            }
        }
        assert!(seeds >= 5, "only {seeds} corpus seeds");
    }

    #[test]
    fn nesting_stops_where_prost_stops() {
        for depth in [30, 31, 32, 33, 34] {
            // A map inside a map, `depth` times, around a string.
            let mut v = Vec::new();
            field(&mut v, 1, b"x");
            for _ in 0..depth {
                let mut entry = Vec::new();
                field(&mut entry, 1, b"m");
                field(&mut entry, 2, &v);
                let mut map = Vec::new();
                field(&mut map, 1, &entry);
                v.clear();
                field(&mut v, 10, &map);
            }
            let mut entry = Vec::new();
            field(&mut entry, 1, b"a");
            field(&mut entry, 2, &v);
            let mut image = Vec::new();
            field(&mut image, 1, &entry);
            let mut out = Vec::new();
            let mut key = Vec::new();
            let mut key_entry = Vec::new();
            field(&mut key_entry, 1, b"id");
            let mut s = Vec::new();
            field(&mut s, 1, b"k");
            field(&mut key_entry, 2, &s);
            field(&mut key, 1, &key_entry);
            field(&mut out, 1, &key);
            field(&mut out, 3, &image);
            scalar(&mut out, 4, 1);
            agree(&out);
        }
    }
}
