//! The worker side: dispatches every claimed unit to the executor of its job
//! kind and reports a failure back to the job-tracker. It depends on the
//! executors; they never depend on it.

use std::sync::Arc;

use tidemark_kit::worker::{Claim, Executor};
use tidemark_proto::job_tracker::v1::JobKind;

use crate::context::{Context, UnitFailure};

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
                JobKind::BackfillAttribute => {
                    Box::pin(crate::backfill::run::execute(ctx, claim)).await
                }
                JobKind::UnitMigration => Box::pin(crate::migrate::run::execute(ctx, claim)).await,
                JobKind::IncrementalExtract => {
                    Box::pin(crate::extract::run::execute(ctx, claim)).await
                }
                JobKind::Replication => Box::pin(crate::pipeline::run::execute(ctx, claim)).await,
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
