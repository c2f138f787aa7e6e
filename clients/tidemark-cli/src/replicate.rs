//! `tidemark replicate`: pipelines that backfill a live table and follow its
//! change feed into sinks.

use std::time::Duration;

use futures::StreamExt as _;
use tidemark_client::spec::parse_duration;
use tidemark_client::{StoreSpec, Tidemark, state_name};
use tidemark_proto::replicator::v1 as pb;

use crate::error::{CliError, CliResult};
use crate::output::{self, Output};
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
    /// How Kafka sinks encode a message: json (key and item as DynamoDB
    /// JSON, a delete as a tombstone) or change-record (the protobuf
    /// tidemark.common.v1.ChangeRecord a Kafka feed reads).
    #[arg(long, value_enum, default_value = "json")]
    kafka_format: KafkaFormat,
    /// DynamoDB sinks' writes in flight per batch, 1 to 256 (0: the
    /// replicator's 16).
    #[arg(long, default_value_t = 0)]
    writes_in_flight: u32,
    /// Mark this pipeline's DynamoDB writes with this origin (usually its
    /// name), so a pipeline copying the other way can skip them.
    #[arg(long, default_value = "")]
    origin: String,
    /// Skip changes that pipeline (its --origin) wrote into the source:
    /// two pipelines between the same two tables, in opposite directions,
    /// never echo each other.
    #[arg(long, default_value = "")]
    skip_origin: String,
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
pub enum KafkaFormat {
    Json,
    ChangeRecord,
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
                tombstone_retention: None,
                kafka_format: match a.kafka_format {
                    KafkaFormat::Json => pb::KafkaMessageFormat::Json,
                    KafkaFormat::ChangeRecord => pb::KafkaMessageFormat::ChangeRecord,
                } as i32,
                writes_in_flight: a.writes_in_flight,
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
        origin: a.origin.clone(),
        skip_origin: a.skip_origin.clone(),
    })
}

pub async fn run(client: &Tidemark, command: ReplicateCommand, out: Output) -> CliResult {
    let svc = client.replicator();
    match command {
        ReplicateCommand::Create(a) => create(client, &a, out).await?,
        ReplicateCommand::Ls => ls(client, out).await?,
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
            output::pipeline(out, &p, |p| {
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
            output::pipeline(out, &p, |p| {
                format!("pipeline {} {}\n", p.name, state_name(p.state))
            });
        }
        ReplicateCommand::Drain { name, timeout } => drain(client, &name, timeout, out).await?,
        ReplicateCommand::Lag {
            name,
            follow,
            interval,
        } => {
            let mut watch = client.watch_lag(&name, interval);
            while let Some(l) = watch.next().await {
                output::lag(out, &l?);
                if !follow {
                    break;
                }
            }
        }
    }
    Ok(())
}

async fn create(client: &Tidemark, a: &CreateArgs, out: Output) -> CliResult {
    let svc = client.replicator();
    let req = pb::CreatePipelineRequest {
        name: a.name.clone(),
        spec: Some(create_spec(a)?),
        actor: a.actor.clone(),
        validate_only: a.validate_only,
    };
    let created = retried!(client, svc, create_pipeline, req)?;
    let mut p = created.pipeline.unwrap_or_default();
    if a.validate_only {
        output::pipeline_valid(out, &p, &created.checks);
        return Ok(());
    }
    if a.wait {
        let pb = progress::spinner(out, "backfilling");
        let waited = client
            .wait_streaming(&a.name, a.timeout, |l| {
                pb.set_message(output::lag_line(l));
            })
            .await;
        pb.finish_and_clear();
        p = waited?;
    }
    output::pipeline(out, &p, |p| {
        format!(
            "pipeline {} {} (job {}); watch it with `tidemark replicate lag {} --follow`\n",
            p.name,
            state_name(p.state),
            p.job_name,
            p.name
        )
    });
    Ok(())
}

async fn ls(client: &Tidemark, out: Output) -> CliResult {
    let svc = client.replicator();
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
    output::pipelines(out, &all);
    Ok(())
}

async fn drain(client: &Tidemark, name: &str, timeout: Duration, out: Output) -> CliResult {
    let pb = progress::spinner(out, &format!("draining {name}"));
    let lag_pb = pb.clone();
    // Show the lag going down while the drain call waits.
    let mut watch = client.watch_lag(name, Duration::from_secs(1));
    let watcher = tokio::spawn(async move {
        while let Some(Ok(l)) = watch.next().await {
            lag_pb.set_message(format!("draining: {}", output::lag_line(&l)));
        }
    });
    let drained = client.drain(name, timeout).await;
    watcher.abort();
    pb.finish_and_clear();
    output::drained(out, name, &drained?);
    Ok(())
}
