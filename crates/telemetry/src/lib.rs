//! Telemetry: tracing to stderr, and OpenTelemetry OTLP export of traces
//! when an endpoint is configured (off by default). `init` returns a guard
//! that flushes spans when dropped.

pub mod metrics;
pub mod propagation;

use opentelemetry::trace::TracerProvider as _;
pub use propagation::{TraceContextLayer, TracedChannel, install_propagator, traced};
use tracing_subscriber::{EnvFilter, layer::SubscriberExt, util::SubscriberInitExt};

/// Flushes and shuts down the OTLP exporter when dropped.
#[derive(Debug, Default)]
pub struct TelemetryGuard {
    provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take() {
            let _ = p.shutdown();
        }
    }
}

/// Install the global subscriber. `filter` uses EnvFilter syntax and is
/// overridden by `RUST_LOG`; `otlp_endpoint` empty means no export.
pub fn init(service: &str, filter: &str, otlp_endpoint: &str) -> anyhow::Result<TelemetryGuard> {
    install_propagator();
    let filter = EnvFilter::try_from_default_env().or_else(|_| EnvFilter::try_new(filter))?;
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_target(false);
    if otlp_endpoint.is_empty() {
        tracing_subscriber::registry().with(filter).with(fmt).try_init()?;
        return Ok(TelemetryGuard::default());
    }
    use opentelemetry_otlp::WithExportConfig;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(otlp_endpoint)
        .build()?;
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(
            opentelemetry_sdk::Resource::builder()
                .with_service_name(service.to_owned())
                .build(),
        )
        .build();
    let tracer = provider.tracer(service.to_owned());
    opentelemetry::global::set_tracer_provider(provider.clone());
    tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .with(tracing_opentelemetry::layer().with_tracer(tracer))
        .try_init()?;
    Ok(TelemetryGuard {
        provider: Some(provider),
    })
}
