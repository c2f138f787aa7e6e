//! What every executor of a claimed unit shares, and how a unit's failure is
//! reported back to the job-tracker.

use std::sync::Arc;

use tidemark_connectors::ConnectorError;
use tidemark_kit::worker::{Claim, Executor, JobTrackerClient, Progress};
use tidemark_proto::job_tracker::v1::JobKind;

use crate::Config;
use crate::stores::Stores;

#[derive(Clone)]
pub struct Context {
    pub config: Arc<Config>,
    pub stores: Stores,
    pub jobs: JobTrackerClient,
    pub dead_letters: crate::dead_letters::DeadLetters,
}

/// Why a unit stopped before completing.
#[derive(Debug)]
pub enum UnitFailure {
    /// Another worker holds the unit now (or the run ended): stop quietly.
    LeaseLost,
    Failed {
        message: String,
        /// Worth another attempt (throttling, timeouts, an unreachable store).
        retryable: bool,
        /// The unit's partial output was removed.
        rolled_back: bool,
        progress: Progress,
    },
}

impl std::fmt::Display for UnitFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::LeaseLost => f.write_str("lease lost"),
            Self::Failed { message, .. } => f.write_str(message),
        }
    }
}

impl UnitFailure {
    pub fn terminal(message: impl Into<String>) -> Self {
        Self::Failed {
            message: message.into(),
            retryable: false,
            rolled_back: false,
            progress: Progress::default(),
        }
    }

    pub fn retryable(message: impl Into<String>) -> Self {
        Self::Failed {
            message: message.into(),
            retryable: true,
            rolled_back: false,
            progress: Progress::default(),
        }
    }
}

impl From<ConnectorError> for UnitFailure {
    fn from(e: ConnectorError) -> Self {
        let retryable = matches!(
            e,
            ConnectorError::Retryable { .. } | ConnectorError::IteratorExpired { .. }
        );
        Self::Failed {
            message: e.to_string(),
            retryable,
            rolled_back: false,
            progress: Progress::default(),
        }
    }
}

/// The segment number of a `segment-<i>` unit.
///
/// # Errors
/// Another unit key, or a segment outside `0..total`.
pub fn segment_of(unit_key: &str, total: u32) -> Result<u32, String> {
    unit_key
        .strip_prefix("segment-")
        .and_then(|n| n.parse::<u32>().ok())
        .filter(|n| *n < total)
        .ok_or_else(|| {
            format!(
                "unit {unit_key:?} is not one of segment-0..segment-{}",
                total.saturating_sub(1)
            )
        })
}

pub fn segment_units(total: u32) -> Vec<String> {
    (0..total).map(|i| format!("segment-{i}")).collect()
}

/// The executor the worker loop runs for every claimed unit: dispatch on
/// the job kind, then report a failure to the job-tracker.
pub fn executor(ctx: Context) -> Executor {
    Arc::new(move |claim: Claim| {
        let ctx = ctx.clone();
        Box::pin(async move {
            let lease = claim.lease.clone();
            let kind = JobKind::try_from(claim.job.kind).unwrap_or(JobKind::Unspecified);
            let job = claim.job.name.clone();
            let unit = claim.unit.unit_key.clone();
            let result = match kind {
                JobKind::BackfillAttribute => Box::pin(crate::backfill::execute(ctx, claim)).await,
                JobKind::UnitMigration => Box::pin(crate::migrate::execute(ctx, claim)).await,
                JobKind::IncrementalExtract => Box::pin(crate::extract::execute(ctx, claim)).await,
                JobKind::Replication => Box::pin(crate::pipeline::execute(ctx, claim)).await,
                _ => Err(UnitFailure::terminal(format!(
                    "the replicator does not execute {kind:?} jobs"
                ))),
            };
            match result {
                Ok(()) => tracing::info!(%job, %unit, "unit done"),
                Err(UnitFailure::LeaseLost) => {
                    tracing::info!(%job, %unit, "unit lease lost; another worker continues it");
                }
                Err(UnitFailure::Failed {
                    message,
                    retryable,
                    rolled_back,
                    progress,
                }) => {
                    tracing::warn!(%job, %unit, error = %message, retryable, rolled_back, "unit failed");
                    if let Err(e) = lease
                        .fail(&message, retryable, rolled_back, &progress)
                        .await
                    {
                        tracing::warn!(%job, %unit, error = %e, "could not report the unit's failure; its lease will lapse");
                    }
                }
            }
        })
    })
}
