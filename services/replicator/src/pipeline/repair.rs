//! Repair and dead letters: rewrite chosen keys from the source's current
//! state, list what the sinks refused, replay it.

use std::collections::BTreeSet;
use std::sync::Arc;

use tidemark_connectors::proto::key_from_proto;
use tidemark_connectors::{AttrValue, Item, Key, Number, RecordOutcome, SinkOp, SinkRecord};
use tidemark_kit::error::FieldError;
use tidemark_proto::replicator::v1::*;

use super::open::{Filtered, OpenSink, Opened, open};
use super::rpc::get;
use crate::context::Replicator;
use crate::context::UnitFailure;
use crate::dead_letters::DeadLetters;
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
    };
    let mut rewritten = 0;
    let mut deleted = 0;
    let mut changes = Vec::with_capacity(keys.len());
    for key in keys {
        let item = opened.source.table.get(key).await?;
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
        changes.push((key.clone(), item, version, "repair".to_owned()));
    }
    let (_, _, dead_lettered) = subset
        .write(&changes, dead, pipeline, Filtered::Delete)
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
    let size = match req.page_size {
        0 => 100,
        n @ 1..=1000 => usize::try_from(n).unwrap_or(100),
        _ => {
            return Err(ReplicatorError::Invalid(vec![FieldError::new(
                "page_size",
                "0 to 1000",
            )]));
        }
    };
    let start: usize = if req.page_token.is_empty() {
        0
    } else {
        req.page_token.parse().map_err(|_| {
            ReplicatorError::Invalid(vec![FieldError::new(
                "page_token",
                "not a token this call issued",
            )])
        })?
    };
    let p = get(r, &req.name).await?;
    check_sink(&p, &req.sink_name)?;
    let all = r
        .ctx
        .dead_letters
        .list(&req.name, &req.sink_name)
        .await
        .map_err(ReplicatorError::Store)?;
    let page: Vec<DeadLetter> = all
        .iter()
        .skip(start)
        .take(size)
        .map(|s| s.letter.clone())
        .collect();
    let next = start + page.len();
    Ok(ListDeadLettersResponse {
        dead_letters: page,
        next_page_token: if next < all.len() {
            next.to_string()
        } else {
            String::new()
        },
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
    let all = r
        .ctx
        .dead_letters
        .list(&req.name, &req.sink_name)
        .await
        .map_err(ReplicatorError::Store)?;
    for id in &req.ids {
        if !all.iter().any(|s| &s.letter.id == id) {
            return Err(ReplicatorError::NotFound(format!(
                "no dead letter {id:?} in pipeline {:?}",
                req.name
            )));
        }
    }
    let mut response = ReplayDeadLettersResponse::default();
    let now = chrono::Utc::now().timestamp();
    let derived = u64::try_from((now - 1).max(1)).unwrap_or(1) * 1_000_000;
    for stored in all
        .iter()
        .filter(|s| req.ids.is_empty() || req.ids.contains(&s.letter.id))
    {
        let Some(sink) = opened
            .sinks
            .iter()
            .find(|s| s.name == stored.letter.sink_name)
        else {
            continue;
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
                    .remove(&req.name, &stored.letter.id)
                    .await
                    .map_err(ReplicatorError::Store)?;
                response.replayed_count += 1;
            }
        }
    }
    Ok(response)
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
