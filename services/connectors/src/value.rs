//! Items and attribute values, mirroring DynamoDB's data model without losing
//! number precision: numbers stay decimal text, normalised so `1.50` and
//! `1.5` are the same value.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Serialize};

/// A decimal number kept as normalised text (no exponent, no redundant
/// zeros), up to DynamoDB's 38 significant digits.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Number(String);

impl Number {
    /// Parses and normalises decimal text such as `-12.500`, `1e3`, `0.0`.
    ///
    /// # Errors
    /// When the text is not a finite decimal number.
    pub fn parse(text: &str) -> Result<Self, String> {
        normalize_number(text).map(Self)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// A number of normalised text (a number's own, or text that
    /// [`is_normal`] accepts), kept as it is.
    pub(crate) fn from_normal(text: String) -> Self {
        Self(text)
    }

    pub fn as_i64(&self) -> Option<i64> {
        self.0.parse().ok()
    }

    pub fn as_u64(&self) -> Option<u64> {
        self.0.parse().ok()
    }
}

impl From<i64> for Number {
    fn from(v: i64) -> Self {
        Self(v.to_string())
    }
}

impl From<u64> for Number {
    fn from(v: u64) -> Self {
        Self(v.to_string())
    }
}

impl TryFrom<String> for Number {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        Self::parse(&s)
    }
}

impl From<Number> for String {
    fn from(n: Number) -> Self {
        n.0
    }
}

impl fmt::Display for Number {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Whether `text` is already what [`normalize_number`] makes of it: a
/// short plain decimal (`-12.5`, `0.25`, `300`) without a sign it does not
/// need, leading zeros, trailing fraction zeros or an exponent. Numbers
/// from a store or a feed mostly are, and are then kept as they are.
pub(crate) fn is_normal(text: &str) -> bool {
    is_normal_bytes(text.as_bytes())
}

/// [`is_normal`] of bytes (what it accepts is ASCII).
pub(crate) fn is_normal_bytes(text: &[u8]) -> bool {
    let t = text.strip_prefix(b"-").unwrap_or(text);
    let (int, frac) = match t.iter().position(|&b| b == b'.') {
        Some(i) => (&t[..i], Some(&t[i + 1..])),
        None => (t, None),
    };
    // 38 bytes at most: never more than 38 significant digits, and the
    // point stays well inside the range.
    text.len() <= 38
        && match int {
            [b'0'] => frac.is_some() || text.len() == 1,
            [b'1'..=b'9', rest @ ..] => rest.iter().all(u8::is_ascii_digit),
            _ => false,
        }
        && frac.is_none_or(|f| {
            f.last().is_some_and(|&b| b != b'0') && f.iter().all(u8::is_ascii_digit)
        })
}

fn normalize_number(text: &str) -> Result<String, String> {
    if is_normal(text) {
        return Ok(text.to_owned());
    }
    let bad = || format!("{text:?} is not a decimal number");
    let t = text.trim();
    let (negative, t) = match t.as_bytes().first() {
        Some(b'-') => (true, &t[1..]),
        Some(b'+') => (false, &t[1..]),
        _ => (false, t),
    };
    let (mantissa, exponent) = match t.find(['e', 'E']) {
        Some(i) => (&t[..i], t[i + 1..].parse::<i32>().map_err(|_| bad())?),
        None => (t, 0),
    };
    let (int_part, frac_part) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    if (int_part.is_empty() && frac_part.is_empty())
        || !int_part.bytes().all(|b| b.is_ascii_digit())
        || !frac_part.bytes().all(|b| b.is_ascii_digit())
    {
        return Err(bad());
    }
    let digits: String = format!("{int_part}{frac_part}");
    // Position of the decimal point within `digits` after applying the exponent.
    let point = i64::try_from(int_part.len()).map_err(|_| bad())? + i64::from(exponent);
    let first = digits.bytes().position(|b| b != b'0');
    let Some(first) = first else {
        return Ok("0".to_owned());
    };
    let last = digits.bytes().rposition(|b| b != b'0').unwrap_or(first);
    let significant = &digits[first..=last];
    if significant.len() > 38 {
        return Err(format!("{text:?} has more than 38 significant digits"));
    }
    let first = i64::try_from(first).map_err(|_| bad())?;
    let last = i64::try_from(last).map_err(|_| bad())?;
    if point.abs() > 200 {
        return Err(format!("{text:?} is out of range"));
    }
    let mut out = String::new();
    if negative {
        out.push('-');
    }
    if point <= first {
        out.push_str("0.");
        for _ in point..first {
            out.push('0');
        }
        out.push_str(significant);
    } else if point > last {
        out.push_str(significant);
        for _ in last + 1..point {
            out.push('0');
        }
    } else {
        let split = usize::try_from(point - first).map_err(|_| bad())?;
        out.push_str(&significant[..split]);
        out.push('.');
        out.push_str(&significant[split..]);
    }
    Ok(out)
}

/// One attribute value, externally tagged like DynamoDB JSON (`{"S": "x"}`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum AttrValue {
    S(String),
    N(Number),
    #[serde(with = "b64")]
    B(Vec<u8>),
    #[serde(rename = "BOOL")]
    Bool(bool),
    #[serde(rename = "NULL")]
    Null(bool),
    #[serde(rename = "SS")]
    Ss(BTreeSet<String>),
    #[serde(rename = "NS")]
    Ns(BTreeSet<Number>),
    #[serde(rename = "BS", with = "b64_set")]
    Bs(BTreeSet<Vec<u8>>),
    L(Vec<AttrValue>),
    M(BTreeMap<String, AttrValue>),
}

impl AttrValue {
    pub fn s(v: impl Into<String>) -> Self {
        Self::S(v.into())
    }

    pub fn n(v: impl Into<Number>) -> Self {
        Self::N(v.into())
    }

    pub fn as_s(&self) -> Option<&str> {
        match self {
            Self::S(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_number(&self) -> Option<&Number> {
        match self {
            Self::N(n) => Some(n),
            _ => None,
        }
    }

    /// Whether the value may be a key attribute (S, N or B): what
    /// [`AttrValue::key_text`] gives a text for, without making it.
    pub fn is_key_scalar(&self) -> bool {
        matches!(self, Self::S(_) | Self::N(_) | Self::B(_))
    }

    /// A stable text form of a key attribute (S, N or B), used to order and
    /// hash keys the same way in every store.
    pub fn key_text(&self) -> Option<String> {
        use base64::Engine as _;
        match self {
            Self::S(s) => Some(s.clone()),
            Self::N(n) => Some(n.0.clone()),
            Self::B(b) => Some(base64::engine::general_purpose::STANDARD.encode(b)),
            _ => None,
        }
    }
}

/// An item: attribute name → value, ordered so its canonical form is stable.
pub type Item = BTreeMap<String, AttrValue>;

/// The primary key of an item: its partition (and sort) key attributes.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Key(pub BTreeMap<String, AttrValue>);

impl PartialOrd for AttrValue {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for AttrValue {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        canonical_json(self).cmp(&canonical_json(other))
    }
}

impl Key {
    pub fn new(attrs: impl IntoIterator<Item = (String, AttrValue)>) -> Self {
        Self(attrs.into_iter().collect())
    }

    /// The key of a single string partition key.
    pub fn single(name: &str, value: AttrValue) -> Self {
        Self::new([(name.to_owned(), value)])
    }

    pub fn get(&self, name: &str) -> Option<&AttrValue> {
        self.0.get(name)
    }

    /// Canonical text of the key, identical whatever store it was read from.
    pub fn canonical(&self) -> String {
        serde_json::to_string(&self.0).expect("attribute values always serialise")
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self
            .0
            .iter()
            .map(|(k, v)| format!("{k}={}", v.key_text().unwrap_or_else(|| canonical_json(v))))
            .collect();
        f.write_str(&parts.join(","))
    }
}

/// Names of a table's key attributes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeySchema {
    pub partition: String,
    pub sort: Option<String>,
}

impl KeySchema {
    pub fn new(partition: impl Into<String>, sort: Option<&str>) -> Self {
        Self {
            partition: partition.into(),
            sort: sort.map(str::to_owned),
        }
    }

    /// Extracts the key of `item`, or says which key attribute is missing.
    ///
    /// # Errors
    /// When the item lacks a key attribute or it is not a scalar.
    pub fn key_of(&self, item: &Item) -> Result<Key, String> {
        let mut key = BTreeMap::new();
        for name in std::iter::once(&self.partition).chain(self.sort.as_ref()) {
            let value = item
                .get(name)
                .ok_or_else(|| format!("item lacks key attribute {name:?}"))?;
            if !value.is_key_scalar() {
                return Err(format!(
                    "key attribute {name:?} must be a string, number or binary"
                ));
            }
            key.insert(name.clone(), value.clone());
        }
        Ok(Key(key))
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.partition.as_str()).chain(self.sort.as_deref())
    }
}

/// Canonical JSON of a value (sorted maps and sets, normalised numbers).
pub fn canonical_json(value: &AttrValue) -> String {
    serde_json::to_string(value).expect("attribute values always serialise")
}

/// Canonical JSON of a whole item.
pub fn canonical_item(item: &Item) -> String {
    serde_json::to_string(item).expect("attribute values always serialise")
}

/// Stable 64-bit hash of a key, the same in every process and store; used to
/// assign keys to scan segments and digest buckets.
pub fn key_hash(key: &Key) -> u64 {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(key.canonical().as_bytes());
    u64::from_be_bytes(digest[..8].try_into().expect("8 bytes"))
}

mod b64 {
    use base64::Engine as _;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(d)?;
        base64::engine::general_purpose::STANDARD
            .decode(text)
            .map_err(serde::de::Error::custom)
    }
}

mod b64_set {
    use std::collections::BTreeSet;

    use base64::Engine as _;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &BTreeSet<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(
            v.iter()
                .map(|b| base64::engine::general_purpose::STANDARD.encode(b)),
        )
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeSet<Vec<u8>>, D::Error> {
        Vec::<String>::deserialize(d)?
            .into_iter()
            .map(|t| {
                base64::engine::general_purpose::STANDARD
                    .decode(t)
                    .map_err(serde::de::Error::custom)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn numbers_already_normal_are_kept_as_they_are() {
        // The shortcut must agree with the full normalisation on every
        // text: generated from a few digits, signs, points and exponents.
        let parts = [
            "", "-", "+", "0", "00", "1", "10", "7", ".", ".0", ".5", ".50", "e1", "9",
        ];
        let mut texts = vec![
            "1".repeat(38),
            format!("-{}", "1".repeat(37)),
            format!("0.{}", "1".repeat(36)),
        ];
        for a in parts {
            for b in parts {
                for c in parts {
                    texts.push(format!("{a}{b}{c}"));
                }
            }
        }
        let mut shortcut = 0;
        for text in &texts {
            if is_normal(text) {
                shortcut += 1;
                assert_eq!(
                    Number::parse(text).map(|n| n.0),
                    Ok(text.clone()),
                    "{text:?}"
                );
            }
        }
        assert!(shortcut > 100, "only {shortcut} texts took the shortcut");
    }

    use super::*;

    #[test]
    fn numbers_normalise() {
        for (input, want) in [
            ("1.50", "1.5"),
            ("001", "1"),
            ("-0.000", "0"),
            ("1e3", "1000"),
            ("1.25E-2", "0.0125"),
            ("-12.500", "-12.5"),
            (
                "123456789012345678901234567890",
                "123456789012345678901234567890",
            ),
            (".5", "0.5"),
        ] {
            assert_eq!(Number::parse(input).unwrap().as_str(), want, "{input}");
        }
        for bad in ["", "abc", "1.2.3", "NaN", "inf", "1e", "--1"] {
            assert!(Number::parse(bad).is_err(), "{bad}");
        }
        assert!(Number::parse("123456789012345678901234567890123456789").is_err());
    }

    #[test]
    fn json_matches_dynamodb_json() {
        let item: Item = [
            ("id".to_owned(), AttrValue::s("a")),
            ("n".to_owned(), AttrValue::N(Number::parse("2.0").unwrap())),
            ("b".to_owned(), AttrValue::B(vec![1, 2])),
            ("ok".to_owned(), AttrValue::Bool(true)),
        ]
        .into();
        let json = canonical_item(&item);
        assert_eq!(
            json,
            r#"{"b":{"B":"AQI="},"id":{"S":"a"},"n":{"N":"2"},"ok":{"BOOL":true}}"#
        );
        let back: Item = serde_json::from_str(&json).unwrap();
        assert_eq!(back, item);
    }

    #[test]
    fn key_of_reports_missing_attribute() {
        let schema = KeySchema::new("documentType", Some("documentId"));
        let item: Item = [("documentType".to_owned(), AttrValue::s("course"))].into();
        assert!(schema.key_of(&item).unwrap_err().contains("documentId"));
    }
}
