//! `tidemark replicate`: pipelines that backfill a live table and follow its
//! change feed into sinks.

use std::time::Duration;

use futures::StreamExt as _;
use serde_json::{Value, json};
use tidemark_client::spec::{parse_duration, std_duration};
use tidemark_client::{StoreSpec, Tidemark, state_name};
use tidemark_proto::replicator::v1 as pb;

use crate::jobs::time;
use crate::output::{CliError, CliResult, Output, table};
use crate::progress;

#[derive(clap::Subcommand, Debug)]
pub enum ReplicateCommand {
    /// Create a pipeline: backfill the source while following its change
    /// feed into the sinks (retrying with the same spec is harmless).
    Create(Box<CreateArgs>),
    /// List pipelines with their state.
    Ls,
    /// Stop reading and writing after the batches in flight.
    Pause {
        name: String,
        #[arg(long, default_value = "paused from the command line")]
        reason: String,
        #[arg(long, env = "USER", default_value = "operator")]
        actor: String,
    },
    /// Resume a paused or failed pipeline from its checkpoints.
    Resume {
        name: String,
        #[arg(long, env = "USER", default_value = "operator")]
        actor: String,
    },
    /// Wait until everything committed to the source so far is in every
    /// sink (lag 0).
    Drain {
        name: String,
        /// How long to wait for lag 0 (at most 1h).
        #[arg(long, default_value = "60s", value_parser = parse_duration)]
        timeout: Duration,
    },
    /// Show a pipeline's lag per shard; --follow keeps watching.
    Lag {
        name: String,
        #[arg(long)]
        follow: bool,
        /// Time between updates with --follow.
        #[arg(long, default_value = "1s", value_parser = parse_duration)]
        interval: Duration,
    },
}

#[derive(clap::Args, Debug)]
pub struct CreateArgs {
    /// The pipeline's name (letters, digits, - and _).
    name: String,
    /// The source table, e.g. dynamodb:documents or sqlite:items?key=pk.
    #[arg(long)]
    source: StoreSpec,
    /// A sink as NAME=STORE, e.g. search=es:documents or
    /// copy=dynamodb:documents-v2 (repeat for several).
    #[arg(long = "sink", required = true, value_parser = parse_sink)]
    sinks: Vec<(String, StoreSpec)>,
    /// The change feed: dynamodb-streams, embedded-change-log or kafka:TOPIC
    /// (default: the source's own).
    #[arg(long, default_value = "")]
    feed: String,
    /// Feed units sharing the feed, each held by any replica: DynamoDB
    /// Streams readers (shards hashed over them) or a Kafka group's
    /// consumers (partitions spread by the group).
    #[arg(long, default_value_t = 1)]
    readers: u32,
    /// Where the feed starts without a checkpoint.
    #[arg(long, value_enum, default_value = "latest")]
    start: Start,
    /// How existing items are copied.
    #[arg(long, value_enum, default_value = "tombstones")]
    backfill: Backfill,
    /// Backfill scan segments (0: the replicator's 8).
    #[arg(long, default_value_t = 0)]
    segments: u32,
    /// Document id of Elasticsearch and S3 sinks, e.g.
    /// "{documentType}#{documentId}" (default: key values joined by #).
    #[arg(long, default_value = "")]
    document_id: String,
    /// The source attribute holding versions kept by Tidemark's own writers.
    #[arg(long, default_value = "")]
    version_attribute: String,
    #[arg(long, env = "USER", default_value = "operator")]
    actor: String,
    /// Check the spec, the source, its feed and every sink as the
    /// replicator would, and print what it found, creating nothing.
    #[arg(long, conflicts_with = "wait")]
    validate_only: bool,
    /// Wait until the backfill is done (the pipeline STREAMING).
    #[arg(long)]
    wait: bool,
    /// How long --wait waits.
    #[arg(long, default_value = "30m", value_parser = parse_duration)]
    timeout: Duration,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum Start {
    Latest,
    TrimHorizon,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum Backfill {
    Tombstones,
    Watermark,
    Touch,
    None,
}

fn parse_sink(text: &str) -> Result<(String, StoreSpec), String> {
    let (name, store) = text
        .split_once('=')
        .ok_or_else(|| format!("{text:?}: expected NAME=STORE, e.g. search=es:documents"))?;
    let store = store.parse::<StoreSpec>().map_err(|e| e.reason)?;
    Ok((name.to_owned(), store))
}

fn pipeline_json(p: &pb::Pipeline) -> Value {
    let spec = p.spec.clone().unwrap_or_default();
    json!({
        "name": p.name, "state": state_name(p.state), "reason": p.state_reason, "job": p.job_name,
        "run_id": p.run_id, "dead_letters": p.dead_letter_count, "created": time(p.create_time.as_ref()),
        "sinks": spec.sinks.iter().map(|s| s.name.clone()).collect::<Vec<_>>(),
    })
}

fn lag_json(l: &pb::PipelineLag) -> Value {
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

fn lag_table(l: &pb::PipelineLag) -> String {
    let rows: Vec<Vec<String>> = l
        .partitions
        .iter()
        .map(|p| {
            vec![
                p.partition.clone(),
                p.records_behind
                    .map_or_else(|| "?".to_owned(), |r| r.to_string()),
                format!("{:.1}s", std_duration(p.time_behind.as_ref()).as_secs_f64()),
                if p.caught_up { "yes" } else { "no" }.to_owned(),
                p.owner.clone(),
            ]
        })
        .collect();
    format!(
        "{}\n{}",
        progress::lag_line(l),
        table(
            &["PARTITION", "BEHIND", "TIME", "CAUGHT UP", "OWNER"],
            &rows
        )
    )
}

fn create_spec(a: &CreateArgs) -> Result<pb::PipelineSpec, CliError> {
    let start = match a.start {
        Start::Latest => pb::StartPosition::Latest,
        Start::TrimHorizon => pb::StartPosition::TrimHorizon,
    } as i32;
    let feed = match (a.feed.as_str(), a.source.kind()) {
        ("dynamodb-streams", _) | ("", "dynamodb") => {
            pb::change_feed::Feed::DynamodbStreams(pb::DynamoDbStreamsFeed {
                start_position: start,
                readers: a.readers,
            })
        }
        ("embedded-change-log", _) | ("", "sqlite") => {
            pb::change_feed::Feed::EmbeddedChangeLog(pb::EmbeddedChangeLogFeed {
                start_position: start,
            })
        }
        (topic, _) if topic.starts_with("kafka:") => {
            let store: StoreSpec = topic.parse()?;
            let Some(tidemark_proto::common::v1::data_store::Store::KafkaTopic(t)) =
                store.to_proto().store
            else {
                unreachable!("kafka: parses as a topic")
            };
            pb::change_feed::Feed::Kafka(pb::KafkaFeed {
                topic: Some(t),
                consumer_group: String::new(),
                start_position: start,
                consumers: a.readers,
            })
        }
        (other, _) => {
            return Err(CliError::invalid(
                format!("--feed {other:?} is not a feed"),
                "use dynamodb-streams, embedded-change-log or kafka:TOPIC",
            ));
        }
    };
    let transform = (!a.document_id.is_empty()).then(|| tidemark_proto::common::v1::Transform {
        document_id_template: a.document_id.clone(),
        ..Default::default()
    });
    Ok(pb::PipelineSpec {
        source: Some(a.source.to_proto()),
        feed: Some(pb::ChangeFeed { feed: Some(feed) }),
        sinks: a
            .sinks
            .iter()
            .map(|(name, store)| pb::Sink {
                name: name.clone(),
                store: Some(store.to_proto()),
                // Templates only mean something to document stores.
                transform: matches!(store.kind(), "elasticsearch" | "s3")
                    .then(|| transform.clone())
                    .flatten(),
                version_attribute: String::new(),
            })
            .collect(),
        backfill: Some(pb::BackfillOptions {
            mode: match a.backfill {
                Backfill::Tombstones => pb::BackfillMode::Tombstones,
                Backfill::Watermark => pb::BackfillMode::Watermark,
                Backfill::Touch => pb::BackfillMode::Touch,
                Backfill::None => pb::BackfillMode::None,
            } as i32,
            segments: a.segments,
            ..Default::default()
        }),
        version_attribute: a.version_attribute.clone(),
        dead_letter_store: None,
    })
}

pub async fn run(client: &Tidemark, command: ReplicateCommand, out: Output) -> CliResult {
    let svc = client.replicator();
    match command {
        ReplicateCommand::Create(a) => {
            let req = pb::CreatePipelineRequest {
                name: a.name.clone(),
                spec: Some(create_spec(&a)?),
                actor: a.actor.clone(),
                validate_only: a.validate_only,
            };
            let created = retried!(client, svc, create_pipeline, req)?;
            let mut p = created.pipeline.unwrap_or_default();
            if a.validate_only {
                let mut value = pipeline_json(&p);
                value["checks"] = json!(created.checks);
                out.print(&value, || {
                    let mut text = format!(
                        "pipeline {} is valid ({}); nothing was created\n",
                        p.name,
                        state_name(p.state)
                    );
                    for line in &created.checks {
                        text.push_str(&format!("  ok  {line}\n"));
                    }
                    text
                });
                return Ok(());
            }
            if a.wait {
                let pb = progress::spinner(out, "backfilling");
                let waited = client
                    .wait_streaming(&a.name, a.timeout, |l| {
                        pb.set_message(progress::lag_line(l));
                    })
                    .await;
                pb.finish_and_clear();
                p = waited?;
            }
            out.print(&pipeline_json(&p), || {
                format!(
                    "pipeline {} {} (job {}); watch it with `tidemark replicate lag {} --follow`\n",
                    p.name,
                    state_name(p.state),
                    p.job_name,
                    p.name
                )
            });
        }
        ReplicateCommand::Ls => {
            let mut all = Vec::new();
            let mut token = String::new();
            loop {
                let page = retried!(
                    client,
                    svc,
                    list_pipelines,
                    pb::ListPipelinesRequest {
                        page_size: 1000,
                        page_token: token.clone(),
                    }
                )?;
                all.extend(page.pipelines);
                if page.next_page_token.is_empty() {
                    break;
                }
                token = page.next_page_token;
            }
            out.print(
                &Value::Array(all.iter().map(pipeline_json).collect()),
                || {
                    let rows: Vec<Vec<String>> = all
                        .iter()
                        .map(|p| {
                            let spec = p.spec.clone().unwrap_or_default();
                            vec![
                                p.name.clone(),
                                state_name(p.state),
                                spec.sinks
                                    .iter()
                                    .map(|s| s.name.clone())
                                    .collect::<Vec<_>>()
                                    .join(","),
                                p.dead_letter_count.to_string(),
                                p.state_reason.clone(),
                            ]
                        })
                        .collect();
                    table(
                        &["PIPELINE", "STATE", "SINKS", "DEAD LETTERS", "REASON"],
                        &rows,
                    )
                },
            );
        }
        ReplicateCommand::Pause {
            name,
            reason,
            actor,
        } => {
            let req = pb::PausePipelineRequest {
                name,
                actor,
                reason,
            };
            let p = retried!(client, svc, pause_pipeline, req)?
                .pipeline
                .unwrap_or_default();
            out.print(&pipeline_json(&p), || {
                format!(
                    "pipeline {} paused; `tidemark replicate resume {}` resumes it\n",
                    p.name, p.name
                )
            });
        }
        ReplicateCommand::Resume { name, actor } => {
            let req = pb::ResumePipelineRequest { name, actor };
            let p = retried!(client, svc, resume_pipeline, req)?
                .pipeline
                .unwrap_or_default();
            out.print(&pipeline_json(&p), || {
                format!("pipeline {} {}\n", p.name, state_name(p.state))
            });
        }
        ReplicateCommand::Drain { name, timeout } => {
            let pb = progress::spinner(out, &format!("draining {name}"));
            let lag_pb = pb.clone();
            // Show the lag going down while the drain call waits.
            let mut watch = client.watch_lag(&name, Duration::from_secs(1));
            let watcher = tokio::spawn(async move {
                while let Some(Ok(l)) = watch.next().await {
                    lag_pb.set_message(format!("draining: {}", progress::lag_line(&l)));
                }
            });
            let drained = client.drain(&name, timeout).await;
            watcher.abort();
            pb.finish_and_clear();
            let r = drained?;
            let lag = r.lag.unwrap_or_default();
            let elapsed = std_duration(r.elapsed.as_ref());
            let mut value = lag_json(&lag);
            value["elapsed_seconds"] = json!(elapsed.as_secs_f64());
            out.print(&value, || {
                format!(
                    "pipeline {name} drained (lag 0) in {:.1}s\n",
                    elapsed.as_secs_f64()
                )
            });
        }
        ReplicateCommand::Lag {
            name,
            follow,
            interval,
        } => {
            let mut watch = client.watch_lag(&name, interval);
            while let Some(l) = watch.next().await {
                let l = l?;
                out.print(&lag_json(&l), || lag_table(&l));
                if !follow {
                    break;
                }
            }
        }
    }
    Ok(())
}
