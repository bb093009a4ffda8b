//! Logs and traces: JSON logs to stderr, and OpenTelemetry traces over OTLP/gRPC when an
//! endpoint is configured (one span per reconcile, named `reconcile`).
//!
//! ```text
//!  tracing spans/events ─┬─► fmt (JSON) ─► stderr
//!                        └─► tracing-opentelemetry ─► batch ─► OTLP/gRPC exporter ─► collector
//! ```

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::{Resource, trace::SdkTracerProvider};
use tracing_subscriber::{EnvFilter, layer::SubscriberExt, util::SubscriberInitExt};

/// Setting up logs or traces failed.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The OTLP exporter could not be built.
    #[error("failed to build the OTLP exporter for endpoint {endpoint}")]
    Exporter {
        /// Endpoint.
        endpoint: String,
        /// Cause.
        #[source]
        source: opentelemetry_otlp::ExporterBuildError,
    },
    /// A global subscriber was already installed.
    #[error("failed to install the log subscriber")]
    Install(#[source] tracing_subscriber::util::TryInitError),
}

/// Keeps the trace pipeline alive; flush and shut it down with [`Telemetry::shutdown`].
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Exports every finished span now (blocking).
    pub fn flush(&self) {
        if let Some(p) = &self.provider
            && let Err(e) = p.force_flush()
        {
            tracing::warn!(error = %e, "failed to flush traces");
        }
    }

    /// Flushes and stops the trace pipeline (blocking).
    pub fn shutdown(&self) {
        if let Some(p) = &self.provider
            && let Err(e) = p.shutdown()
        {
            tracing::warn!(error = %e, "failed to shut the trace exporter down");
        }
    }
}

/// Installs the global subscriber: JSON logs filtered by `filter` (e.g. `info`), plus an
/// OTLP/gRPC trace exporter to `otlp_endpoint` when given. Call inside a tokio runtime.
pub fn init(filter: &str, otlp_endpoint: Option<&str>) -> Result<Telemetry, TelemetryError> {
    let env_filter = EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt::layer()
        .json()
        .with_writer(std::io::stderr);
    let provider = match otlp_endpoint {
        None => None,
        Some(endpoint) => {
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint)
                .build()
                .map_err(|source| TelemetryError::Exporter {
                    endpoint: endpoint.to_owned(),
                    source,
                })?;
            Some(
                SdkTracerProvider::builder()
                    .with_batch_exporter(exporter)
                    .with_resource(
                        Resource::builder()
                            .with_service_name("meshlet-operator")
                            .build(),
                    )
                    .build(),
            )
        }
    };
    let otel = provider
        .as_ref()
        .map(|p| tracing_opentelemetry::layer().with_tracer(p.tracer("meshlet-operator")));
    tracing_subscriber::registry()
        .with(env_filter)
        .with(fmt)
        .with(otel)
        .try_init()
        .map_err(TelemetryError::Install)?;
    Ok(Telemetry { provider })
}
