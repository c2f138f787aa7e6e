//! What every executor of a claimed unit and every RPC handler shares: the
//! stores and clients ([`Context`]), why a unit stopped ([`UnitFailure`]) and
//! the segment unit keys. It imports no executor, so executors can import
//! it without a circle (the dispatch lives in `worker`).

use std::sync::Arc;

use tidemark_connectors::ConnectorError;
use tidemark_kit::jobs::JobTracker;
use tidemark_kit::worker::Progress;

use crate::config::Config;
use crate::stores::Stores;

/// The `ReplicatorService` implementation: the RPC handlers' view of the
/// shared context.
#[derive(Clone)]
pub struct Replicator {
    pub(crate) ctx: Context,
}

#[derive(Clone)]
pub struct Context {
    pub config: Arc<Config>,
    pub stores: Stores,
    pub jobs: JobTracker,
    pub dead_letters: crate::dead_letters::DeadLetters,
    pub metrics: crate::metrics::ReplicatorMetrics,
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

/// A lease call that failed: lost, stop quietly; a job-tracker that did
/// not answer, retry the unit.
impl From<tidemark_kit::worker::LeaseError> for UnitFailure {
    fn from(e: tidemark_kit::worker::LeaseError) -> Self {
        match e {
            tidemark_kit::worker::LeaseError::Lost(_) => Self::LeaseLost,
            tidemark_kit::worker::LeaseError::Rpc(s) => Self::retryable(s.message()),
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
/// The most writes in flight a job may ask for, per segment of an attribute
/// backfill (`BackfillAttributeSpec.writes_in_flight`) or per batch of a
/// DynamoDB sink (`Sink.writes_in_flight`).
pub const MAX_WRITES_IN_FLIGHT: u32 = 256;

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
