//! Switchyard sinks: each sink is one durable pull consumer `sink_<name>` on the events
//! stream, shared by every router that runs the same configuration, so the routers split
//! its work.
//!
//! - [`retry`] contains the one retry decision.
//! - [`http`] sends a request to a `webhook` or `n8n` endpoint.
//! - [`signing`] computes Standard Webhooks signatures.
//! - [`template`] compiles filters and transforms.
//! - [`worker`] runs the delivery loop.
//! - [`dlq`] writes, lists and replays dead letters.

pub mod dlq;
pub mod http;
pub mod retry;
pub mod signing;
pub mod template;
pub mod worker;

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use switchyard_core::config::{Config, SinkConfig, ValidationError};
use switchyard_core::event::{EventPattern, REPLAY_SUBJECT_PREFIX};
use switchyard_core::schema::SchemaRegistry;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use switchyard_telemetry::metrics::{Metrics, metrics};
use switchyard_telemetry::throttle::LogThrottle;

use crate::http::HttpTarget;
use crate::template::SinkTemplates;
use crate::worker::SinkWorker;

/// Unacknowledged messages a consumer allows across all routers, for unordered sinks.
pub const MAX_ACK_PENDING: i64 = 10_000;

/// A sink that could not be started.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("sink {sink}: {message}")]
    Setup { sink: String, message: String },
    #[error("sink {sink}: failed to create or update consumer {consumer}: {message}")]
    Consumer {
        sink: String,
        consumer: String,
        message: String,
    },
}

/// Returns the durable consumer name of a sink.
pub fn consumer_name(sink: &str) -> String {
    format!("sink_{sink}")
}

/// Checks what only the sinks can check: templates compile, secrets decode, headers are
/// valid. Errors name their key, like [`Config::validate`].
pub fn check(config: &Config) -> Vec<ValidationError> {
    let mut errors = Vec::new();
    let Ok(client) = http::build_client() else {
        return errors;
    };
    for (index, sink) in config.sinks.iter().enumerate() {
        let key = format!("sinks[{index}]");
        if let Err(err) = SinkTemplates::new(sink.filter.as_deref(), sink.transform.as_deref()) {
            let field = match err {
                template::TemplateError::Filter(_) => "filter",
                template::TemplateError::Transform(_) => "transform",
            };
            errors.push(ValidationError {
                key: format!("{key}.{field}"),
                message: err.to_string(),
            });
        }
        if let Err(err) = HttpTarget::new(sink, client.clone()) {
            let field = match err {
                http::HttpSetupError::Secret(_) => "secrets",
                // `Config::validate` already reports an invalid URL under the same key.
                http::HttpSetupError::Url(_) => continue,
                _ => "headers",
            };
            errors.push(ValidationError {
                key: format!("{key}.{field}"),
                message: err.to_string(),
            });
        }
    }
    errors
}

/// Creates or updates every sink's consumer and starts its delivery loop.
pub async fn start(
    config: &Config,
    jetstream: &jetstream::Context,
    schemas: Arc<SchemaRegistry>,
    shutdown: CancellationToken,
) -> Result<Vec<JoinHandle<()>>, SinkError> {
    let client = http::build_client().map_err(|err| SinkError::Setup {
        sink: "*".to_owned(),
        message: format!("failed to build the HTTP client: {err}"),
    })?;

    let mut workers = Vec::with_capacity(config.sinks.len());
    for sink in &config.sinks {
        let setup_error = |message: String| SinkError::Setup {
            sink: sink.name.clone(),
            message,
        };
        let templates = SinkTemplates::new(sink.filter.as_deref(), sink.transform.as_deref())
            .map_err(|err| setup_error(err.to_string()))?;
        let target =
            HttpTarget::new(sink, client.clone()).map_err(|err| setup_error(err.to_string()))?;
        let consumer = ensure_consumer(jetstream, &config.streams.events.name, sink).await?;
        workers.push(SinkWorker {
            config: sink.clone(),
            consumer,
            jetstream: jetstream.clone(),
            schemas: schemas.clone(),
            templates,
            target,
            limiter: SinkWorker::limiter_for(sink),
            throttle: LogThrottle::default(),
        });
    }

    let mut handles = Vec::with_capacity(workers.len() * 2);
    for worker in workers {
        let monitor = PendingMonitor {
            sink: worker.config.name.clone(),
            consumer: worker.consumer.clone(),
            jetstream: jetstream.clone(),
            stream_name: config.streams.events.name.clone(),
        };
        handles.push(tokio::spawn(monitor.run(shutdown.clone())));
        handles.push(tokio::spawn(Arc::new(worker).run(shutdown.clone())));
    }
    Ok(handles)
}

/// How often the pending gauges are refreshed.
const PENDING_POLL_INTERVAL: Duration = Duration::from_secs(5);

/// Keeps the per-sink pending count and oldest pending age up to date.
struct PendingMonitor {
    sink: String,
    consumer: consumer::PullConsumer,
    jetstream: jetstream::Context,
    stream_name: String,
}

impl PendingMonitor {
    async fn run(self, shutdown: CancellationToken) {
        let mut ticks = tokio::time::interval(PENDING_POLL_INTERVAL);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = ticks.tick() => {}
            }
            if let Err(err) = self.refresh().await {
                tracing::debug!(sink = %self.sink, error = %err, "failed to refresh pending metrics");
            }
        }
    }

    async fn refresh(&self) -> Result<(), async_nats::Error> {
        let info = self.consumer.get_info().await?;
        let pending = info.num_pending.saturating_add(info.num_ack_pending as u64);
        let labels = Metrics::sink(&self.sink);
        metrics()
            .consumer_pending
            .get_or_create(&labels)
            .set(i64::try_from(pending).unwrap_or(i64::MAX));

        // The oldest event not yet acknowledged is the first one after the ack floor that
        // matches one of the consumer's filters.
        let mut oldest = None;
        if pending > 0 {
            let stream = self.jetstream.get_stream_no_info(&self.stream_name).await?;
            let start = info.ack_floor.stream_sequence + 1;
            for filter in &info.config.filter_subjects {
                if let Ok(message) = stream
                    .direct_get_next_for_subject(filter.as_str(), Some(start))
                    .await
                {
                    oldest = Some(oldest.map_or(message.time, |time: time::OffsetDateTime| {
                        time.min(message.time)
                    }));
                }
            }
        }
        let age = oldest
            .map(|time| {
                (time::OffsetDateTime::now_utc() - time)
                    .as_seconds_f64()
                    .max(0.0)
            })
            .unwrap_or(0.0);
        metrics()
            .consumer_oldest_pending_age
            .get_or_create(&labels)
            .set(age);
        Ok(())
    }
}

/// Creates the sink's durable consumer or updates it to the configuration.
///
/// A new consumer starts with events published after its creation, as a new webhook
/// endpoint does in Svix or Convoy; `dlq replay` sends older events again.
async fn ensure_consumer(
    jetstream: &jetstream::Context,
    stream_name: &str,
    sink: &SinkConfig,
) -> Result<consumer::PullConsumer, SinkError> {
    let name = consumer_name(&sink.name);
    let consumer_error = |message: String| SinkError::Consumer {
        sink: sink.name.clone(),
        consumer: name.clone(),
        message,
    };

    let mut filter_subjects = Vec::with_capacity(sink.events.len() + 1);
    for pattern in &sink.events {
        let pattern: EventPattern =
            pattern
                .parse()
                .map_err(|err: switchyard_core::event::EventNameError| {
                    consumer_error(err.to_string())
                })?;
        filter_subjects.push(pattern.subject_filter());
    }
    filter_subjects.push(format!("{REPLAY_SUBJECT_PREFIX}.{}.>", sink.name));

    let ordered = sink.delivery.ordered;
    let consumer_config = consumer::pull::Config {
        durable_name: Some(name.clone()),
        name: Some(name.clone()),
        description: Some(format!(
            "Switchyard sink {} ({})",
            sink.name,
            sink.kind.as_str()
        )),
        filter_subjects,
        deliver_policy: consumer::DeliverPolicy::New,
        ack_policy: consumer::AckPolicy::Explicit,
        ack_wait: sink.delivery.ack_wait,
        // Attempts are counted by the router, which dead-letters instead of letting the
        // server drop a message silently.
        max_deliver: -1,
        max_ack_pending: if ordered { 1 } else { MAX_ACK_PENDING },
        ..Default::default()
    };

    let stream = jetstream
        .get_stream(stream_name)
        .await
        .map_err(|err| consumer_error(err.to_string()))?;
    stream
        .create_consumer(consumer_config)
        .await
        .map_err(|err| consumer_error(err.to_string()))
}
