//! An item image as a pipeline carries it from its feed to its sinks:
//! decoded ([`Item`]), or still the protobuf `Item` of the Kafka message it
//! came in ([`EncodedItem`]), read in place. A sink that writes from the
//! encoding (Elasticsearch) never has the item built; any other reads it
//! through [`Image::into_item`]. [`ValueRef`] reads a value of either kind.

use std::borrow::Cow;
use std::collections::{BTreeSet, btree_map, btree_set};
use std::fmt;
use std::ops::Range;
use std::sync::Arc;

use crate::proto::view::{self, Field, Fields, Member, order};
use crate::value::{AttrValue, Item, Number};

/// A new image, decoded or encoded.
#[derive(Clone)]
pub enum Image {
    Item(Item),
    Encoded(EncodedItem),
}

impl From<Item> for Image {
    fn from(item: Item) -> Self {
        Self::Item(item)
    }
}

impl Image {
    /// The value of attribute `name`.
    pub fn get(&self, name: &str) -> Option<ValueRef<'_>> {
        match self {
            Self::Item(item) => item.get(name).map(ValueRef::from),
            Self::Encoded(e) => e.get(name),
        }
    }

    /// The attributes, in name order.
    pub fn attributes(&self) -> Attributes<'_> {
        match self {
            Self::Item(item) => Attributes::Item(item.iter()),
            Self::Encoded(e) => e.attributes(),
        }
    }

    /// The decoded item.
    pub fn into_item(self) -> Item {
        match self {
            Self::Item(item) => item,
            Self::Encoded(e) => e.to_item(),
        }
    }

    /// The decoded item, borrowed when it is one already.
    pub fn to_item(&self) -> Cow<'_, Item> {
        match self {
            Self::Item(item) => Cow::Borrowed(item),
            Self::Encoded(e) => Cow::Owned(e.to_item()),
        }
    }
}

/// Equal when the decoded items are.
impl PartialEq for Image {
    fn eq(&self, other: &Self) -> bool {
        self.to_item() == other.to_item()
    }
}

impl fmt::Debug for Image {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Item(item) => item.fmt(f),
            Self::Encoded(e) => e.fmt(f),
        }
    }
}

/// The attributes of an [`Image`] or [`EncodedItem`]: (name, value), the
/// name's UTF-8 bytes.
#[derive(Clone)]
pub enum Attributes<'a> {
    Item(btree_map::Iter<'a, String, AttrValue>),
    Encoded(&'a [u8], std::slice::Iter<'a, Entry>),
}

impl<'a> Iterator for Attributes<'a> {
    type Item = (&'a [u8], ValueRef<'a>);

    fn next(&mut self) -> Option<(&'a [u8], ValueRef<'a>)> {
        match self {
            Self::Item(i) => i.next().map(|(n, v)| (n.as_bytes(), ValueRef::from(v))),
            Self::Encoded(payload, i) => i.next().map(|e| (e.name(payload), e.value(payload))),
        }
    }
}

/// The `Item` message of a change record, checked to be in the canonical
/// form (see [`crate::proto::view`]) and read in place: each attribute a
/// name and its value's one member, ranges of the shared payload, in name
/// order. A transform trims and renames the list, not the payload.
#[derive(Clone)]
pub struct EncodedItem {
    payload: Arc<[u8]>,
    entries: Vec<Entry>,
}

#[derive(Clone)]
pub struct Entry {
    name: Name,
    /// The value's one member, its content a range of the payload.
    value: Member,
}

#[derive(Clone)]
enum Name {
    In(Range<usize>),
    Renamed(Arc<str>),
}

impl Entry {
    fn name<'a>(&'a self, payload: &'a [u8]) -> &'a [u8] {
        match &self.name {
            Name::In(range) => &payload[range.clone()],
            Name::Renamed(name) => name.as_bytes(),
        }
    }

    fn value<'a>(&self, payload: &'a [u8]) -> ValueRef<'a> {
        match &self.value {
            Member::Bytes(tag, range) => {
                ValueRef::member(*tag, Field::Bytes(&payload[range.clone()]))
            }
            Member::Varint(tag, v) => ValueRef::member(*tag, Field::Varint(*v)),
        }
    }
}

/// What a transform does with an attribute of an [`EncodedItem`].
pub enum Reshape {
    Drop,
    Keep,
    Rename(Arc<str>),
}

impl EncodedItem {
    /// The `Item` message at `image` within `payload`, when it is in the
    /// canonical form.
    pub(crate) fn new(payload: Arc<[u8]>, image: Range<usize>) -> Option<Self> {
        let mut entries = Vec::with_capacity(16);
        view::check_item(&payload, image, |name, value| {
            entries.push(Entry {
                name: Name::In(name),
                value,
            });
        })?;
        Some(Self { payload, entries })
    }

    pub fn get(&self, name: &str) -> Option<ValueRef<'_>> {
        let payload = self.payload.as_ref();
        self.entries
            .binary_search_by(|e| order(e.name(payload), name.as_bytes()))
            .ok()
            .map(|i| self.entries[i].value(payload))
    }

    pub fn attributes(&self) -> Attributes<'_> {
        Attributes::Encoded(self.payload.as_ref(), self.entries.iter())
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The item it encodes.
    pub fn to_item(&self) -> Item {
        self.attributes()
            .map(|(name, v)| (text(name), v.to_owned()))
            .collect()
    }

    /// Drops, keeps or renames each attribute as `how` says of its name
    /// (its UTF-8 bytes, asked in name order); where renamed names meet,
    /// the attribute of the later source name stays (what collecting the
    /// renamed pairs into an [`Item`] keeps).
    pub fn reshape(&mut self, mut how: impl FnMut(&[u8]) -> Reshape) {
        let payload = self.payload.as_ref();
        let mut renamed = false;
        self.entries.retain_mut(|e| match how(e.name(payload)) {
            Reshape::Drop => false,
            Reshape::Keep => true,
            Reshape::Rename(to) => {
                e.name = Name::Renamed(to);
                renamed = true;
                true
            }
        });
        if renamed
            && !self
                .entries
                .is_sorted_by(|a, b| order(a.name(payload), b.name(payload)).is_lt())
        {
            // Stable: of equal names the later source name is last.
            self.entries
                .sort_by(|a, b| order(a.name(payload), b.name(payload)));
            self.entries.dedup_by(|later, earlier| {
                let same = later.name(payload) == earlier.name(payload);
                if same {
                    std::mem::swap(later, earlier);
                }
                same
            });
        }
    }
}

impl fmt::Debug for EncodedItem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("EncodedItem").field(&self.to_item()).finish()
    }
}

impl PartialEq for EncodedItem {
    fn eq(&self, other: &Self) -> bool {
        self.to_item() == other.to_item()
    }
}

/// Checked UTF-8 as a `String`.
fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// An attribute value read in place, of an [`Item`] or of an encoding.
/// Strings and numbers are their UTF-8 bytes (a number's normalised text).
#[derive(Clone, Copy, Debug)]
pub enum ValueRef<'a> {
    S(&'a [u8]),
    N(&'a [u8]),
    B(&'a [u8]),
    Bool(bool),
    Null(bool),
    Ss(Members<'a>),
    Ns(Members<'a>),
    Bs(Members<'a>),
    L(List<'a>),
    M(Map<'a>),
}

impl<'a> From<&'a AttrValue> for ValueRef<'a> {
    fn from(v: &'a AttrValue) -> Self {
        match v {
            AttrValue::S(s) => Self::S(s.as_bytes()),
            AttrValue::N(n) => Self::N(n.as_str().as_bytes()),
            AttrValue::B(b) => Self::B(b),
            AttrValue::Bool(b) => Self::Bool(*b),
            AttrValue::Null(b) => Self::Null(*b),
            AttrValue::Ss(set) => Self::Ss(Members::Strings(set)),
            AttrValue::Ns(set) => Self::Ns(Members::Numbers(set)),
            AttrValue::Bs(set) => Self::Bs(Members::Blobs(set)),
            AttrValue::L(list) => Self::L(List::Values(list)),
            AttrValue::M(map) => Self::M(Map::Item(map)),
        }
    }
}

impl<'a> ValueRef<'a> {
    /// The value of a checked `AttributeValue` message.
    fn encoded(message: &'a [u8]) -> Self {
        match Fields::new(message).next() {
            Some((tag, field)) => Self::member(tag, field),
            None => Self::Null(true),
        }
    }

    /// The value of a checked `AttributeValue` message's one member.
    fn member(tag: u64, field: Field<'a>) -> Self {
        match (tag, field) {
            (1, Field::Bytes(b)) => Self::S(b),
            (2, Field::Bytes(b)) => Self::N(b),
            (3, Field::Bytes(b)) => Self::B(b),
            (4, Field::Varint(v)) => Self::Bool(v != 0),
            (6, Field::Bytes(b)) => Self::Ss(Members::Encoded(b)),
            (7, Field::Bytes(b)) => Self::Ns(Members::Encoded(b)),
            (8, Field::Bytes(b)) => Self::Bs(Members::Encoded(b)),
            (9, Field::Bytes(b)) => Self::L(List::Encoded(b)),
            (10, Field::Bytes(b)) => Self::M(Map::Encoded(b)),
            // 5, NULL; nothing else passes the check.
            _ => Self::Null(true),
        }
    }

    /// A string's text.
    pub fn as_str(self) -> Option<&'a str> {
        match self {
            Self::S(s) => std::str::from_utf8(s).ok(),
            _ => None,
        }
    }

    /// A number's normalised text.
    pub fn as_number(self) -> Option<&'a str> {
        match self {
            Self::N(n) => std::str::from_utf8(n).ok(),
            _ => None,
        }
    }

    /// The value, decoded.
    pub fn to_owned(self) -> AttrValue {
        let number = |n: &[u8]| Number::from_normal(text(n));
        match self {
            Self::S(s) => AttrValue::S(text(s)),
            Self::N(n) => AttrValue::N(number(n)),
            Self::B(b) => AttrValue::B(b.to_vec()),
            Self::Bool(b) => AttrValue::Bool(b),
            Self::Null(b) => AttrValue::Null(b),
            Self::Ss(set) => AttrValue::Ss(set.iter().map(text).collect()),
            Self::Ns(set) => AttrValue::Ns(set.iter().map(number).collect()),
            Self::Bs(set) => AttrValue::Bs(set.iter().map(<[u8]>::to_vec).collect()),
            Self::L(list) => AttrValue::L(list.iter().map(Self::to_owned).collect()),
            Self::M(map) => {
                AttrValue::M(map.iter().map(|(n, v)| (text(n), v.to_owned())).collect())
            }
        }
    }
}

/// The members of a set, each as bytes (a string's or number's text).
#[derive(Clone, Copy, Debug)]
pub enum Members<'a> {
    Strings(&'a BTreeSet<String>),
    Numbers(&'a BTreeSet<Number>),
    Blobs(&'a BTreeSet<Vec<u8>>),
    Encoded(&'a [u8]),
}

impl<'a> Members<'a> {
    /// In order (each set is sorted by its members' bytes).
    pub fn iter(self) -> MembersIter<'a> {
        match self {
            Self::Strings(s) => MembersIter(MembersOf::Strings(s.iter())),
            Self::Numbers(s) => MembersIter(MembersOf::Numbers(s.iter())),
            Self::Blobs(s) => MembersIter(MembersOf::Blobs(s.iter())),
            Self::Encoded(m) => MembersIter(MembersOf::Encoded(Fields::new(m))),
        }
    }
}

#[derive(Clone)]
pub struct MembersIter<'a>(MembersOf<'a>);

#[derive(Clone)]
enum MembersOf<'a> {
    Strings(btree_set::Iter<'a, String>),
    Numbers(btree_set::Iter<'a, Number>),
    Blobs(btree_set::Iter<'a, Vec<u8>>),
    Encoded(Fields<'a>),
}

impl<'a> Iterator for MembersIter<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        match &mut self.0 {
            MembersOf::Strings(i) => i.next().map(String::as_bytes),
            MembersOf::Numbers(i) => i.next().map(|n| n.as_str().as_bytes()),
            MembersOf::Blobs(i) => i.next().map(Vec::as_slice),
            MembersOf::Encoded(f) => f.find_map(|(_, f)| bytes(f)),
        }
    }
}

fn bytes(f: Field<'_>) -> Option<&[u8]> {
    match f {
        Field::Bytes(b) => Some(b),
        Field::Varint(_) => None,
    }
}

/// The elements of a list.
#[derive(Clone, Copy, Debug)]
pub enum List<'a> {
    Values(&'a [AttrValue]),
    Encoded(&'a [u8]),
}

impl<'a> List<'a> {
    pub fn iter(self) -> ListIter<'a> {
        match self {
            Self::Values(v) => ListIter(ListOf::Values(v.iter())),
            Self::Encoded(m) => ListIter(ListOf::Encoded(Fields::new(m))),
        }
    }
}

#[derive(Clone)]
pub struct ListIter<'a>(ListOf<'a>);

#[derive(Clone)]
enum ListOf<'a> {
    Values(std::slice::Iter<'a, AttrValue>),
    Encoded(Fields<'a>),
}

impl<'a> Iterator for ListIter<'a> {
    type Item = ValueRef<'a>;

    fn next(&mut self) -> Option<ValueRef<'a>> {
        match &mut self.0 {
            ListOf::Values(i) => i.next().map(ValueRef::from),
            ListOf::Encoded(f) => f.find_map(|(_, f)| bytes(f)).map(ValueRef::encoded),
        }
    }
}

/// The attributes of a map value, in name order.
#[derive(Clone, Copy, Debug)]
pub enum Map<'a> {
    Item(&'a Item),
    Encoded(&'a [u8]),
}

impl<'a> Map<'a> {
    pub fn iter(self) -> MapIter<'a> {
        match self {
            Self::Item(item) => MapIter(MapOf::Item(item.iter())),
            Self::Encoded(m) => MapIter(MapOf::Encoded(Fields::new(m))),
        }
    }
}

#[derive(Clone)]
pub struct MapIter<'a>(MapOf<'a>);

#[derive(Clone)]
enum MapOf<'a> {
    Item(btree_map::Iter<'a, String, AttrValue>),
    Encoded(Fields<'a>),
}

impl<'a> Iterator for MapIter<'a> {
    type Item = (&'a [u8], ValueRef<'a>);

    fn next(&mut self) -> Option<(&'a [u8], ValueRef<'a>)> {
        match &mut self.0 {
            MapOf::Item(i) => i.next().map(|(n, v)| (n.as_bytes(), ValueRef::from(v))),
            MapOf::Encoded(f) => f.find_map(|(_, f)| {
                let (name, value) = view::entry(bytes(f)?)?;
                Some((name, ValueRef::encoded(value)))
            }),
        }
    }
}

/// Random items (a small deterministic generator, so a failing case is
/// found again from its seed) and their encoded images, for the tests of
/// every reader of an [`Image`].
#[cfg(test)]
pub(crate) mod testing {
    use std::sync::Arc;

    use super::Image;
    use crate::proto::{decode_change_encoded, encode_change};
    use crate::traits::Position;
    use crate::value::{AttrValue, Item, Key, Number};

    /// xorshift.
    pub(crate) struct Rng(pub u64);

    impl Rng {
        pub(crate) fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        pub(crate) fn below(&mut self, n: usize) -> usize {
            usize::try_from(self.next() % n as u64).unwrap_or(0)
        }

        fn pick<'a>(&mut self, from: &[&'a str]) -> &'a str {
            from[self.below(from.len())]
        }
    }

    const NAMES: [&str; 10] = [
        "a",
        "b",
        "id",
        "title",
        "é",
        "x y",
        "q\"uote",
        "back\\slash",
        "tab\t",
        "zz",
    ];
    const TEXTS: [&str; 8] = [
        "",
        "plain",
        "with \"quotes\"",
        "a\\b",
        "new\nline",
        "\u{1}\u{1f}",
        "😀 é",
        "x",
    ];
    const NUMBERS: [&str; 9] = [
        "0",
        "-1",
        "42",
        "0.25",
        "-12.5",
        "9007199254740993",
        "123456789012345678901234567890",
        "0.1234567890123456789",
        "1e3",
    ];

    fn number(rng: &mut Rng) -> Number {
        Number::parse(rng.pick(&NUMBERS)).expect("numbers of the pool parse")
    }

    /// A value of every kind, nested `depth` more levels at most.
    pub(crate) fn value(rng: &mut Rng, depth: u32) -> AttrValue {
        let kinds = if depth == 0 { 8 } else { 10 };
        match rng.below(kinds) {
            0 => AttrValue::s(rng.pick(&TEXTS)),
            1 => AttrValue::N(number(rng)),
            2 => AttrValue::B((0..rng.below(5)).map(|i| (i * 97) as u8).collect()),
            3 => AttrValue::Bool(rng.below(2) == 0),
            4 => AttrValue::Null(true),
            5 => AttrValue::Ss(
                (0..=rng.below(3))
                    .map(|_| rng.pick(&TEXTS).to_owned())
                    .collect(),
            ),
            6 => AttrValue::Ns((0..=rng.below(3)).map(|_| number(rng)).collect()),
            7 => AttrValue::Bs((0..=rng.below(3)).map(|i| vec![i as u8; i]).collect()),
            8 => AttrValue::L((0..rng.below(4)).map(|_| value(rng, depth - 1)).collect()),
            _ => AttrValue::M(item(rng, depth - 1)),
        }
    }

    pub(crate) fn item(rng: &mut Rng, depth: u32) -> Item {
        (0..rng.below(NAMES.len()))
            .map(|_| (rng.pick(&NAMES).to_owned(), value(rng, depth)))
            .collect()
    }

    pub(crate) fn position() -> Position {
        Position {
            partition: "t/0".to_owned(),
            sequence: "1".to_owned(),
        }
    }

    /// `item` as a Kafka feed hands it over: encoded by prost, read in
    /// place.
    pub(crate) fn encoded(item: &Item) -> Image {
        let key = Key::new([("id".to_owned(), AttrValue::s("k"))]);
        let bytes = encode_change(&key, Some(item), 1, 0);
        let record = decode_change_encoded(&Arc::from(bytes), position()).expect("decodes");
        let image = record.new_image.expect("an upsert");
        assert!(matches!(image, Image::Encoded(_)), "kept encoded: {item:?}");
        image
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::testing::{Rng, encoded, item, position};
    use super::*;
    use crate::proto::{decode_change, decode_change_encoded, encode_change};
    use crate::value::Key;

    #[test]
    fn an_encoded_image_reads_as_its_item() {
        let mut rng = Rng(0x2545_f491_4f6c_dd1d);
        for _ in 0..2_000 {
            let item = item(&mut rng, 3);
            let image = encoded(&item);
            assert_eq!(image.to_item().as_ref(), &item);
            for name in ["a", "id", "é", "nope", ""] {
                assert_eq!(
                    image.get(name).map(ValueRef::to_owned),
                    item.get(name).cloned(),
                    "{name:?} of {item:?}"
                );
            }
            let names: Vec<&[u8]> = image.attributes().map(|(n, _)| n).collect();
            let want: Vec<&[u8]> = item.keys().map(String::as_bytes).collect();
            assert_eq!(names, want);
        }
    }

    #[test]
    fn a_damaged_or_unusual_record_decodes_as_decode_change_decodes_it() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let key = Key::new([("id".to_owned(), AttrValue::s("k"))]);
        let (mut kept, mut decoded) = (0, 0);
        for _ in 0..3_000 {
            let item = item(&mut rng, 2);
            let mut bytes = encode_change(&key, Some(&item), 1, 0);
            match rng.below(3) {
                0 => {
                    let at = rng.below(bytes.len());
                    bytes[at] ^= 1 << rng.below(8);
                }
                1 => bytes.truncate(rng.below(bytes.len())),
                _ => {
                    let at = rng.below(bytes.len());
                    bytes.extend_from_within(at..);
                }
            }
            let slow = decode_change(&bytes, position());
            let fast = decode_change_encoded(&Arc::from(bytes.as_slice()), position());
            assert_eq!(fast, slow, "{bytes:?}");
            match fast.ok().and_then(|r| r.new_image) {
                Some(Image::Encoded(_)) => kept += 1,
                Some(Image::Item(_)) => decoded += 1,
                None => {}
            }
        }
        // Both ways must be taken, or the comparison tests little.
        assert!(kept > 300 && decoded > 50, "{kept} kept, {decoded} decoded");
    }

    /// A record of `key` and an image whose `Item` message is `image`.
    fn record_with_image(image: &[u8]) -> Vec<u8> {
        let key = Key::new([("id".to_owned(), AttrValue::s("k"))]);
        let mut bytes = encode_change(&key, None, 1, 0);
        // deleted=true is field 2 (0x10 0x01); drop it and add the image.
        let at = bytes.windows(2).position(|w| w == [0x10, 0x01]).unwrap();
        bytes.drain(at..at + 2);
        bytes.push(0x1a);
        bytes.push(u8::try_from(image.len()).unwrap());
        bytes.extend_from_slice(image);
        bytes
    }

    /// A map entry of `name` and an `AttributeValue` message.
    fn entry(name: &str, value: &[u8]) -> Vec<u8> {
        let mut e = vec![0x0a, u8::try_from(name.len()).unwrap()];
        e.extend_from_slice(name.as_bytes());
        e.push(0x12);
        e.push(u8::try_from(value.len()).unwrap());
        e.extend_from_slice(value);
        let mut out = vec![0x0a, u8::try_from(e.len()).unwrap()];
        out.extend(e);
        out
    }

    #[test]
    fn only_the_canonical_form_is_kept_encoded() {
        let s = |text: &str| {
            let mut v = vec![0x0a, u8::try_from(text.len()).unwrap()];
            v.extend_from_slice(text.as_bytes());
            v
        };
        let n = |text: &str| {
            let mut v = vec![0x12, u8::try_from(text.len()).unwrap()];
            v.extend_from_slice(text.as_bytes());
            v
        };
        let canonical = [entry("a", &s("x")), entry("b", &n("1.5"))].concat();
        let others = [
            // Names out of order, or twice (the later wins).
            [entry("b", &n("1.5")), entry("a", &s("x"))].concat(),
            [entry("a", &s("x")), entry("a", &s("y"))].concat(),
            // A number to normalise, a boolean of 2, two members (the
            // later replaces the earlier), an unknown field.
            entry("a", &n("1.50")),
            entry("a", &[0x20, 0x02]),
            entry("a", &[s("x"), s("y")].concat()),
            entry("a", &[s("x"), vec![0x78, 0x01]].concat()),
            // A string set out of order, and one holding a member twice (refused).
            entry("a", &[vec![0x32, 0x06], s("b"), s("a")].concat()),
            entry("a", &[vec![0x32, 0x06], s("a"), s("a")].concat()),
            // Not UTF-8 (refused).
            entry("a", &[0x0a, 0x01, 0xff]),
        ];
        let kept = decode_change_encoded(&Arc::from(record_with_image(&canonical)), position());
        assert!(
            matches!(kept.unwrap().new_image, Some(Image::Encoded(_))),
            "the canonical image is kept"
        );
        for image in others {
            let bytes = record_with_image(&image);
            let fast = decode_change_encoded(&Arc::from(bytes.as_slice()), position());
            assert_eq!(fast, decode_change(&bytes, position()), "{image:?}");
            if let Ok(record) = fast {
                assert!(
                    matches!(record.new_image, Some(Image::Item(_))),
                    "decoded: {image:?}"
                );
            }
        }
    }

    #[test]
    fn reshaping_drops_renames_and_keeps_the_later_of_two_names() {
        let item: Item = [
            ("a", AttrValue::s("1")),
            ("b", AttrValue::s("2")),
            ("c", AttrValue::s("3")),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        let Image::Encoded(mut e) = encoded(&item) else {
            unreachable!("encoded() checks");
        };
        // c → a meets the kept a: c sorts later, so its value stays.
        e.reshape(|name| match name {
            b"b" => Reshape::Drop,
            b"c" => Reshape::Rename(Arc::from("a")),
            _ => Reshape::Keep,
        });
        assert_eq!(e.len(), 1);
        assert_eq!(e.get("a").map(ValueRef::to_owned), Some(AttrValue::s("3")));
    }
}
