//! `noop-rpc`: what the kit's tower stack costs per RPC. The same no-op
//! (`grpc.health.v1.Health/Check`) is served by the kit's `ServiceHost` and by
//! a bare tonic server, side by side in this process, and driven by the same
//! client code.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tidemark_kit::{CancellationToken, ServerConfig, ServiceHost};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Channel, Endpoint, Server};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::framework::{Benchmark, Context, Report, Rounds, Side, Sides, fmt_num, interleaved};
use crate::load::{ClosedLoop, LoadResult, OpenLoop};

/// Workers in the closed loop, and client connections per side.
const CONCURRENCY: usize = 64;
/// Well below either side's capacity, so the open loop measures latency at a
/// steady load, not saturation.
const OPEN_LOOP_RATE: f64 = 5_000.0;
/// Rounds per side of each loop, in ABBA order; figures are medians over them.
const ROUNDS: usize = 5;

const WARMUP: Duration = Duration::from_secs(1);
const ROUND_SETTLE: Duration = Duration::from_millis(100);
const CLOSED_ROUND: Duration = Duration::from_millis(1_000);
const OPEN_ROUND: Duration = Duration::from_millis(800);

pub struct NoopRpc;

type Clients = Arc<Vec<HealthClient<Channel>>>;
type CheckFuture = Pin<Box<dyn Future<Output = Result<(), tonic::Status>> + Send>>;

struct Running {
    addr: SocketAddr,
    task: JoinHandle<anyhow::Result<()>>,
}

/// The baseline: tonic and tonic-health, nothing else. TCP_NODELAY is set
/// as the kit sets it, so the two servers differ only by the stack.
async fn spawn_bare(shutdown: &CancellationToken) -> anyhow::Result<Running> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (_reporter, health_server) = tonic_health::server::health_reporter();
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    let token = shutdown.clone();
    let task = tokio::spawn(async move {
        Server::builder()
            .add_service(health_server)
            .serve_with_incoming_shutdown(incoming, token.cancelled_owned())
            .await
            .context("bare tonic server")
    });
    Ok(Running { addr, task })
}

/// The system: the kit's `ServiceHost` exactly as a service gets it, default
/// configuration (its concurrency limit of 1024 is far above the 64
/// requests in flight, so nothing is shed).
async fn spawn_kit(
    shutdown: &CancellationToken,
) -> anyhow::Result<(Running, tidemark_kit::Metrics)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let config = ServerConfig {
        listen: addr,
        ..ServerConfig::default()
    };
    anyhow::ensure!(
        config.concurrency_limit >= CONCURRENCY * 2,
        "the default concurrency limit would shed load"
    );
    let host = ServiceHost::new(config, shutdown.clone());
    let metrics = host.metrics();
    let task = tokio::spawn(async move { host.serve(listener).await.context("kit server") });
    Ok((Running { addr, task }, metrics))
}

/// One HTTP/2 connection per worker: no worker waits on another's
/// connection, as with that many independent clients.
async fn connect(addr: SocketAddr, n: usize) -> anyhow::Result<Clients> {
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))?.tcp_nodelay(true);
    let mut clients = Vec::with_capacity(n);
    for _ in 0..n {
        clients.push(HealthClient::new(endpoint.connect().await?));
    }
    Ok(Arc::new(clients))
}

async fn check(mut client: HealthClient<Channel>) -> Result<(), tonic::Status> {
    let status = client
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await?
        .into_inner()
        .status;
    if status == ServingStatus::Serving as i32 {
        Ok(())
    } else {
        Err(tonic::Status::unavailable(format!("status {status}")))
    }
}

/// The operation both loops run: request `i` goes out on client `i mod n`.
fn check_op(clients: &Clients) -> impl Fn(u64) -> CheckFuture + Send + Sync + 'static {
    let clients = Arc::clone(clients);
    move |i| {
        #[allow(clippy::cast_possible_truncation)]
        let client = clients[i as usize % clients.len()].clone();
        Box::pin(check(client))
    }
}

/// Successful `Health/Check` calls the kit's own metrics counted.
fn kit_counted_checks(metrics: &tidemark_kit::Metrics) -> u64 {
    metrics
        .encode()
        .lines()
        .find(|l| {
            l.starts_with("tidemark_rpc_requests_total{")
                && l.contains("rpc=\"/grpc.health.v1.Health/Check\"")
                && l.contains("code=\"OK\"")
        })
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0)
}

#[async_trait::async_trait]
impl Benchmark for NoopRpc {
    fn name(&self) -> &'static str {
        "noop-rpc"
    }

    fn description(&self) -> &'static str {
        "A no-op RPC (`grpc.health.v1.Health/Check`) through the kit's full stack \
         (`ServiceHost` with the default `ServerConfig`: metrics layer, bearer auth, load \
         shedding over the global concurrency limit, request timeout, tracing span) ÷ a bare \
         tonic server serving only tonic-health's `HealthServer`. Both on loopback in this \
         process, driven by the same client code; the ratio is what the stack costs."
    }

    async fn run(&self, ctx: &Context) -> anyhow::Result<Report> {
        let shutdown = CancellationToken::new();
        let bare = spawn_bare(&shutdown).await?;
        let (kit, kit_metrics) = spawn_kit(&shutdown).await?;
        let clients = Sides {
            baseline: connect(bare.addr, CONCURRENCY).await?,
            system: connect(kit.addr, CONCURRENCY).await?,
        };
        for side in [Side::Baseline, Side::System] {
            check(clients.get(side)[0].clone())
                .await
                .with_context(|| format!("{side} server does not answer SERVING"))?;
        }

        let (closed, open) = measure(ctx, &clients).await?;
        drop(clients);
        shutdown.cancel();
        for (name, server) in [("bare", bare), ("kit", kit)] {
            tokio::time::timeout(Duration::from_secs(10), server.task)
                .await
                .with_context(|| format!("{name} server did not stop"))?
                .with_context(|| format!("{name} server panicked"))??;
        }

        Ok(report(
            ctx,
            &closed,
            &open,
            kit_counted_checks(&kit_metrics),
        ))
    }
}

/// Warms both sides up, then runs the closed-loop and the open-loop rounds.
async fn measure(ctx: &Context, clients: &Sides<Clients>) -> anyhow::Result<(Rounds, Rounds)> {
    for side in [Side::Baseline, Side::System] {
        ClosedLoop {
            concurrency: CONCURRENCY,
            warmup: Duration::ZERO,
            duration: ctx.time(WARMUP),
        }
        .run(check_op(clients.get(side)))
        .await?;
    }

    let mut closed = Rounds::default();
    for side in interleaved(ROUNDS) {
        let r = ClosedLoop {
            concurrency: CONCURRENCY,
            warmup: ctx.time(ROUND_SETTLE),
            // At least 300 ms even in --quick: a 50 ms round on a loaded
            // 2-core machine can end before any of 64 first requests answers.
            duration: ctx.time(CLOSED_ROUND).max(Duration::from_millis(300)),
        }
        .run(check_op(clients.get(side)))
        .await?;
        eprintln!("  closed loop, {side:<8}: {}", r.summary());
        closed.push(side, r);
    }

    let mut open = Rounds::default();
    for side in interleaved(ROUNDS) {
        let r = OpenLoop {
            rate: OPEN_LOOP_RATE,
            warmup: ctx.time(ROUND_SETTLE),
            duration: ctx.time(OPEN_ROUND),
            max_in_flight: 4_096,
        }
        .run(check_op(clients.get(side)))
        .await?;
        eprintln!("  open loop,   {side:<8}: {}", r.summary());
        open.push(side, r);
    }

    Ok((closed, open))
}

/// One figure of the report: the rounds it reads, its name, its unit and
/// what it reads from each round.
type Figure<'a> = (&'a Rounds, String, &'static str, fn(&LoadResult) -> f64);

/// The figures of both loops and the notes that say how to read them.
fn report(ctx: &Context, closed: &Rounds, open: &Rounds, counted: u64) -> Report {
    let throughput = |r: &LoadResult| r.throughput();
    let p50 = |r: &LoadResult| r.latency_us(0.5);
    let p99 = |r: &LoadResult| r.latency_us(0.99);
    let service_p99 = |r: &LoadResult| r.service_time_us(0.99);
    let lag_p99 = |r: &LoadResult| lag_us(r, 0.99);
    let cpu = |r: &LoadResult| r.cpu_per_request_us();
    let rate = fmt_num(OPEN_LOOP_RATE);
    let closed_fig = |what: &str| format!("closed loop, {CONCURRENCY} concurrent: {what}");
    let open_fig = |what: &str| format!("open loop, {rate} req/s: {what}");
    let figures: [Figure<'_>; 7] = [
        (closed, closed_fig("throughput"), "req/s", throughput),
        (closed, closed_fig("CPU per request"), "µs", cpu),
        (closed, closed_fig("p50 latency"), "µs", p50),
        (closed, closed_fig("p99 latency"), "µs", p99),
        (open, open_fig("p50 latency"), "µs", p50),
        (open, open_fig("p99 latency"), "µs", p99),
        (open, open_fig("CPU per request"), "µs", cpu),
    ];
    let rows: Vec<_> = figures
        .iter()
        .map(|(rounds, figure, unit, f)| rounds.row(figure.clone(), unit, *f))
        .collect();
    let within_noise: Vec<&str> = figures
        .iter()
        .filter(|(rounds, .., f)| rounds.overlap(*f))
        .map(|(_, figure, ..)| figure.as_str())
        .collect();

    let extra_cpu_us = rows[1].system - rows[1].baseline;
    let pooled = [
        closed.pooled(Side::System),
        closed.pooled(Side::Baseline),
        open.pooled(Side::System),
        open.pooled(Side::Baseline),
    ];
    let errors: u64 = pooled.iter().map(|r| r.errors).sum();
    let first_error = pooled.iter().find_map(|r| r.first_error.clone());
    let mut notes = vec![
        format!(
            "Client: tonic, one `Channel` (one HTTP/2 connection) per closed-loop worker, \
             {CONCURRENCY} per side; the open loop sends request i on connection i mod \
             {CONCURRENCY}. Client and both servers share this process's tokio runtime, \
             so each side's figures include the client's own cost; a ratio near 1 means \
             the stack costs little next to one RPC through tonic and the kernel."
        ),
        format!(
            "Rounds: {}s warm-up per side, then {ROUNDS} rounds per side in the order \
             baseline, system, system, baseline, …: closed loop {:.1}s, open loop {:.1}s \
             each (after a {}ms settle). Each figure is the median over a side's rounds.",
            ctx.time(WARMUP).as_secs_f64(),
            ctx.time(CLOSED_ROUND).as_secs_f64(),
            ctx.time(OPEN_ROUND).as_secs_f64(),
            ctx.time(ROUND_SETTLE).as_millis(),
        ),
        format!(
            "Spread of the rounds: closed-loop throughput {}; open-loop p99 {}.",
            closed.spread("req/s", throughput),
            open.spread("µs", p99),
        ),
        format!(
            "Open-loop latency runs from each request's scheduled send time (no \
             coordinated omission). Service time from the actual send, p99: system \
             {:.0} µs, baseline {:.0} µs; the generator's own send lag p99: {:.0} µs / \
             {:.0} µs.",
            open.median(Side::System, service_p99),
            open.median(Side::Baseline, service_p99),
            open.median(Side::System, lag_p99),
            open.median(Side::Baseline, lag_p99),
        ),
        format!(
            "CPU per request is the whole process's user + system CPU time (client, \
             server, runtime) over a round ÷ its requests: steadier than throughput on a \
             shared VM, since another process taking the cores lowers throughput but not \
             the CPU each request costs. The stack adds about {extra_cpu_us:.1} µs of CPU \
             per request (closed loop, system − baseline)."
        ),
        format!(
            "The kit's own metrics counted {counted} successful Health/Check calls, \
             warm-up included: every system request went through its stack."
        ),
    ];
    let lag = open
        .median(Side::System, lag_p99)
        .max(open.median(Side::Baseline, lag_p99));
    let open_p99 = rows[5].system.min(rows[5].baseline);
    if lag > open_p99 / 2.0 {
        notes.push(format!(
            "The generator itself sent up to {lag:.0} µs late (p99), against an open-loop \
             p99 of {open_p99:.0} µs: the open-loop tail mostly measures contention for \
             this machine's cores (another process, or the generator's own thread), not \
             the stack."
        ));
    }
    if within_noise.len() == figures.len() {
        notes.push(
            "Every figure is within this run's noise: for each, the two sides' rounds \
             overlap."
                .to_owned(),
        );
    } else if !within_noise.is_empty() {
        notes.push(format!(
            "Within this run's noise (the two sides' rounds overlap): {}.",
            within_noise.join("; ")
        ));
    }
    notes.push(if tracing::dispatcher::has_been_set() {
        "The kit's tracing subscriber (JSON at `info`, written to a sink; every span an \
         OpenTelemetry span with its trace and span ids, the caller's traceparent \
         adopted) was installed, so the per-RPC span is live as in a deployed service."
            .to_owned()
    } else {
        "No tracing subscriber was installed: the per-RPC span cost nothing.".to_owned()
    });
    notes.push(match first_error {
        Some(e) => format!("{errors} requests failed; first error: {e}"),
        None => "No request failed on either side.".to_owned(),
    });
    Report { rows, notes }
}

fn lag_us(r: &LoadResult, q: f64) -> f64 {
    #[allow(clippy::cast_precision_loss)]
    let ns = r.send_lag.value_at_quantile(q) as f64;
    ns / 1_000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn quick_run_measures_both_sides_without_errors() {
        let ctx = Context {
            quick: true,
            workspace_root: std::env::temp_dir(),
            figures: None,
        };
        let report = NoopRpc.run(&ctx).await.unwrap();
        assert_eq!(report.rows.len(), 7);
        for row in &report.rows {
            assert!(row.system > 0.0 && row.baseline > 0.0, "{row:?}");
            assert!(row.ratio.is_finite(), "{row:?}");
        }
        assert!(
            report
                .notes
                .iter()
                .any(|n| n == "No request failed on either side."),
            "{:?}",
            report.notes
        );
    }
}
