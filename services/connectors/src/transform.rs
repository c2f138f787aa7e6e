//! The item transform of `tidemark.common.v1.Transform`, shared by
//! replication, unit migration, extraction and verification so the same
//! source item is shaped the same way everywhere: filter, projection,
//! renames, then the document-id and index-name templates.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use tidemark_proto::common::v1 as pb;

use crate::image::{EncodedItem, Image, Reshape, ValueRef};
use crate::proto::ProtoError;
use crate::traits::SinkOp;
use crate::value::{AttrValue, Item, Key, KeySchema};

/// How a time-valued attribute is encoded (`tidemark.common.v1.TimeEncoding`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimeEncoding {
    Rfc3339,
    EpochSeconds,
    EpochMillis,
}

impl TimeEncoding {
    /// # Errors
    /// UNSPECIFIED or an unknown number.
    pub fn from_proto(value: i32, field: &str) -> Result<Self, ProtoError> {
        match pb::TimeEncoding::try_from(value) {
            Ok(pb::TimeEncoding::Rfc3339) => Ok(Self::Rfc3339),
            Ok(pb::TimeEncoding::EpochSeconds) => Ok(Self::EpochSeconds),
            Ok(pb::TimeEncoding::EpochMillis) => Ok(Self::EpochMillis),
            _ => Err(ProtoError {
                field: field.to_owned(),
                reason: "must be RFC3339, EPOCH_SECONDS or EPOCH_MILLIS".to_owned(),
            }),
        }
    }

    /// The time a value holds, in microseconds since the epoch; `None` when
    /// it is not of this encoding.
    pub fn micros(self, value: &AttrValue) -> Option<i64> {
        self.micros_of(value.into())
    }

    /// [`TimeEncoding::micros`] of a value read in place.
    pub fn micros_of(self, value: ValueRef<'_>) -> Option<i64> {
        match (self, value) {
            (Self::Rfc3339, ValueRef::S(_)) => {
                chrono::DateTime::parse_from_rfc3339(value.as_str()?)
                    .ok()
                    .map(|t| t.timestamp_micros())
            }
            (Self::EpochSeconds, ValueRef::N(_)) => decimal_micros(value.as_number()?, 1_000_000),
            (Self::EpochMillis, ValueRef::N(_)) => decimal_micros(value.as_number()?, 1_000),
            _ => None,
        }
    }

    /// Encodes a time for a key condition or filter on such an attribute.
    pub fn value(self, micros: i64) -> AttrValue {
        match self {
            Self::Rfc3339 => AttrValue::s(
                chrono::DateTime::from_timestamp_micros(micros)
                    .unwrap_or_default()
                    .to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true),
            ),
            Self::EpochSeconds => AttrValue::N(
                crate::value::Number::parse(&format!(
                    "{}.{:06}",
                    micros.div_euclid(1_000_000),
                    micros.rem_euclid(1_000_000)
                ))
                .expect("a decimal"),
            ),
            Self::EpochMillis => AttrValue::N(
                crate::value::Number::parse(&format!(
                    "{}.{:03}",
                    micros.div_euclid(1_000),
                    micros.rem_euclid(1_000)
                ))
                .expect("a decimal"),
            ),
        }
    }
}

/// `text` (a normalised decimal) times `scale`, truncated to an integer.
fn decimal_micros(text: &str, scale: i64) -> Option<i64> {
    let (whole, frac) = text.split_once('.').unwrap_or((text, ""));
    let negative = whole.starts_with('-');
    let whole: i64 = whole.parse().ok()?;
    // The fraction's first log10(scale) digits, padded with zeros.
    let mut digits = frac.bytes();
    let mut fraction = 0i64;
    for _ in 0..scale.ilog10() {
        let digit = match digits.next() {
            None => 0,
            Some(b @ b'0'..=b'9') => i64::from(b - b'0'),
            Some(_) => return None,
        };
        fraction = fraction * 10 + digit;
    }
    let sign = if negative { -1 } else { 1 };
    whole.checked_mul(scale)?.checked_add(sign * fraction)
}

/// A `{attribute}` template; `{{` and `}}` are literal braces.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Template {
    parts: Vec<Part>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Part {
    Text(String),
    Attribute(String),
}

impl Template {
    /// # Errors
    /// Unbalanced braces or an empty placeholder.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut parts = Vec::new();
        let mut literal = String::new();
        let mut chars = text.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '{' if chars.peek() == Some(&'{') => {
                    chars.next();
                    literal.push('{');
                }
                '}' if chars.peek() == Some(&'}') => {
                    chars.next();
                    literal.push('}');
                }
                '{' => {
                    let mut name = String::new();
                    loop {
                        match chars.next() {
                            Some('}') => break,
                            Some('{') | None => {
                                return Err(format!("unclosed placeholder in {text:?}"));
                            }
                            Some(c) => name.push(c),
                        }
                    }
                    if name.is_empty() {
                        return Err(format!("empty placeholder {{}} in {text:?}"));
                    }
                    if !literal.is_empty() {
                        parts.push(Part::Text(std::mem::take(&mut literal)));
                    }
                    parts.push(Part::Attribute(name));
                }
                '}' => {
                    return Err(format!(
                        "unmatched '}}' in {text:?} (write '}}}}' for a brace)"
                    ));
                }
                c => literal.push(c),
            }
        }
        if !literal.is_empty() {
            parts.push(Part::Text(literal));
        }
        Ok(Self { parts })
    }

    /// The attributes the template names, in order.
    pub fn attributes(&self) -> impl Iterator<Item = &str> {
        self.parts.iter().filter_map(|p| match p {
            Part::Attribute(a) => Some(a.as_str()),
            Part::Text(_) => None,
        })
    }

    /// The template with `*` for each placeholder: a pattern matching every
    /// name it renders (an index pattern).
    pub fn pattern(&self) -> String {
        self.parts
            .iter()
            .map(|p| match p {
                Part::Text(t) => t.as_str(),
                Part::Attribute(_) => "*",
            })
            .collect()
    }

    /// Renders against a source item.
    ///
    /// # Errors
    /// A placeholder naming an attribute the item lacks or that is not `S`/`N`.
    pub fn render(&self, item: &Item) -> Result<String, String> {
        let mut out = String::new();
        for part in &self.parts {
            match part {
                Part::Text(t) => out.push_str(t),
                Part::Attribute(a) => match item.get(a) {
                    Some(AttrValue::S(s)) => out.push_str(s),
                    Some(AttrValue::N(n)) => out.push_str(n.as_str()),
                    Some(_) => {
                        return Err(format!(
                            "template attribute {a:?} is not a string or number"
                        ));
                    }
                    None => return Err(format!("the item lacks template attribute {a:?}")),
                },
            }
        }
        Ok(out)
    }
}

/// Keeps only recently changed items (`tidemark.common.v1.RecencyFilter`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecencyFilter {
    pub attribute: String,
    pub encoding: TimeEncoding,
    pub max_age_micros: i64,
}

/// A validated transform; the default is the identity.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Transform {
    projection: BTreeSet<String>,
    /// Source name → target name (shared by the encoded images that
    /// carry it).
    renames: BTreeMap<String, Arc<str>>,
    /// Every name the projection or the renames name, in name order: kept
    /// by the projection, and renamed to. Names that come in order are
    /// shaped in one walk along it.
    rules: Vec<(String, bool, Option<Arc<str>>)>,
    document_id: Option<Template>,
    index_name: Option<Template>,
    filter: Option<RecencyFilter>,
}

impl Transform {
    /// # Errors
    /// Conflicting renames, a malformed template or filter; the field is
    /// relative to the Transform message.
    pub fn from_proto(t: &pb::Transform) -> Result<Self, ProtoError> {
        let bad = |field: &str, reason: String| ProtoError {
            field: field.to_owned(),
            reason,
        };
        let projection: BTreeSet<String> = t.projection.iter().cloned().collect();
        if projection.iter().any(String::is_empty) {
            return Err(bad(
                "projection",
                "attribute names must not be empty".to_owned(),
            ));
        }
        let renames: BTreeMap<String, String> = t.renames.clone().into_iter().collect();
        let mut targets = BTreeSet::new();
        for (from, to) in &renames {
            if from.is_empty() || to.is_empty() {
                return Err(bad(
                    "renames",
                    "attribute names must not be empty".to_owned(),
                ));
            }
            if !targets.insert(to) {
                return Err(bad(
                    &format!("renames[{from:?}]"),
                    format!("two attributes are renamed to {to:?}"),
                ));
            }
            let kept = projection.is_empty() || projection.contains(to);
            if kept && !renames.contains_key(to) && to != from && projection.contains(to) {
                return Err(bad(
                    &format!("renames[{from:?}]"),
                    format!("{to:?} is kept by the projection and not renamed itself"),
                ));
            }
        }
        let template = |text: &str, field: &str| -> Result<Option<Template>, ProtoError> {
            if text.is_empty() {
                Ok(None)
            } else {
                Template::parse(text).map(Some).map_err(|e| bad(field, e))
            }
        };
        let filter = t
            .filter
            .as_ref()
            .map(|f| -> Result<RecencyFilter, ProtoError> {
                if f.attribute_name.is_empty() {
                    return Err(bad("filter.attribute_name", "required".to_owned()));
                }
                let encoding = TimeEncoding::from_proto(f.encoding, "filter.encoding")?;
                let max_age = f.max_age.as_ref().map_or(0, |d| {
                    d.seconds
                        .saturating_mul(1_000_000)
                        .saturating_add(i64::from(d.nanos) / 1000)
                });
                if max_age <= 0 {
                    return Err(bad("filter.max_age", "required and positive".to_owned()));
                }
                Ok(RecencyFilter {
                    attribute: f.attribute_name.clone(),
                    encoding,
                    max_age_micros: max_age,
                })
            })
            .transpose()?;
        Ok(Self {
            rules: projection
                .iter()
                .chain(renames.keys())
                .collect::<BTreeSet<_>>()
                .into_iter()
                .map(|name| {
                    let kept = projection.is_empty() || projection.contains(name);
                    (
                        name.clone(),
                        kept,
                        renames.get(name).map(|to| Arc::from(to.as_str())),
                    )
                })
                .collect(),
            projection,
            renames: renames
                .into_iter()
                .map(|(from, to)| (from, Arc::from(to)))
                .collect(),
            document_id: template(&t.document_id_template, "document_id_template")?,
            index_name: template(&t.index_name_template, "index_name_template")?,
            filter,
        })
    }

    /// Whether the item passes the recency filter at `now_micros`.
    pub fn passes(&self, item: &Item, now_micros: i64) -> bool {
        self.passes_by(|name| item.get(name).map(ValueRef::from), now_micros)
    }

    /// [`Transform::passes`] of an image, decoded or not.
    pub fn passes_image(&self, image: &Image, now_micros: i64) -> bool {
        self.passes_by(|name| image.get(name), now_micros)
    }

    fn passes_by<'a>(
        &self,
        get: impl FnOnce(&str) -> Option<ValueRef<'a>>,
        now_micros: i64,
    ) -> bool {
        self.filter.as_ref().is_none_or(|f| {
            get(&f.attribute)
                .and_then(|v| f.encoding.micros_of(v))
                .is_some_and(|t| t >= now_micros - f.max_age_micros)
        })
    }

    /// Projection then renames; key attributes are always kept.
    pub fn shape(&self, item: &Item, schema: &KeySchema) -> Item {
        if self.projection.is_empty() && self.renames.is_empty() {
            return item.clone();
        }
        item.iter()
            .filter(|(name, _)| self.keeps(name, schema))
            .map(|(name, v)| (self.target(name).to_owned(), v.clone()))
            .collect()
    }

    /// Whether the projection keeps attribute `name` (key attributes always).
    fn keeps(&self, name: &str, schema: &KeySchema) -> bool {
        self.projection.is_empty()
            || self.projection.contains(name)
            || schema.names().any(|k| k == name)
    }

    /// The sink write of an image that passes the filter: shaped, and
    /// still encoded if it was.
    pub fn upsert(&self, image: &Image, schema: &KeySchema) -> SinkOp {
        match image {
            Image::Item(item) => SinkOp::Upsert(self.shape(item, schema)),
            Image::Encoded(e) => self.upsert_owned(Image::Encoded(e.clone()), schema),
        }
    }

    /// [`Transform::upsert`] of an image the caller gives up (see
    /// [`Transform::shape_owned`]).
    pub fn upsert_owned(&self, image: Image, schema: &KeySchema) -> SinkOp {
        match image {
            Image::Item(item) => SinkOp::Upsert(self.shape_owned(item, schema)),
            Image::Encoded(mut e) => {
                self.shape_encoded(&mut e, schema);
                SinkOp::UpsertEncoded(e)
            }
        }
    }

    /// What the projection and the renames do with each of names asked in
    /// name order: whether it is kept ([`Transform::keeps`]) and what it is
    /// renamed to. One walk along the rules (in name order too), one
    /// comparison a step, instead of lookups per name.
    fn in_order<'a>(
        &'a self,
        schema: &'a KeySchema,
    ) -> impl FnMut(&[u8]) -> (bool, Option<&'a Arc<str>>) + 'a {
        let mut rules = self.rules.iter().peekable();
        move |name| {
            let mut rule = None;
            while let Some(&r) = rules.peek() {
                match crate::proto::view::order(r.0.as_bytes(), name) {
                    std::cmp::Ordering::Less => {
                        rules.next();
                    }
                    std::cmp::Ordering::Equal => {
                        rule = Some(r);
                        break;
                    }
                    std::cmp::Ordering::Greater => break,
                }
            }
            let kept = rule.map_or(self.projection.is_empty(), |r| r.1)
                || schema.names().any(|k| k.as_bytes() == name);
            (kept, rule.and_then(|r| r.2.as_ref()))
        }
    }

    /// [`Transform::shape`] of an item the caller gives up: its values move
    /// into the result instead of being copied, and the item is trimmed and
    /// renamed in place rather than rebuilt. What a pipeline does with each
    /// change it writes to its last sink.
    pub fn shape_owned(&self, mut item: Item, schema: &KeySchema) -> Item {
        if !self.projection.is_empty() {
            let mut rules = self.in_order(schema);
            item.retain(|name, _| rules(name.as_bytes()).0);
        }
        if self.renames.is_empty() {
            return item;
        }
        // Every renamed attribute leaves before any arrives, so renames
        // that swap or chain names see the item as it was.
        let moved: Vec<(&String, &Arc<str>, AttrValue)> = self
            .renames
            .iter()
            .filter_map(|(from, to)| item.remove(from).map(|v| (from, to, v)))
            .collect();
        for (from, to, v) in moved {
            // No two renames share a target, so a value already under `to`
            // is an attribute of that name left as it is. `shape` builds
            // the result in source-name order, the later name winning:
            // the renamed one wins when its own name sorts after `to`.
            match item.get_mut(&**to) {
                Some(slot) if from.as_str() > &**to => *slot = v,
                Some(_) => {}
                None => {
                    item.insert(to.to_string(), v);
                }
            }
        }
        item
    }

    /// [`Transform::shape`] of an encoded image, which is trimmed and
    /// renamed in its list of attributes.
    pub fn shape_encoded(&self, item: &mut EncodedItem, schema: &KeySchema) {
        if self.projection.is_empty() && self.renames.is_empty() {
            return;
        }
        let mut rules = self.in_order(schema);
        item.reshape(|name| match rules(name) {
            (false, _) => Reshape::Drop,
            (true, Some(to)) => Reshape::Rename(Arc::clone(to)),
            (true, None) => Reshape::Keep,
        });
    }

    /// The name attribute `name` has in the target.
    fn target<'a>(&'a self, name: &'a str) -> &'a str {
        self.renames.get(name).map_or(name, |to| to)
    }

    /// The key as the target names it (renamed key attributes).
    pub fn shape_key(&self, key: &Key) -> Key {
        if self.renames.is_empty() {
            return key.clone();
        }
        Key(key
            .0
            .iter()
            .map(|(n, v)| (self.target(n).to_owned(), v.clone()))
            .collect())
    }

    /// [`Transform::shape_key`] of a key the caller gives up: kept as it
    /// is unless a rename names one of its attributes.
    pub fn shape_key_owned(&self, key: Key) -> Key {
        if !key.0.keys().any(|n| self.renames.contains_key(n)) {
            return key;
        }
        Key(key
            .0
            .into_iter()
            .map(|(n, v)| match self.renames.get(&n) {
                Some(to) => (to.to_string(), v),
                None => (n, v),
            })
            .collect())
    }

    /// The target document id of a source item with that key; the key values
    /// joined with `#`, partition key first, without a template.
    ///
    /// # Errors
    /// The template names an attribute the item lacks.
    pub fn document_id(
        &self,
        key: &Key,
        item: Option<&Item>,
        schema: &KeySchema,
    ) -> Result<String, String> {
        match (&self.document_id, item) {
            (Some(t), Some(item)) => t.render(item),
            // A delete carries no image: render from the key attributes,
            // which is all a document-id template may sensibly use.
            (Some(t), None) => t.render(&key.0),
            (None, _) => Ok(default_document_id(key, schema)),
        }
    }

    /// The per-item index name, when a template is set.
    ///
    /// # Errors
    /// The template names an attribute the item lacks.
    pub fn index_name(&self, item: &Item) -> Result<Option<String>, String> {
        self.index_name.as_ref().map(|t| t.render(item)).transpose()
    }

    pub fn has_document_id_template(&self) -> bool {
        self.document_id.is_some()
    }

    /// The document-id template, when one is set.
    pub fn document_id_template(&self) -> Option<&Template> {
        self.document_id.as_ref()
    }

    /// The index-name template, when one is set.
    pub fn index_name_template(&self) -> Option<&Template> {
        self.index_name.as_ref()
    }
}

/// Key values joined with `#`, partition key first.
pub fn default_document_id(key: &Key, schema: &KeySchema) -> String {
    schema
        .names()
        .filter_map(|n| key.get(n).and_then(AttrValue::key_text))
        .collect::<Vec<_>>()
        .join("#")
}

/// A transform of a projection and renames, for tests.
#[cfg(test)]
pub(crate) fn of(projection: &[&str], renames: &[(&str, &str)]) -> Transform {
    Transform::from_proto(&pb::Transform {
        projection: projection.iter().map(|s| (*s).to_owned()).collect(),
        renames: renames
            .iter()
            .map(|(a, b)| ((*a).to_owned(), (*b).to_owned()))
            .collect(),
        ..pb::Transform::default()
    })
    .expect("a valid transform")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(pairs: &[(&str, AttrValue)]) -> Item {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.clone()))
            .collect()
    }

    #[test]
    fn an_extreme_max_age_is_refused_or_kept_never_an_overflow() {
        // i64::MAX seconds plus the nanos overflowed (a panic in the RPC
        // handler, found by the e2e RPC fuzzer).
        let with = |seconds, nanos| pb::Transform {
            filter: Some(pb::RecencyFilter {
                attribute_name: "at".to_owned(),
                encoding: pb::TimeEncoding::EpochSeconds as i32,
                max_age: Some(prost_types::Duration { seconds, nanos }),
            }),
            ..pb::Transform::default()
        };
        let huge = Transform::from_proto(&with(i64::MAX, 999_999_999)).unwrap();
        assert_eq!(huge.filter.unwrap().max_age_micros, i64::MAX);
        let err = Transform::from_proto(&with(i64::MIN, -999_999_999)).unwrap_err();
        assert!(format!("{err:?}").contains("filter.max_age"), "{err:?}");
    }

    #[test]
    fn templates_render_and_reject_bad_syntax() {
        let t = Template::parse("{documentType}#{documentId}").unwrap();
        let i = item(&[
            ("documentType", AttrValue::s("post")),
            ("documentId", AttrValue::n(7i64)),
        ]);
        assert_eq!(t.render(&i).unwrap(), "post#7");
        assert_eq!(
            Template::parse("a{{b}}").unwrap().render(&i).unwrap(),
            "a{b}"
        );
        assert!(Template::parse("{x").is_err());
        assert!(Template::parse("x}").is_err());
        assert!(Template::parse("{}").is_err());
        assert!(Template::parse("{nope}").unwrap().render(&i).is_err());
    }

    #[test]
    fn projection_and_renames_keep_keys() {
        let schema = KeySchema::new("id", None);
        let t = Transform::from_proto(&pb::Transform {
            projection: vec!["a".to_owned()],
            renames: [("a".to_owned(), "b".to_owned())].into_iter().collect(),
            ..pb::Transform::default()
        })
        .unwrap();
        let i = item(&[
            ("id", AttrValue::s("1")),
            ("a", AttrValue::n(1i64)),
            ("c", AttrValue::n(2i64)),
        ]);
        assert_eq!(
            t.shape(&i, &schema),
            item(&[("id", AttrValue::s("1")), ("b", AttrValue::n(1i64))])
        );
        assert_eq!(t.shape_owned(i.clone(), &schema), t.shape(&i, &schema));
        let key = Key(item(&[("id", AttrValue::s("1"))]));
        assert_eq!(t.shape_key_owned(key.clone()), t.shape_key(&key));
    }

    #[test]
    fn an_owned_item_is_shaped_as_a_borrowed_one() {
        // Renames onto a name the item has, chains, projection with and
        // without renames: moving must give what copying gives.
        let schema = KeySchema::new("id", None);
        let i = item(&[
            ("id", AttrValue::s("1")),
            ("a", AttrValue::n(1i64)),
            ("b", AttrValue::n(2i64)),
            ("c", AttrValue::n(3i64)),
        ]);
        let transforms = [
            (vec![], vec![]),
            (vec!["a", "c"], vec![]),
            (vec![], vec![("a", "b"), ("b", "c")]),
            (vec![], vec![("c", "a")]),
            (vec!["b"], vec![("b", "x"), ("id", "key")]),
            // A swap, and renames onto a kept name from either side of it.
            (vec![], vec![("a", "b"), ("b", "a")]),
            (vec![], vec![("c", "b")]),
            (vec![], vec![("a", "c")]),
            (vec!["a", "b", "c"], vec![("a", "z"), ("c", "a")]),
        ];
        for (projection, renames) in transforms {
            let t = of(&projection, &renames);
            assert_eq!(
                t.shape_owned(i.clone(), &schema),
                t.shape(&i, &schema),
                "{projection:?} {renames:?}"
            );
            // An encoded image is shaped in its list of attributes.
            let SinkOp::UpsertEncoded(e) = t.upsert(&crate::image::testing::encoded(&i), &schema)
            else {
                panic!("an encoded image stays encoded");
            };
            assert_eq!(
                e.to_item(),
                t.shape(&i, &schema),
                "{projection:?} {renames:?}"
            );
            let key = Key(item(&[("id", AttrValue::s("1"))]));
            assert_eq!(t.shape_key_owned(key.clone()), t.shape_key(&key));
        }
    }

    #[test]
    fn conflicting_renames_are_refused() {
        let err = Transform::from_proto(&pb::Transform {
            renames: [
                ("a".to_owned(), "x".to_owned()),
                ("b".to_owned(), "x".to_owned()),
            ]
            .into_iter()
            .collect(),
            ..pb::Transform::default()
        })
        .unwrap_err();
        assert!(err.field.starts_with("renames"), "{err}");
    }

    #[test]
    fn time_encodings() {
        let e = TimeEncoding::EpochSeconds;
        assert_eq!(
            e.micros(&AttrValue::N(crate::value::Number::parse("1.5").unwrap())),
            Some(1_500_000)
        );
        assert_eq!(e.micros(&e.value(1_234_567)), Some(1_234_567));
        let m = TimeEncoding::EpochMillis;
        assert_eq!(m.micros(&m.value(1_234_000)), Some(1_234_000));
        // Truncated past a microsecond, padded short of one, either sign.
        let at = |e: TimeEncoding, text: &str| {
            e.micros(&AttrValue::N(crate::value::Number::parse(text).unwrap()))
        };
        assert_eq!(at(e, "12.3456789"), Some(12_345_678));
        assert_eq!(at(e, "-0.5"), Some(-500_000));
        assert_eq!(at(e, "-2.25"), Some(-2_250_000));
        assert_eq!(at(m, "1790000000000"), Some(1_790_000_000_000_000));
        assert_eq!(at(m, "7.25"), Some(7_250));
        assert_eq!(at(m, "99999999999999999999"), None);
        let r = TimeEncoding::Rfc3339;
        assert_eq!(
            r.micros(&AttrValue::s("1970-01-01T00:00:01Z")),
            Some(1_000_000)
        );
        assert_eq!(r.micros(&r.value(1_000_001)), Some(1_000_001));
    }
}
