//! A `ChangeRecord`'s new image read in place: the attributes of an
//! `Item` message as byte ranges of the payload it came in, so a record can
//! go from a Kafka feed to a sink that writes from it (Elasticsearch)
//! without an [`Item`](crate::value::Item) being built and dropped.
//!
//! Only an image in the one form prost (and every deterministic encoder)
//! writes is read this way: each map entry a name then a value, names in
//! order and distinct, each value exactly one member, numbers normalised,
//! set members in order and distinct, no unknown fields. Such an image
//! decodes to exactly the item [`super::wire`] makes of it, and its bytes
//! are a value's one encoding, so two equal values have equal bytes.
//! Anything else (merged or repeated members, unordered maps, numbers to
//! normalise, bad values) is left to [`super::decode_change`], which
//! decodes it or says what is wrong.

use std::ops::Range;

/// Deepest value nesting read in place (a list in a map in a list …);
/// deeper images are decoded. prost stops at 100 nested messages, about
/// 33 levels of values.
const DEPTH: u32 = 24;

/// A field of a message in the canonical form: its number and its
/// content (a length-delimited field's bytes, or a varint's value).
#[derive(Clone, Copy)]
pub(crate) enum Field<'a> {
    Bytes(&'a [u8]),
    Varint(u64),
}

/// The fields of a message, in order; stops at the first malformed byte
/// or field of a wire type the canonical form has no use for (a checked
/// message has none).
#[derive(Clone)]
pub(crate) struct Fields<'a> {
    buf: &'a [u8],
    bad: bool,
}

impl<'a> Fields<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Self { buf, bad: false }
    }

    /// Whether every byte was read as a field.
    fn complete(&self) -> bool {
        self.buf.is_empty() && !self.bad
    }

    fn fail<T>(&mut self) -> Option<T> {
        self.bad = true;
        None
    }
}

#[inline(always)]
fn varint(buf: &mut &[u8]) -> Option<u64> {
    // Keys and lengths are mostly one byte.
    if let Some((&b, rest)) = buf.split_first()
        && b < 0x80
    {
        *buf = rest;
        return Some(u64::from(b));
    }
    long_varint(buf)
}

#[cold]
fn long_varint(buf: &mut &[u8]) -> Option<u64> {
    let mut value = 0u64;
    for i in 0..10 {
        let (&b, rest) = buf.split_first()?;
        *buf = rest;
        if i == 9 && b > 1 {
            return None;
        }
        value |= u64::from(b & 0x7f) << (7 * i);
        if b < 0x80 {
            return Some(value);
        }
    }
    None
}

impl<'a> Iterator for Fields<'a> {
    type Item = (u64, Field<'a>);

    #[inline]
    fn next(&mut self) -> Option<Self::Item> {
        if self.buf.is_empty() || self.bad {
            return None;
        }
        let Some(key) = varint(&mut self.buf) else {
            return self.fail();
        };
        let field = match (key & 7, varint(&mut self.buf)) {
            (0, Some(v)) => Field::Varint(v),
            (2, Some(len)) => match usize::try_from(len) {
                Ok(len) if len <= self.buf.len() => {
                    let (content, rest) = self.buf.split_at(len);
                    self.buf = rest;
                    Field::Bytes(content)
                }
                _ => return self.fail(),
            },
            _ => return self.fail(),
        };
        Some((key >> 3, field))
    }
}

/// The (name, value) contents of a checked map entry.
pub(crate) fn entry(entry: &[u8]) -> Option<(&[u8], &[u8])> {
    let mut fields = Fields::new(entry);
    match (fields.next(), fields.next()) {
        (Some((1, Field::Bytes(name))), Some((2, Field::Bytes(value)))) => Some((name, value)),
        _ => None,
    }
}

/// Checks the `Item` message at `image` within `payload` (a `MapValue`
/// has the same form), calling `each` with every entry's name and value's
/// member, as ranges of `payload`, in name order; `None` when the message
/// is not in the canonical form.
pub(crate) fn check_item(
    payload: &[u8],
    image: Range<usize>,
    mut each: impl FnMut(Range<usize>, Member),
) -> Option<()> {
    check_map(&payload[image], 0, |name, (tag, field)| {
        let member = match field {
            Field::Bytes(b) => Member::Bytes(tag, span(payload, b)),
            Field::Varint(v) => Member::Varint(tag, v),
        };
        each(span(payload, name), member);
    })
}

/// The one member of a checked `AttributeValue`: its field number and
/// content (a range of the message it was read from, or a varint).
#[derive(Clone, Debug)]
pub(crate) enum Member {
    Bytes(u64, Range<usize>),
    Varint(u64, u64),
}

/// `part`'s range within `whole` (`part` is a subslice of it).
fn span(whole: &[u8], part: &[u8]) -> Range<usize> {
    let start = part.as_ptr() as usize - whole.as_ptr() as usize;
    start..start + part.len()
}

/// Checks a map message, calling `each` with every entry's name and
/// value's member.
fn check_map<'a>(
    map: &'a [u8],
    depth: u32,
    mut each: impl FnMut(&'a [u8], (u64, Field<'a>)),
) -> Option<()> {
    let mut fields = Fields::new(map);
    let mut previous: Option<&[u8]> = None;
    for (tag, field) in fields.by_ref() {
        let (1, Field::Bytes(entry)) = (tag, field) else {
            return None;
        };
        let mut e = Fields::new(entry);
        let (Some((1, Field::Bytes(name))), Some((2, Field::Bytes(value))), None) =
            (e.next(), e.next(), e.next())
        else {
            return None;
        };
        if !e.complete() || previous.is_some_and(|p| order(p, name).is_ge()) || !utf8(name) {
            return None;
        }
        let member = check_value(value, depth)?;
        previous = Some(name);
        each(name, member);
    }
    fields.complete().then_some(())
}

/// Checks an `AttributeValue` message: exactly one member, canonical.
/// Returns the member.
fn check_value(value: &[u8], depth: u32) -> Option<(u64, Field<'_>)> {
    if depth > DEPTH {
        return None;
    }
    let mut fields = Fields::new(value);
    let (tag, field) = fields.next()?;
    if fields.next().is_some() || !fields.complete() {
        return None;
    }
    let checked = match (tag, field) {
        (1, Field::Bytes(s)) => utf8(s).then_some(()),
        (2, Field::Bytes(n)) => normal_number(n).then_some(()),
        (3, Field::Bytes(_)) | (4, Field::Varint(0 | 1)) | (5, Field::Varint(0)) => Some(()),
        (6, Field::Bytes(set)) => check_set(set, utf8),
        (7, Field::Bytes(set)) => check_set(set, normal_number),
        (8, Field::Bytes(set)) => check_set(set, |_| true),
        (9, Field::Bytes(list)) => {
            let mut fields = Fields::new(list);
            for (tag, element) in fields.by_ref() {
                let (1, Field::Bytes(element)) = (tag, element) else {
                    return None;
                };
                check_value(element, depth + 1)?;
            }
            fields.complete().then_some(())
        }
        (10, Field::Bytes(map)) => check_map(map, depth + 1, |_, _| {}),
        _ => None,
    };
    checked.map(|()| (tag, field))
}

/// Whether `text` is UTF-8; ASCII (most text) is told word by word.
fn utf8(text: &[u8]) -> bool {
    text.is_ascii() || std::str::from_utf8(text).is_ok()
}

/// A set message: one member or more, each passing `valid`, in byte order
/// and distinct (the order of the decoded `BTreeSet`).
fn check_set(set: &[u8], valid: impl Fn(&[u8]) -> bool) -> Option<()> {
    let mut fields = Fields::new(set);
    let mut previous: Option<&[u8]> = None;
    for (tag, member) in fields.by_ref() {
        let (1, Field::Bytes(member)) = (tag, member) else {
            return None;
        };
        if previous.is_some_and(|p| order(p, member).is_ge()) || !valid(member) {
            return None;
        }
        previous = Some(member);
    }
    (previous.is_some() && fields.complete()).then_some(())
}

/// The byte order of two names or members, told by their first bytes
/// where those differ (most names), without a call to `memcmp`.
#[inline]
pub(crate) fn order(a: &[u8], b: &[u8]) -> std::cmp::Ordering {
    match (a.first(), b.first()) {
        (Some(x), Some(y)) if x != y => x.cmp(y),
        _ => a.cmp(b),
    }
}

/// A number's text as [`Number`](crate::value::Number) keeps it.
fn normal_number(text: &[u8]) -> bool {
    crate::value::is_normal_bytes(text)
}
