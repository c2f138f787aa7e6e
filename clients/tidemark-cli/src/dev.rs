//! `tidemark dev`: the four services in one process on embedded defaults.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use tidemark_kit::config::{LogFormat, ServerConfig};
use tidemark_kit::{CancellationToken, ServiceHost};

#[derive(clap::Args, Debug)]
pub struct DevArgs {
    /// Address every service answers on.
    #[arg(long, default_value = "127.0.0.1:50051")]
    listen: SocketAddr,
    /// Directory of the embedded stores (created if missing).
    #[arg(long, default_value = "./.tidemark")]
    data_dir: PathBuf,
    /// Prometheus metrics address, e.g. 127.0.0.1:9090.
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,
    /// Log format.
    #[arg(long, env = "TIDEMARK_LOG_FORMAT", value_enum, default_value = "text")]
    log_format: LogFormat,
    /// Log filter.
    #[arg(long, env = "TIDEMARK_LOG_LEVEL", default_value = "info")]
    log_level: String,
}

pub fn main(args: &DevArgs) -> ExitCode {
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tidemark dev: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tidemark dev: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: &DevArgs) -> anyhow::Result<()> {
    let telemetry =
        tidemark_kit::telemetry::init("tidemark-dev", args.log_format, &args.log_level, None)?;
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("cannot create data directory {}", args.data_dir.display()))?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| {
            format!(
                "cannot listen on {} (is another tidemark running? pick one with --listen)",
                args.listen
            )
        })?;
    let addr = listener.local_addr()?;
    let server = ServerConfig {
        listen: addr,
        metrics_listen: args.metrics_listen,
        log_format: args.log_format,
        log_level: args.log_level.clone(),
        ..ServerConfig::default()
    };
    let shutdown = tidemark_kit::shutdown::on_signal();
    let host = build_host(server, &args.data_dir, shutdown).await?;
    println!(
        "tidemark dev: serving on {addr} (data in {})",
        args.data_dir.display()
    );
    for service in host.health().services() {
        println!("  {service}");
    }
    println!(
        "  grpc.health.v1.Health, grpc.reflection.v1.ServerReflection, grpc.reflection.v1alpha.ServerReflection"
    );
    println!("try: grpcurl -plaintext {addr} list        (Ctrl-C stops)");
    host.serve(listener).await?;
    telemetry.shutdown();
    println!("tidemark dev: stopped");
    Ok(())
}

/// One host carrying all four services, each pointed at the others on the
/// same address.
pub async fn build_host(
    server: ServerConfig,
    data_dir: &std::path::Path,
    shutdown: CancellationToken,
) -> anyhow::Result<ServiceHost> {
    let self_url = format!("http://{}", server.listen);
    let mut host = ServiceHost::new(server.clone(), shutdown);
    let jobs = job_tracker::Config {
        server: server.clone(),
        data_dir: data_dir.to_owned(),
        ..job_tracker::Config::default()
    };
    job_tracker::register(&jobs, &mut host).await?;
    let replication = replicator::Config {
        server: server.clone(),
        job_tracker_url: self_url.clone(),
        data_dir: data_dir.join("tables"),
        ..replicator::Config::default()
    };
    replicator::register(&replication, &mut host).await?;
    let stats = stats_aggregator::Config {
        server: server.clone(),
        buffer: stats_aggregator::BufferKind::Embedded,
        store: stats_aggregator::StoreKind::Embedded,
        data_dir: data_dir.to_owned(),
        ..stats_aggregator::Config::default()
    };
    stats_aggregator::register(&stats, &mut host).await?;
    let verification = verifier::Config {
        server,
        job_tracker_url: self_url.clone(),
        replicator_url: self_url,
        // Where the replicator keeps embedded tables, so `sqlite:` stores
        // name the same database for both.
        data_dir: data_dir.join("tables"),
        ..verifier::Config::default()
    };
    verifier::register(&verification, &mut host).await?;
    Ok(host)
}
