//! Prometheus metrics, in one registry for the process.
//!
//! Names carry their unit and labels stay small: event types only come from the schema
//! folder (anything else is counted as `unknown`), sinks from the configuration.

use std::sync::OnceLock;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Label value for event types that have no schema.
pub const UNKNOWN_TYPE: &str = "unknown";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EventTypeLabels {
    pub event_type: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RejectLabels {
    pub event_type: String,
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SinkLabels {
    pub sink: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SinkOutcomeLabels {
    pub sink: String,
    /// `delivered`, `retried`, `dead_lettered` or `filtered`.
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SinkReasonLabels {
    pub sink: String,
    pub reason: String,
}

fn latency_histogram() -> Histogram {
    // 1 ms to about 33 s.
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

/// Every metric Switchyard exports.
pub struct Metrics {
    registry: Registry,
    pub events_accepted: Family<EventTypeLabels, Counter>,
    pub events_rejected: Family<RejectLabels, Counter>,
    pub publish_duration: Histogram,
    pub deliveries: Family<SinkOutcomeLabels, Counter>,
    pub delivery_duration: Family<SinkLabels, Histogram, fn() -> Histogram>,
    pub retries: Family<SinkLabels, Counter>,
    pub dead_letters: Family<SinkReasonLabels, Counter>,
    pub consumer_pending: Family<SinkLabels, Gauge>,
    pub consumer_oldest_pending_age: Family<SinkLabels, Gauge<f64, AtomicU64>>,
}

impl Metrics {
    fn new() -> Self {
        let mut registry = Registry::with_prefix("switchyard");
        let metrics = Self {
            events_accepted: Family::default(),
            events_rejected: Family::default(),
            publish_duration: latency_histogram(),
            deliveries: Family::default(),
            delivery_duration: Family::new_with_constructor(latency_histogram),
            retries: Family::default(),
            dead_letters: Family::default(),
            consumer_pending: Family::default(),
            consumer_oldest_pending_age: Family::default(),
            registry: Registry::default(),
        };
        registry.register(
            "events_accepted",
            "Events stored in JetStream by the ingress",
            metrics.events_accepted.clone(),
        );
        registry.register(
            "events_rejected",
            "Events the ingress rejected, by reason",
            metrics.events_rejected.clone(),
        );
        registry.register(
            "publish_duration_seconds",
            "Time from publish to JetStream acknowledgement",
            metrics.publish_duration.clone(),
        );
        registry.register(
            "deliveries",
            "Delivery outcomes per sink",
            metrics.deliveries.clone(),
        );
        registry.register(
            "delivery_duration_seconds",
            "Duration of one delivery attempt per sink",
            metrics.delivery_duration.clone(),
        );
        registry.register(
            "retries",
            "Attempts scheduled again per sink",
            metrics.retries.clone(),
        );
        registry.register(
            "dead_letters",
            "Events stored in the dead letter stream per sink and reason",
            metrics.dead_letters.clone(),
        );
        registry.register(
            "consumer_pending_messages",
            "Events waiting for or in delivery per sink",
            metrics.consumer_pending.clone(),
        );
        registry.register(
            "consumer_oldest_pending_age_seconds",
            "Age of the oldest event not yet acknowledged per sink",
            metrics.consumer_oldest_pending_age.clone(),
        );
        Self {
            registry,
            ..metrics
        }
    }

    /// Renders every metric in the Prometheus text format.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        if let Err(err) = encode(&mut text, &self.registry) {
            tracing::warn!(error = %err, "failed to encode metrics");
        }
        text
    }

    pub fn sink(sink: &str) -> SinkLabels {
        SinkLabels {
            sink: sink.to_owned(),
        }
    }

    pub fn sink_outcome(sink: &str, outcome: &str) -> SinkOutcomeLabels {
        SinkOutcomeLabels {
            sink: sink.to_owned(),
            outcome: outcome.to_owned(),
        }
    }
}

/// Returns the process-wide metrics.
pub fn metrics() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::new)
}

/// Content type of [`Metrics::encode`] output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_includes_units_and_labels() {
        let metrics = metrics();
        metrics
            .events_accepted
            .get_or_create(&EventTypeLabels {
                event_type: "chat.created".to_owned(),
            })
            .inc();
        let text = metrics.encode();
        assert!(
            text.contains("switchyard_events_accepted_total{event_type=\"chat.created\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("switchyard_publish_duration_seconds"),
            "{text}"
        );
    }
}
