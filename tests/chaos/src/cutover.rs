//! Problem 1's cut-over under faults: a third of the way into the run, while
//! the counters keep flowing and processes keep dying, `Tidemark::cutover`
//! moves the stats-aggregator's table to a new one by the runbook
//! (replicate, verify, pause writers, drain, verify, switch the route,
//! resume). It may complete, or abort when a fault outlasts a step's
//! deadline; either way the writers must be running at the end and the
//! route must be where the cut-over says it left it. When it completed,
//! the new table must hold the writer's exact sums after a drain.

use std::time::Duration;

use anyhow::Context as _;
use tidemark_client::{ClientError, CutoverPlan, Endpoints, Options, Tidemark};
use tidemark_connectors::dynamodb::DynamoTable;
use tidemark_proto::job_tracker::v1 as jt;
use tidemark_proto::replicator::v1 as rp;
use tidemark_proto::stats_aggregator::v1 as sa;
use tokio_util::sync::CancellationToken;

use crate::counters;
use crate::plane::through_restarts;

/// The services' addresses, as a user's client config names them.
pub struct Urls {
    pub jobs: String,
    pub replicator: String,
    pub verifier: String,
    pub stats: String,
}

/// How the cut-over ended.
#[derive(Debug, Default)]
pub struct Outcome {
    pub completed: bool,
    /// The step it aborted at, and why.
    pub aborted: Option<String>,
    /// The writer pause, when writers were paused.
    pub pause: Option<Duration>,
    /// Writers left paused, or a route not where the report says.
    pub left_inconsistent: u32,
    /// Counters of the new table short of (lost) or over (doubled) the
    /// writer's sums, when the cut-over completed.
    pub lost: i64,
    pub doubled: i64,
}

impl Outcome {
    pub fn clean(&self) -> bool {
        (self.completed || self.aborted.is_some())
            && self.left_inconsistent == 0
            && self.lost == 0
            && self.doubled == 0
    }
}

pub fn pipeline_name(run: &str) -> String {
    format!("{run}-counters-v2")
}

fn plan(run: &str, old: &str, new: &str) -> anyhow::Result<CutoverPlan> {
    let text = format!(
        r##"
name = "{run}-cutover"
actor = "chaos"

[pipeline]
name = "{pipeline}"
source = "dynamodb:{old}"
segments = 2

# The counters only: the aggregator's bookkeeping stays with the old table.
[[pipeline.sinks]]
name = "new-table"
store = "dynamodb:{new}"
projection = ["{metric}"]

[verify]
recheck_rounds = 5
recheck_min_wait = "1s"
segments = 2

[[verify.checks]]
name = "counts"
count = {{}}

[[verify.checks]]
name = "content"
digest = {{ buckets = 16 }}

[writers]
mode = "buffer"

# Longer than a restart and a store fault together.
[deadlines]
start_replication = "60s"
backfill = "3m"
verify = "3m"
pause_writers = "30s"
drain = "60s"
final_verify = "3m"
switch_route = "30s"
resume_writers = "60s"
"##,
        pipeline = pipeline_name(run),
        metric = counters::METRIC,
    );
    CutoverPlan::from_toml(&text).context("the cut-over plan")
}

/// Waits `after`, then runs the cut-over through the faults.
pub async fn run(
    urls: Urls,
    run: String,
    old: String,
    new: String,
    after: Duration,
    stop: CancellationToken,
) -> anyhow::Result<(Outcome, Tidemark)> {
    let client = Tidemark::connect(Options {
        endpoint: urls.replicator.clone(),
        services: Endpoints {
            job_tracker: Some(urls.jobs),
            replicator: Some(urls.replicator),
            verifier: Some(urls.verifier),
            stats_aggregator: Some(urls.stats),
        },
        ..Options::default()
    })?;
    tokio::select! {
        () = tokio::time::sleep(after) => {}
        () = stop.cancelled() => {}
    }
    let plan = plan(&run, &old, &new)?;
    let mut outcome = Outcome::default();
    let report = match client.cutover(&plan, &mut |_| {}).await {
        Ok(report) => {
            outcome.completed = true;
            report
        }
        Err(ClientError::Cutover(e)) => {
            eprintln!("chaos: {e}");
            outcome.aborted = Some(format!("{}: {}", e.step.name(), e.reason));
            e.report
        }
        Err(e) => return Err(anyhow::Error::new(e).context("the cut-over")),
    };
    outcome.pause = report.writer_pause;
    if report.writer_pause.is_some() && !report.writers_resumed {
        eprintln!("chaos: the cut-over left the writers paused: {report:?}");
        outcome.left_inconsistent += 1;
    }
    Ok((outcome, client))
}

/// After the faults: the writers run, the route is where the cut-over
/// left it, and a completed cut-over's new table holds the exact sums.
pub async fn check(
    client: &Tidemark,
    run: &str,
    mut outcome: Outcome,
    new: &DynamoTable,
    ledger: &counters::Ledger,
) -> anyhow::Result<Outcome> {
    let stats = client.stats();
    let state = through_restarts("GetBufferState", Duration::from_secs(60), || {
        let mut c = stats.clone();
        async move { c.get_buffer_state(sa::GetBufferStateRequest {}).await }
    })
    .await?
    .state
    .unwrap_or_default();
    if state.paused {
        eprintln!("chaos: writers are still paused after the cut-over: {state:?}");
        outcome.left_inconsistent += 1;
    }
    let jobs = client.jobs();
    let route = through_restarts("GetRoute", Duration::from_secs(60), || {
        let mut c = jobs.clone();
        let r = jt::GetRouteRequest {
            job_name: format!("pipeline/{}", pipeline_name(run)),
            unit_key: String::new(),
        };
        async move { c.get_route(r).await }
    })
    .await?
    .route
    .unwrap_or_default();
    let on_target = route.target == jt::RouteTarget::Target as i32;
    if on_target != outcome.completed {
        eprintln!(
            "chaos: the route is {:?} after a cut-over that {}",
            route.target,
            if outcome.completed {
                "completed"
            } else {
                "aborted"
            }
        );
        outcome.left_inconsistent += 1;
    }
    if outcome.completed {
        // The counters were flushed by the ledger check; carry the last
        // flush into the new table.
        let replicator = client.replicator();
        through_restarts("Drain", Duration::from_secs(180), || {
            let mut c = replicator.clone();
            let r = rp::DrainRequest {
                name: pipeline_name(run),
                timeout: Some(prost_types::Duration {
                    seconds: 120,
                    nanos: 0,
                }),
            };
            async move { c.drain(r).await }
        })
        .await?;
        let (lost, doubled) = counters::compare(new, &ledger.sums).await?;
        outcome.lost = lost;
        outcome.doubled = doubled;
    }
    Ok(outcome)
}
