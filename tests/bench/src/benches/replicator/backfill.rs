//! The attribute backfill pairs: Tidemark through the delay proxy ÷ the
//! seed's loop, and Tidemark ÷ a raw client sending the same requests.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use aws_sdk_dynamodb::types::{AttributeValue, ReturnValue};
use futures::StreamExt as _;
use tidemark_connectors::dynamodb::DynamoTable;
use tidemark_connectors::testing::{local_sdk_config, unique_name};
use tidemark_connectors::{AttrValue, Item, KeySchema, SourceTable};
use tidemark_proto::common::v1 as common;
use tidemark_proto::job_tracker::v1 as jt;
use tidemark_proto::job_tracker::v1::job_tracker_service_client::JobTrackerServiceClient;
use tidemark_proto::replicator::v1 as pb;
use tidemark_proto::replicator::v1::replicator_service_client::ReplicatorServiceClient;
use tonic::transport::Channel;

use super::{DELAY, IN_FLIGHT, PAGE, SEGMENTS, UNITS, plane, table_ref, wait_run};
use crate::framework::{Context, Side, interleaved};
use crate::proxy::{DelayProxy, Delays};

/// Items/s of a Tidemark backfill of `attribute` over the whole table.
async fn tidemark_backfill(
    endpoint: &str,
    table: &str,
    attribute: &str,
    items: usize,
) -> anyhow::Result<f64> {
    let mut plane = plane(endpoint).await?;
    let request = BackfillRequest {
        table: table_ref(table),
        attribute,
        segments: SEGMENTS,
        rate: 0,
        in_flight: 0,
        within: RUN_WITHIN,
    };
    let (_, rate) = run_backfill(&mut plane.replicator, &mut plane.jobs, &request, items).await?;
    Ok(rate)
}

/// A BackfillAttribute setting `attribute = 1` on every item of `table`.
pub(crate) struct BackfillRequest<'a> {
    pub(crate) table: common::DataStore,
    pub(crate) attribute: &'a str,
    pub(crate) segments: u32,
    /// Writes per second over the job (0: unlimited).
    pub(crate) rate: u32,
    /// Updates in flight per segment (0: the replicator's default).
    pub(crate) in_flight: u32,
    /// A run still going after this has stalled: the benchmark says so
    /// rather than waiting for ever.
    pub(crate) within: Duration,
}

/// How long a run of the benchmarks' few thousand items may take.
pub(crate) const RUN_WITHIN: Duration = Duration::from_secs(300);

/// Runs `request` to its end: the run (checked to have succeeded with
/// every one of `items` items updated) and its items/s.
pub(crate) async fn run_backfill(
    replicator: &mut ReplicatorServiceClient<Channel>,
    jobs: &mut JobTrackerServiceClient<Channel>,
    request: &BackfillRequest<'_>,
    items: usize,
) -> anyhow::Result<(jt::Run, f64)> {
    let started = Instant::now();
    let run_id = replicator
        .backfill_attribute(pb::BackfillAttributeRequest {
            spec: Some(pb::BackfillAttributeSpec {
                table: Some(request.table.clone()),
                attribute_name: request.attribute.to_owned(),
                value: Some(tidemark_connectors::proto::value_to_proto(&AttrValue::n(
                    1i64,
                ))),
                segments: request.segments,
                write_units_per_second: request.rate,
                writes_in_flight: request.in_flight,
            }),
            actor: "bench".to_owned(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .run_id;
    let within = request.within;
    let run = tokio::time::timeout(within, wait_run(jobs, &run_id))
        .await
        .with_context(|| format!("backfill run {run_id} still running after {within:?}"))??;
    let elapsed = started.elapsed().as_secs_f64();
    anyhow::ensure!(
        run.status == jt::RunStatus::Succeeded as i32,
        "backfill run {run:?}"
    );
    let updated = run.counters.get("updated").copied().unwrap_or_default();
    anyhow::ensure!(
        usize::try_from(updated)? == items,
        "backfill updated {updated} of {items} items"
    );
    #[allow(clippy::cast_precision_loss)]
    Ok((run, items as f64 / elapsed))
}

pub(crate) async fn client_at(endpoint: &str) -> aws_sdk_dynamodb::Client {
    let config = local_sdk_config("TIDEMARK_TEST_DYNAMODB_ENDPOINT")
        .await
        .into_builder()
        .endpoint_url(endpoint)
        .build();
    aws_sdk_dynamodb::Client::new(&config)
}

/// The seed's update: set the attribute unless it is there.
async fn seed_update(
    client: &aws_sdk_dynamodb::Client,
    table: &str,
    id: AttributeValue,
    attribute: &str,
) -> anyhow::Result<()> {
    client
        .update_item()
        .table_name(table)
        .key("id", id)
        .update_expression("SET #a = :v")
        .condition_expression("attribute_exists(id) AND attribute_not_exists(#a)")
        .expression_attribute_names("#a", attribute)
        .expression_attribute_values(":v", AttributeValue::N("1".to_owned()))
        .send()
        .await?;
    Ok(())
}

/// The seed's loop: one scan for items lacking the attribute, then one
/// UpdateItem at a time, for `budget`; returns items/s.
async fn seed_loop(
    endpoint: &str,
    table: &str,
    attribute: &str,
    budget: Duration,
) -> anyhow::Result<f64> {
    let client = client_at(endpoint).await;
    let started = Instant::now();
    let mut updated = 0u32;
    let mut start_key = None;
    'pages: loop {
        let page = client
            .scan()
            .table_name(table)
            .filter_expression("attribute_not_exists(#a)")
            .expression_attribute_names("#a", attribute)
            .set_exclusive_start_key(start_key)
            .send()
            .await?;
        for item in page.items() {
            let id = item.get("id").context("item without id")?.clone();
            seed_update(&client, table, id, attribute).await?;
            updated += 1;
            if started.elapsed() >= budget {
                break 'pages;
            }
        }
        start_key = page.last_evaluated_key().cloned();
        if start_key.is_none() {
            break;
        }
    }
    Ok(f64::from(updated) / started.elapsed().as_secs_f64())
}

/// The replicator's update, as its DynamoDB connector sends it: the same
/// placeholders, the same condition (the item still exists and still lacks
/// the attribute) and `ReturnValues=ALL_NEW`.
async fn backfill_update(
    client: &aws_sdk_dynamodb::Client,
    table: &str,
    id: AttributeValue,
    attribute: &str,
) -> anyhow::Result<()> {
    client
        .update_item()
        .table_name(table)
        .key("id", id)
        .update_expression("SET #n0 = :v0")
        .condition_expression("(attribute_exists(#n1)) AND (attribute_not_exists(#n0))")
        .expression_attribute_names("#n0", attribute)
        .expression_attribute_names("#n1", "id")
        .expression_attribute_values(":v0", AttributeValue::N("1".to_owned()))
        .return_values(ReturnValue::AllNew)
        .send()
        .await?;
    Ok(())
}

/// A raw client sending the replicator's requests at its concurrency:
/// `units` segments at a time (a replicator's `UNITS`), pages of `PAGE`,
/// `in_flight` conditional updates each (the replicator's `IN_FLIGHT`
/// unless the job says), with the replicator's request parameters; each segment's
/// pages one after another (the replicator reads a segment's next page
/// while it updates the current one).
pub(crate) async fn raw_parallel(
    endpoint: &str,
    table: &str,
    attribute: &str,
    items: usize,
    units: usize,
    in_flight: usize,
) -> anyhow::Result<f64> {
    let client = client_at(endpoint).await;
    let table: Arc<str> = Arc::from(table);
    let attribute: Arc<str> = Arc::from(attribute);
    let started = Instant::now();
    let counts: Vec<anyhow::Result<usize>> = futures::stream::iter(0..SEGMENTS)
        .map(|segment| {
            let (client, table, attribute) =
                (client.clone(), Arc::clone(&table), Arc::clone(&attribute));
            async move {
                let mut n = 0;
                let mut start_key = None;
                loop {
                    let page = client
                        .scan()
                        .table_name(&*table)
                        .limit(PAGE)
                        .consistent_read(false)
                        .filter_expression("attribute_not_exists(#n0)")
                        .expression_attribute_names("#n0", &*attribute)
                        .segment(i32::try_from(segment)?)
                        .total_segments(i32::try_from(SEGMENTS)?)
                        .set_exclusive_start_key(start_key)
                        .send()
                        .await?;
                    let ids: Vec<AttributeValue> = page
                        .items()
                        .iter()
                        .filter_map(|i| i.get("id").cloned())
                        .collect();
                    let results: Vec<anyhow::Result<()>> = futures::stream::iter(ids)
                        .map(|id| {
                            let (client, table, attribute) =
                                (client.clone(), Arc::clone(&table), Arc::clone(&attribute));
                            async move { backfill_update(&client, &table, id, &attribute).await }
                        })
                        .buffer_unordered(in_flight)
                        .collect()
                        .await;
                    for r in results {
                        r?;
                        n += 1;
                    }
                    start_key = page.last_evaluated_key().cloned();
                    if start_key.is_none() {
                        return Ok::<usize, anyhow::Error>(n);
                    }
                }
            }
        })
        .buffer_unordered(units)
        .collect()
        .await;
    let mut total = 0;
    for c in counts {
        total += c?;
    }
    anyhow::ensure!(total == items, "raw client updated {total} of {items}");
    #[allow(clippy::cast_precision_loss)]
    Ok(items as f64 / started.elapsed().as_secs_f64())
}

pub(crate) async fn seed_table(endpoint: &str, items: usize) -> anyhow::Result<String> {
    let client = client_at(endpoint).await;
    let name = unique_name("bench-backfill");
    let table =
        Arc::new(DynamoTable::create(client, &name, &KeySchema::new("id", None), false).await?);
    let results: Vec<_> = futures::stream::iter(0..items)
        .map(|i| {
            let table = Arc::clone(&table);
            async move {
                let item: Item = [("id".to_owned(), AttrValue::s(format!("item-{i:07}")))]
                    .into_iter()
                    .collect();
                table.put(&item, None).await
            }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    for r in results {
        r?;
    }
    Ok(name)
}

/// Both backfill pairs on one endpoint.
pub(super) struct Backfill {
    pub(super) items: usize,
    pub(super) seed: f64,
    pub(super) proxied: f64,
    /// No proxy, per round, in the order run.
    pub(super) raw: Vec<f64>,
    pub(super) direct: Vec<f64>,
}

/// The seed loop and Tidemark through a 50 ms proxy to `direct`, then
/// `pairs` ABBA pairs of the raw client and Tidemark without it; each run
/// sets its own attribute on every item of one table.
pub(super) async fn backfill(
    ctx: &Context,
    direct: &str,
    items: usize,
    pairs: usize,
) -> anyhow::Result<Backfill> {
    let upstream: std::net::SocketAddr = direct
        .trim_start_matches("http://")
        .parse()
        .with_context(|| format!("endpoint {direct} must be http://host:port"))?;
    let proxy = DelayProxy::start(upstream, Delays::per_request(DELAY)).await?;
    let proxied = format!("http://{}", proxy.addr());
    let table = seed_table(direct, items).await?;
    let seed = seed_loop(&proxied, &table, "seed", ctx.time(Duration::from_secs(8))).await?;
    let tidemark_proxied = tidemark_backfill(&proxied, &table, "tm_proxy", items).await?;
    let mut raw = Vec::new();
    let mut tidemark = Vec::new();
    for (round, side) in interleaved(pairs).into_iter().enumerate() {
        match side {
            Side::Baseline => {
                raw.push(
                    raw_parallel(
                        direct,
                        &table,
                        &format!("raw_{round}"),
                        items,
                        UNITS,
                        IN_FLIGHT,
                    )
                    .await?,
                );
            }
            Side::System => {
                tidemark
                    .push(tidemark_backfill(direct, &table, &format!("tm_{round}"), items).await?);
            }
        }
    }
    Ok(Backfill {
        items,
        seed,
        proxied: tidemark_proxied,
        raw,
        direct: tidemark,
    })
}
