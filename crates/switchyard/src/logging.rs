//! Telemetry set-up for the command line: logs always, traces when configured.

use std::path::Path;

use switchyard_core::config;
use switchyard_telemetry::{LogFormat as TelemetryLogFormat, TelemetryGuard, TraceSettings};

/// Log line format.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// Installs logging, and trace export when `config_path` (if given) or the environment
/// configures an OTLP endpoint.
///
/// A configuration that fails to load is not reported here; the command reports it.
pub fn init(format: LogFormat, config_path: Option<&Path>) -> Option<TelemetryGuard> {
    let traces = config_path
        .and_then(|path| config::load_file(path).ok())
        .map(|config| TraceSettings {
            otlp_endpoint: config.telemetry.otlp_endpoint,
            service_name: config.telemetry.service_name,
        })
        .unwrap_or_default();
    let format = match format {
        LogFormat::Text => TelemetryLogFormat::Text,
        LogFormat::Json => TelemetryLogFormat::Json,
    };
    // Long-running commands log their work; one-shot commands only warnings and errors.
    let default_filter = if config_path.is_some() {
        switchyard_telemetry::DEFAULT_LOG_FILTER
    } else {
        switchyard_telemetry::QUIET_LOG_FILTER
    };
    match switchyard_telemetry::init(format, default_filter, &traces) {
        Ok(guard) => Some(guard),
        Err(err) => {
            eprintln!("warning: traces are off: {err}");
            None
        }
    }
}
