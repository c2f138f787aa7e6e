//! Logs and traces: JSON (or text) logs through `tracing`, every span an
//! OpenTelemetry span (so its trace continues across services: see
//! `trace_context`), every JSON line with its trace and span ids
//! (`openTelemetry: {traceId, spanId}`), and OTLP trace export when
//! `OTEL_EXPORTER_OTLP_ENDPOINT` is set.

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use tracing_subscriber::filter::{FilterExt as _, filter_fn};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::config::LogFormat;
use crate::error::{KitError, KitResult};

/// Keeps the trace pipeline alive; [`Telemetry::shutdown`] flushes it.
#[derive(Default)]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Flushes buffered spans and stops the exporter.
    pub fn shutdown(self) {
        if let Some(provider) = self.provider
            && let Err(e) = provider.shutdown()
        {
            tracing::warn!(error = %e, "telemetry flush failed");
        }
    }
}

/// Installs the global subscriber. A second call (several services in one
/// process, or tests) keeps the first subscriber and returns a no-op guard.
///
/// `otlp_endpoint` is usually `OTEL_EXPORTER_OTLP_ENDPOINT`; the exporter
/// reads the standard `OTEL_…` variables for everything else.
///
/// # Errors
/// When the OTLP exporter cannot be built from its settings.
pub fn init(
    service_name: &'static str,
    format: LogFormat,
    level: &str,
    otlp_endpoint: Option<&str>,
) -> KitResult<Telemetry> {
    init_with_writer(service_name, format, level, otlp_endpoint, std::io::stdout)
}

/// [`init`] writing the log lines to `writer` (a benchmark's sink, a
/// test's buffer) instead of stdout.
///
/// # Errors
/// When the OTLP exporter cannot be built from its settings.
pub fn init_with_writer<W>(
    service_name: &'static str,
    format: LogFormat,
    level: &str,
    otlp_endpoint: Option<&str>,
    writer: W,
) -> KitResult<Telemetry>
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let filter = EnvFilter::try_new(level).map_err(|e| KitError::Telemetry(e.to_string()))?;
    let fmt = match format {
        LogFormat::Json => json_subscriber::fmt::layer()
            .with_writer(writer)
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .with_opentelemetry_ids(true)
            .boxed(),
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(writer)
            .compact()
            .boxed(),
    };
    // Spans get trace and span ids whether or not they are exported: the
    // ids go into the logs and into outgoing calls either way.
    let mut provider = SdkTracerProvider::builder()
        .with_resource(Resource::builder().with_service_name(service_name).build());
    let exporting = match otlp_endpoint.filter(|e| !e.is_empty()) {
        Some(endpoint) => {
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint)
                .build()
                .map_err(|e| KitError::Telemetry(e.to_string()))?;
            provider = provider.with_batch_exporter(exporter);
            true
        }
        None => false,
    };
    if !exporting {
        // Nothing is exported: spans keep their (valid) ids for the logs
        // and the outgoing `traceparent`, but none is recorded, which
        // would cost every RPC the building of a span nobody reads.
        provider = provider.with_sampler(Sampler::AlwaysOff);
    }
    let provider = provider.build();
    // Spans at INFO and above (each RPC's, each unit's) whatever the log
    // level, so traces cross services even when only warnings are logged;
    // no events: they are the logs' (a long span would otherwise keep
    // every event it saw until it closes).
    let otel = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer(service_name))
        .with_filter(filter_fn(|meta| {
            meta.is_span() && *meta.level() <= tracing::Level::INFO
        }));
    // The logs see the spans the traces do, whatever the log level, so a
    // warning inside an RPC still names the RPC's trace and span.
    let filter = filter.or(filter_fn(|meta| {
        meta.is_span() && *meta.level() <= tracing::Level::INFO
    }));
    let installed = tracing_subscriber::registry()
        .with(fmt.with_filter(filter))
        .with(otel)
        .try_init()
        .is_ok();
    Ok(Telemetry {
        provider: (installed && exporting).then_some(provider),
    })
}
