//! `tidemark stats`: send counter events to the stats-aggregator, read
//! counters, and handle the writer pause by hand.

use std::io::BufRead as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;
use tidemark_client::Tidemark;
use tidemark_client::spec::{parse_duration, proto_duration};
use tidemark_proto::stats_aggregator::v1 as pb;

use crate::error::{CliError, CliResult};
use crate::output::{self, Output};

#[derive(clap::Subcommand, Debug)]
pub enum StatsCommand {
    /// Send events: one from the flags, or JSON lines from --file (`-`:
    /// stdin), each {"event_id", "entity_key", "metric", "increment": N |
    /// "replace": "V"}. Resending is safe: event ids are deduplicated.
    Ingest(IngestArgs),
    /// An entity's stored counters and what is still buffered.
    Get {
        entity: String,
        /// Only these metrics (repeat).
        #[arg(long = "metric")]
        metrics: Vec<String>,
    },
    /// Flush the buffer to the store now.
    Flush,
    /// Pause the writers (what a cut-over does).
    Pause {
        #[arg(long, value_enum, default_value = "buffer")]
        mode: Mode,
        #[arg(long, default_value = "paused from the command line")]
        reason: String,
        /// Writers resume by themselves after this long.
        #[arg(long, default_value = "10m", value_parser = parse_duration)]
        max_pause: Duration,
    },
    /// Resume paused writers.
    Resume {
        /// Flush at once.
        #[arg(long)]
        flush: bool,
    },
    /// The buffer and pause state.
    State,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum Mode {
    Buffer,
    Reject,
}

#[derive(clap::Args, Debug)]
pub struct IngestArgs {
    /// JSON lines of events; `-` reads stdin.
    #[arg(long, conflicts_with_all = ["entity", "metric"])]
    file: Option<PathBuf>,
    #[arg(long)]
    entity: Option<String>,
    #[arg(long)]
    metric: Option<String>,
    /// Add this amount.
    #[arg(long, allow_hyphen_values = true, conflicts_with = "replace")]
    increment: Option<i64>,
    /// Replace the value (decimal text).
    #[arg(long, allow_hyphen_values = true)]
    replace: Option<String>,
    /// The event id (dedup key); default: generated.
    #[arg(long)]
    event_id: Option<String>,
}

fn event_from_json(line: &str, n: usize) -> Result<pb::Event, CliError> {
    let bad = |why: &str| {
        CliError::invalid(
            format!("event line {n}: {why}"),
            r#"each line is {"event_id": "e1", "entity_key": "c1", "metric": "views", "increment": 1} or with "replace": "4.5""#,
        )
    };
    let v: Value = serde_json::from_str(line).map_err(|e| bad(&e.to_string()))?;
    let s = |k: &str| {
        v.get(k)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned()
    };
    let op = match (v.get("increment"), v.get("replace")) {
        (Some(i), None) => pb::event::Op::Increment(pb::Increment {
            delta: i
                .as_i64()
                .ok_or_else(|| bad("increment must be an integer"))?,
        }),
        (None, Some(r)) => pb::event::Op::Replace(pb::Replace {
            value: r.as_str().map_or_else(|| r.to_string(), str::to_owned),
        }),
        _ => return Err(bad("exactly one of increment or replace")),
    };
    Ok(pb::Event {
        event_id: s("event_id"),
        entity_key: s("entity_key"),
        metric: s("metric"),
        op: Some(op),
        event_time: None,
    })
}

pub async fn run(client: &Tidemark, command: StatsCommand, out: Output) -> CliResult {
    let mut svc = client.stats();
    match command {
        StatsCommand::Ingest(a) => return ingest(client, a, out).await,
        StatsCommand::Get { entity, metrics } => {
            let req = pb::GetStatsRequest {
                entity_key: entity,
                metrics,
            };
            let r = retried!(client, svc, get_stats, req)?;
            output::entity_stats(out, &r);
        }
        StatsCommand::Flush => {
            let r = svc.flush(pb::FlushRequest {}).await?.into_inner();
            output::flushed(out, &r);
        }
        StatsCommand::Pause {
            mode,
            reason,
            max_pause,
        } => {
            let req = pb::PauseWritersRequest {
                mode: match mode {
                    Mode::Buffer => pb::PauseMode::Buffer,
                    Mode::Reject => pb::PauseMode::Reject,
                } as i32,
                reason,
                max_pause: Some(proto_duration(max_pause)),
            };
            let s = retried!(client, svc, pause_writers, req)?
                .state
                .unwrap_or_default();
            output::buffer_state(out, &s);
        }
        StatsCommand::Resume { flush } => {
            let s = retried!(
                client,
                svc,
                resume_writers,
                pb::ResumeWritersRequest { flush_now: flush }
            )?
            .state
            .unwrap_or_default();
            output::buffer_state(out, &s);
        }
        StatsCommand::State => {
            let s = retried!(client, svc, get_buffer_state, pb::GetBufferStateRequest {})?
                .state
                .unwrap_or_default();
            output::buffer_state(out, &s);
        }
    }
    Ok(())
}

async fn ingest(client: &Tidemark, a: IngestArgs, out: Output) -> CliResult {
    let svc = client.stats();
    let events = if let Some(file) = &a.file {
        read_events(file)?
    } else {
        vec![flag_event(a)?]
    };
    let (mut accepted, mut duplicates, mut rejected) = (0, 0, 0);
    let mut rejections = Vec::new();
    // Batches of at most 10000 events, the API's limit per message;
    // each retried as a whole (event ids make that safe).
    for chunk in events.chunks(10_000) {
        let req = pb::IngestBatchRequest {
            events: chunk.to_vec(),
        };
        let r = retried!(client, svc, ingest_batch, req)?;
        accepted += r.accepted_count;
        duplicates += r.duplicate_count;
        rejected += r.rejected_count;
        rejections.extend(r.rejections);
    }
    output::ingested(out, accepted, duplicates, rejected, &rejections);
    if rejected > 0 {
        return Err(CliError::invalid(
            format!("{rejected} events were rejected (the others were accepted)"),
            "fix the fields named above and resend only those events",
        ));
    }
    Ok(())
}

/// Events as JSON lines from a file, or stdin for `-`.
fn read_events(file: &Path) -> Result<Vec<pb::Event>, CliError> {
    let reader: Box<dyn std::io::BufRead> = if file.as_os_str() == "-" {
        Box::new(std::io::stdin().lock())
    } else {
        Box::new(std::io::BufReader::new(std::fs::File::open(file).map_err(
            |e| CliError::invalid(format!("cannot read {}: {e}", file.display()), ""),
        )?))
    };
    let mut events = Vec::new();
    for (i, line) in reader.lines().enumerate() {
        let line = line.map_err(|e| CliError::invalid(e.to_string(), ""))?;
        if !line.trim().is_empty() {
            events.push(event_from_json(&line, i + 1)?);
        }
    }
    Ok(events)
}

/// The one event given by --entity, --metric and --increment or --replace.
fn flag_event(a: IngestArgs) -> Result<pb::Event, CliError> {
    let (Some(entity), Some(metric)) = (a.entity, a.metric) else {
        return Err(CliError::invalid(
            "an event needs --entity and --metric (or --file)",
            "e.g. tidemark stats ingest --entity c1 --metric views --increment 1",
        ));
    };
    let op = match (a.increment, a.replace) {
        (Some(d), None) => pb::event::Op::Increment(pb::Increment { delta: d }),
        (None, Some(v)) => pb::event::Op::Replace(pb::Replace { value: v }),
        _ => {
            return Err(CliError::invalid(
                "an event needs --increment N or --replace V",
                "",
            ));
        }
    };
    Ok(pb::Event {
        event_id: a
            .event_id
            .unwrap_or_else(|| format!("cli-{}-{:016x}", std::process::id(), rand_id())),
        entity_key: entity,
        metric,
        op: Some(op),
        event_time: None,
    })
}

fn rand_id() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    u64::try_from(t.as_nanos() & u128::from(u64::MAX)).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_lines_parse_or_say_what_a_line_looks_like() {
        let e = event_from_json(
            r#"{"event_id": "e1", "entity_key": "c1", "metric": "views", "increment": -2}"#,
            1,
        )
        .unwrap();
        assert_eq!(
            e.op,
            Some(pb::event::Op::Increment(pb::Increment { delta: -2 }))
        );
        let e = event_from_json(
            r#"{"event_id": "e2", "entity_key": "c1", "metric": "score", "replace": 4.5}"#,
            2,
        )
        .unwrap();
        assert_eq!(
            e.op,
            Some(pb::event::Op::Replace(pb::Replace {
                value: "4.5".into()
            }))
        );
        let err = event_from_json(r#"{"event_id": "e3"}"#, 3).unwrap_err();
        assert!(err.to_string().contains("line 3"), "{err}");
    }
}
