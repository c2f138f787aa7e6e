//! The cut-over plan as read from TOML: its types, their defaults, and every
//! check that needs no service. A plan that passes [`CutoverPlan::validate`]
//! converts to requests (`convert.rs`) without an error.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tidemark_proto::common::v1 as common;
use tidemark_proto::replicator::v1 as rp;
use tidemark_proto::stats_aggregator::v1 as sa;
use tidemark_proto::verifier::v1 as vf;

use crate::spec::{SpecError, StoreSpec, de_duration, parse_value};

/// What a cut-over does, read from TOML. See `docs` in the README and
/// [`CutoverPlan::from_toml`].
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CutoverPlan {
    /// Names the plan's verification jobs (`cutover/<name>/...`) and shows in
    /// the writers' pause reason. Job-name characters only.
    pub name: String,
    /// Who runs it; recorded in the histories.
    #[serde(default = "default_actor")]
    pub actor: String,
    /// The replication that carries the source into the new store.
    pub pipeline: PipelinePlan,
    /// The proofs taken before the pause and during it.
    #[serde(default)]
    pub verify: VerifyPlan,
    /// The writer pause (stats-aggregator PauseWriters).
    #[serde(default)]
    pub writers: WritersPlan,
    /// The read route switched to TARGET.
    #[serde(default)]
    pub route: RoutePlan,
    /// A deadline per step.
    #[serde(default)]
    pub deadlines: Deadlines,
    /// Keep the old store current after the switch: before the route
    /// moves, a pipeline `<pipeline>-reverse` copies the new store's
    /// changes back into the old one, so `tidemark cutover rollback` loses
    /// no write made since. Both stores must be DynamoDB tables with
    /// streams.
    #[serde(default)]
    pub reverse: bool,
    /// The monitoring window after the switch; unset: 7 days with an
    /// hourly verification when `reverse` is set, none otherwise.
    #[serde(default)]
    pub window: Option<WindowPlan>,
}

/// The monitoring window: verifications of old against new on a schedule
/// until `tidemark cutover complete` (or the window's end).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WindowPlan {
    /// How long the window lasts, e.g. `7d`.
    #[serde(default = "d_window", deserialize_with = "de_duration")]
    pub length: Duration,
    /// A verification this often (the job-tracker's scheduler starts it):
    /// seconds or minutes dividing a minute or an hour, hours dividing a
    /// day, or `1d`.
    #[serde(default = "d_every", deserialize_with = "de_duration")]
    pub verify_every: Duration,
}

fn d_window() -> Duration {
    Duration::from_secs(7 * 24 * 3600)
}
fn d_every() -> Duration {
    Duration::from_secs(3600)
}

impl Default for WindowPlan {
    fn default() -> Self {
        Self {
            length: d_window(),
            verify_every: d_every(),
        }
    }
}

impl WindowPlan {
    /// `verify_every` as the job-tracker's cron (seconds field first).
    ///
    /// # Errors
    /// A period that no cron expression repeats evenly.
    pub fn cron(&self) -> Result<String, SpecError> {
        let s = self.verify_every.as_secs();
        let bad = || {
            SpecError::new(
                "window.verify_every",
                format!("{s}s: use seconds or minutes dividing 60, hours dividing 24, or 1d"),
            )
        };
        if self.verify_every.subsec_nanos() != 0 || s == 0 {
            return Err(bad());
        }
        Ok(match s {
            1..=59 if 60u64.is_multiple_of(s) => format!("*/{s} * * * * *"),
            60..=3599 if s.is_multiple_of(60) && 60u64.is_multiple_of(s / 60) => {
                format!("0 */{} * * * *", s / 60)
            }
            3600..=86_399 if s.is_multiple_of(3600) && 24u64.is_multiple_of(s / 3600) => {
                format!("0 0 */{} * * *", s / 3600)
            }
            86_400 => "0 0 0 * * *".to_owned(),
            _ => return Err(bad()),
        })
    }
}

fn default_actor() -> String {
    "tidemark-cutover".to_owned()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelinePlan {
    /// The pipeline's name; created if missing, reused if it exists with
    /// the same spec.
    pub name: String,
    /// The source table, e.g. `dynamodb:stats`.
    pub source: StoreSpec,
    /// `dynamodb-streams` (default for DynamoDB sources),
    /// `embedded-change-log` (default for SQLite sources) or `kafka:TOPIC`.
    #[serde(default)]
    pub feed: String,
    /// `latest` (default) or `trim-horizon`.
    #[serde(default)]
    pub start_position: String,
    /// `tombstones` (default), `watermark`, `touch` or `none`.
    #[serde(default)]
    pub backfill: String,
    /// Backfill scan segments; 0: the replicator's default.
    #[serde(default)]
    pub segments: u32,
    /// The source's version attribute kept by Tidemark's own writers (e.g.
    /// `tidemark_version` of the stats-aggregator's table); empty: derived.
    #[serde(default)]
    pub version_attribute: String,
    /// The targets, at least one.
    pub sinks: Vec<SinkPlan>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SinkPlan {
    pub name: String,
    pub store: StoreSpec,
    #[serde(default)]
    pub version_attribute: String,
    #[serde(default)]
    pub projection: Vec<String>,
    #[serde(default)]
    pub renames: BTreeMap<String, String>,
    #[serde(default)]
    pub document_id_template: String,
    #[serde(default)]
    pub index_name_template: String,
    /// For a `kafka:TOPIC` store: `json` (default) or `change-record`.
    #[serde(default)]
    pub kafka_format: String,
    /// For a DynamoDB store: writes in flight per batch, 1 to 256; 0: the
    /// replicator's 16.
    #[serde(default)]
    pub writes_in_flight: u32,
}

impl SinkPlan {
    /// `kafka_format`; validated by [`PipelinePlan::require_sinks`].
    pub(crate) fn kafka_format(&self) -> rp::KafkaMessageFormat {
        match self.kafka_format.as_str() {
            "change-record" => rp::KafkaMessageFormat::ChangeRecord,
            _ => rp::KafkaMessageFormat::Json,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VerifyPlan {
    /// The sink verified against the source; empty: the first.
    #[serde(default)]
    pub sink: String,
    /// The checks; empty: one digest check named `content`.
    #[serde(default)]
    pub checks: Vec<CheckPlan>,
    /// Re-check rounds before a mismatch counts (0: the verifier's 3).
    #[serde(default)]
    pub recheck_rounds: u32,
    /// The least wait between rounds.
    #[serde(default = "default_recheck_wait", deserialize_with = "de_duration")]
    pub recheck_min_wait: Duration,
    /// Scan segments per side (0: the verifier's default).
    #[serde(default)]
    pub segments: u32,
}

fn default_recheck_wait() -> Duration {
    Duration::from_secs(1)
}

impl Default for VerifyPlan {
    fn default() -> Self {
        Self {
            sink: String::new(),
            checks: Vec::new(),
            recheck_rounds: 0,
            recheck_min_wait: default_recheck_wait(),
            segments: 0,
        }
    }
}

/// One check: exactly one of `count`, `digest`, `predicate`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckPlan {
    pub name: String,
    #[serde(default)]
    pub count: Option<CountPlan>,
    #[serde(default)]
    pub digest: Option<DigestPlan>,
    #[serde(default)]
    pub predicate: Option<PredicatePlan>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CountPlan {
    #[serde(default)]
    pub unit_attribute: String,
    #[serde(default)]
    pub unit_keys: Vec<String>,
    #[serde(default)]
    pub index_name: String,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DigestPlan {
    #[serde(default)]
    pub buckets: u32,
    #[serde(default)]
    pub versions_only: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PredicatePlan {
    /// `source` (default) or `target`.
    #[serde(default)]
    pub side: String,
    /// A DynamoDB filter expression, e.g. `attribute_not_exists(#a)`.
    pub filter: String,
    #[serde(default)]
    pub names: BTreeMap<String, String>,
    /// Values in text form (`n:1`, `s:x`).
    #[serde(default)]
    pub values: BTreeMap<String, String>,
    #[serde(default)]
    pub expected: i64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WritersPlan {
    /// Pause the stats-aggregator's writers (false for sources written by
    /// something Tidemark does not control).
    #[serde(default = "yes")]
    pub pause: bool,
    /// `buffer` (events still accepted, flushes stopped; default) or
    /// `reject`.
    #[serde(default)]
    pub mode: String,
}

fn yes() -> bool {
    true
}

impl Default for WritersPlan {
    fn default() -> Self {
        Self {
            pause: true,
            mode: String::new(),
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoutePlan {
    /// The job whose route switches; empty: the pipeline's job
    /// (`pipeline/<name>`).
    #[serde(default)]
    pub job: String,
    /// The unit; empty: the job-wide route.
    #[serde(default)]
    pub unit: String,
}

/// A deadline per step, as text (`30s`, `5m`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Deadlines {
    #[serde(default = "d_start", deserialize_with = "de_duration")]
    pub start_replication: Duration,
    #[serde(default = "d_backfill", deserialize_with = "de_duration")]
    pub backfill: Duration,
    #[serde(default = "d_verify", deserialize_with = "de_duration")]
    pub verify: Duration,
    #[serde(default = "d_pause", deserialize_with = "de_duration")]
    pub pause_writers: Duration,
    #[serde(default = "d_drain", deserialize_with = "de_duration")]
    pub drain: Duration,
    #[serde(default = "d_final", deserialize_with = "de_duration")]
    pub final_verify: Duration,
    #[serde(default = "d_switch", deserialize_with = "de_duration")]
    pub switch_route: Duration,
    #[serde(default = "d_resume", deserialize_with = "de_duration")]
    pub resume_writers: Duration,
    /// Creating the reverse pipeline and seeing its feed read (during the
    /// pause), and scheduling the window's verifications.
    #[serde(default = "d_reverse", deserialize_with = "de_duration")]
    pub start_reverse: Duration,
    /// Stopping the reverse pipeline and ending the window (rollback,
    /// complete).
    #[serde(default = "d_reverse", deserialize_with = "de_duration")]
    pub stop_reverse: Duration,
}

fn d_start() -> Duration {
    Duration::from_secs(30)
}
fn d_backfill() -> Duration {
    Duration::from_secs(30 * 60)
}
fn d_verify() -> Duration {
    Duration::from_secs(10 * 60)
}
fn d_pause() -> Duration {
    Duration::from_secs(10)
}
fn d_drain() -> Duration {
    Duration::from_secs(60)
}
fn d_final() -> Duration {
    Duration::from_secs(60)
}
fn d_switch() -> Duration {
    Duration::from_secs(10)
}
fn d_resume() -> Duration {
    Duration::from_secs(30)
}
fn d_reverse() -> Duration {
    Duration::from_secs(60)
}

impl Default for Deadlines {
    fn default() -> Self {
        Self {
            start_replication: d_start(),
            backfill: d_backfill(),
            verify: d_verify(),
            pause_writers: d_pause(),
            drain: d_drain(),
            final_verify: d_final(),
            switch_route: d_switch(),
            resume_writers: d_resume(),
            start_reverse: d_reverse(),
            stop_reverse: d_reverse(),
        }
    }
}

/// The steps, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Step {
    StartReplication,
    WaitBackfill,
    Verify,
    PauseWriters,
    Drain,
    FinalVerify,
    StartReverse,
    SwitchRoute,
    ResumeWriters,
    StartWindow,
    /// Rollback and complete only.
    StopReverse,
    EndWindow,
}

impl Step {
    /// The forward cut-over's steps, in order.
    pub const ALL: [Self; 10] = [
        Self::StartReplication,
        Self::WaitBackfill,
        Self::Verify,
        Self::PauseWriters,
        Self::Drain,
        Self::FinalVerify,
        Self::StartReverse,
        Self::SwitchRoute,
        Self::ResumeWriters,
        Self::StartWindow,
    ];
    /// A rollback's steps, in order.
    pub const ROLLBACK: [Self; 7] = [
        Self::PauseWriters,
        Self::Drain,
        Self::FinalVerify,
        Self::SwitchRoute,
        Self::ResumeWriters,
        Self::StopReverse,
        Self::EndWindow,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::StartReplication => "start-replication",
            Self::WaitBackfill => "wait-backfill",
            Self::Verify => "verify",
            Self::PauseWriters => "pause-writers",
            Self::Drain => "drain",
            Self::FinalVerify => "final-verify",
            Self::StartReverse => "start-reverse",
            Self::SwitchRoute => "switch-route",
            Self::ResumeWriters => "resume-writers",
            Self::StartWindow => "start-window",
            Self::StopReverse => "stop-reverse",
            Self::EndWindow => "end-window",
        }
    }

    pub fn deadline(self, d: &Deadlines) -> Duration {
        match self {
            Self::StartReplication => d.start_replication,
            Self::WaitBackfill => d.backfill,
            Self::Verify => d.verify,
            Self::PauseWriters => d.pause_writers,
            Self::Drain => d.drain,
            Self::FinalVerify => d.final_verify,
            Self::SwitchRoute => d.switch_route,
            Self::ResumeWriters => d.resume_writers,
            Self::StartReverse | Self::StartWindow => d.start_reverse,
            Self::StopReverse | Self::EndWindow => d.stop_reverse,
        }
    }

    /// The plan key of its deadline.
    pub fn deadline_key(self) -> &'static str {
        match self {
            Self::StartReverse | Self::StartWindow => "start_reverse",
            Self::StopReverse | Self::EndWindow => "stop_reverse",
            _ => match self.name() {
                "start-replication" => "start_replication",
                "wait-backfill" => "backfill",
                "pause-writers" => "pause_writers",
                "final-verify" => "final_verify",
                "switch-route" => "switch_route",
                "resume-writers" => "resume_writers",
                other => other,
            },
        }
    }
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl CutoverPlan {
    /// Reads a plan from TOML text.
    ///
    /// # Errors
    /// Syntax, unknown keys, bad values, or a plan that cannot be sent
    /// (see [`Self::validate`]).
    pub fn from_toml(text: &str) -> Result<Self, SpecError> {
        use figment::providers::{Format as _, Toml};
        let plan: Self = figment::Figment::from(Toml::string(text))
            .extract()
            .map_err(|e| {
                let e = e.into_iter().next().map_or_else(String::new, |e| {
                    let path = e.path.join(".");
                    let msg = e.kind.to_string();
                    if path.is_empty() {
                        msg
                    } else {
                        format!("{path}: {msg}")
                    }
                });
                SpecError::new("plan", e)
            })?;
        plan.validate()?;
        Ok(plan)
    }

    /// Checks everything that can be checked without asking a service.
    ///
    /// # Errors
    /// The first field that cannot be sent, with its path.
    pub fn validate(&self) -> Result<(), SpecError> {
        let job_chars = |s: &str| {
            !s.is_empty()
                && s.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "._:/-".contains(c))
        };
        if !job_chars(&self.name) || self.name.len() > 100 {
            return Err(SpecError::new(
                "name",
                "1-100 ASCII letters, digits and ._:/-, starting with a letter or digit",
            ));
        }
        // In the order the conversions meet them, so the first bad field
        // is the one named.
        self.pipeline.check()?;
        self.verified_sink()?;
        for (i, c) in self.verify.checks.iter().enumerate() {
            c.choice(&format!("verify.checks[{i}]"))?;
        }
        self.pause_mode()?;
        if self.deadlines.drain > Duration::from_secs(3600) {
            return Err(SpecError::new("deadlines.drain", "at most 1h"));
        }
        if self.max_pause() > Duration::from_secs(3600) {
            return Err(SpecError::new(
                "deadlines",
                "pause_writers + drain + final_verify + start_reverse (with reverse) + switch_route + resume_writers must stay under 1h (the writers' longest pause)",
            ));
        }
        for step in Step::ALL.into_iter().chain(Step::ROLLBACK) {
            if step.deadline(&self.deadlines).is_zero() {
                return Err(SpecError::new(
                    format!("deadlines.{}", step.deadline_key()),
                    "must be positive",
                ));
            }
        }
        if self.reverse {
            self.check_reverse()?;
        }
        if let Some(w) = self.window() {
            w.cron()?;
            if w.length < w.verify_every {
                return Err(SpecError::new(
                    "window.length",
                    "must be at least window.verify_every",
                ));
            }
        }
        Ok(())
    }

    /// Both ends of a reverse pipeline must be DynamoDB tables (the new
    /// one's stream is its feed), and its name must fit.
    fn check_reverse(&self) -> Result<(), SpecError> {
        if self.pipeline.source.kind() != "dynamodb" {
            return Err(SpecError::new(
                "reverse",
                "needs a dynamodb: pipeline.source (the reverse pipeline writes back into it)",
            ));
        }
        let sink = self.verified_sink()?;
        if sink.store.kind() != "dynamodb" {
            return Err(SpecError::new(
                "reverse",
                format!(
                    "needs the verified sink to be a dynamodb: table with a stream (the reverse pipeline reads it); {} is {}",
                    sink.name, sink.store
                ),
            ));
        }
        if self.reverse_pipeline().len() > 100 {
            return Err(SpecError::new(
                "pipeline.name",
                "at most 92 characters with reverse = true (the reverse pipeline is <name>-reverse)",
            ));
        }
        Ok(())
    }

    /// The monitoring window this plan opens, if any.
    pub fn window(&self) -> Option<WindowPlan> {
        match (&self.window, self.reverse) {
            (Some(w), _) => Some(w.clone()),
            (None, true) => Some(WindowPlan::default()),
            (None, false) => None,
        }
    }

    /// The pipeline copying the new store back into the old one.
    pub fn reverse_pipeline(&self) -> String {
        format!("{}-reverse", self.pipeline.name)
    }

    /// The scheduled verification job of the monitoring window.
    pub fn window_job(&self) -> String {
        format!("cutover/{}/window", self.name)
    }

    /// The pipeline job whose route switches unless `route.job` says
    /// otherwise.
    pub fn route_job(&self) -> String {
        if self.route.job.is_empty() {
            format!("pipeline/{}", self.pipeline.name)
        } else {
            self.route.job.clone()
        }
    }

    /// The verification job of the proof before (`before-pause`) or during
    /// (`final`) the pause.
    pub fn verification_job(&self, final_one: bool) -> String {
        format!(
            "cutover/{}/{}",
            self.name,
            if final_one { "final" } else { "before-pause" }
        )
    }

    /// Writers resume by themselves after this long, so a cut-over that
    /// dies cannot leave them paused: the rest of the steps' deadlines plus
    /// a margin.
    pub fn max_pause(&self) -> Duration {
        // Saturating: each deadline may be as long as a Duration holds, and
        // validate() refuses a sum past an hour rather than overflowing.
        let d = &self.deadlines;
        [
            d.drain,
            d.final_verify,
            if self.reverse {
                d.start_reverse
            } else {
                Duration::ZERO
            },
            d.switch_route,
            d.resume_writers,
            Duration::from_secs(30),
        ]
        .into_iter()
        .fold(d.pause_writers, Duration::saturating_add)
    }

    /// `writers.mode`.
    pub(crate) fn pause_mode(&self) -> Result<sa::PauseMode, SpecError> {
        match self.writers.mode.as_str() {
            "" | "buffer" => Ok(sa::PauseMode::Buffer),
            "reject" => Ok(sa::PauseMode::Reject),
            other => Err(SpecError::new(
                "writers.mode",
                format!("{other:?}: expected buffer or reject"),
            )),
        }
    }

    /// The sink both proofs compare with the source.
    pub(crate) fn verified_sink(&self) -> Result<&SinkPlan, SpecError> {
        if self.verify.sink.is_empty() {
            self.pipeline
                .sinks
                .first()
                .ok_or_else(|| SpecError::new("pipeline.sinks", "at least one sink"))
        } else {
            self.pipeline
                .sinks
                .iter()
                .find(|s| s.name == self.verify.sink)
                .ok_or_else(|| {
                    SpecError::new(
                        "verify.sink",
                        format!("no sink named {:?} in pipeline.sinks", self.verify.sink),
                    )
                })
        }
    }
}

/// The change feed a plan names.
pub(crate) enum FeedChoice {
    DynamodbStreams,
    EmbeddedChangeLog,
    /// The topic of `kafka:TOPIC`.
    Kafka(StoreSpec),
}

impl PipelinePlan {
    /// `pipeline.start_position`.
    pub(crate) fn start_position(&self) -> Result<rp::StartPosition, SpecError> {
        match self.start_position.as_str() {
            "" | "latest" => Ok(rp::StartPosition::Latest),
            "trim-horizon" => Ok(rp::StartPosition::TrimHorizon),
            other => Err(SpecError::new(
                "pipeline.start_position",
                format!("{other:?}: expected latest or trim-horizon"),
            )),
        }
    }

    /// `pipeline.feed`, defaulting to the source's own feed.
    pub(crate) fn feed_choice(&self) -> Result<FeedChoice, SpecError> {
        match (self.feed.as_str(), self.source.kind()) {
            ("dynamodb-streams", _) | ("", "dynamodb") => Ok(FeedChoice::DynamodbStreams),
            ("embedded-change-log", _) | ("", "sqlite") => Ok(FeedChoice::EmbeddedChangeLog),
            (kafka, _) if kafka.starts_with("kafka:") => kafka
                .parse()
                .map(FeedChoice::Kafka)
                .map_err(|e: SpecError| e.under("pipeline.feed")),
            (other, _) => Err(SpecError::new(
                "pipeline.feed",
                format!("{other:?}: expected dynamodb-streams, embedded-change-log or kafka:TOPIC"),
            )),
        }
    }

    /// `pipeline.backfill`.
    pub(crate) fn backfill_mode(&self) -> Result<rp::BackfillMode, SpecError> {
        match self.backfill.as_str() {
            "" | "tombstones" => Ok(rp::BackfillMode::Tombstones),
            "watermark" => Ok(rp::BackfillMode::Watermark),
            "touch" => Ok(rp::BackfillMode::Touch),
            "none" => Ok(rp::BackfillMode::None),
            other => Err(SpecError::new(
                "pipeline.backfill",
                format!("{other:?}: expected tombstones, watermark, touch or none"),
            )),
        }
    }

    /// `pipeline.sinks` names at least one sink.
    pub(crate) fn require_sinks(&self) -> Result<(), SpecError> {
        if self.sinks.is_empty() {
            return Err(SpecError::new(
                "pipeline.sinks",
                "at least one sink ([[pipeline.sinks]] with name and store)",
            ));
        }
        for (i, s) in self.sinks.iter().enumerate() {
            if !matches!(s.kafka_format.as_str(), "" | "json" | "change-record") {
                return Err(SpecError::new(
                    format!("pipeline.sinks[{i}].kafka_format"),
                    format!("{:?}: expected json or change-record", s.kafka_format),
                ));
            }
        }
        Ok(())
    }

    fn check(&self) -> Result<(), SpecError> {
        self.start_position()?;
        self.feed_choice()?;
        self.backfill_mode()?;
        self.require_sinks()
    }
}

/// A check's one kind, its text fields parsed.
pub(crate) enum CheckChoice<'a> {
    Count(&'a CountPlan),
    Digest(&'a DigestPlan),
    Predicate {
        plan: &'a PredicatePlan,
        side: vf::Side,
        values: HashMap<String, common::AttributeValue>,
    },
}

impl CheckPlan {
    /// The check's kind; `at` is its path in the plan (`verify.checks[0]`).
    pub(crate) fn choice(&self, at: &str) -> Result<CheckChoice<'_>, SpecError> {
        match (&self.count, &self.digest, &self.predicate) {
            (Some(n), None, None) => Ok(CheckChoice::Count(n)),
            (None, Some(d), None) => Ok(CheckChoice::Digest(d)),
            (None, None, Some(p)) => {
                let side = match p.side.as_str() {
                    "" | "source" => vf::Side::Source,
                    "target" => vf::Side::Target,
                    other => {
                        return Err(SpecError::new(
                            format!("{at}.predicate.side"),
                            format!("{other:?}: expected source or target"),
                        ));
                    }
                };
                let mut values = HashMap::new();
                for (k, v) in &p.values {
                    values.insert(
                        k.clone(),
                        parse_value(v)
                            .map_err(|e| e.under(&format!("{at}.predicate.values.{k}")))?,
                    );
                }
                Ok(CheckChoice::Predicate {
                    plan: p,
                    side,
                    values,
                })
            }
            _ => Err(SpecError::new(
                at,
                "exactly one of count, digest or predicate",
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PLAN: &str = include_str!("testdata/plan.toml");

    #[test]
    fn the_readme_plan_reads() {
        // The plan of the README's cut-over section, as users copy it.
        let readme = include_str!("../../../../README.md");
        let section = readme
            .split("### Cut-over plans")
            .nth(1)
            .expect("the README has a cut-over section");
        let plan = section
            .split("```toml\n")
            .nth(1)
            .and_then(|b| b.split("```").next())
            .expect("a toml block");
        let plan = CutoverPlan::from_toml(plan).unwrap();
        assert!(plan.reverse);
        assert_eq!(
            plan.window().unwrap().length,
            Duration::from_secs(7 * 86_400)
        );
    }

    #[test]
    fn deadlines_too_long_to_add_up_are_refused_not_a_panic() {
        // Two deadlines that fit a Duration alone overflowed max_pause()'s
        // sum inside validate() (fuzz/corpus/cutover_plan/huge_deadlines.toml).
        let plan = PLAN.replace(
            "final_verify = \"1m\"",
            "final_verify = \"10000000000000000000s\"\npause_writers = \"10000000000000000000s\"",
        );
        let err = CutoverPlan::from_toml(&plan).unwrap_err();
        assert_eq!(err.field, "deadlines", "{err:?}");
    }

    #[test]
    fn bad_plans_name_the_field() {
        let cases = [
            (
                PLAN.replace(
                    "name = \"counters-v2\"\nactor",
                    "name = \"bad name\"\nactor",
                ),
                "name",
            ),
            (
                PLAN.replace("source = \"dynamodb:stats\"", "source = \"mysql:stats\""),
                "mysql",
            ),
            (PLAN.replace("drain = \"20s\"", "drain = \"soon\""), "soon"),
            (
                PLAN.replace("mode = \"buffer\"", "mode = \"sometimes\""),
                "writers.mode",
            ),
            (
                PLAN.replace("count = {}", "count = {}\ndigest = {}"),
                "verify.checks[0]",
            ),
            (PLAN.replace("segments = 4", "segmnts = 4"), "segmnts"),
            (
                format!("{PLAN}\n[route]\nunit = \"x\"\nflavour = 1\n"),
                "flavour",
            ),
            (
                PLAN.replace("drain = \"20s\"", "drain = \"2h\""),
                "deadlines.drain",
            ),
        ];
        for (text, want) in cases {
            let e = CutoverPlan::from_toml(&text).unwrap_err().to_string();
            assert!(e.contains(want), "{want}: {e}");
        }
    }
}
