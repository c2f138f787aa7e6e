//! Repair and dead letters: rewrite chosen keys from the source's current
//! state, list what the sinks refused, replay it.

use std::collections::BTreeSet;
use std::sync::Arc;

use tidemark_connectors::proto::key_from_proto;
use tidemark_connectors::{AttrValue, Image, Item, Key, Number, RecordOutcome, SinkOp, SinkRecord};
use tidemark_kit::error::FieldError;
use tidemark_proto::replicator::v1::*;

use super::open::{Filtered, OpenSink, Opened, open};
use super::rpc::get;
use crate::context::Replicator;
use crate::context::UnitFailure;
use crate::dead_letters::{DeadLetters, Stored};
use crate::error::{ReplicatorError, ReplicatorResult};

/// The version a rewrite of a key's current source image (`None`: the key is
/// gone) carries. Without a version attribute, versions are derived from
/// time and `floor` (a second in the past, so a change made after the read
/// still wins) is the one to use. With one, versions are the items' own
/// counters: a time-derived version would rank above every later update and
/// freeze the key, so an image keeps its own version and a delete ranks just
/// above the version the sinks hold (`removed`).
pub(crate) fn rewrite_version(
    version_attribute: &str,
    image: Option<&Item>,
    floor: u64,
    removed: Option<u64>,
) -> u64 {
    if version_attribute.is_empty() {
        return floor;
    }
    match image {
        Some(item) => item
            .get(version_attribute)
            .and_then(AttrValue::as_number)
            .and_then(Number::as_u64)
            .unwrap_or(0),
        None => removed.map_or(1, |v| v.saturating_add(1)),
    }
}

/// The highest version any of `sinks` holds for `key`, when versions are
/// the items' own (`version_attribute` set); `None` otherwise or when no
/// sink holds the key.
async fn held_version(
    sinks: &[OpenSink],
    key: &Key,
    version_attribute: &str,
) -> Result<Option<u64>, UnitFailure> {
    if version_attribute.is_empty() {
        return Ok(None);
    }
    let mut held = None;
    for s in sinks {
        if let Some((v, _)) = s.sink.read(&s.transform.shape_key(key)).await? {
            held = held.max(Some(v));
        }
    }
    Ok(held)
}

/// Re-reads keys from the source and rewrites their current image to the
/// sinks (deleting those the source no longer has), versioned by
/// [`rewrite_version`].
async fn rewrite(
    opened: &Opened,
    keys: &[Key],
    only: &[String],
    dead: &DeadLetters,
    pipeline: &str,
) -> Result<(i64, i64, i64), UnitFailure> {
    let now = chrono::Utc::now().timestamp();
    let derived = u64::try_from((now - 1).max(1)).unwrap_or(1) * 1_000_000;
    let sinks: Vec<&OpenSink> = opened
        .sinks
        .iter()
        .filter(|s| only.is_empty() || only.contains(&s.name))
        .collect();
    let subset = Opened {
        source: opened.source.clone(),
        sinks: sinks
            .into_iter()
            .map(|s| OpenSink {
                name: s.name.clone(),
                sink: Arc::clone(&s.sink),
                transform: s.transform.clone(),
            })
            .collect(),
        version_attribute: opened.version_attribute.clone(),
        watermark_prefix: opened.watermark_prefix.clone(),
        skip_origin: opened.skip_origin.clone(),
        metrics: opened.metrics.clone(),
    };
    let mut rewritten = 0;
    let mut deleted = 0;
    let mut changes = Vec::with_capacity(keys.len());
    for key in keys {
        // Another pipeline's tombstone is an absent item.
        let item = opened.application_image(opened.source.table.get(key).await?);
        let removed = match &item {
            Some(_) => {
                rewritten += 1;
                None
            }
            None => {
                deleted += 1;
                held_version(&subset.sinks, key, &opened.version_attribute).await?
            }
        };
        let version = rewrite_version(&opened.version_attribute, item.as_ref(), derived, removed);
        changes.push((
            key.clone(),
            item.map(Image::Item),
            version,
            "repair".to_owned(),
        ));
    }
    let (_, _, dead_lettered) = subset
        .write(changes, dead, pipeline, Filtered::Delete)
        .await?;
    let dl = i64::try_from(dead_lettered).unwrap_or(i64::MAX);
    Ok((rewritten - dl.min(rewritten), deleted, dl))
}

pub async fn repair(r: &Replicator, req: RepairRequest) -> ReplicatorResult<RepairResponse> {
    if req.keys.is_empty() || req.keys.len() > 1000 {
        return Err(ReplicatorError::Invalid(vec![FieldError::new(
            "keys",
            "give 1 to 1000 keys",
        )]));
    }
    let p = get(r, &req.name).await?;
    if p.state == PipelineState::Creating as i32 {
        return Err(ReplicatorError::Precondition(format!(
            "pipeline {:?} is still CREATING",
            req.name
        )));
    }
    let opened = open(&r.ctx, &p).await?;
    for s in &req.sink_names {
        if !opened.sinks.iter().any(|o| &o.name == s) {
            return Err(ReplicatorError::NotFound(format!(
                "pipeline {:?} has no sink {s:?}",
                req.name
            )));
        }
    }
    let mut keys = Vec::with_capacity(req.keys.len());
    for (i, k) in req.keys.iter().enumerate() {
        let key = key_from_proto(k).map_err(|e| {
            ReplicatorError::Invalid(vec![FieldError::new(
                format!("keys[{i}].{}", e.field),
                e.reason,
            )])
        })?;
        let names: BTreeSet<&str> = key.0.keys().map(String::as_str).collect();
        let wanted: BTreeSet<&str> = opened.source.schema.names().collect();
        if names != wanted {
            return Err(ReplicatorError::Invalid(vec![FieldError::new(
                format!("keys[{i}]"),
                format!("must hold exactly the key attributes {wanted:?}"),
            )]));
        }
        keys.push(key);
    }
    let (rewritten, deleted, dead) = rewrite(
        &opened,
        &keys,
        &req.sink_names,
        &r.ctx.dead_letters,
        &p.name,
    )
    .await?;
    Ok(RepairResponse {
        rewritten_count: rewritten,
        deleted_count: deleted,
        dead_lettered_count: dead,
    })
}

pub async fn list_dead_letters(
    r: &Replicator,
    req: ListDeadLettersRequest,
) -> ReplicatorResult<ListDeadLettersResponse> {
    // AIP-158: 0 is the default, more than the maximum is lowered to it.
    let size = match req.page_size {
        0 => 100,
        n if n < 0 => {
            return Err(ReplicatorError::Invalid(vec![FieldError::new(
                "page_size",
                "must not be negative",
            )]));
        }
        n => usize::try_from(n.min(1000)).unwrap_or(1000),
    };
    // The token is the last id of the previous page (a UUID).
    let after = if req.page_token.is_empty() {
        None
    } else if uuid::Uuid::parse_str(&req.page_token).is_ok() {
        Some(req.page_token.as_str())
    } else {
        return Err(ReplicatorError::Invalid(vec![FieldError::new(
            "page_token",
            "not a token this call issued",
        )]));
    };
    let p = get(r, &req.name).await?;
    check_sink(&p, &req.sink_name)?;
    let (page, next) = r
        .ctx
        .dead_letters
        .page(&req.name, &req.sink_name, after, size)
        .await
        .map_err(ReplicatorError::Store)?;
    Ok(ListDeadLettersResponse {
        dead_letters: page.into_iter().map(|s| s.letter).collect(),
        next_page_token: next.unwrap_or_default(),
    })
}

fn check_sink(p: &Pipeline, sink: &str) -> ReplicatorResult<()> {
    if sink.is_empty()
        || p.spec
            .as_ref()
            .is_some_and(|s| s.sinks.iter().any(|x| x.name == sink))
    {
        Ok(())
    } else {
        Err(ReplicatorError::NotFound(format!(
            "pipeline {:?} has no sink {sink:?}",
            p.name
        )))
    }
}

pub async fn replay_dead_letters(
    r: &Replicator,
    req: ReplayDeadLettersRequest,
) -> ReplicatorResult<ReplayDeadLettersResponse> {
    if req.ids.len() > 1000 {
        return Err(ReplicatorError::Invalid(vec![FieldError::new(
            "ids",
            "at most 1000",
        )]));
    }
    let p = get(r, &req.name).await?;
    check_sink(&p, &req.sink_name)?;
    let opened = open(&r.ctx, &p).await?;
    let now = chrono::Utc::now().timestamp();
    let derived = u64::try_from((now - 1).max(1)).unwrap_or(1) * 1_000_000;
    let mut response = ReplayDeadLettersResponse::default();
    let letters = &r.ctx.dead_letters;
    if !req.ids.is_empty() {
        // Every id is checked before anything is written.
        let mut chosen = Vec::with_capacity(req.ids.len());
        for id in &req.ids {
            match letters
                .get(&req.name, id)
                .await
                .map_err(ReplicatorError::Store)?
            {
                Some(s) if req.sink_name.is_empty() || s.letter.sink_name == req.sink_name => {
                    chosen.push(s);
                }
                _ => {
                    return Err(ReplicatorError::NotFound(format!(
                        "no dead letter {id:?} in pipeline {:?}",
                        req.name
                    )));
                }
            }
        }
        for stored in &chosen {
            replay_one(r, &opened, stored, derived, &mut response).await?;
        }
        return Ok(response);
    }
    // All of them, a page at a time; a letter that fails again stays, so
    // the next page starts after the last one read.
    let mut after: Option<String> = None;
    loop {
        let (page, next) = letters
            .page(&req.name, &req.sink_name, after.as_deref(), 100)
            .await
            .map_err(ReplicatorError::Store)?;
        for stored in &page {
            replay_one(r, &opened, stored, derived, &mut response).await?;
        }
        match next {
            Some(id) => after = Some(id),
            None => return Ok(response),
        }
    }
}

/// Writes one dead letter again from the source's current item; removes it
/// when the sink took it, records the new reason when it did not. Letters
/// of no sink (feed messages that were not change records) are left alone.
async fn replay_one(
    r: &Replicator,
    opened: &Opened,
    stored: &Stored,
    derived: u64,
    response: &mut ReplayDeadLettersResponse,
) -> ReplicatorResult<()> {
    let Some(sink) = opened
        .sinks
        .iter()
        .find(|s| s.name == stored.letter.sink_name)
    else {
        return Ok(());
    };
    let source_key = stored.key.clone();
    let item = opened
        .source
        .table
        .get(&source_key)
        .await
        .map_err(ReplicatorError::Store)?;
    let key = sink.transform.shape_key(&source_key);
    let removed = match (&item, opened.version_attribute.is_empty()) {
        (None, false) => sink
            .sink
            .read(&key)
            .await
            .map_err(ReplicatorError::Store)?
            .map(|(v, _)| v),
        _ => None,
    };
    let record = SinkRecord {
        key,
        version: rewrite_version(
            &opened.version_attribute,
            item.as_ref(),
            stored.letter.version.max(derived),
            removed,
        ),
        op: match &item {
            Some(i) => SinkOp::Upsert(sink.transform.shape(i, &opened.source.schema)),
            None => SinkOp::Delete,
        },
    };
    let outcome = sink
        .sink
        .apply(std::slice::from_ref(&record))
        .await
        .map_err(ReplicatorError::Store)?;
    match outcome.into_iter().next() {
        Some(RecordOutcome::Rejected(reason)) => {
            r.ctx
                .dead_letters
                .retried(stored, &reason)
                .await
                .map_err(ReplicatorError::Store)?;
            response.still_failing_count += 1;
            if response.still_failing.len() < 100 {
                let mut letter = stored.letter.clone();
                letter.reason = reason;
                letter.attempts += 1;
                response.still_failing.push(letter);
            }
        }
        _ => {
            r.ctx
                .dead_letters
                .remove(&stored.letter.pipeline_name, &stored.letter.id)
                .await
                .map_err(ReplicatorError::Store)?;
            response.replayed_count += 1;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn versioned(v: i64) -> Item {
        [
            ("id".to_owned(), AttrValue::s("a")),
            ("v".to_owned(), AttrValue::n(v)),
        ]
        .into_iter()
        .collect()
    }

    #[test]
    fn a_rewrite_keeps_the_items_own_version_scale() {
        let floor = 1_765_000_000_000_000; // a time-derived version, in µs
        // With a version attribute the image keeps its version, so the next
        // update (v = 6) still wins over the replayed or repaired write.
        let replayed = rewrite_version("v", Some(&versioned(5)), floor, None);
        assert_eq!(replayed, 5);
        assert!(replayed < 6, "a later update would be refused as stale");
        // A delete ranks just above what the sinks hold, not at a time.
        assert_eq!(rewrite_version("v", None, floor, Some(5)), 6);
        assert_eq!(rewrite_version("v", None, floor, None), 1);
        // Without one, versions are time-derived and the floor is used.
        assert_eq!(rewrite_version("", Some(&versioned(5)), floor, None), floor);
        assert_eq!(rewrite_version("", None, floor, Some(5)), floor);
    }
}
