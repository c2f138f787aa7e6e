//! What every service `main` does, once: load and validate configuration
//! (exit 64 on bad config), start telemetry, bind, run until a signal, flush.

use std::fmt::Display;
use std::future::Future;
use std::path::Path;
use std::process::ExitCode;

use serde::Serialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::{self, ServiceConfig};

/// `EX_USAGE` from sysexits.h: the configuration is wrong.
pub const EXIT_BAD_CONFIG: u8 = 64;
/// `EX_UNAVAILABLE`: the listen address could not be bound.
pub const EXIT_UNAVAILABLE: u8 = 69;

/// Loads the configuration, or prints why it is wrong.
///
/// # Errors
/// Returns exit code 64 after printing the reason to stderr.
pub fn load_config<C: ServiceConfig>(
    service: &str,
    file: Option<&Path>,
    flags: &impl Serialize,
) -> Result<C, ExitCode> {
    config::load(file, flags).map_err(|e| {
        eprintln!("{service}: bad configuration: {e}");
        ExitCode::from(EXIT_BAD_CONFIG)
    })
}

/// Runs a service to completion: telemetry, bind, `run(config, listener,
/// shutdown)` until SIGTERM/SIGINT, then flush telemetry.
pub fn run_service<C, F, Fut, E>(service: &'static str, config: C, run: F) -> ExitCode
where
    C: ServiceConfig + Send + 'static,
    F: FnOnce(C, TcpListener, CancellationToken) -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: Display,
{
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{service}: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let server = config.server().clone();
        let otlp = std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT").ok();
        let telemetry = match crate::telemetry::init(
            service,
            server.log_format,
            &server.log_level,
            otlp.as_deref(),
        ) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("{service}: bad configuration: {e}");
                return ExitCode::from(EXIT_BAD_CONFIG);
            }
        };
        let listener = match TcpListener::bind(server.listen).await {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(addr = %server.listen, error = %e, "cannot bind listen address");
                telemetry.shutdown();
                return ExitCode::from(EXIT_UNAVAILABLE);
            }
        };
        let shutdown = crate::shutdown::on_signal();
        let outcome = run(config, listener, shutdown).await;
        let code = match outcome {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!(error = %e, "service failed");
                ExitCode::FAILURE
            }
        };
        telemetry.shutdown();
        code
    })
}
