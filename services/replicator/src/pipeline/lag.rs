//! Lag and drain: read from the counters and checkpoints the feed units'
//! holders write (see `feed::report_progress`), never from the feed itself, so any
//! replica answers.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use tidemark_kit::ServiceError;
use tidemark_kit::error::FieldError;
use tidemark_kit::rpc::BoxStream;
use tidemark_proto::job_tracker::v1::UnitStatus;
use tidemark_proto::replicator::v1::*;

use super::feed::feed_report;
use super::rpc::get;
use super::spec;
use crate::context::Replicator;
use crate::error::{ReplicatorError, ReplicatorResult};

fn micros_ts(ms: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: i32::try_from(ms.rem_euclid(1000) * 1_000_000).unwrap_or(0),
    }
}

/// The lag now, from the feed unit's last checkpointed counters.
/// The pipeline's lag from the counters its feed units' holders checkpoint,
/// one partition entry per feed unit; with the oldest of their observation
/// times (a drain waits until every unit reported after it began).
async fn lag(r: &Replicator, p: &Pipeline) -> ReplicatorResult<(PipelineLag, i64)> {
    let keys = spec::feed_units(p);
    let mut feeds = if p.run_id.is_empty() {
        Vec::new()
    } else {
        r.ctx.jobs.list_units(&p.run_id, &keys, &[]).await?
    };
    // A unit not listed yet reports nothing: behind, never observed.
    for key in &keys {
        if !feeds.iter().any(|u| &u.unit_key == key) {
            feeds.push(tidemark_proto::job_tracker::v1::Unit {
                unit_key: key.clone(),
                ..Default::default()
            });
        }
    }
    let backfill_done = p.state == PipelineState::Streaming as i32;
    // One entry per shard or partition, from the checkpoint of the feed unit
    // reading it; a unit that reads none yet stands for itself. Consumers of
    // one Kafka group each report the whole topic: the most behind counts.
    let mut by_partition: std::collections::BTreeMap<String, PartitionLag> =
        std::collections::BTreeMap::new();
    let mut observed = i64::MAX;
    let mut units_caught_up = true;
    for feed in &feeds {
        let c = |k: &str| feed.counters.get(k).copied().unwrap_or_default();
        observed = observed.min(c("observed_ms"));
        let unit_caught_up = c("caught_up") == 1;
        units_caught_up &= unit_caught_up;
        let owner = feed
            .lease
            .as_ref()
            .filter(|_| feed.status == UnitStatus::InProgress as i32)
            .map(|l| l.owner.clone())
            .unwrap_or_default();
        let report = feed_report(&feed.checkpoint);
        let mut entries = Vec::new();
        if let Some(report) = report.filter(|r| !r.lag.is_empty() || !r.positions.is_empty()) {
            let mut names: BTreeSet<&String> = report.positions.keys().collect();
            names.extend(report.lag.iter().map(|l| &l.partition));
            for name in names {
                let lag = report.lag.iter().find(|l| &l.partition == name);
                let (position, closed) = report.positions.get(name).cloned().unwrap_or_default();
                let records = lag.map_or(0, |l| l.records);
                let millis = i64::try_from(lag.map_or(0, |l| l.millis)).unwrap_or(i64::MAX);
                entries.push(PartitionLag {
                    partition: name.clone(),
                    records_behind: Some(i64::try_from(records).unwrap_or(i64::MAX)),
                    time_behind: Some(millis_duration(millis)),
                    caught_up: closed || (unit_caught_up && records == 0),
                    position: position.unwrap_or_default(),
                    owner: owner.clone(),
                    closed,
                });
            }
        } else {
            entries.push(PartitionLag {
                partition: feed.unit_key.clone(),
                records_behind: Some(c("lag_records")),
                time_behind: Some(millis_duration(c("lag_ms"))),
                caught_up: unit_caught_up,
                position: String::new(),
                owner,
                closed: false,
            });
        }
        for e in entries {
            match by_partition.get(&e.partition) {
                Some(have) if have.records_behind >= e.records_behind => {}
                _ => {
                    by_partition.insert(e.partition.clone(), e);
                }
            }
        }
    }
    let partitions: Vec<PartitionLag> = by_partition.into_values().collect();
    let records: i64 = partitions
        .iter()
        .map(|p| p.records_behind.unwrap_or_default())
        .sum();
    let max_time_behind = partitions
        .iter()
        .filter_map(|p| p.time_behind)
        .max_by_key(|d| (d.seconds, d.nanos));
    let caught_up = units_caught_up && partitions.iter().all(|p| p.caught_up);
    let lag = PipelineLag {
        pipeline_name: p.name.clone(),
        state: p.state,
        records_behind: Some(records),
        max_time_behind,
        caught_up: caught_up && backfill_done,
        observe_time: Some(micros_ts(observed)),
        partitions,
    };
    Ok((lag, observed))
}

fn millis_duration(ms: i64) -> prost_types::Duration {
    prost_types::Duration {
        seconds: ms / 1000,
        nanos: i32::try_from((ms % 1000) * 1_000_000).unwrap_or(0),
    }
}

fn duration_of(d: Option<&prost_types::Duration>) -> Option<Duration> {
    d.and_then(|d| {
        let secs = u64::try_from(d.seconds).ok()?;
        let nanos = u32::try_from(d.nanos).ok()?;
        Some(Duration::new(secs, nanos))
    })
}

/// The longest `Drain.timeout`; the server lets the RPC run this long past
/// its request timeout.
pub const MAX_DRAIN: Duration = Duration::from_secs(3600);

pub async fn drain(r: &Replicator, req: DrainRequest) -> ReplicatorResult<DrainResponse> {
    let Some(timeout) =
        duration_of(req.timeout.as_ref()).filter(|t| !t.is_zero() && *t <= MAX_DRAIN)
    else {
        return Err(ReplicatorError::Invalid(vec![FieldError::new(
            "timeout",
            "required, positive and at most 1 h",
        )]));
    };
    let started = Instant::now();
    let call_ms = chrono::Utc::now().timestamp_millis();
    let mut p = get(r, &req.name).await?;
    if p.state != PipelineState::Streaming as i32 {
        return Err(ReplicatorError::Precondition(format!(
            "pipeline {:?} is {:?}, not STREAMING: drain after the backfill, and resume a paused pipeline first",
            req.name,
            PipelineState::try_from(p.state).unwrap_or(PipelineState::Unspecified)
        )));
    }
    loop {
        let (lag, observed_ms) = lag(r, &p).await?;
        // An observation made after the call began that saw nothing
        // waiting: every change committed before the call is applied.
        if lag.caught_up && observed_ms >= call_ms {
            let elapsed = started.elapsed();
            return Ok(DrainResponse {
                lag: Some(lag),
                elapsed: Some(prost_types::Duration {
                    seconds: i64::try_from(elapsed.as_secs()).unwrap_or(i64::MAX),
                    nanos: i32::try_from(elapsed.subsec_nanos()).unwrap_or(0),
                }),
            });
        }
        if started.elapsed() >= timeout {
            let mut metadata = HashMap::new();
            if let Some(n) = lag.records_behind {
                metadata.insert("records_behind".to_owned(), n.to_string());
            }
            let secs = lag.max_time_behind.map_or(0, |d| d.seconds);
            metadata.insert("seconds_behind".to_owned(), secs.to_string());
            return Err(ServiceError::deadline(format!(
                "pipeline {:?} did not reach lag 0 within {timeout:?}",
                req.name
            ))
            .with_info("DRAIN_TIMEOUT", "tidemark.replicator.v1", metadata)
            .into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        p = get(r, &req.name).await?;
    }
}

pub async fn watch_lag(
    r: &Replicator,
    req: WatchLagRequest,
) -> ReplicatorResult<BoxStream<WatchLagResponse>> {
    let interval = match req.interval.as_ref() {
        None => Duration::from_secs(1),
        Some(d) => duration_of(Some(d))
            .filter(|d| *d >= Duration::from_millis(100) && *d <= Duration::from_secs(60))
            .ok_or_else(|| {
                ReplicatorError::Invalid(vec![FieldError::new("interval", "100 ms to 1 min")])
            })?,
    };
    get(r, &req.name).await?;
    let r = r.clone();
    let name = req.name;
    let stream = async_stream(move |tx| async move {
        loop {
            let item = match get(&r, &name).await {
                Ok(p) => lag(&r, &p)
                    .await
                    .map(|(lag, _)| WatchLagResponse { lag: Some(lag) }),
                Err(e) => Err(e),
            };
            let failed = item.is_err();
            if tx.send(item).await.is_err() || failed {
                return;
            }
            tokio::time::sleep(interval).await;
        }
    });
    Ok(stream)
}

/// A response stream fed by a task that ends when the client goes away.
fn async_stream<T, F, Fut>(f: F) -> BoxStream<T>
where
    T: Send + 'static,
    F: FnOnce(tokio::sync::mpsc::Sender<ReplicatorResult<T>>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(f(tx));
    Box::pin(tokio_stream::StreamExt::map(
        tokio_stream::wrappers::ReceiverStream::new(rx),
        |item| item.map_err(tonic::Status::from),
    ))
}
