//! The job-tracker's domain: jobs, runs, units, leases, transitions and
//! routes, with the legal state transitions. Stored as JSON; converted to
//! and from the protobuf API in `convert`.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum JobKind {
    BackfillAttribute,
    UnitMigration,
    IncrementalExtract,
    Replication,
    Verification,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RunStatus {
    Queued,
    Running,
    Succeeded,
    Failed,
    FailedAcknowledged,
    Skipped,
}

impl RunStatus {
    pub fn is_terminal(self) -> bool {
        !matches!(self, Self::Queued | Self::Running)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum UnitStatus {
    NotMigrated,
    InProgress,
    Migrated,
    Failed,
    RolledBack,
}

impl UnitStatus {
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Migrated | Self::Failed | Self::RolledBack)
    }

    /// The unit state machine (issue: illegal transitions are refused with
    /// the current state in the message).
    pub fn can_become(self, to: Self) -> bool {
        use UnitStatus::{Failed, InProgress, Migrated, NotMigrated, RolledBack};
        matches!(
            (self, to),
            (NotMigrated, InProgress)
                | (InProgress, InProgress)
                | (InProgress, Migrated)
                | (InProgress, Failed)
                | (InProgress, RolledBack)
                | (InProgress, NotMigrated)
                | (Failed, RolledBack)
        )
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RouteTarget {
    Source,
    Target,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RunTrigger {
    Manual,
    Schedule,
    Api,
}

/// An opaque, typed job spec (a `google.protobuf.Any`): the job-tracker
/// stores it and never reads it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Spec {
    pub type_url: String,
    pub value: Vec<u8>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Schedule {
    /// Cron with a seconds field, e.g. `0 0 9-17 * * Mon-Fri`.
    pub cron: String,
    /// IANA time zone the expression is read in; UTC when empty.
    pub time_zone: String,
    /// How long a due run may wait for the gate or a running run before it
    /// is recorded as SKIPPED.
    pub max_wait_ms: u64,
    pub start_time: Option<DateTime<Utc>>,
    pub end_time: Option<DateTime<Utc>>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Job {
    pub name: String,
    pub kind: JobKind,
    pub description: String,
    pub spec: Option<Spec>,
    pub schedule: Option<Schedule>,
    pub default_unit_keys: Vec<String>,
    pub explicit_completion: bool,
    pub max_attempts: u32,
    pub max_concurrent_units: u32,
    pub revision: u64,
    pub create_time: DateTime<Utc>,
    pub update_time: DateTime<Utc>,
    pub last_run_id: Option<String>,
    /// The FAILED run that blocks new runs until acknowledged (invariant 8).
    pub blocking_run_id: Option<String>,
    /// The run that is QUEUED or RUNNING; a job runs one run at a time.
    pub active_run_id: Option<String>,
    /// Where the last successful run stopped: the next incremental run
    /// starts from here.
    pub last_processed: Option<Watermark>,
    /// The run that recorded `last_processed`.
    #[serde(default)]
    pub last_processed_run_id: Option<String>,
    /// The next time the schedule fires, when it has one.
    pub next_run_time: Option<DateTime<Utc>>,
    /// Since when the due run has been waiting for the gate or a running run.
    pub due_since: Option<DateTime<Utc>>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Watermark {
    pub time: Option<DateTime<Utc>>,
    pub position: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Acknowledgement {
    pub actor: String,
    pub reason: String,
    pub time: DateTime<Utc>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Run {
    pub run_id: String,
    pub job_name: String,
    pub job_kind: JobKind,
    pub job_revision: u64,
    pub correlation_id: String,
    pub trigger: RunTrigger,
    pub actor: String,
    pub status: RunStatus,
    pub status_reason: String,
    pub create_time: DateTime<Utc>,
    pub scheduled_time: Option<DateTime<Utc>>,
    pub start_time: Option<DateTime<Utc>>,
    pub finish_time: Option<DateTime<Utc>>,
    pub window_start: Option<DateTime<Utc>>,
    pub window_end: Option<DateTime<Utc>>,
    pub last_processed: Option<Watermark>,
    pub force_remigrate: bool,
    pub explicit_completion: bool,
    pub max_attempts: u32,
    pub result: Option<Spec>,
    pub acknowledgement: Option<Acknowledgement>,
    /// The SUCCEEDED run whose `last_processed` is `window_start`.
    #[serde(default)]
    pub window_start_run_id: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub owner: String,
    pub fencing_token: u64,
    pub acquire_time: DateTime<Utc>,
    pub expire_time: DateTime<Utc>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    pub items_processed: i64,
    pub items_failed: i64,
    pub items_estimated: i64,
    pub counters: BTreeMap<String, i64>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Unit {
    pub run_id: String,
    pub job_name: String,
    pub unit_key: String,
    pub status: UnitStatus,
    #[serde(with = "serde_bytes_b64")]
    pub checkpoint: Vec<u8>,
    pub progress: Progress,
    pub last_error: String,
    pub attempts: u32,
    /// Highest fencing token handed out for this unit; the next claim gets +1.
    pub fencing_token: u64,
    pub lease: Option<Lease>,
    pub after_unit_keys: Vec<String>,
    pub result: Option<Spec>,
    pub create_time: DateTime<Utc>,
    pub update_time: DateTime<Utc>,
    /// When a unit that failed retryably may be claimed again; `None` once
    /// claimed (and for units stored before it existed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_time: Option<DateTime<Utc>>,
}

/// How an explicit-completion run ends once its units are done.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunEnd {
    /// `None`: SUCCEEDED; else FAILED with this error.
    pub error: Option<String>,
    /// Where a SUCCEEDED run stopped, as CompleteRun's `last_processed`.
    pub last_processed: Option<Watermark>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Change {
    RunStatus {
        from: Option<RunStatus>,
        to: RunStatus,
    },
    UnitStatus {
        from: Option<UnitStatus>,
        to: UnitStatus,
    },
    Route {
        from: Option<RouteTarget>,
        to: RouteTarget,
        revision: u64,
    },
    JobUpdate {
        revision: u64,
        fields: Vec<String>,
    },
}

/// One recorded transition: what changed, when, by whom and why.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Transition {
    pub sequence: u64,
    pub job_name: String,
    pub run_id: String,
    pub unit_key: String,
    pub time: DateTime<Utc>,
    pub actor: String,
    pub reason: String,
    pub fencing_token: u64,
    pub change: Change,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    pub job_name: String,
    /// Empty: the job-wide route.
    pub unit_key: String,
    pub target: RouteTarget,
    pub revision: u64,
    pub update_time: Option<DateTime<Utc>>,
    pub actor: String,
    pub reason: String,
}

/// Unit counts of a run by status.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UnitCounts {
    pub total: i64,
    pub not_migrated: i64,
    pub in_progress: i64,
    pub migrated: i64,
    pub failed: i64,
    pub rolled_back: i64,
}

impl UnitCounts {
    pub fn add(&mut self, status: UnitStatus) {
        self.total += 1;
        match status {
            UnitStatus::NotMigrated => self.not_migrated += 1,
            UnitStatus::InProgress => self.in_progress += 1,
            UnitStatus::Migrated => self.migrated += 1,
            UnitStatus::Failed => self.failed += 1,
            UnitStatus::RolledBack => self.rolled_back += 1,
        }
    }
}

/// A run with what it is made of, as the API shows it.
#[derive(Clone, Debug, PartialEq)]
pub struct RunView {
    pub run: Run,
    pub units: UnitCounts,
    pub totals: Progress,
}

/// Job names: letters, digits and `-_./:`, up to 200 characters.
pub fn valid_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("must not be empty".to_owned());
    }
    if name.len() > 200 {
        return Err("must be at most 200 characters".to_owned());
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || "-_./:".contains(*c)))
    {
        return Err(format!("contains {c:?}; use letters, digits and - _ . / :"));
    }
    Ok(())
}

/// Unit keys: any non-empty text up to
/// [`MAX_UNIT_KEY_BYTES`](crate::limits::MAX_UNIT_KEY_BYTES) without control
/// characters.
pub fn valid_unit_key(key: &str) -> Result<(), String> {
    use crate::limits::MAX_UNIT_KEY_BYTES;
    if key.is_empty() {
        return Err("must not be empty".to_owned());
    }
    if key.len() > MAX_UNIT_KEY_BYTES {
        return Err(format!("must be at most {MAX_UNIT_KEY_BYTES} bytes"));
    }
    if key.chars().any(char::is_control) {
        return Err("must not contain control characters".to_owned());
    }
    Ok(())
}

mod serde_bytes_b64 {
    use base64::Engine as _;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        base64::engine::general_purpose::STANDARD
            .decode(String::deserialize(d)?)
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unit_state_machine() {
        use UnitStatus::*;
        assert!(NotMigrated.can_become(InProgress));
        assert!(InProgress.can_become(Migrated));
        assert!(
            !Migrated.can_become(InProgress),
            "a migrated unit is never claimed again"
        );
        assert!(!Migrated.can_become(NotMigrated));
        assert!(!RolledBack.can_become(InProgress));
        assert!(Failed.can_become(RolledBack));
    }

    #[test]
    fn names_are_checked() {
        assert!(valid_name("pipeline/orders-to-es").is_ok());
        assert!(valid_name("").is_err());
        assert!(valid_name("a b").unwrap_err().contains("' '"));
        assert!(valid_unit_key("course-17").is_ok());
        assert!(valid_unit_key("bad\nkey").is_err());
    }
}
