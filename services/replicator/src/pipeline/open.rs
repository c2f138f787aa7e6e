//! A pipeline's source and sinks, opened, and how a batch of changes is
//! written to every sink (rejected records go to the dead-letter store).

use std::collections::BTreeMap;
use std::sync::Arc;

use tidemark_connectors::dynamodb::{DELETED_ATTRIBUTE, ORIGIN_ATTRIBUTE, VERSION_ATTRIBUTE};
use tidemark_connectors::kafka::KafkaFormat;
use tidemark_connectors::transform::Transform;
use tidemark_connectors::{
    AttrValue, ConnectorResult, Image, Item, Key, KeySchema, RecordOutcome, Sink, SinkOp,
    SinkRecord, ValueRef,
};
use tidemark_proto::common::v1::data_store::Store;
use tidemark_proto::replicator::v1::{self as rp, KafkaMessageFormat, Pipeline};

use super::spec::DEFAULT_WATERMARK_PREFIX;
use crate::context::{Context, UnitFailure};
use crate::dead_letters::DeadLetters;
use crate::metrics::{ReplicatorMetrics, SinkTotals, record_bytes};
use crate::stores::{OpenTable, SinkHandle, Stores};

/// Records per sink request, and sink requests in flight per poll.
pub const SINK_BATCH: usize = 500;
pub const SINK_CONCURRENCY: usize = 4;

/// One sink of a pipeline, opened, with its transform.
pub struct OpenSink {
    pub name: String,
    pub sink: Arc<dyn Sink>,
    pub transform: Transform,
}

/// A pipeline's source and sinks, opened.
pub struct Opened {
    pub source: OpenTable,
    pub sinks: Vec<OpenSink>,
    pub version_attribute: String,
    pub watermark_prefix: String,
    /// `PipelineSpec.skip_origin`.
    pub skip_origin: String,
    /// What each sink wrote is counted here (`crate::metrics`).
    pub metrics: ReplicatorMetrics,
}

/// Opens what a pipeline reads and writes.
///
/// # Errors
/// A store that cannot be opened.
pub async fn open(ctx: &Context, pipeline: &Pipeline) -> Result<Opened, UnitFailure> {
    let spec = pipeline.spec.clone().unwrap_or_default();
    let source = ctx
        .stores
        .table(spec.source.as_ref().unwrap_or(&Default::default()))
        .await?;
    let mut sinks = Vec::new();
    for s in &spec.sinks {
        let transform = Transform::from_proto(&s.transform.clone().unwrap_or_default())
            .map_err(|e| UnitFailure::terminal(format!("sink {}: transform.{e}", s.name)))?;
        let sink = open_sink(&ctx.stores, s, &source.schema, &transform, &spec.origin).await?;
        sinks.push(OpenSink {
            name: s.name.clone(),
            sink,
            transform,
        });
    }
    let watermark_prefix = spec
        .backfill
        .as_ref()
        .map(|b| b.watermark_key_prefix.clone())
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| DEFAULT_WATERMARK_PREFIX.to_owned());
    Ok(Opened {
        source,
        sinks,
        version_attribute: spec.version_attribute,
        watermark_prefix,
        skip_origin: spec.skip_origin,
        metrics: ctx.metrics.clone(),
    })
}

/// Opens one sink of a pipeline as the pipeline writes it (creating what a
/// sink may create, such as an index with its mapping).
///
/// # Errors
/// A store that cannot be opened.
pub async fn open_sink(
    stores: &Stores,
    s: &rp::Sink,
    source: &KeySchema,
    transform: &Transform,
    origin: &str,
) -> ConnectorResult<Arc<dyn Sink>> {
    let schema = crate::schema::target_schema(source, transform);
    let store = s.store.clone().unwrap_or_default();
    Ok(match &store.store {
        Some(Store::KafkaTopic(t)) => {
            stores
                .kafka_sink(t, &schema, kafka_format(s.kafka_format()))
                .await?
        }
        _ => match stores.sink(&store, &schema, "", transform).await? {
            SinkHandle::Dynamo(d)
                if !origin.is_empty()
                    || !s.version_attribute.is_empty()
                    || s.writes_in_flight != 0 =>
            {
                let mut d = d
                    .as_ref()
                    .clone()
                    .with_version_attribute(&s.version_attribute)
                    .with_writes_in_flight(s.writes_in_flight as usize);
                if !origin.is_empty() {
                    d = d.with_origin(origin);
                }
                Arc::new(d)
            }
            other => other.sink(),
        },
    })
}

/// The connector's format of a sink's `kafka_format`.
pub fn kafka_format(f: KafkaMessageFormat) -> KafkaFormat {
    match f {
        KafkaMessageFormat::ChangeRecord => KafkaFormat::ChangeRecord,
        KafkaMessageFormat::Unspecified | KafkaMessageFormat::Json => KafkaFormat::Json,
    }
}

impl Opened {
    /// Items under the reserved watermark prefix are Tidemark's own and
    /// never forwarded.
    pub(crate) fn reserved(&self, key: &Key) -> bool {
        key.get(&self.source.schema.partition)
            .and_then(AttrValue::as_s)
            .is_some_and(|p| p.starts_with(&self.watermark_prefix))
    }

    /// See [`is_echo`].
    pub(crate) fn echo(&self, new_image: Option<&Image>, old_image: Option<&Item>) -> bool {
        is_echo(&self.skip_origin, new_image, old_image)
    }

    /// See [`application_image`].
    pub(crate) fn application_image(&self, image: Option<Item>) -> Option<Item> {
        application_image(&self.skip_origin, &self.version_attribute, image)
    }

    /// [`Opened::application_image`] of a change's new image: left
    /// encoded unless something is to be left out of it.
    pub(crate) fn application_new_image(&self, image: Option<Image>) -> Option<Image> {
        let image = image?;
        let reserved = image
            .attributes()
            .any(|(name, _)| name.starts_with(RESERVED_PREFIX.as_bytes()));
        if self.skip_origin.is_empty() && !reserved {
            return Some(image);
        }
        self.application_image(Some(image.into_item()))
            .map(Image::Item)
    }

    pub(crate) fn version_of(&self, item: &Item, derived: u64) -> u64 {
        self.version_from(
            item.get(&self.version_attribute).map(ValueRef::from),
            derived,
        )
    }

    /// [`Opened::version_of`] a change's new image.
    pub(crate) fn version_in(&self, image: &Image, derived: u64) -> u64 {
        self.version_from(image.get(&self.version_attribute), derived)
    }

    fn version_from(&self, value: Option<ValueRef<'_>>, derived: u64) -> u64 {
        if self.version_attribute.is_empty() {
            return derived;
        }
        value
            .and_then(ValueRef::as_number)
            .and_then(|n| n.parse().ok())
            .unwrap_or(derived)
    }

    /// Writes changes to every sink; records a sink rejects go to the
    /// dead-letter store. Keys and images move into the last sink's
    /// records (the others get copies). Returns (applied, stale, dead-lettered).
    pub async fn write(
        &self,
        mut changes: Vec<Change>,
        dead: &DeadLetters,
        pipeline: &str,
        filtered: Filtered,
    ) -> Result<(u64, u64, u64), UnitFailure> {
        let now = chrono::Utc::now().timestamp_micros();
        let mut totals = (0, 0, 0);
        // An image still encoded is decoded once here if any sink needs it
        // decoded; otherwise every sink writes from the encoding.
        if self.sinks.iter().any(|s| !s.sink.writes_encoded()) {
            for (_, image, _, _) in &mut changes {
                if let Some(Image::Encoded(_)) = image {
                    *image = image.take().map(|i| Image::Item(i.into_item()));
                }
            }
        }
        for (i, sink) in self.sinks.iter().enumerate() {
            let last = i + 1 == self.sinks.len();
            let mut batch = Vec::with_capacity(changes.len());
            let mut origin = Vec::with_capacity(changes.len());
            for (j, (key, image, version, _)) in changes.iter_mut().enumerate() {
                let op = match image {
                    Some(image) if sink.transform.passes_image(image, now) => {
                        let schema = &self.source.schema;
                        if last {
                            let image = std::mem::replace(image, Image::Item(Item::new()));
                            sink.transform.upsert_owned(image, schema)
                        } else {
                            sink.transform.upsert(image, schema)
                        }
                    }
                    Some(_) if filtered == Filtered::Skip => continue,
                    Some(_) | None => SinkOp::Delete,
                };
                batch.push(SinkRecord {
                    key: if last {
                        sink.transform
                            .shape_key_owned(std::mem::replace(key, Key(BTreeMap::new())))
                    } else {
                        sink.transform.shape_key(key)
                    },
                    version: *version,
                    op,
                });
                origin.push(j);
            }
            if batch.is_empty() {
                continue;
            }
            // Writes are conditional on version, so chunks of one poll may be
            // applied concurrently without ever moving a target backwards; the
            // feed is acknowledged only after all of them.
            let chunks = if sink.sink.ordered() {
                let mut out = Vec::new();
                for chunk in batch.chunks(SINK_BATCH) {
                    out.push(sink.sink.apply(chunk).await?);
                }
                out
            } else {
                let requests: Vec<_> = batch
                    .chunks(SINK_BATCH)
                    .map(|chunk| sink.sink.apply(chunk))
                    .collect();
                futures::future::try_join_all(requests).await?
            };
            let outcomes = chunks.into_iter().flatten();
            let mut this = SinkTotals::default();
            for ((record, j), outcome) in batch.iter().zip(origin).zip(outcomes) {
                match outcome {
                    RecordOutcome::Applied => {
                        this.applied += 1;
                        this.bytes += record_bytes(record);
                    }
                    RecordOutcome::Stale => this.stale += 1,
                    RecordOutcome::Rejected(reason) => {
                        dead.add(pipeline, &sink.name, record, &changes[j].3, &reason)
                            .await?;
                        this.dead_lettered += 1;
                    }
                }
            }
            self.metrics.wrote(pipeline, &sink.name, &this);
            totals.0 += this.applied;
            totals.1 += this.stale;
            totals.2 += this.dead_lettered;
        }
        Ok(totals)
    }
}

/// A change as the sinks are given it: the key, the image (`None` for a
/// delete), the version, and where it came from (a feed position, a
/// backfill segment) for a dead letter.
pub type Change = (Key, Option<Image>, u64, String);

/// Whether a change is the `skip_origin` pipeline's own write coming back:
/// it set the origin marker to that pipeline's (an application's write
/// leaves the marker as it was, a whole-item put of its own drops it).
pub fn is_echo(skip_origin: &str, new_image: Option<&Image>, old_image: Option<&Item>) -> bool {
    if skip_origin.is_empty() {
        return false;
    }
    let new = new_image
        .and_then(|i| i.get(ORIGIN_ATTRIBUTE))
        .and_then(ValueRef::as_str);
    let old = old_image
        .and_then(|i| i.get(ORIGIN_ATTRIBUTE))
        .and_then(AttrValue::as_s);
    new.and_then(|m| m.strip_prefix(skip_origin))
        .is_some_and(|rest| rest.starts_with('@'))
        && new != old
}

/// Attributes Tidemark keeps in items: origin markers, the touch of a
/// TOUCH backfill, a reverse sink's version. Never data: the verifier
/// leaves them out too, and an index refuses them.
const RESERVED_PREFIX: &str = "_tidemark_";
/// The first name after every name starting with [`RESERVED_PREFIX`].
const RESERVED_END: &str = "_tidemark`";

/// An image as the application wrote it: Tidemark's `_tidemark_`
/// attributes left out. Read from the `skip_origin` pipeline's DynamoDB
/// sink, that sink's version goes too (unless it is the source's own
/// version attribute) and its tombstone is a delete (`None`).
pub fn application_image(
    skip_origin: &str,
    version_attribute: &str,
    image: Option<Item>,
) -> Option<Item> {
    let mut image = image?;
    let reserved = image
        .range::<str, _>((
            std::ops::Bound::Included(RESERVED_PREFIX),
            std::ops::Bound::Excluded(RESERVED_END),
        ))
        .next()
        .is_some();
    if skip_origin.is_empty() && !reserved {
        return Some(image);
    }
    if !skip_origin.is_empty() && image.contains_key(DELETED_ATTRIBUTE) {
        return None;
    }
    if reserved {
        image.retain(|name, _| !name.starts_with(RESERVED_PREFIX));
    }
    if !skip_origin.is_empty() && version_attribute != VERSION_ATTRIBUTE {
        image.remove(VERSION_ATTRIBUTE);
    }
    Some(image)
}

/// What a write does with an image a sink's filter leaves out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Filtered {
    /// A change of the key: its earlier image may have passed and be in the
    /// target, so the target's copy is deleted (versioned like any write).
    Delete,
    /// A backfill read: its version ranks below every change of the key
    /// from the feed, so only a change can have put the key in the target,
    /// and that change's own write handles it; a tombstone here would only
    /// fill the target with the keys it is meant not to hold.
    Skip,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(attrs: &[(&str, AttrValue)]) -> Item {
        attrs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.clone()))
            .collect()
    }

    fn echo(skip: &str, new: Option<&Item>, old: Option<&Item>) -> bool {
        is_echo(skip, new.cloned().map(Image::Item).as_ref(), old)
    }

    fn marked(origin: &str, views: i64) -> Item {
        item(&[
            ("pk", AttrValue::s("a")),
            ("views", AttrValue::n(views)),
            ("tidemark_version", AttrValue::n(9u64)),
            (ORIGIN_ATTRIBUTE, AttrValue::s(origin)),
        ])
    }

    #[test]
    fn only_a_change_that_sets_the_other_pipelines_marker_is_an_echo() {
        let skip = "fwd";
        // The forward pipeline's write: the marker changes to fwd@....
        assert!(echo(
            skip,
            Some(&marked("fwd@2", 1)),
            Some(&marked("fwd@1", 0))
        ));
        assert!(
            echo(skip, Some(&marked("fwd@2", 1)), None),
            "an insert by it"
        );
        // Its tombstone carries the marker too.
        assert!(echo(
            skip,
            Some(&marked("fwd@3", 1)),
            Some(&marked("rev@2", 1))
        ));
        // An application's UpdateItem of an item it wrote keeps the marker.
        assert!(!echo(
            skip,
            Some(&marked("fwd@2", 5)),
            Some(&marked("fwd@2", 1))
        ));
        // An application's whole-item put drops it.
        let plain = item(&[("pk", AttrValue::s("a")), ("views", AttrValue::n(3i64))]);
        assert!(!echo(skip, Some(&plain), Some(&marked("fwd@2", 1))));
        // Another pipeline's marker, a prefix of the name, a delete.
        assert!(!echo(
            skip,
            Some(&marked("rev@4", 1)),
            Some(&marked("fwd@2", 1))
        ));
        assert!(!echo(skip, Some(&marked("fwd-2@4", 1)), None));
        assert!(!echo(skip, None, Some(&marked("fwd@2", 1))));
        // Without skip_origin nothing is.
        assert!(!echo("", Some(&marked("fwd@2", 1)), None));
    }

    #[test]
    fn the_other_sinks_bookkeeping_is_left_out_and_its_tombstone_is_a_delete() {
        let mut reverse_written = marked("rev@2", 1);
        reverse_written.insert("_tidemark_version".to_owned(), AttrValue::n(2u64));
        assert_eq!(
            application_image("rev", "", Some(reverse_written)),
            application_image("fwd", "", Some(marked("fwd@2", 1))),
            "a reverse sink's version goes too"
        );
        let clean = application_image("fwd", "", Some(marked("fwd@2", 1))).unwrap();
        assert_eq!(
            clean,
            item(&[("pk", AttrValue::s("a")), ("views", AttrValue::n(1i64))])
        );
        // The source's own version attribute stays.
        let kept = application_image("fwd", "tidemark_version", Some(marked("fwd@2", 1))).unwrap();
        assert!(kept.contains_key("tidemark_version"));
        let mut tombstone = marked("fwd@3", 1);
        tombstone.insert(DELETED_ATTRIBUTE.to_owned(), AttrValue::Bool(true));
        assert_eq!(application_image("fwd", "", Some(tombstone.clone())), None);
        // Without skip_origin, images are copied but for Tidemark's own
        // attributes (a TOUCH backfill's marker too).
        let mut touched = tombstone.clone();
        touched.insert("_tidemark_touch".to_owned(), AttrValue::n(1u64));
        let mut want = tombstone.clone();
        want.remove(ORIGIN_ATTRIBUTE);
        assert_eq!(application_image("", "", Some(touched)), Some(want));
    }
}
