//! The bounded cut-over (DESIGN.md invariant 9): start replication → wait
//! for its backfill → verify → pause writers → drain to lag 0 → verify again
//! → switch the route → resume writers. Every step has a deadline; a step
//! that fails or misses it aborts the cut-over cleanly — writers resumed,
//! route unchanged — and the error names the step and why. The writer pause
//! is measured and reported.

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tidemark_proto::common::v1 as common;
use tidemark_proto::job_tracker::v1 as jt;
use tidemark_proto::replicator::v1 as rp;
use tidemark_proto::stats_aggregator::v1 as sa;
use tidemark_proto::verifier::v1 as vf;
use tonic::Code;

use crate::ops::state_name;
use crate::spec::{SpecError, StoreSpec, de_duration, parse_value, proto_duration};
use crate::{ClientError, ClientResult, Tidemark};

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
    SwitchRoute,
    ResumeWriters,
}

impl Step {
    pub const ALL: [Self; 8] = [
        Self::StartReplication,
        Self::WaitBackfill,
        Self::Verify,
        Self::PauseWriters,
        Self::Drain,
        Self::FinalVerify,
        Self::SwitchRoute,
        Self::ResumeWriters,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::StartReplication => "start-replication",
            Self::WaitBackfill => "wait-backfill",
            Self::Verify => "verify",
            Self::PauseWriters => "pause-writers",
            Self::Drain => "drain",
            Self::FinalVerify => "final-verify",
            Self::SwitchRoute => "switch-route",
            Self::ResumeWriters => "resume-writers",
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
        }
    }
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// How a step ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum StepOutcome {
    Done,
    Failed,
    /// Not needed by this plan (e.g. no writers to pause).
    Skipped,
}

/// One step's record in the report.
#[derive(Debug, Clone, Serialize)]
pub struct StepRecord {
    pub step: Step,
    pub outcome: StepOutcome,
    #[serde(serialize_with = "ser_secs")]
    pub elapsed: Duration,
    #[serde(serialize_with = "ser_secs")]
    pub deadline: Duration,
    pub detail: String,
}

fn ser_secs<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

fn ser_opt_secs<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => s.serialize_some(&d.as_secs_f64()),
        None => s.serialize_none(),
    }
}

/// What a cut-over did, step by step.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CutoverReport {
    pub plan: String,
    pub pipeline: String,
    pub steps: Vec<StepRecord>,
    /// From the PauseWriters call to ResumeWriters' answer: the longest
    /// writers can have been held (None when writers were not paused).
    #[serde(serialize_with = "ser_opt_secs")]
    pub writer_pause: Option<Duration>,
    /// The verifications run (before the pause, during it).
    pub verification_ids: Vec<String>,
    /// The route job and unit, and the route revision after the switch.
    pub route_job: String,
    pub route_unit: String,
    pub route_revision: Option<u64>,
    /// Writers were resumed after a failure (or at the end).
    pub writers_resumed: bool,
    /// The route is as it was before the cut-over (true unless it switched).
    pub route_unchanged: bool,
}

/// A cut-over that stopped at `step`.
#[derive(Debug, Clone, thiserror::Error)]
#[error("cut-over {plan} aborted at step {step}: {reason}{}", cleanup(self))]
pub struct CutoverError {
    pub plan: String,
    pub step: Step,
    pub reason: String,
    pub report: CutoverReport,
}

fn cleanup(e: &CutoverError) -> String {
    let paused = e.report.writer_pause.is_some() || e.step == Step::PauseWriters;
    let mut out = String::new();
    if paused {
        out.push_str(if e.report.writers_resumed {
            "; writers resumed"
        } else {
            "; WRITERS NOT RESUMED (they resume by themselves at the pause's max duration; `tidemark stats resume` resumes them now)"
        });
    }
    out.push_str(if e.report.route_unchanged {
        "; route unchanged"
    } else {
        "; ROUTE SWITCHED"
    });
    out
}

/// What a cut-over reports as it goes (progress bars, logs).
#[derive(Debug, Clone)]
pub enum CutoverEvent {
    StepStarted { step: Step, deadline: Duration },
    StepFinished(StepRecord),
    Lag(rp::PipelineLag),
    Report(vf::Report),
}

/// One precondition checked by a dry run.
#[derive(Debug, Clone, Serialize)]
pub struct Precondition {
    pub check: String,
    pub ok: bool,
    pub detail: String,
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
        self.pipeline_spec()?;
        self.verification_spec()?;
        self.pause_mode()?;
        if self.deadlines.drain > Duration::from_secs(3600) {
            return Err(SpecError::new("deadlines.drain", "at most 1h"));
        }
        if self.max_pause() > Duration::from_secs(3600) {
            return Err(SpecError::new(
                "deadlines",
                "pause_writers + drain + final_verify + switch_route + resume_writers must stay under 1h (the writers' longest pause)",
            ));
        }
        for step in Step::ALL {
            if step.deadline(&self.deadlines).is_zero() {
                return Err(SpecError::new(
                    format!("deadlines.{}", step.name().replace('-', "_")),
                    "must be positive",
                ));
            }
        }
        Ok(())
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
        let d = &self.deadlines;
        d.pause_writers
            + d.drain
            + d.final_verify
            + d.switch_route
            + d.resume_writers
            + Duration::from_secs(30)
    }

    fn pause_mode(&self) -> Result<sa::PauseMode, SpecError> {
        match self.writers.mode.as_str() {
            "" | "buffer" => Ok(sa::PauseMode::Buffer),
            "reject" => Ok(sa::PauseMode::Reject),
            other => Err(SpecError::new(
                "writers.mode",
                format!("{other:?}: expected buffer or reject"),
            )),
        }
    }

    /// The pipeline as CreatePipeline takes it.
    ///
    /// # Errors
    /// A field that cannot be sent.
    pub fn pipeline_spec(&self) -> Result<rp::PipelineSpec, SpecError> {
        let p = &self.pipeline;
        let start = match p.start_position.as_str() {
            "" | "latest" => rp::StartPosition::Latest,
            "trim-horizon" => rp::StartPosition::TrimHorizon,
            other => {
                return Err(SpecError::new(
                    "pipeline.start_position",
                    format!("{other:?}: expected latest or trim-horizon"),
                ));
            }
        } as i32;
        let feed = match (p.feed.as_str(), p.source.kind()) {
            ("dynamodb-streams", _) | ("", "dynamodb") => {
                rp::change_feed::Feed::DynamodbStreams(rp::DynamoDbStreamsFeed {
                    start_position: start,
                    readers: 0,
                })
            }
            ("embedded-change-log", _) | ("", "sqlite") => {
                rp::change_feed::Feed::EmbeddedChangeLog(rp::EmbeddedChangeLogFeed {
                    start_position: start,
                })
            }
            (kafka, _) if kafka.starts_with("kafka:") => {
                let topic: StoreSpec = kafka
                    .parse()
                    .map_err(|e: SpecError| e.under("pipeline.feed"))?;
                let Some(common::data_store::Store::KafkaTopic(t)) = topic.to_proto().store else {
                    unreachable!("kafka: parses as a topic")
                };
                rp::change_feed::Feed::Kafka(rp::KafkaFeed {
                    topic: Some(t),
                    consumer_group: String::new(),
                    start_position: start,
                    consumers: 0,
                })
            }
            (other, _) => {
                return Err(SpecError::new(
                    "pipeline.feed",
                    format!(
                        "{other:?}: expected dynamodb-streams, embedded-change-log or kafka:TOPIC"
                    ),
                ));
            }
        };
        let mode = match p.backfill.as_str() {
            "" | "tombstones" => rp::BackfillMode::Tombstones,
            "watermark" => rp::BackfillMode::Watermark,
            "touch" => rp::BackfillMode::Touch,
            "none" => rp::BackfillMode::None,
            other => {
                return Err(SpecError::new(
                    "pipeline.backfill",
                    format!("{other:?}: expected tombstones, watermark, touch or none"),
                ));
            }
        };
        if p.sinks.is_empty() {
            return Err(SpecError::new(
                "pipeline.sinks",
                "at least one sink ([[pipeline.sinks]] with name and store)",
            ));
        }
        Ok(rp::PipelineSpec {
            source: Some(p.source.to_proto()),
            feed: Some(rp::ChangeFeed { feed: Some(feed) }),
            sinks: p
                .sinks
                .iter()
                .map(|s| rp::Sink {
                    name: s.name.clone(),
                    store: Some(s.store.to_proto()),
                    transform: s.transform(),
                    version_attribute: s.version_attribute.clone(),
                })
                .collect(),
            backfill: Some(rp::BackfillOptions {
                mode: mode as i32,
                segments: p.segments,
                ..Default::default()
            }),
            version_attribute: p.version_attribute.clone(),
            dead_letter_store: None,
        })
    }

    fn verified_sink(&self) -> Result<&SinkPlan, SpecError> {
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

    /// The verification both proofs run.
    ///
    /// # Errors
    /// A check that cannot be sent.
    pub fn verification_spec(&self) -> Result<vf::VerificationSpec, SpecError> {
        let sink = self.verified_sink()?;
        let mut checks = Vec::new();
        for (i, c) in self.verify.checks.iter().enumerate() {
            let at = format!("verify.checks[{i}]");
            let kind = match (&c.count, &c.digest, &c.predicate) {
                (Some(n), None, None) => vf::check::Kind::Count(vf::CountCheck {
                    unit_attribute: n.unit_attribute.clone(),
                    unit_keys: n.unit_keys.clone(),
                    index_name: n.index_name.clone(),
                }),
                (None, Some(d), None) => vf::check::Kind::Digest(vf::DigestCheck {
                    buckets: d.buckets,
                    versions_only: d.versions_only,
                }),
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
                    let mut values = std::collections::HashMap::new();
                    for (k, v) in &p.values {
                        values.insert(
                            k.clone(),
                            parse_value(v)
                                .map_err(|e| e.under(&format!("{at}.predicate.values.{k}")))?,
                        );
                    }
                    vf::check::Kind::Predicate(vf::PredicateCheck {
                        side: side as i32,
                        filter_expression: p.filter.clone(),
                        expression_attribute_names: p.names.clone().into_iter().collect(),
                        expression_attribute_values: values,
                        expected_count: p.expected,
                    })
                }
                _ => {
                    return Err(SpecError::new(
                        at,
                        "exactly one of count, digest or predicate",
                    ));
                }
            };
            checks.push(vf::Check {
                name: c.name.clone(),
                kind: Some(kind),
            });
        }
        if checks.is_empty() {
            checks.push(vf::Check {
                name: "content".to_owned(),
                kind: Some(vf::check::Kind::Digest(vf::DigestCheck::default())),
            });
        }
        Ok(vf::VerificationSpec {
            source: Some(self.pipeline.source.to_proto()),
            target: Some(sink.store.to_proto()),
            transform: sink.transform(),
            version_attribute: self.pipeline.version_attribute.clone(),
            checks,
            recheck: Some(vf::RecheckPolicy {
                rounds: self.verify.recheck_rounds,
                min_wait: Some(proto_duration(self.verify.recheck_min_wait)),
                pipeline_name: self.pipeline.name.clone(),
            }),
            repair: false,
            segments: self.verify.segments,
            sample_size: 20,
        })
    }

    /// The plan in words, step by step, for `--dry-run`.
    pub fn describe(&self) -> Vec<(Step, String)> {
        let p = &self.pipeline;
        let d = &self.deadlines;
        let sinks: Vec<String> = p
            .sinks
            .iter()
            .map(|s| format!("{} ({})", s.name, s.store))
            .collect();
        let checks = self
            .verification_spec()
            .map(|v| {
                v.checks
                    .iter()
                    .map(|c| c.name.clone())
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .unwrap_or_default();
        let target = self
            .verified_sink()
            .map(|s| s.name.clone())
            .unwrap_or_default();
        let route = if self.route.unit.is_empty() {
            format!("job-wide route of {}", self.route_job())
        } else {
            format!("route of unit {} of {}", self.route.unit, self.route_job())
        };
        let writers = |what: &str| {
            if self.writers.pause {
                what.to_owned()
            } else {
                "skipped (writers.pause = false)".to_owned()
            }
        };
        let mode = self.pause_mode().unwrap_or(sa::PauseMode::Buffer);
        vec![
            (
                Step::StartReplication,
                format!(
                    "create pipeline {} from {} into {}",
                    p.name,
                    p.source,
                    sinks.join(", ")
                ),
            ),
            (
                Step::WaitBackfill,
                format!("wait until {} streams (backfill done)", p.name),
            ),
            (
                Step::Verify,
                format!("verify {} against sink {target}: {checks}", p.source),
            ),
            (
                Step::PauseWriters,
                writers(&format!(
                    "pause the stats-aggregator's writers ({}; they resume by themselves after {}s)",
                    mode.as_str_name()
                        .trim_start_matches("PAUSE_MODE_")
                        .to_ascii_lowercase(),
                    self.max_pause().as_secs()
                )),
            ),
            (
                Step::Drain,
                format!("drain {} to lag 0 (within {}s)", p.name, d.drain.as_secs()),
            ),
            (Step::FinalVerify, format!("verify again: {checks}")),
            (Step::SwitchRoute, format!("switch the {route} to TARGET")),
            (Step::ResumeWriters, writers("resume the writers")),
        ]
    }
}

impl SinkPlan {
    fn transform(&self) -> Option<common::Transform> {
        if self.projection.is_empty()
            && self.renames.is_empty()
            && self.document_id_template.is_empty()
            && self.index_name_template.is_empty()
        {
            return None;
        }
        Some(common::Transform {
            projection: self.projection.clone(),
            renames: self.renames.clone().into_iter().collect(),
            document_id_template: self.document_id_template.clone(),
            index_name_template: self.index_name_template.clone(),
            filter: None,
        })
    }
}

/// Runs one step under its deadline; the error is the reason in words.
async fn bounded<T>(
    step: Step,
    deadline: Duration,
    fut: impl Future<Output = ClientResult<T>>,
) -> Result<T, String> {
    match tokio::time::timeout(deadline, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(describe_error(&e)),
        Err(_) => Err(format!(
            "missed its deadline of {} (deadlines.{} in the plan)",
            human(deadline),
            step.name().replace('-', "_")
        )),
    }
}

fn describe_error(e: &ClientError) -> String {
    match e {
        ClientError::Rpc(s) => format!("{} ({:?})", s.message(), s.code()),
        other => other.to_string(),
    }
}

fn human(d: Duration) -> String {
    if d < Duration::from_secs(1) {
        format!("{}ms", d.as_millis())
    } else if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{:.1}s", d.as_secs_f64())
    }
}

/// A report whose checks did not all pass, in one line.
fn verdict_failure(report: &vf::Report) -> Option<String> {
    if report.verdict == vf::Verdict::Pass as i32 {
        return None;
    }
    let failed: Vec<String> = report
        .checks
        .iter()
        .filter(|c| c.verdict != vf::Verdict::Pass as i32)
        .map(|c| {
            let m = c.mismatches.unwrap_or_default();
            let why = if c.error.is_empty() {
                format!(
                    "{}; missing in target {}, extra in target {}, stale version {}, different content {}",
                    c.detail,
                    m.missing_in_target,
                    m.extra_in_target,
                    m.stale_version,
                    m.different_content
                )
            } else {
                c.error.clone()
            };
            format!("{} {} ({why})", c.name, verdict_name(c.verdict))
        })
        .collect();
    Some(format!(
        "verification {} did not pass: {}{}",
        report.verification_id,
        failed.join("; "),
        if report.error.is_empty() {
            String::new()
        } else {
            format!("; {}", report.error)
        }
    ))
}

/// `VERDICT_PASS` → `pass`.
pub fn verdict_name(v: i32) -> String {
    vf::Verdict::try_from(v).map_or_else(
        |_| v.to_string(),
        |v| {
            v.as_str_name()
                .trim_start_matches("VERDICT_")
                .to_ascii_lowercase()
        },
    )
}

struct Run<'a> {
    plan: &'a CutoverPlan,
    report: CutoverReport,
    observer: &'a mut (dyn FnMut(CutoverEvent) + Send),
}

impl Run<'_> {
    fn start(&mut self, step: Step) -> (Instant, Duration) {
        let deadline = step.deadline(&self.plan.deadlines);
        (self.observer)(CutoverEvent::StepStarted { step, deadline });
        (Instant::now(), deadline)
    }

    fn finish(&mut self, step: Step, t0: Instant, outcome: StepOutcome, detail: String) {
        let record = StepRecord {
            step,
            outcome,
            elapsed: t0.elapsed(),
            deadline: step.deadline(&self.plan.deadlines),
            detail,
        };
        self.report.steps.push(record.clone());
        (self.observer)(CutoverEvent::StepFinished(record));
    }

    fn abort(mut self, step: Step, t0: Instant, reason: String) -> ClientError {
        self.finish(step, t0, StepOutcome::Failed, reason.clone());
        ClientError::Cutover(Box::new(CutoverError {
            plan: self.plan.name.clone(),
            step,
            reason,
            report: self.report,
        }))
    }
}

impl Tidemark {
    /// Runs a cut-over plan (see the module comment), reporting each step
    /// to `observer`.
    ///
    /// # Errors
    /// [`ClientError::Cutover`] naming the step that failed and why, after
    /// resuming writers and leaving the route as it was;
    /// [`ClientError::Spec`] for a plan that cannot be sent.
    #[allow(
        clippy::too_many_lines,
        reason = "the steps read in order, as the runbook"
    )]
    pub async fn cutover(
        &self,
        plan: &CutoverPlan,
        observer: &mut (dyn FnMut(CutoverEvent) + Send),
    ) -> ClientResult<CutoverReport> {
        plan.validate()?;
        let spec = plan.pipeline_spec()?;
        let verification = plan.verification_spec()?;
        let name = plan.pipeline.name.clone();
        let route_job = plan.route_job();
        let mut run = Run {
            plan,
            report: CutoverReport {
                plan: plan.name.clone(),
                pipeline: name.clone(),
                route_job: route_job.clone(),
                route_unit: plan.route.unit.clone(),
                route_unchanged: true,
                ..CutoverReport::default()
            },
            observer,
        };

        // 1. Start replication (an identical pipeline is returned as is).
        let step = Step::StartReplication;
        let (t0, deadline) = run.start(step);
        let create = rp::CreatePipelineRequest {
            name: name.clone(),
            spec: Some(spec),
            actor: plan.actor.clone(),
            validate_only: false,
        };
        let svc = self.replicator();
        let created = bounded(
            step,
            deadline,
            self.idempotent(|| {
                let mut svc = svc.clone();
                let req = create.clone();
                async move { svc.create_pipeline(req).await }
            }),
        )
        .await;
        match created {
            Ok(r) => {
                let p = r.pipeline.unwrap_or_default();
                let detail = format!("pipeline {} is {}", p.name, state_name(p.state));
                run.finish(step, t0, StepOutcome::Done, detail);
            }
            Err(reason) => return Err(run.abort(step, t0, reason)),
        }

        // 2. Wait for the backfill.
        let step = Step::WaitBackfill;
        let (t0, deadline) = run.start(step);
        let waited = {
            let observer = &mut *run.observer;
            bounded(
                step,
                deadline,
                self.wait_streaming(&name, deadline, |lag| {
                    observer(CutoverEvent::Lag(lag.clone()));
                }),
            )
            .await
        };
        match waited {
            Ok(_) => run.finish(
                step,
                t0,
                StepOutcome::Done,
                "backfill done, streaming".to_owned(),
            ),
            Err(reason) => return Err(run.abort(step, t0, reason)),
        }

        // 3. Verify while writers still run: a cheap early "no" before the
        // pause (re-checks absorb what is still in flight).
        let step = Step::Verify;
        let (t0, deadline) = run.start(step);
        let request = vf::StartVerificationRequest {
            job_name: plan.verification_job(false),
            spec: Some(verification.clone()),
            schedule: None,
            actor: plan.actor.clone(),
            correlation_id: String::new(),
        };
        let verified = {
            let observer = &mut *run.observer;
            bounded(
                step,
                deadline,
                self.verify(request, deadline, |r| {
                    observer(CutoverEvent::Report(r.clone()));
                }),
            )
            .await
        };
        match verified {
            Ok(report) => {
                run.report
                    .verification_ids
                    .push(report.verification_id.clone());
                if let Some(reason) = verdict_failure(&report) {
                    return Err(run.abort(step, t0, reason));
                }
                let detail = format!(
                    "verification {} passed ({} items compared)",
                    report.verification_id, report.items_compared
                );
                run.finish(step, t0, StepOutcome::Done, detail);
            }
            Err(reason) => return Err(run.abort(step, t0, reason)),
        }

        // The route before the switch, to switch only from it (and to
        // restore it if a timed-out switch took effect anyway).
        let before = match self.get_route(&route_job, &plan.route.unit).await {
            Ok(route) => route,
            Err(e) => {
                let reason = format!("cannot read the route to switch: {}", describe_error(&e));
                return Err(run.abort(Step::SwitchRoute, Instant::now(), reason));
            }
        };

        // 4. Pause writers. From here on every failure resumes them.
        let mut paused_at = None;
        if plan.writers.pause {
            let step = Step::PauseWriters;
            let (t0, deadline) = run.start(step);
            paused_at = Some(Instant::now());
            let req = sa::PauseWritersRequest {
                mode: plan.pause_mode()? as i32,
                reason: format!("cutover {}", plan.name),
                max_pause: Some(proto_duration(plan.max_pause())),
            };
            let svc = self.stats();
            let paused = bounded(
                step,
                deadline,
                self.idempotent(|| {
                    let mut svc = svc.clone();
                    let req = req.clone();
                    async move { svc.pause_writers(req).await }
                }),
            )
            .await;
            match paused {
                Ok(r) => {
                    let s = r.state.unwrap_or_default();
                    let detail = format!(
                        "writers paused and quiesced={} ({} events buffered)",
                        s.quiesced, s.pending_events
                    );
                    run.finish(step, t0, StepOutcome::Done, detail);
                }
                Err(reason) => {
                    // A pause that timed out may still have taken effect.
                    self.resume_after_failure(&mut run, paused_at).await;
                    return Err(run.abort(step, t0, reason));
                }
            }
        } else {
            let t0 = Instant::now();
            run.finish(
                Step::PauseWriters,
                t0,
                StepOutcome::Skipped,
                "writers.pause = false".to_owned(),
            );
        }

        // 5. Drain to lag 0.
        let step = Step::Drain;
        let (t0, deadline) = run.start(step);
        match bounded(
            step,
            deadline + Duration::from_secs(5),
            self.drain(&name, deadline),
        )
        .await
        {
            Ok(r) => {
                let lag = r.lag.unwrap_or_default();
                let detail = format!(
                    "lag 0 after {:.1}s",
                    crate::spec::std_duration(r.elapsed.as_ref()).as_secs_f64()
                );
                (run.observer)(CutoverEvent::Lag(lag));
                run.finish(step, t0, StepOutcome::Done, detail);
            }
            Err(reason) => {
                self.resume_after_failure(&mut run, paused_at).await;
                return Err(run.abort(step, t0, reason));
            }
        }

        // 6. Verify again, with the source quiet.
        let step = Step::FinalVerify;
        let (t0, deadline) = run.start(step);
        let request = vf::StartVerificationRequest {
            job_name: plan.verification_job(true),
            spec: Some(verification),
            schedule: None,
            actor: plan.actor.clone(),
            correlation_id: String::new(),
        };
        let verified = {
            let observer = &mut *run.observer;
            bounded(
                step,
                deadline,
                self.verify(request, deadline, |r| {
                    observer(CutoverEvent::Report(r.clone()));
                }),
            )
            .await
        };
        let failure = match verified {
            Ok(report) => {
                run.report
                    .verification_ids
                    .push(report.verification_id.clone());
                verdict_failure(&report).map_or_else(
                    || {
                        Ok(format!(
                            "verification {} passed ({} items compared)",
                            report.verification_id, report.items_compared
                        ))
                    },
                    Err,
                )
            }
            Err(reason) => Err(reason),
        };
        match failure {
            Ok(detail) => run.finish(step, t0, StepOutcome::Done, detail),
            Err(reason) => {
                self.resume_after_failure(&mut run, paused_at).await;
                return Err(run.abort(step, t0, reason));
            }
        }

        // 7. Switch the route, only from the route read before the pause.
        let step = Step::SwitchRoute;
        let (t0, deadline) = run.start(step);
        let req = jt::SetRouteRequest {
            job_name: route_job.clone(),
            unit_key: plan.route.unit.clone(),
            target: jt::RouteTarget::Target as i32,
            actor: plan.actor.clone(),
            reason: format!("cutover {}", plan.name),
            expected_revision: before.revision,
        };
        let mut svc = self.jobs();
        match bounded(step, deadline, async {
            Ok(svc.set_route(req).await?.into_inner())
        })
        .await
        {
            Ok(r) => {
                let route = r.route.unwrap_or_default();
                run.report.route_revision = Some(route.revision);
                run.report.route_unchanged = false;
                let detail = format!("route → TARGET (revision {})", route.revision);
                run.finish(step, t0, StepOutcome::Done, detail);
            }
            Err(reason) => {
                self.restore_route(&mut run, &before).await;
                self.resume_after_failure(&mut run, paused_at).await;
                return Err(run.abort(step, t0, reason));
            }
        }

        // 8. Resume writers.
        if plan.writers.pause {
            let step = Step::ResumeWriters;
            let (t0, deadline) = run.start(step);
            let svc = self.stats();
            let resumed = bounded(
                step,
                deadline,
                self.idempotent(|| {
                    let mut svc = svc.clone();
                    async move {
                        svc.resume_writers(sa::ResumeWritersRequest { flush_now: false })
                            .await
                    }
                }),
            )
            .await;
            run.report.writer_pause = paused_at.map(|t| t.elapsed());
            match resumed {
                Ok(_) => {
                    run.report.writers_resumed = true;
                    let detail = format!(
                        "writers resumed; paused for {:.2}s",
                        run.report.writer_pause.unwrap_or_default().as_secs_f64()
                    );
                    run.finish(step, t0, StepOutcome::Done, detail);
                }
                // The route already switched: that part stands; the writers
                // resume by themselves at max_pause.
                Err(reason) => return Err(run.abort(step, t0, reason)),
            }
        } else {
            let t0 = Instant::now();
            run.finish(
                Step::ResumeWriters,
                t0,
                StepOutcome::Skipped,
                "writers.pause = false".to_owned(),
            );
        }
        Ok(run.report)
    }

    /// Resumes writers after a failed step (retrying within the resume
    /// deadline) and records the pause.
    async fn resume_after_failure(&self, run: &mut Run<'_>, paused_at: Option<Instant>) {
        let Some(paused_at) = paused_at else {
            return;
        };
        let svc = self.stats();
        let resumed = tokio::time::timeout(
            run.plan.deadlines.resume_writers,
            self.idempotent(|| {
                let mut svc = svc.clone();
                async move {
                    svc.resume_writers(sa::ResumeWritersRequest { flush_now: false })
                        .await
                }
            }),
        )
        .await;
        run.report.writer_pause = Some(paused_at.elapsed());
        run.report.writers_resumed = matches!(resumed, Ok(Ok(_)));
        if !run.report.writers_resumed {
            tracing::error!(plan = %run.plan.name, "writers could not be resumed after a failed cut-over step");
        }
    }

    /// After a failed or timed-out switch: if the route did change, set it
    /// back, so the cut-over leaves it as it found it.
    async fn restore_route(&self, run: &mut Run<'_>, before: &jt::Route) {
        let job = run.plan.route_job();
        let unit = run.plan.route.unit.clone();
        let Ok(now) = self.get_route(&job, &unit).await else {
            run.report.route_unchanged = false;
            return;
        };
        if now.revision == before.revision {
            return;
        }
        let back = if before.target == jt::RouteTarget::Unspecified as i32 {
            jt::RouteTarget::Source as i32
        } else {
            before.target
        };
        let req = jt::SetRouteRequest {
            job_name: job,
            unit_key: unit,
            target: back,
            actor: run.plan.actor.clone(),
            reason: format!("cutover {} aborted: route restored", run.plan.name),
            expected_revision: now.revision,
        };
        let restored = self.jobs().set_route(req).await;
        run.report.route_unchanged = restored.is_ok();
    }

    /// The effective route of a unit (or the job-wide route).
    ///
    /// # Errors
    /// NOT_FOUND for an unknown job.
    pub async fn get_route(&self, job: &str, unit: &str) -> ClientResult<jt::Route> {
        let svc = self.jobs();
        let req = jt::GetRouteRequest {
            job_name: job.to_owned(),
            unit_key: unit.to_owned(),
        };
        Ok(self
            .idempotent(|| {
                let mut svc = svc.clone();
                let req = req.clone();
                async move { svc.get_route(req).await }
            })
            .await?
            .route
            .unwrap_or_default())
    }

    /// Checks every precondition of a plan without changing anything:
    /// services reachable, the pipeline absent or identical and healthy,
    /// writers not already paused, verification jobs neither running nor
    /// blocked by a failed run, the route not already switched.
    pub async fn cutover_preflight(&self, plan: &CutoverPlan) -> Vec<Precondition> {
        let mut out = Vec::new();
        let mut check = |check: &str, result: Result<String, String>| {
            let (ok, detail) = match result {
                Ok(d) => (true, d),
                Err(d) => (false, d),
            };
            out.push(Precondition {
                check: check.to_owned(),
                ok,
                detail,
            });
        };
        let spec = match plan.validate().and_then(|()| plan.pipeline_spec()) {
            Ok(spec) => {
                check("plan", Ok("valid".to_owned()));
                Some(spec)
            }
            Err(e) => {
                check("plan", Err(e.to_string()));
                None
            }
        };
        let unreachable = |svc: &str, s: &tonic::Status| {
            matches!(
                s.code(),
                Code::Unavailable | Code::Unimplemented | Code::Unauthenticated | Code::Unknown
            )
            .then(|| format!("{svc} not usable: {} ({:?})", s.message(), s.code()))
        };

        let jobs = self
            .jobs()
            .list_jobs(jt::ListJobsRequest {
                page_size: 1,
                ..Default::default()
            })
            .await;
        check(
            "job-tracker reachable",
            jobs.map(|_| "answers".to_owned()).map_err(|s| {
                unreachable("job-tracker", &s).unwrap_or_else(|| s.message().to_owned())
            }),
        );

        let name = &plan.pipeline.name;
        let pipeline = self
            .replicator()
            .get_pipeline(rp::GetPipelineRequest { name: name.clone() })
            .await;
        check(
            "replicator reachable",
            match &pipeline {
                Err(s) if unreachable("replicator", s).is_some() => {
                    Err(unreachable("replicator", s).unwrap_or_default())
                }
                _ => Ok("answers".to_owned()),
            },
        );
        let exists = pipeline.is_ok();
        match pipeline {
            Ok(r) => {
                let p = r.into_inner().pipeline.unwrap_or_default();
                let same = spec.as_ref().is_none_or(|s| p.spec.as_ref() == Some(s));
                check(
                    "pipeline",
                    if !same {
                        Err(format!(
                            "{name} exists with another spec: CreatePipeline would refuse it (pick another pipeline name or align the plan)"
                        ))
                    } else if p.state == rp::PipelineState::Failed as i32 {
                        Err(format!(
                            "{name} FAILED ({}); `tidemark replicate resume {name}` first",
                            p.state_reason
                        ))
                    } else if p.state == rp::PipelineState::Paused as i32 {
                        Err(format!(
                            "{name} is paused; `tidemark replicate resume {name}` first"
                        ))
                    } else {
                        Ok(format!(
                            "{name} exists with this spec ({})",
                            state_name(p.state)
                        ))
                    },
                );
            }
            Err(s) if s.code() == Code::NotFound => {
                check("pipeline", Ok(format!("{name} will be created")));
            }
            Err(s) => check("pipeline", Err(s.message().to_owned())),
        }
        if let Some(spec) = &spec {
            // The replicator checks the source, its stream or topic and every
            // sink exactly as CreatePipeline would, creating nothing.
            let validated = self
                .replicator()
                .create_pipeline(rp::CreatePipelineRequest {
                    name: name.clone(),
                    spec: Some(spec.clone()),
                    actor: String::new(),
                    validate_only: true,
                })
                .await;
            match validated {
                Ok(r) => {
                    for line in r.into_inner().checks {
                        let (what, detail) = line.split_once(": ").unwrap_or(("stores", &line));
                        check(what, Ok(detail.to_owned()));
                    }
                }
                Err(s) if unreachable("replicator", &s).is_none() => check(
                    "pipeline stores",
                    Err(format!("{} ({:?})", s.message(), s.code())),
                ),
                Err(_) => {}
            }
        }

        if plan.writers.pause {
            let state = self
                .stats()
                .get_buffer_state(sa::GetBufferStateRequest {})
                .await;
            check(
                "stats-aggregator writers",
                match state {
                    Ok(r) => {
                        let s = r.into_inner().state.unwrap_or_default();
                        if s.paused {
                            Err(format!(
                                "already paused ({}); resume them (`tidemark stats resume`) or wait",
                                s.pause_reason
                            ))
                        } else {
                            Ok(format!(
                                "running, {} events buffered, last flush {}",
                                s.pending_events, s.last_flush_sequence
                            ))
                        }
                    }
                    Err(s) => Err(unreachable("stats-aggregator", &s)
                        .unwrap_or_else(|| s.message().to_owned())),
                },
            );
        }

        let probe = self
            .verifier()
            .get_report(vf::GetReportRequest {
                verification_id: "tidemark-preflight-probe".to_owned(),
            })
            .await;
        check(
            "verifier reachable",
            match probe {
                Err(s) if unreachable("verifier", &s).is_some() => {
                    Err(unreachable("verifier", &s).unwrap_or_default())
                }
                _ => Ok("answers".to_owned()),
            },
        );

        for final_one in [false, true] {
            let job = plan.verification_job(final_one);
            let got = self
                .jobs()
                .get_job(jt::GetJobRequest { name: job.clone() })
                .await;
            check(
                &format!("verification job {job}"),
                match got {
                    Err(s) if s.code() == Code::NotFound => Ok("will be created".to_owned()),
                    Err(s) => Err(s.message().to_owned()),
                    Ok(r) => {
                        let j = r.into_inner().job.unwrap_or_default();
                        let active = j.last_run.as_ref().is_some_and(|r| {
                            r.status == jt::RunStatus::Running as i32
                                || r.status == jt::RunStatus::Queued as i32
                        });
                        if !j.blocking_run_id.is_empty() {
                            Err(format!(
                                "blocked by failed run {}: see `tidemark jobs show {job}`, then `tidemark jobs ack {job} --reason ...`",
                                j.blocking_run_id
                            ))
                        } else if active {
                            Err(format!("a run of {job} is still running; wait for it"))
                        } else {
                            Ok("no active run, not blocked".to_owned())
                        }
                    }
                },
            );
        }

        let route_job = plan.route_job();
        if exists || !plan.route.job.is_empty() {
            let route = self.get_route(&route_job, &plan.route.unit).await;
            check(
                "route",
                match route {
                    Ok(r) if r.target == jt::RouteTarget::Target as i32 => Err(format!(
                        "{route_job} already routes to TARGET (revision {}): the cut-over was done",
                        r.revision
                    )),
                    Ok(r) => Ok(format!(
                        "{route_job} routes to SOURCE (revision {})",
                        r.revision
                    )),
                    Err(e) => Err(describe_error(&e)),
                },
            );
        } else {
            check(
                "route",
                Ok(format!(
                    "{route_job} is created with the pipeline (routes to SOURCE)"
                )),
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PLAN: &str = r##"
name = "counters-v2"
actor = "ops"

[pipeline]
name = "counters-v2"
source = "dynamodb:stats"
start_position = "trim-horizon"
version_attribute = "tidemark_version"
segments = 4

[[pipeline.sinks]]
name = "new-table"
store = "dynamodb:stats-v2"

[[pipeline.sinks]]
name = "search"
store = "es:stats-v2"
document_id_template = "{pk}"

[verify]
recheck_rounds = 2
recheck_min_wait = "500ms"

[[verify.checks]]
name = "counts"
count = {}

[[verify.checks]]
name = "content"
digest = { buckets = 64 }

[[verify.checks]]
name = "all-have-views"
predicate = { filter = "attribute_not_exists(#a)", names = { "#a" = "views" }, expected = 0 }

[writers]
mode = "buffer"

[deadlines]
drain = "20s"
final_verify = "1m"
"##;

    #[test]
    fn a_plan_reads_from_toml_into_requests() {
        let plan = CutoverPlan::from_toml(PLAN).unwrap();
        assert_eq!(plan.route_job(), "pipeline/counters-v2");
        assert_eq!(plan.deadlines.drain, Duration::from_secs(20));
        assert_eq!(plan.deadlines.pause_writers, Duration::from_secs(10));
        let spec = plan.pipeline_spec().unwrap();
        assert_eq!(spec.sinks.len(), 2);
        assert_eq!(spec.version_attribute, "tidemark_version");
        assert!(matches!(
            spec.feed.unwrap().feed,
            Some(rp::change_feed::Feed::DynamodbStreams(rp::DynamoDbStreamsFeed { start_position, .. }))
                if start_position == rp::StartPosition::TrimHorizon as i32
        ));
        assert_eq!(
            spec.backfill.unwrap().mode,
            rp::BackfillMode::Tombstones as i32
        );
        assert!(spec.sinks[0].transform.is_none());
        assert_eq!(
            spec.sinks[1]
                .transform
                .as_ref()
                .unwrap()
                .document_id_template,
            "{pk}"
        );
        let v = plan.verification_spec().unwrap();
        assert_eq!(v.checks.len(), 3);
        assert_eq!(v.recheck.unwrap().pipeline_name, "counters-v2");
        assert_eq!(
            v.target,
            Some("dynamodb:stats-v2".parse::<StoreSpec>().unwrap().to_proto())
        );
        let steps: Vec<Step> = plan.describe().into_iter().map(|(s, _)| s).collect();
        assert_eq!(steps, Step::ALL);
        assert_eq!(plan.verification_job(true), "cutover/counters-v2/final");
        // The pause outlives every step after it, so a dead client cannot
        // leave writers paused for ever, nor resume them mid-cut-over.
        assert!(plan.max_pause() > Duration::from_secs(10 + 20 + 60 + 10 + 30));
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

    #[test]
    fn a_failed_verification_says_which_check_and_why() {
        let report = vf::Report {
            verification_id: "v1".into(),
            verdict: vf::Verdict::Fail as i32,
            checks: vec![
                vf::CheckResult {
                    name: "counts".into(),
                    verdict: vf::Verdict::Pass as i32,
                    ..Default::default()
                },
                vf::CheckResult {
                    name: "content".into(),
                    verdict: vf::Verdict::Fail as i32,
                    detail: "3 missing in target".into(),
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        let why = verdict_failure(&report).unwrap();
        assert!(
            why.contains("content fail (3 missing in target; missing in target 0"),
            "{why}"
        );
        assert!(!why.contains("counts"), "{why}");
        assert!(
            verdict_failure(&vf::Report {
                verdict: vf::Verdict::Pass as i32,
                ..Default::default()
            })
            .is_none()
        );
    }

    #[test]
    fn an_abort_says_what_was_cleaned_up() {
        let e = CutoverError {
            plan: "p".into(),
            step: Step::Drain,
            reason: "missed its deadline of 20s".into(),
            report: CutoverReport {
                writer_pause: Some(Duration::from_secs(21)),
                writers_resumed: true,
                route_unchanged: true,
                ..Default::default()
            },
        };
        assert_eq!(
            e.to_string(),
            "cut-over p aborted at step drain: missed its deadline of 20s; writers resumed; route unchanged"
        );
    }

    #[tokio::test]
    async fn a_step_past_its_deadline_fails_with_the_plan_key() {
        let r: Result<(), String> = bounded(Step::Drain, Duration::from_millis(20), async {
            tokio::time::sleep(Duration::from_secs(5)).await;
            Ok(())
        })
        .await;
        assert_eq!(
            r.unwrap_err(),
            "missed its deadline of 20ms (deadlines.drain in the plan)"
        );
    }
}
