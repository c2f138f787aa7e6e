//! `StatsAggregatorService` RPCs over the [`Engine`].

use std::sync::Arc;
use std::time::Duration;

use tidemark_kit::FieldError;
use tidemark_proto::stats_aggregator::v1::stats_aggregator_service_server::StatsAggregatorService;
use tidemark_proto::stats_aggregator::v1::*;
use tonic::{Request, Response, Status, Streaming};
use tracing::instrument;

use crate::StatsAggregator;
use crate::convert::{self, MAX_EVENTS};
use crate::engine::{Engine, Ingested, PauseMode as Mode};

fn check_size(events: &[Event]) -> Result<(), Status> {
    if events.len() > MAX_EVENTS {
        return Err(FieldError::new(
            "events",
            format!("{} events; at most {MAX_EVENTS} per message", events.len()),
        )
        .into());
    }
    Ok(())
}

/// The caller's `grpc-timeout`, less a margin to answer in: PauseWriters
/// reports which replicas did not confirm rather than being cut off.
fn caller_deadline(metadata: &tonic::metadata::MetadataMap) -> Option<Duration> {
    let value = metadata.get("grpc-timeout")?.to_str().ok()?;
    let (amount, unit) = value.split_at(value.len().checked_sub(1)?);
    let amount: u64 = amount.parse().ok()?;
    let timeout = match unit {
        "H" => Duration::from_secs(amount.saturating_mul(3600)),
        "M" => Duration::from_secs(amount.saturating_mul(60)),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    };
    Some(timeout.saturating_sub(timeout / 10 + Duration::from_millis(20)))
}

fn engine(s: &StatsAggregator) -> &Arc<Engine> {
    &s.engine
}

#[tonic::async_trait]
impl StatsAggregatorService for StatsAggregator {
    #[instrument(skip_all)]
    async fn ingest(
        &self,
        request: Request<Streaming<IngestRequest>>,
    ) -> Result<Response<IngestResponse>, Status> {
        let mut stream = request.into_inner();
        let mut total = Ingested::default();
        let mut base = 0u64;
        while let Some(message) = stream.message().await? {
            check_size(&message.events)?;
            let n = u64::try_from(message.events.len()).unwrap_or(u64::MAX);
            total.absorb(
                engine(self)
                    .ingest(message.events, base)
                    .await
                    .map_err(on_events)?,
            );
            base += n;
        }
        Ok(Response::new(IngestResponse {
            accepted_count: total.accepted,
            duplicate_count: total.duplicates,
            rejected_count: total.rejected,
            rejections: total.rejections,
        }))
    }

    #[instrument(skip_all, fields(events = request.get_ref().events.len()))]
    async fn ingest_batch(
        &self,
        request: Request<IngestBatchRequest>,
    ) -> Result<Response<IngestBatchResponse>, Status> {
        let events = request.into_inner().events;
        check_size(&events)?;
        let mut total = Ingested::default();
        total.absorb(engine(self).ingest(events, 0).await.map_err(on_events)?);
        Ok(Response::new(IngestBatchResponse {
            accepted_count: total.accepted,
            duplicate_count: total.duplicates,
            rejected_count: total.rejected,
            rejections: total.rejections,
        }))
    }

    #[instrument(skip_all)]
    async fn flush(
        &self,
        _request: Request<FlushRequest>,
    ) -> Result<Response<FlushResponse>, Status> {
        let report = engine(self).flush().await?;
        Ok(Response::new(FlushResponse {
            flush_sequence: report.sequence,
            items_written: report.items_written,
            items_already_applied: report.items_already_applied,
            records_published: report.records_published,
            duration: Some(convert::duration(report.duration)),
            write_units_consumed: report.write_units_consumed,
            throttled: i64::try_from(report.throttled).unwrap_or(i64::MAX),
        }))
    }

    #[instrument(skip_all, fields(entity = %request.get_ref().entity_key))]
    async fn get_stats(
        &self,
        request: Request<GetStatsRequest>,
    ) -> Result<Response<GetStatsResponse>, Status> {
        let r = request.into_inner();
        Ok(Response::new(
            engine(self).get_stats(&r.entity_key, &r.metrics).await?,
        ))
    }

    #[instrument(skip_all)]
    async fn pause_writers(
        &self,
        request: Request<PauseWritersRequest>,
    ) -> Result<Response<PauseWritersResponse>, Status> {
        let deadline = caller_deadline(request.metadata());
        let r = request.into_inner();
        let mode = match PauseMode::try_from(r.mode) {
            Ok(PauseMode::Buffer) => Mode::Buffer,
            Ok(PauseMode::Reject) => Mode::Reject,
            Ok(PauseMode::Unspecified) | Err(_) => {
                return Err(FieldError::new("mode", "must be BUFFER or REJECT").into());
            }
        };
        let max_pause = convert::max_pause(r.max_pause)?;
        let state = engine(self)
            .pause(mode, r.reason, max_pause, deadline)
            .await?;
        Ok(Response::new(PauseWritersResponse { state: Some(state) }))
    }

    #[instrument(skip_all)]
    async fn resume_writers(
        &self,
        request: Request<ResumeWritersRequest>,
    ) -> Result<Response<ResumeWritersResponse>, Status> {
        let engine = engine(self);
        let mut state = engine.resume(false).await?;
        if request.into_inner().flush_now {
            engine.flush().await.map_err(|e| {
                let status = Status::from(e);
                Status::unavailable(format!(
                    "writers are resumed, but the flush did not complete: {}",
                    status.message()
                ))
            })?;
            state = engine.state().await?;
        }
        Ok(Response::new(ResumeWritersResponse { state: Some(state) }))
    }

    #[instrument(skip_all)]
    async fn get_buffer_state(
        &self,
        _request: Request<GetBufferStateRequest>,
    ) -> Result<Response<GetBufferStateResponse>, Status> {
        Ok(Response::new(GetBufferStateResponse {
            state: Some(engine(self).state().await?),
        }))
    }
}

/// An ingestion refused as a whole for bad input (the buffer's sum of a
/// metric's increments would overflow i64) names `events`, the field at
/// fault; it named none (found by the e2e RPC fuzzer).
fn on_events(e: crate::StatsError) -> Status {
    let e = tidemark_kit::ServiceError::from(e);
    if e.kind() == tidemark_kit::error::ErrorKind::InvalidArgument && e.violations().is_empty() {
        e.on_field("events").into()
    } else {
        e.into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_callers_deadline_keeps_a_margin() {
        let mut m = tonic::metadata::MetadataMap::new();
        assert_eq!(caller_deadline(&m), None);
        m.insert("grpc-timeout", "2S".parse().unwrap());
        assert_eq!(caller_deadline(&m), Some(Duration::from_millis(1780)));
        m.insert("grpc-timeout", "500m".parse().unwrap());
        assert_eq!(caller_deadline(&m), Some(Duration::from_millis(430)));
        m.insert("grpc-timeout", "5x".parse().unwrap());
        assert_eq!(caller_deadline(&m), None);
    }

    #[test]
    fn an_overflowing_batch_names_the_events_field() {
        use tonic_types::StatusExt as _;
        let overflow = crate::StatsError::Backend(tidemark_connectors::ConnectorError::invalid(
            "sqlite",
            "increments of e/m overflow i64",
        ));
        let status = on_events(overflow);
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        let bad = status.get_details_bad_request().expect("BadRequest");
        assert_eq!(bad.field_violations[0].field, "events");
        let down = crate::StatsError::Backend(tidemark_connectors::ConnectorError::Retryable {
            backend: "redis",
            message: "down".into(),
            retry_after: None,
        });
        assert_eq!(on_events(down).code(), tonic::Code::Unavailable);
    }
}
