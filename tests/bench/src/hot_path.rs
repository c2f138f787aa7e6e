//! The replicator's per-record hot path, without I/O (DESIGN.md §6): a
//! change record as a feed hands it over (the protobuf `ChangeRecord` of a
//! Kafka change message, copied out of the consumer's buffer) →
//! [`decode_change_encoded`] (the new image stays encoded) → the sink's
//! [`Transform`] (recency filter, projection, renames) → the Elasticsearch
//! sink's [`bulk_lines`], written from the encoding. The same functions the
//! Kafka feed, the pipeline and the sink call, on one thread.
//!
//! Used by the criterion bench `hot_path` (per stage) and by the
//! `hot-path` benchmark (items/s per core, written to `BENCHMARKS.md`).

use std::sync::Arc;
use tidemark_connectors::elasticsearch::bulk_lines;

use tidemark_connectors::proto::{decode_change_encoded, encode_change};
use tidemark_connectors::transform::Transform;
use tidemark_connectors::{AttrValue, Item, KeySchema, Number, Position, SinkOp, SinkRecord};
use tidemark_proto::common::v1 as common;

/// Records in the fixture; the loops cycle through them.
pub const RECORDS: usize = 1024;

/// Encoded change records, the transform and the sink's index and schema.
pub struct Fixture {
    pub payloads: Vec<Vec<u8>>,
    pub transform: Transform,
    pub schema: KeySchema,
    pub index: String,
    pub now_micros: i64,
}

/// A content item of a dozen attributes (~400 bytes as DynamoDB JSON):
/// strings, numbers (integer and decimal), a boolean, a string set, a list
/// and a small map, like the documents the problems describe.
pub fn item(i: usize, now_micros: i64) -> Item {
    let n = |v: i64| AttrValue::n(v);
    [
        ("documentType", AttrValue::s("article")),
        ("documentId", AttrValue::s(format!("doc-{i:08}"))),
        (
            "title",
            AttrValue::s(format!("A title for document number {i}")),
        ),
        (
            "body",
            AttrValue::s(
                "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor.",
            ),
        ),
        ("views", n(i64::try_from(i).unwrap_or(0) * 37)),
        (
            "score",
            AttrValue::N(Number::parse(&format!("{}.25", i % 100)).expect("a decimal")),
        ),
        ("published", AttrValue::Bool(i.is_multiple_of(3))),
        ("updatedAt", n(now_micros / 1000)),
        (
            "tags",
            AttrValue::Ss(["news".to_owned(), "tech".to_owned(), format!("t{}", i % 7)].into()),
        ),
        (
            "authors",
            AttrValue::L(vec![AttrValue::s("ada"), AttrValue::s("grace")]),
        ),
        (
            "meta",
            AttrValue::M(
                [
                    ("lang".to_owned(), AttrValue::s("en")),
                    ("rev".to_owned(), n(3)),
                ]
                .into(),
            ),
        ),
        ("internalNote", AttrValue::s("not for the index")),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

impl Fixture {
    /// `RECORDS` upserts of [`item`]s, and a transform that keeps items
    /// changed in the last day (`updatedAt`, epoch milliseconds), drops one
    /// attribute and renames another.
    ///
    /// # Panics
    /// When the fixture's images would not stay encoded (the figure would
    /// be of another path).
    pub fn new() -> Self {
        let now_micros = 1_790_000_000_000_000;
        let schema = KeySchema::new("documentType", Some("documentId"));
        let payloads = (0..RECORDS)
            .map(|i| {
                let item = item(i, now_micros);
                let key = schema.key_of(&item).expect("items carry their key");
                encode_change(&key, Some(&item), i as u64 + 1, now_micros)
            })
            .collect();
        let transform = Transform::from_proto(&common::Transform {
            projection: [
                "title",
                "body",
                "views",
                "score",
                "published",
                "updatedAt",
                "tags",
                "authors",
                "meta",
            ]
            .into_iter()
            .map(str::to_owned)
            .collect(),
            renames: [("views".to_owned(), "viewCount".to_owned())].into(),
            filter: Some(common::RecencyFilter {
                attribute_name: "updatedAt".to_owned(),
                encoding: common::TimeEncoding::EpochMillis as i32,
                max_age: Some(prost_types::Duration {
                    seconds: 86_400,
                    nanos: 0,
                }),
            }),
            ..Default::default()
        })
        .expect("a valid transform");
        let fixture = Self {
            payloads,
            transform,
            schema,
            index: "content".to_owned(),
            now_micros,
        };
        // The figure is of the path a Kafka feed's records take into an
        // Elasticsearch sink: the image read in place, never decoded.
        let record = fixture
            .decode(0)
            .and_then(|c| fixture.transform(c).ok_or_else(String::new));
        assert!(
            matches!(record.map(|r| r.op), Ok(SinkOp::UpsertEncoded(_))),
            "the fixture's images stay encoded"
        );
        fixture
    }

    /// Decode only.
    ///
    /// # Errors
    /// A payload that does not decode (never, for the fixture's).
    pub fn decode(&self, i: usize) -> Result<tidemark_connectors::ChangeRecord, String> {
        decode_change_encoded(
            &Arc::from(self.payloads[i % RECORDS].as_slice()),
            Position {
                partition: "topic/0".to_owned(),
                sequence: i.to_string(),
            },
        )
        .map_err(|e| e.to_string())
    }

    /// The sink record of a decoded change: filter, projection, renames,
    /// the image moving into the record as the pipeline moves it into its
    /// last sink's.
    pub fn transform(&self, change: tidemark_connectors::ChangeRecord) -> Option<SinkRecord> {
        let op = match change.new_image {
            Some(image) if self.transform.passes_image(&image, self.now_micros) => {
                self.transform.upsert_owned(image, &self.schema)
            }
            Some(_) => return None,
            None => SinkOp::Delete,
        };
        Some(SinkRecord {
            key: self.transform.shape_key_owned(change.key),
            version: change.version,
            op,
        })
    }

    /// Bulk lines of a sink record, appended to `out`.
    ///
    /// # Errors
    /// A record the sink refuses (never, for the fixture's).
    pub fn bulk(&self, record: &SinkRecord, out: &mut Vec<u8>) -> Result<(), String> {
        bulk_lines(&self.index, &self.schema, record, out)
    }

    /// The whole path for record `i`: decode, transform, bulk lines
    /// appended to `out`.
    ///
    /// # Errors
    /// As the stages.
    pub fn one(&self, i: usize, out: &mut Vec<u8>) -> Result<(), String> {
        let change = self.decode(i)?;
        let record = self.transform(change).ok_or("filtered out")?;
        self.bulk(&record, out)
    }
}

impl Default for Fixture {
    fn default() -> Self {
        Self::new()
    }
}
