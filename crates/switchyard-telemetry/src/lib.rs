//! Switchyard telemetry: logs, traces and metrics.
//!
//! - Logs go through `tracing`, as text for people or JSON for collectors.
//! - Traces are exported with OTLP over HTTP when an endpoint is configured (the standard
//!   `OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, or the config's
//!   `telemetry.otlp_endpoint`). Without one, no OpenTelemetry layer is installed, so spans
//!   cost what plain `tracing` spans cost.
//! - [`propagation`] carries the W3C trace context across HTTP and NATS headers.
//! - [`metrics`] keeps the Prometheus metrics served on `/metrics`.
//! - [`throttle`] rate-limits repeated log lines.

pub mod metrics;
pub mod propagation;
pub mod throttle;

use std::io::IsTerminal;
use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// Log filter of long-running commands when `RUST_LOG` is unset.
pub const DEFAULT_LOG_FILTER: &str = "info";
/// Log filter of one-shot commands when `RUST_LOG` is unset, so their output stays clean.
pub const QUIET_LOG_FILTER: &str = "warn";
/// Service name reported with every span unless `OTEL_SERVICE_NAME` is set.
pub const DEFAULT_SERVICE_NAME: &str = "switchyard";
/// Environment variables that turn trace export on, as the OpenTelemetry spec names them.
const OTLP_ENDPOINT_VARIABLES: [&str; 2] = [
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
];
/// Log targets of Switchyard's crates, whose debug spans are exported.
const SWITCHYARD_TARGETS: [&str; 5] = [
    "switchyard",
    "switchyard_core",
    "switchyard_ingress",
    "switchyard_sinks",
    "switchyard_telemetry",
];
/// How long the exporter may take to flush at shutdown.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// Trace export settings; the `OTEL_*` environment variables take precedence.
#[derive(Debug, Clone, Default)]
pub struct TraceSettings {
    /// OTLP/HTTP base endpoint, such as `http://127.0.0.1:4318`.
    pub otlp_endpoint: Option<String>,
    pub service_name: Option<String>,
}

/// A failure to set up telemetry.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("failed to build the OTLP trace exporter for {endpoint}: {message}")]
    Exporter { endpoint: String, message: String },
}

/// Flushes and stops the trace exporter when dropped.
#[must_use = "dropping the guard stops trace export"]
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
}

impl TelemetryGuard {
    /// Reports whether spans are exported.
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take()
            && let Err(err) = provider.shutdown_with_timeout(SHUTDOWN_TIMEOUT)
        {
            eprintln!("warning: failed to flush traces at shutdown: {err}");
        }
    }
}

/// Installs the global subscriber: the log layer, and the OpenTelemetry layer when an
/// endpoint is configured. Logs go to stderr so command output stays on stdout.
///
/// Call it before starting an async runtime: the exporter runs its own thread with a
/// blocking HTTP client.
pub fn init(
    format: LogFormat,
    default_filter: &str,
    traces: &TraceSettings,
) -> Result<TelemetryGuard, TelemetryError> {
    let filter =
        || EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let log_layer = match format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_ansi(std::io::stderr().is_terminal())
            .with_writer(std::io::stderr)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_writer(std::io::stderr)
            .boxed(),
    };

    let provider = build_provider(traces)?;
    let otel_layer = provider.as_ref().map(|provider| {
        tracing_opentelemetry::layer().with_tracer(provider.tracer(DEFAULT_SERVICE_NAME))
    });
    // Switchyard's per-event spans are at debug level, so without an exporter (and with
    // the default log filter) no layer enables them and they cost next to nothing. The
    // exporter takes them from Switchyard's own crates only, not the libraries' spans.
    let exported = Targets::new()
        .with_default(LevelFilter::INFO)
        .with_targets(SWITCHYARD_TARGETS.map(|target| (target, LevelFilter::DEBUG)));

    let _ = tracing_subscriber::registry()
        .with(log_layer.with_filter(filter()))
        .with(otel_layer.with_filter(exported))
        .try_init();
    Ok(TelemetryGuard { provider })
}

fn configured_endpoint(traces: &TraceSettings) -> Option<String> {
    let disabled =
        std::env::var("OTEL_SDK_DISABLED").is_ok_and(|value| value.eq_ignore_ascii_case("true"));
    if disabled {
        return None;
    }
    let from_env = OTLP_ENDPOINT_VARIABLES
        .iter()
        .find_map(|name| std::env::var(name).ok().filter(|value| !value.is_empty()));
    from_env.or_else(|| traces.otlp_endpoint.clone())
}

fn build_provider(traces: &TraceSettings) -> Result<Option<SdkTracerProvider>, TelemetryError> {
    let Some(endpoint) = configured_endpoint(traces) else {
        return Ok(None);
    };
    // The exporter's HTTP client is built without a default TLS provider.
    let _ = rustls::crypto::ring::default_provider().install_default();

    let mut builder = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpBinary);
    // The exporter reads an endpoint from the environment itself. An endpoint from the
    // config file is the base URL, so the signal path is added here.
    let from_env = OTLP_ENDPOINT_VARIABLES
        .iter()
        .any(|name| std::env::var(name).is_ok_and(|value| !value.is_empty()));
    if !from_env {
        builder = builder.with_endpoint(format!("{}/v1/traces", endpoint.trim_end_matches('/')));
    }
    let exporter = builder.build().map_err(|err| TelemetryError::Exporter {
        endpoint: endpoint.clone(),
        message: err.to_string(),
    })?;

    let service_name = std::env::var("OTEL_SERVICE_NAME")
        .ok()
        .or_else(|| traces.service_name.clone())
        .unwrap_or_else(|| DEFAULT_SERVICE_NAME.to_owned());
    let resource = Resource::builder().with_service_name(service_name).build();
    Ok(Some(
        SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource)
            .build(),
    ))
}
