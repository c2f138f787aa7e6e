//! How results look: text for people, JSON for scripts. Every table, JSON
//! shape and summary line of the commands lives here, so two commands that
//! show the same thing show it the same way.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use tidemark_client::spec::std_duration;
use tidemark_client::{
    CutoverError, CutoverPlan, CutoverReport, Precondition, Step, StepOutcome, StepRecord,
    WindowStatus, state_name, verdict_name,
};
use tidemark_proto::job_tracker::v1 as jt;
use tidemark_proto::replicator::v1 as rp;
use tidemark_proto::stats_aggregator::v1 as sa;
use tidemark_proto::verifier::v1 as vf;

/// `--output`: text for people, JSON for scripts.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Output {
    #[default]
    Text,
    Json,
}

impl Output {
    pub fn print(self, json: &Value, text: impl FnOnce() -> String) {
        match self {
            Self::Json => println!(
                "{}",
                serde_json::to_string_pretty(json).expect("JSON values serialise")
            ),
            Self::Text => print!("{}", text()),
        }
    }
}

/// Left-aligned columns, two spaces apart.
pub fn table(header: &[&str], rows: impl IntoIterator<Item = Vec<String>>) -> String {
    let rows: Vec<Vec<String>> = rows.into_iter().collect();
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: &mut dyn Iterator<Item = &str>| {
        let parts: Vec<String> = cells
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        format!("{}\n", parts.join("  ").trim_end())
    };
    let mut out = line(&mut header.iter().copied());
    for row in rows {
        out.push_str(&line(&mut row.iter().map(String::as_str)));
    }
    out
}

// Names and times.

pub fn time(t: Option<&prost_types::Timestamp>) -> String {
    t.and_then(|t| DateTime::<Utc>::from_timestamp(t.seconds, u32::try_from(t.nanos).unwrap_or(0)))
        .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
        .unwrap_or_default()
}

/// `RUN_STATUS_FAILED_ACKNOWLEDGED` → `failed-acknowledged`.
pub fn enum_name(name: &str, prefix: &str) -> String {
    name.strip_prefix(prefix)
        .unwrap_or(name)
        .to_ascii_lowercase()
        .replace('_', "-")
}

pub fn run_status(v: i32) -> String {
    jt::RunStatus::try_from(v).map_or_else(
        |_| v.to_string(),
        |s| enum_name(s.as_str_name(), "RUN_STATUS_"),
    )
}

pub fn unit_status(v: i32) -> String {
    jt::UnitStatus::try_from(v).map_or_else(
        |_| v.to_string(),
        |s| enum_name(s.as_str_name(), "UNIT_STATUS_"),
    )
}

fn job_kind(v: i32) -> String {
    jt::JobKind::try_from(v).map_or_else(
        |_| v.to_string(),
        |s| enum_name(s.as_str_name(), "JOB_KIND_"),
    )
}

/// A step's time, to the hundredth of a second.
pub fn secs(d: Duration) -> String {
    format!("{:.2}s", d.as_secs_f64())
}

/// Text only: what started, on stderr, so stdout keeps just the result.
pub fn announce(out: Output, said: &str) {
    if out == Output::Text {
        eprintln!("{said}");
    }
}

// Jobs and runs.

pub fn run_json(r: &jt::Run) -> Value {
    let units = r.units.unwrap_or_default();
    json!({
        "run_id": r.run_id, "status": run_status(r.status), "reason": r.status_reason,
        "trigger": r.trigger, "created": time(r.create_time.as_ref()), "finished": time(r.finish_time.as_ref()),
        "units": {"total": units.total, "not_migrated": units.not_migrated, "in_progress": units.in_progress,
                  "migrated": units.migrated, "failed": units.failed, "rolled_back": units.rolled_back},
        "items_processed": r.items_processed, "window_start": time(r.window_start.as_ref()),
        "last_processed": time(r.last_processed.as_ref().and_then(|w| w.time.as_ref())),
    })
}

fn job_json(j: &jt::Job) -> Value {
    json!({
        "name": j.name, "kind": job_kind(j.kind), "description": j.description, "revision": j.revision,
        "schedule": j.schedule.as_ref().map(|s| s.cron.clone()), "next_run": time(j.next_run_time.as_ref()),
        "blocking_run_id": j.blocking_run_id, "last_run": j.last_run.as_ref().map(run_json),
    })
}

fn units_text(r: &jt::Run) -> String {
    let u = r.units.unwrap_or_default();
    format!(
        "{}/{} migrated, {} failed, {} rolled back, {} in progress",
        u.migrated, u.total, u.failed, u.rolled_back, u.in_progress
    )
}

/// `tidemark jobs ls`.
pub fn jobs(out: Output, jobs: &[jt::Job]) {
    out.print(&Value::Array(jobs.iter().map(job_json).collect()), || {
        table(
            &["JOB", "KIND", "LAST RUN", "UNITS", "GATE"],
            jobs.iter().map(|j| {
                let last = j.last_run.as_ref();
                vec![
                    j.name.clone(),
                    job_kind(j.kind),
                    last.map(|r| run_status(r.status))
                        .unwrap_or_else(|| "-".into()),
                    last.map(units_text).unwrap_or_default(),
                    if j.blocking_run_id.is_empty() {
                        String::new()
                    } else {
                        format!("blocked by {}", j.blocking_run_id)
                    },
                ]
            }),
        )
    });
}

/// `tidemark jobs show`: the job, its recent runs and the failed units of
/// the latest.
pub fn job(out: Output, job: &jt::Job, runs: &[jt::Run], failed_units: &[jt::Unit]) {
    let mut value = job_json(job);
    value["runs"] = Value::Array(runs.iter().map(run_json).collect());
    value["failed_units"] = Value::Array(
        failed_units.iter().map(|u| json!({"unit": u.unit_key, "status": unit_status(u.status), "error": u.last_error})).collect(),
    );
    out.print(&value, || job_text(job, runs, failed_units));
}

fn job_text(job: &jt::Job, runs: &[jt::Run], failed_units: &[jt::Unit]) -> String {
    let mut text = format!(
        "job {} ({}), revision {}\n",
        job.name,
        job_kind(job.kind),
        job.revision
    );
    if !job.description.is_empty() {
        text.push_str(&format!("  {}\n", job.description));
    }
    if let Some(s) = &job.schedule {
        text.push_str(&format!(
            "  schedule: {} {}; next run {}\n",
            s.cron,
            s.time_zone,
            time(job.next_run_time.as_ref())
        ));
    }
    if !job.blocking_run_id.is_empty() {
        text.push_str(&format!(
            "  BLOCKED by failed run {}: acknowledge with `tidemark jobs ack {} --reason \"...\"`\n",
            job.blocking_run_id, job.name
        ));
    }
    text.push_str(&table(
        &["RUN", "STATUS", "CREATED", "UNITS", "REASON"],
        runs.iter().map(|r| {
            vec![
                r.run_id.clone(),
                run_status(r.status),
                time(r.create_time.as_ref()),
                units_text(r),
                r.status_reason.clone(),
            ]
        }),
    ));
    for u in failed_units {
        text.push_str(&format!(
            "  unit {} {}: {}\n",
            u.unit_key,
            unit_status(u.status),
            u.last_error
        ));
    }
    text
}

/// `tidemark jobs ack`.
pub fn acknowledged(out: Output, job: &str, run: &jt::Run) {
    out.print(&run_json(run), || {
        format!(
            "acknowledged run {} of {job}; the next run may start\n",
            run.run_id
        )
    });
}

fn transition_text(t: &jt::Transition) -> String {
    use jt::transition::Change;
    match &t.change {
        Some(Change::RunStatus(c)) => format!(
            "run {} → {}",
            run_status(c.from_status),
            run_status(c.to_status)
        ),
        Some(Change::UnitStatus(c)) => format!(
            "unit {} → {}",
            unit_status(c.from_status),
            unit_status(c.to_status)
        ),
        Some(Change::Route(c)) => format!(
            "route → {} (revision {})",
            if c.to_target == 2 { "target" } else { "source" },
            c.revision
        ),
        Some(Change::JobUpdate(c)) => {
            format!("job revision {} ({})", c.revision, c.fields.join(", "))
        }
        None => String::new(),
    }
}

/// `tidemark jobs history`.
pub fn history(out: Output, all: &[jt::Transition]) {
    let values: Vec<Value> = all
        .iter()
        .map(|t| json!({"time": time(t.time.as_ref()), "run_id": t.run_id, "unit": t.unit_key, "change": transition_text(t),
                         "actor": t.actor, "reason": t.reason, "fencing_token": t.fencing_token}))
        .collect();
    out.print(&Value::Array(values), || {
        table(
            &["TIME", "RUN", "UNIT", "CHANGE", "ACTOR", "REASON"],
            all.iter().map(|t| {
                vec![
                    time(t.time.as_ref()),
                    t.run_id.clone(),
                    t.unit_key.clone(),
                    transition_text(t),
                    t.actor.clone(),
                    t.reason.clone(),
                ]
            }),
        )
    });
}

fn counters_text(run: &jt::Run) -> String {
    let mut c: Vec<String> = run
        .counters
        .iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect();
    c.sort();
    c.join(", ")
}

/// A run started and not followed (--no-wait); a migration also lists the
/// units it skipped.
pub fn run_started(out: Output, job: &str, run_id: &str, already_migrated: Option<&[String]>) {
    let mut value = json!({"job": job, "run_id": run_id});
    if let Some(units) = already_migrated {
        value["already_migrated"] = json!(units);
    }
    out.print(&value, || {
        format!("started run {run_id} of {job}; follow it with `tidemark jobs show {job}`\n")
    });
}

/// A run followed to its end.
pub fn run_finished(out: Output, job: &str, run: &jt::Run) {
    let mut value = run_json(run);
    value["job"] = Value::from(job.to_owned());
    value["counters"] = json!(run.counters);
    out.print(&value, || {
        format!(
            "run {} of {job}: {} ({})\n",
            run.run_id,
            run_status(run.status),
            counters_text(run)
        )
    });
}

/// What `tidemark migrate-units` says it started, on stderr.
pub fn migrating(job: &str, units: usize, started: &rp::MigrateUnitResponse) -> String {
    format!(
        "migrating {units} units of {job} (run {}){}",
        started.run_id,
        if started.already_migrated_unit_keys.is_empty() {
            String::new()
        } else {
            format!(
                "; already migrated, skipped: {}",
                started.already_migrated_unit_keys.join(", ")
            )
        }
    )
}

/// A migration run followed to its end, unit by unit.
pub fn migration_finished(
    out: Output,
    job: &str,
    run: &jt::Run,
    already_migrated: &[String],
    units: &[jt::Unit],
) {
    let mut value = run_json(run);
    value["job"] = Value::from(job.to_owned());
    value["already_migrated"] = json!(already_migrated);
    value["unit_results"] = Value::Array(
        units
            .iter()
            .map(|u| {
                json!({"unit": u.unit_key, "status": unit_status(u.status), "error": u.last_error,
                       "items": u.items_processed, "counters": u.counters})
            })
            .collect(),
    );
    out.print(&value, || {
        format!(
            "run {} of {job}: {}\n{}",
            run.run_id,
            run_status(run.status),
            table(
                &["UNIT", "STATUS", "ITEMS", "ERROR"],
                units.iter().map(|u| {
                    vec![
                        u.unit_key.clone(),
                        unit_status(u.status),
                        u.items_processed.to_string(),
                        u.last_error.clone(),
                    ]
                })
            )
        )
    });
}

/// An extract job created without a run.
pub fn extract_ready(out: Output, job: &str, cron: &str) {
    out.print(&json!({"job": job, "schedule": cron}), || {
        format!(
            "extract job {job} is ready{}; start a run with `tidemark jobs run {job}`\n",
            if cron.is_empty() {
                String::new()
            } else {
                format!(", scheduled \"{cron}\"")
            },
        )
    });
}

// Pipelines and lag.

fn sink_names(p: &rp::Pipeline) -> Vec<String> {
    let spec = p.spec.clone().unwrap_or_default();
    spec.sinks.iter().map(|s| s.name.clone()).collect()
}

fn pipeline_json(p: &rp::Pipeline) -> Value {
    json!({
        "name": p.name, "state": state_name(p.state), "reason": p.state_reason, "job": p.job_name,
        "run_id": p.run_id, "dead_letters": p.dead_letter_count, "created": time(p.create_time.as_ref()),
        "sinks": sink_names(p),
    })
}

/// A pipeline and one line about it.
pub fn pipeline(out: Output, p: &rp::Pipeline, text: impl FnOnce(&rp::Pipeline) -> String) {
    out.print(&pipeline_json(p), || text(p));
}

/// `tidemark replicate create --validate-only`: what the replicator checked.
pub fn pipeline_valid(out: Output, p: &rp::Pipeline, checks: &[String]) {
    let mut value = pipeline_json(p);
    value["checks"] = json!(checks);
    out.print(&value, || {
        let mut text = format!(
            "pipeline {} is valid ({}); nothing was created\n",
            p.name,
            state_name(p.state)
        );
        for line in checks {
            text.push_str(&format!("  ok  {line}\n"));
        }
        text
    });
}

/// `tidemark replicate ls`.
pub fn pipelines(out: Output, all: &[rp::Pipeline]) {
    out.print(
        &Value::Array(all.iter().map(pipeline_json).collect()),
        || {
            table(
                &["PIPELINE", "STATE", "SINKS", "DEAD LETTERS", "REASON"],
                all.iter().map(|p| {
                    vec![
                        p.name.clone(),
                        state_name(p.state),
                        sink_names(p).join(","),
                        p.dead_letter_count.to_string(),
                        p.state_reason.clone(),
                    ]
                }),
            )
        },
    );
}

/// One line of a pipeline's lag.
pub fn lag_line(l: &rp::PipelineLag) -> String {
    let behind = l
        .records_behind
        .map_or_else(|| "? records".to_owned(), |r| format!("{r} records"));
    let secs = l
        .max_time_behind
        .as_ref()
        .map_or(0.0, |d| d.seconds as f64 + f64::from(d.nanos) / 1e9);
    format!(
        "{} {}: {behind}, {secs:.1}s behind over {} partitions{}",
        l.pipeline_name,
        state_name(l.state),
        l.partitions.len(),
        if l.caught_up { ", caught up" } else { "" }
    )
}

fn lag_json(l: &rp::PipelineLag) -> Value {
    json!({
        "pipeline": l.pipeline_name, "state": state_name(l.state), "caught_up": l.caught_up,
        "records_behind": l.records_behind,
        "seconds_behind": std_duration(l.max_time_behind.as_ref()).as_secs_f64(),
        "partitions": l.partitions.iter().map(|p| json!({
            "partition": p.partition, "records_behind": p.records_behind,
            "seconds_behind": std_duration(p.time_behind.as_ref()).as_secs_f64(),
            "caught_up": p.caught_up, "owner": p.owner, "closed": p.closed,
        })).collect::<Vec<_>>(),
    })
}

/// `tidemark replicate lag`: the lag per partition.
pub fn lag(out: Output, l: &rp::PipelineLag) {
    out.print(&lag_json(l), || {
        format!(
            "{}\n{}",
            lag_line(l),
            table(
                &["PARTITION", "BEHIND", "TIME", "CAUGHT UP", "OWNER"],
                l.partitions.iter().map(|p| {
                    vec![
                        p.partition.clone(),
                        p.records_behind
                            .map_or_else(|| "?".to_owned(), |r| r.to_string()),
                        format!("{:.1}s", std_duration(p.time_behind.as_ref()).as_secs_f64()),
                        if p.caught_up { "yes" } else { "no" }.to_owned(),
                        p.owner.clone(),
                    ]
                })
            )
        )
    });
}

/// `tidemark replicate drain`: lag 0 and how long it took.
pub fn drained(out: Output, name: &str, r: &rp::DrainResponse) {
    let elapsed = std_duration(r.elapsed.as_ref());
    let mut value = lag_json(&r.lag.clone().unwrap_or_default());
    value["elapsed_seconds"] = json!(elapsed.as_secs_f64());
    out.print(&value, || {
        format!(
            "pipeline {name} drained (lag 0) in {:.1}s\n",
            elapsed.as_secs_f64()
        )
    });
}

// The stats-aggregator.

/// `tidemark stats ingest`: the totals and each rejected event.
pub fn ingested(
    out: Output,
    accepted: i64,
    duplicates: i64,
    rejected: i64,
    rejections: &[sa::Rejection],
) {
    let value = json!({
        "accepted": accepted, "duplicates": duplicates, "rejected": rejected,
        "rejections": rejections.iter().map(|r| json!({"index": r.event_index, "event_id": r.event_id, "field": r.field, "reason": r.description})).collect::<Vec<_>>(),
    });
    out.print(&value, || {
        let mut text =
            format!("{accepted} accepted, {duplicates} duplicates, {rejected} rejected\n");
        for r in rejections {
            text.push_str(&format!(
                "  event {} ({}): {} {}\n",
                r.event_index, r.event_id, r.field, r.description
            ));
        }
        text
    });
}

/// `tidemark stats get`.
pub fn entity_stats(out: Output, r: &sa::GetStatsResponse) {
    let mut names: Vec<&String> = r.metrics.keys().collect();
    names.sort();
    let value = json!({
        "entity": r.entity_key, "version": r.version, "last_flush_sequence": r.last_flush_sequence,
        "metrics": r.metrics.iter().map(|(k, m)| (k.clone(), json!({
            "stored": m.stored_value, "pending_delta": m.pending_delta,
            "pending_replace": m.pending_replace, "effective": m.effective_value,
        }))).collect::<serde_json::Map<_, _>>(),
    });
    out.print(&value, || {
        format!(
            "{} (version {})\n{}",
            r.entity_key,
            r.version,
            table(
                &["METRIC", "VALUE", "STORED", "PENDING +", "PENDING ="],
                names.iter().map(|k| {
                    let m = &r.metrics[*k];
                    vec![
                        (*k).clone(),
                        m.effective_value.clone(),
                        m.stored_value.clone(),
                        m.pending_delta.to_string(),
                        m.pending_replace.clone().unwrap_or_default(),
                    ]
                })
            )
        )
    });
}

/// `tidemark stats flush`.
pub fn flushed(out: Output, r: &sa::FlushResponse) {
    out.print(
        &json!({"flush_sequence": r.flush_sequence, "items_written": r.items_written, "records_published": r.records_published}),
        || format!("flush #{}: {} items written\n", r.flush_sequence, r.items_written),
    );
}

/// The writers' buffer and pause state.
pub fn buffer_state(out: Output, s: &sa::BufferState) {
    let value = json!({
        "dirty_keys": s.dirty_keys, "pending_events": s.pending_events,
        "last_flush_sequence": s.last_flush_sequence, "last_flush": time(s.last_flush_time.as_ref()),
        "flush_in_progress": s.flush_in_progress, "paused": s.paused, "quiesced": s.quiesced,
        "pause_reason": s.pause_reason, "auto_resume": time(s.auto_resume_time.as_ref()),
    });
    out.print(&value, || {
        format!(
            "writers {}{}; {} events buffered over {} entities; last flush #{} at {}\n",
            if s.paused { "PAUSED" } else { "running" },
            if s.paused {
                format!(
                    " ({}, quiesced={}, resume by itself at {})",
                    s.pause_reason,
                    s.quiesced,
                    time(s.auto_resume_time.as_ref())
                )
            } else {
                String::new()
            },
            s.pending_events,
            s.dirty_keys,
            s.last_flush_sequence,
            time(s.last_flush_time.as_ref())
        )
    });
}

// Verifications.

/// A verification under way, for a progress message.
pub fn verify_progress(r: &vf::Report) -> String {
    format!(
        "verifying: {} items compared, round {}",
        r.items_compared, r.rounds
    )
}

/// A verifier's report, check by check.
pub fn verification(out: Output, r: &vf::Report) {
    out.print(&report_json(r), || report_text(r));
}

fn report_json(r: &vf::Report) -> Value {
    json!({
        "verification_id": r.verification_id, "job": r.job_name, "verdict": verdict_name(r.verdict),
        "items_compared": r.items_compared, "rounds": r.rounds, "error": r.error,
        "started": time(r.start_time.as_ref()), "finished": time(r.finish_time.as_ref()),
        "checks": r.checks.iter().map(|c| {
            let m = c.mismatches.unwrap_or_default();
            json!({
                "name": c.name, "verdict": verdict_name(c.verdict), "detail": c.detail,
                "source_count": c.source_count, "target_count": c.target_count, "error": c.error,
                "missing_in_target": m.missing_in_target, "extra_in_target": m.extra_in_target,
                "stale_version": m.stale_version, "different_content": m.different_content,
                "resolved_on_recheck": c.resolved_on_recheck,
            })
        }).collect::<Vec<_>>(),
    })
}

fn report_text(r: &vf::Report) -> String {
    format!(
        "verification {} ({}): {}, {} items compared\n{}",
        r.verification_id,
        r.job_name,
        verdict_name(r.verdict),
        r.items_compared,
        table(
            &[
                "CHECK",
                "VERDICT",
                "SOURCE",
                "TARGET",
                "MISSING/EXTRA/STALE/DIFFERENT",
                "DETAIL"
            ],
            r.checks.iter().map(|c| {
                let m = c.mismatches.unwrap_or_default();
                vec![
                    c.name.clone(),
                    verdict_name(c.verdict),
                    c.source_count.to_string(),
                    c.target_count.to_string(),
                    format!(
                        "{}/{}/{}/{}",
                        m.missing_in_target,
                        m.extra_in_target,
                        m.stale_version,
                        m.different_content
                    ),
                    if c.error.is_empty() {
                        c.detail.clone()
                    } else {
                        c.error.clone()
                    },
                ]
            })
        )
    )
}

// Cut-overs.

/// One finished step, as a line above the spinner.
pub fn cutover_step(r: &StepRecord) -> String {
    let mark = match r.outcome {
        StepOutcome::Done => "done",
        StepOutcome::Failed => "FAILED",
        StepOutcome::Skipped => "skipped",
    };
    format!(
        "{:<18} {mark:<7} {:>8}  {}",
        r.step.name(),
        secs(r.elapsed),
        r.detail
    )
}

/// A cut-over, rollback or completion that finished (`what` names it).
pub fn cutover_done(out: Output, plan: &CutoverPlan, report: &CutoverReport, what: &str) {
    let value = serde_json::to_value(report).unwrap_or(Value::Null);
    out.print(&json!({"ok": true, "report": value}), || {
        let mut text = format!(
            "{what} {} done: route {} at revision {}; writers paused for {}\n",
            plan.name,
            report.route_job,
            report.route_revision.unwrap_or_default(),
            report
                .writer_pause
                .map_or_else(|| "no time (not paused)".to_owned(), secs)
        );
        if let Some(end) = &report.window_ends {
            text.push_str(&format!(
                "window open until {end}: `tidemark cutover status|rollback|complete PLAN`\n"
            ));
        }
        text
    });
}

/// `tidemark cutover status`.
pub fn cutover_status(out: Output, s: &WindowStatus) {
    let value = serde_json::to_value(s).unwrap_or(Value::Null);
    out.print(&value, || {
        let last = s.last_verification.as_ref().map_or_else(
            || "none yet".to_owned(),
            |v| {
                format!(
                    "{} {} ({} items; missing {}, extra {}, stale {}, different {})",
                    v.verification_id,
                    v.verdict,
                    v.items_compared,
                    v.missing_in_target,
                    v.extra_in_target,
                    v.stale_version,
                    v.different_content
                )
            },
        );
        let rows = vec![
            vec!["state".to_owned(), s.state.clone()],
            vec![
                "route".to_owned(),
                format!(
                    "{} → {} (revision {}, by {} at {}: {})",
                    s.route_job,
                    s.route,
                    s.route_revision,
                    s.route_set_by,
                    s.route_set_at.clone().unwrap_or_default(),
                    s.route_reason
                ),
            ],
            vec![
                "reverse".to_owned(),
                if s.reverse_pipeline.is_empty() {
                    "none".to_owned()
                } else {
                    format!(
                        "{} {} (lag {} records, {:.1}s)",
                        s.reverse_pipeline,
                        s.reverse_state,
                        s.reverse_lag_records,
                        s.reverse_lag_seconds
                    )
                },
            ],
            vec![
                "window".to_owned(),
                s.window_ends.as_ref().map_or_else(
                    || "none".to_owned(),
                    |end| {
                        format!(
                            "until {end} ({} left), next verification {}",
                            secs(Duration::from_secs_f64(
                                s.window_left_seconds.unwrap_or(0.0)
                            )),
                            s.next_verification
                                .clone()
                                .unwrap_or_else(|| "none".to_owned())
                        )
                    },
                ),
            ],
            vec!["last verification".to_owned(), last],
        ];
        format!("cut-over {}\n{}", s.plan, table(&["", ""], rows))
    });
}

/// A cut-over that aborted: scripts get the report of what ran (and was
/// undone) on stdout; people read the error on stderr.
pub fn cutover_aborted(out: Output, e: &CutoverError) {
    if out == Output::Json {
        out.print(
            &json!({"ok": false, "failed_step": e.step, "reason": e.reason,
                    "report": serde_json::to_value(&e.report).unwrap_or(Value::Null)}),
            String::new,
        );
    }
}

/// `tidemark cutover --dry-run`: the steps and every precondition.
pub fn cutover_dry_run(
    out: Output,
    plan: &CutoverPlan,
    steps: &[(Step, String)],
    checks: &[Precondition],
    ok: bool,
) {
    let value = json!({
        "plan": plan.name,
        "steps": steps.iter().map(|(s, what)| json!({
            "step": s.name(), "what": what, "deadline_seconds": s.deadline(&plan.deadlines).as_secs_f64(),
        })).collect::<Vec<_>>(),
        "preconditions": checks,
        "ok": ok,
    });
    out.print(&value, || {
        format!(
            "cut-over plan {}\n{}\npreconditions:\n{}{}",
            plan.name,
            table(
                &["STEP", "DEADLINE", "WHAT"],
                steps.iter().enumerate().map(|(i, (s, what))| {
                    vec![
                        format!("{}. {}", i + 1, s.name()),
                        secs(s.deadline(&plan.deadlines)),
                        what.clone(),
                    ]
                })
            ),
            table(
                &["", "CHECK", "DETAIL"],
                checks.iter().map(|c| {
                    vec![
                        if c.ok { "ok" } else { "FAIL" }.to_owned(),
                        c.check.clone(),
                        c.detail.clone(),
                    ]
                })
            ),
            if ok {
                "all preconditions hold; run it without --dry-run\n"
            } else {
                ""
            }
        )
    });
}
