//! The delivery loop of one sink: pull from its durable consumer, deliver, then ack, nak
//! with a delay, or dead-letter and term.
//!
//! Messages are pulled only when a worker slot is free, so nothing waits in the router's
//! memory while its ack wait runs. The backlog stays in JetStream however long a sink
//! hangs. An attempt that outlives half the ack wait sends in-progress acks, so JetStream
//! does not hand the message to another router while it is still being delivered.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, AckKind, consumer::PullConsumer};
use bytes::Bytes;
use futures::StreamExt;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use switchyard_core::config::SinkConfig;
use switchyard_core::event::{EventType, headers as names};
use switchyard_core::schema::SchemaRegistry;
use switchyard_telemetry::metrics::{Metrics, SinkReasonLabels, metrics};
use switchyard_telemetry::propagation;
use switchyard_telemetry::throttle::LogThrottle;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::dlq::{DeadLetterInfo, publish_dead_letter};
use crate::http::{EventHeaders, HttpTarget};
use crate::retry::{AttemptOutcome, DeadLetterReason, Decision, decide};
use crate::template::{self, SinkTemplates};

/// How long one pull request waits for messages before it is renewed.
const PULL_EXPIRES: Duration = Duration::from_secs(5);
/// Pause after a failed pull, such as while NATS is down.
const PULL_ERROR_PAUSE: Duration = Duration::from_secs(1);
/// Delay before a message whose dead letter could not be stored is tried again.
const DEAD_LETTER_RETRY_DELAY: Duration = Duration::from_secs(5);
/// How long a dead letter publish may wait for its acknowledgement.
const DEAD_LETTER_TIMEOUT: Duration = Duration::from_secs(5);

/// Everything one sink needs to deliver.
pub struct SinkWorker {
    pub config: SinkConfig,
    pub consumer: PullConsumer,
    pub jetstream: jetstream::Context,
    pub schemas: Arc<SchemaRegistry>,
    pub templates: SinkTemplates,
    pub target: HttpTarget,
    pub limiter: Option<DefaultDirectRateLimiter>,
    /// Rate limit for repeated retry and give-up log lines.
    pub throttle: LogThrottle,
}

/// Outcome of preparing an event, before any attempt.
enum Prepared {
    /// Deliver this body with this content type.
    Deliver { body: Bytes, content_type: String },
    /// The filter excluded the event.
    Skip,
    /// The event cannot be delivered by this sink.
    Reject {
        reason: DeadLetterReason,
        error: String,
    },
}

/// Final state of the event after a run of attempts.
enum Settled {
    Delivered,
    /// Nak with this delay, so JetStream redelivers the event later.
    RetryLater(Duration),
    GiveUp {
        reason: DeadLetterReason,
        attempt: u32,
        outcome: AttemptOutcome,
    },
}

/// The attributes of a stored event, read from its headers and subject.
struct StoredEvent {
    id: String,
    event_type: Option<EventType>,
    source: String,
    time: String,
    content_type: String,
    traceparent: Option<String>,
    tracestate: Option<String>,
    stream_sequence: u64,
    delivered: u32,
}

impl SinkWorker {
    /// Builds a rate limiter for `config`, if it sets one.
    pub fn limiter_for(config: &SinkConfig) -> Option<DefaultDirectRateLimiter> {
        let per_second = std::num::NonZeroU32::new(config.delivery.rate_limit_per_second?)?;
        Some(RateLimiter::direct(Quota::per_second(per_second)))
    }

    fn concurrency(&self) -> usize {
        if self.config.delivery.ordered {
            1
        } else {
            self.config.delivery.concurrency
        }
    }

    /// Runs until `shutdown` fires, then waits for deliveries in flight.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let concurrency = self.concurrency();
        let slots = Arc::new(Semaphore::new(concurrency));
        tracing::info!(sink = %self.config.name, concurrency, ordered = self.config.delivery.ordered, "sink started");

        loop {
            let first = tokio::select! {
                () = shutdown.cancelled() => break,
                permit = slots.clone().acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => break,
                },
            };
            let mut permits = vec![first];
            while let Ok(permit) = slots.clone().try_acquire_owned() {
                permits.push(permit);
            }

            let batch = self
                .consumer
                .batch()
                .max_messages(permits.len())
                .expires(PULL_EXPIRES)
                .messages()
                .await;
            let mut batch = match batch {
                Ok(batch) => batch,
                Err(err) => {
                    tracing::warn!(sink = %self.config.name, error = %err, "pull request failed");
                    pause(&shutdown, PULL_ERROR_PAUSE).await;
                    continue;
                }
            };

            loop {
                let next = tokio::select! {
                    () = shutdown.cancelled() => break,
                    next = batch.next() => next,
                };
                let Some(result) = next else { break };
                let message = match result {
                    Ok(message) => message,
                    Err(err) => {
                        tracing::warn!(sink = %self.config.name, error = %err, "pull failed");
                        pause(&shutdown, PULL_ERROR_PAUSE).await;
                        break;
                    }
                };
                let Some(permit) = permits.pop() else {
                    // The server never sends more than requested; if it did, the message
                    // is redelivered after its ack wait.
                    break;
                };
                let worker = self.clone();
                let shutdown = shutdown.clone();
                tokio::spawn(async move {
                    worker.handle(message, &shutdown).await;
                    drop(permit);
                });
            }
        }

        // Wait for deliveries in flight; their messages are acked, nakked or dead-lettered.
        let in_flight = u32::try_from(concurrency).unwrap_or(u32::MAX);
        let _ = slots.acquire_many(in_flight).await;
        tracing::info!(sink = %self.config.name, "sink stopped");
    }

    async fn handle(&self, message: jetstream::Message, shutdown: &CancellationToken) {
        let Some(event) = stored_event(&message) else {
            tracing::error!(sink = %self.config.name, subject = %message.subject, "message without JetStream metadata; terminating it");
            let _ = message.ack_with(AckKind::Term).await;
            return;
        };
        // tracing-opentelemetry 0.34 exports unsigned integers as strings, so integer span
        // attributes are recorded as i64.
        let stream_sequence = i64::try_from(event.stream_sequence).unwrap_or(i64::MAX);
        let span = tracing::debug_span!(
            "deliver",
            otel.name = %format!("process {}", message.subject),
            otel.kind = "consumer",
            messaging.system = "nats",
            messaging.operation.type = "process",
            messaging.destination.name = %message.subject,
            messaging.consumer.group.name = %crate::consumer_name(&self.config.name),
            messaging.message.id = %event.id,
            messaging.nats.stream_sequence = stream_sequence,
            sink = %self.config.name,
            event.id = %event.id,
            delivery_count = i64::from(event.delivered),
        );
        if let Some(headers) = &message.headers {
            propagation::continue_trace(&span, &propagation::NatsHeaders(headers));
        }
        self.deliver(message, event, shutdown)
            .instrument(span)
            .await;
    }

    async fn deliver(
        &self,
        message: jetstream::Message,
        event: StoredEvent,
        shutdown: &CancellationToken,
    ) {
        let (body, content_type) = match self.prepare(&message, &event) {
            Prepared::Deliver { body, content_type } => (body, content_type),
            Prepared::Skip => {
                tracing::debug!(event.id = %event.id, "filtered out");
                self.count_outcome("filtered");
                ack(&message, AckKind::Ack).await;
                return;
            }
            Prepared::Reject { reason, error } => {
                tracing::error!(sink = %self.config.name, event.id = %event.id, reason = reason.as_str(), error = %error, "event cannot be delivered; dead-lettering");
                self.dead_letter(&message, &event, reason, event.delivered, None, &error)
                    .await;
                return;
            }
        };

        let ack_wait = self.config.delivery.ack_wait;
        let attempts = self.attempt_until_settled(&event, &content_type, body, shutdown);
        match with_progress(&message, ack_wait, attempts).await {
            Settled::Delivered => ack(&message, AckKind::Ack).await,
            Settled::RetryLater(delay) => ack(&message, AckKind::Nak(Some(delay))).await,
            Settled::GiveUp {
                reason,
                attempt,
                outcome,
            } => {
                let error = outcome.describe();
                self.dead_letter(&message, &event, reason, attempt, Some(&outcome), &error)
                    .await;
            }
        }
    }

    /// Runs attempts until one settles the event: delivered, to be retried later, or given
    /// up. Only ordered sinks attempt more than once here, because they retry in place.
    async fn attempt_until_settled(
        &self,
        event: &StoredEvent,
        content_type: &str,
        body: Bytes,
        shutdown: &CancellationToken,
    ) -> Settled {
        let mut attempt = event.delivered;
        loop {
            if let Some(limiter) = &self.limiter {
                limiter.until_ready().await;
            }
            let (outcome, decision) = self
                .attempt(event, attempt, content_type, body.clone())
                .await;
            match decision {
                Decision::Ack => {
                    tracing::debug!(sink = %self.config.name, event.id = %event.id, attempt, status = outcome.status(), "delivered");
                    self.count_outcome("delivered");
                    return Settled::Delivered;
                }
                Decision::Retry { delay } => {
                    self.count_outcome("retried");
                    metrics()
                        .retries
                        .get_or_create(&Metrics::sink(&self.config.name))
                        .inc();
                    let key = format!("{}:retry:{}", self.config.name, outcome.kind());
                    if let Some(suppressed) = self.throttle.check(&key) {
                        tracing::warn!(
                            sink = %self.config.name,
                            event.id = %event.id,
                            attempt,
                            outcome = %outcome.describe(),
                            delay_ms = delay.as_millis() as u64,
                            suppressed,
                            "delivery failed; will retry"
                        );
                    }
                    if self.config.delivery.ordered && !shutdown.is_cancelled() {
                        // Ordered sinks hold the message and retry in place, so no later
                        // event overtakes it; in-progress acks extend the ack wait meanwhile.
                        pause(shutdown, delay).await;
                        if !shutdown.is_cancelled() {
                            attempt += 1;
                            continue;
                        }
                    }
                    return Settled::RetryLater(delay);
                }
                Decision::DeadLetter(reason) => {
                    let key = format!("{}:give-up:{}", self.config.name, reason.as_str());
                    if let Some(suppressed) = self.throttle.check(&key) {
                        tracing::error!(
                            sink = %self.config.name,
                            event.id = %event.id,
                            attempt,
                            reason = reason.as_str(),
                            outcome = %outcome.describe(),
                            suppressed,
                            "giving up; dead-lettering"
                        );
                    }
                    return Settled::GiveUp {
                        reason,
                        attempt,
                        outcome,
                    };
                }
            }
        }
    }

    /// Sends one attempt in its own client span and decides what follows.
    async fn attempt(
        &self,
        event: &StoredEvent,
        attempt: u32,
        content_type: &str,
        body: Bytes,
    ) -> (AttemptOutcome, Decision) {
        let span = tracing::debug_span!(
            "attempt",
            otel.name = "POST",
            otel.kind = "client",
            http.request.method = "POST",
            server.address = %self.target.host(),
            sink = %self.config.name,
            attempt = i64::from(attempt),
            http.response.status_code = tracing::field::Empty,
            error.type = tracing::field::Empty,
            decision = tracing::field::Empty,
            retry_delay_ms = tracing::field::Empty,
        );
        // With an exporter, the request continues this span; without one, the producer's
        // context is passed on unchanged.
        let (traceparent, tracestate) = match propagation::current_headers(&span) {
            Some((traceparent, tracestate)) => (Some(traceparent), tracestate),
            None => (event.traceparent.clone(), event.tracestate.clone()),
        };
        let headers = EventHeaders {
            id: &event.id,
            event_type: event
                .event_type
                .as_ref()
                .map(EventType::as_str)
                .unwrap_or_default(),
            source: &event.source,
            time: &event.time,
            traceparent: traceparent.as_deref(),
            tracestate: tracestate.as_deref(),
        };

        let started = Instant::now();
        let outcome = self
            .target
            .send(&headers, content_type, body)
            .instrument(span.clone())
            .await;
        metrics()
            .delivery_duration
            .get_or_create(&Metrics::sink(&self.config.name))
            .observe(started.elapsed().as_secs_f64());
        let decision = decide(self.target.kind, &self.config.delivery, attempt, &outcome);

        match outcome.status() {
            Some(status) => span.record("http.response.status_code", i64::from(status)),
            None => span.record("error.type", outcome.kind()),
        };
        match &decision {
            Decision::Ack => span.record("decision", "ack"),
            Decision::Retry { delay } => {
                span.record("retry_delay_ms", delay.as_millis() as i64);
                span.record("decision", "retry")
            }
            Decision::DeadLetter(reason) => span.record("decision", reason.as_str()),
        };
        (outcome, decision)
    }

    fn count_outcome(&self, outcome: &str) {
        metrics()
            .deliveries
            .get_or_create(&Metrics::sink_outcome(&self.config.name, outcome))
            .inc();
    }

    /// Validates the event, applies the filter and renders the body.
    fn prepare(&self, message: &jetstream::Message, event: &StoredEvent) -> Prepared {
        let Some(event_type) = &event.event_type else {
            return Prepared::Reject {
                reason: DeadLetterReason::Invalid,
                error: format!("subject {} carries no valid event type", message.subject),
            };
        };
        // The ingress rejected duplicate keys already; a direct NATS publisher's duplicate
        // key is validated with the last value and forwarded unchanged.
        let data: serde_json::Value = match switchyard_core::json::parse_checked_before(
            switchyard_core::json::strip_bom(&message.payload),
        ) {
            Ok(data) => data,
            Err(err) => {
                return Prepared::Reject {
                    reason: DeadLetterReason::Invalid,
                    error: err.to_string(),
                };
            }
        };
        // Producers that publish to NATS directly skip the ingress, so the schema is
        // checked again here.
        match self.schemas.validate(event_type, &data) {
            None => {
                return Prepared::Reject {
                    reason: DeadLetterReason::Invalid,
                    error: format!("no schema for event type {event_type}"),
                };
            }
            Some(violations) if !violations.is_empty() => {
                let first = &violations[0];
                return Prepared::Reject {
                    reason: DeadLetterReason::Invalid,
                    error: format!(
                        "schema violation at \"{}\": {} ({} in all)",
                        first.pointer,
                        first.message,
                        violations.len()
                    ),
                };
            }
            Some(_) => {}
        }

        if !self.templates.has_filter() && !self.templates.has_transform() {
            // The payload goes out unchanged, so the template variables are not built:
            // converting the payload for minijinja costs about as much as the schema check.
            return Prepared::Deliver {
                body: message.payload.clone(),
                content_type: event.content_type.clone(),
            };
        }
        let context = template::context(
            event_type.as_str(),
            &event.id,
            &event.source,
            &event.time,
            &data,
        );
        match self.templates.passes(&context) {
            Ok(true) => {}
            Ok(false) => return Prepared::Skip,
            Err(err) => {
                return Prepared::Reject {
                    reason: DeadLetterReason::Transform,
                    error: err.to_string(),
                };
            }
        }
        match self.templates.render(&context) {
            Ok(Some(rendered)) => Prepared::Deliver {
                body: Bytes::from(rendered),
                content_type: "application/json".to_owned(),
            },
            Ok(None) => Prepared::Deliver {
                body: message.payload.clone(),
                content_type: event.content_type.clone(),
            },
            Err(err) => Prepared::Reject {
                reason: DeadLetterReason::Transform,
                error: err.to_string(),
            },
        }
    }

    /// Stores the dead letter, then terms the message. If the store fails, the message is
    /// nakked so it is tried again rather than lost.
    async fn dead_letter(
        &self,
        message: &jetstream::Message,
        event: &StoredEvent,
        reason: DeadLetterReason,
        attempts: u32,
        outcome: Option<&AttemptOutcome>,
        error: &str,
    ) {
        let excerpt = match outcome {
            Some(AttemptOutcome::Response { excerpt, .. }) => excerpt.as_str(),
            _ => "",
        };
        let info = DeadLetterInfo {
            sink: &self.config.name,
            reason: reason.as_str(),
            attempts,
            last_status: outcome.and_then(AttemptOutcome::status),
            last_error: error,
            response_excerpt: excerpt,
            original_subject: message.subject.as_str(),
            original_sequence: event.stream_sequence,
            event_type: event
                .event_type
                .as_ref()
                .map(EventType::as_str)
                .unwrap_or("unknown"),
        };
        let subject = format!("dlq.{}.{}", info.sink, info.event_type);
        let span = tracing::debug_span!(
            "dead_letter",
            otel.name = %format!("publish {subject}"),
            otel.kind = "producer",
            messaging.system = "nats",
            messaging.operation.type = "publish",
            messaging.destination.name = %subject,
            sink = %self.config.name,
            reason = reason.as_str(),
            attempts = i64::from(attempts),
        );
        let stored = publish_dead_letter(
            &self.jetstream,
            message.headers.as_ref(),
            message.payload.clone(),
            &info,
            DEAD_LETTER_TIMEOUT,
        )
        .instrument(span)
        .await;
        match stored {
            Ok(dlq_sequence) => {
                tracing::debug!(event.id = %event.id, dlq_sequence, "dead letter stored");
                self.count_outcome("dead_lettered");
                let labels = SinkReasonLabels {
                    sink: self.config.name.clone(),
                    reason: reason.as_str().to_owned(),
                };
                metrics().dead_letters.get_or_create(&labels).inc();
                ack(message, AckKind::Term).await;
            }
            Err(err) => {
                tracing::error!(error = %err, "failed to store dead letter; will try again");
                ack(message, AckKind::Nak(Some(DEAD_LETTER_RETRY_DELAY))).await;
            }
        }
    }
}

fn stored_event(message: &jetstream::Message) -> Option<StoredEvent> {
    let info = message.info().ok()?;
    let header = |name: &str| {
        message
            .headers
            .as_ref()
            .and_then(|headers| headers.get(name))
            .map(|value| value.as_str().to_owned())
            .filter(|value| !value.is_empty())
    };
    let event_type = header(names::CE_TYPE)
        .and_then(|value| value.parse().ok())
        .or_else(|| EventType::from_subject(message.subject.as_str()));
    Some(StoredEvent {
        id: header(names::CE_ID)
            .or_else(|| header(names::NATS_MSG_ID))
            .unwrap_or_else(|| format!("seq-{}", info.stream_sequence)),
        event_type,
        source: header(names::CE_SOURCE).unwrap_or_else(|| "nats".to_owned()),
        time: header(names::CE_TIME).unwrap_or_default(),
        content_type: header(names::CONTENT_TYPE).unwrap_or_else(|| "application/json".to_owned()),
        traceparent: header(names::TRACEPARENT),
        tracestate: header(names::TRACESTATE),
        stream_sequence: info.stream_sequence,
        delivered: u32::try_from(info.delivered).unwrap_or(1).max(1),
    })
}

async fn ack(message: &jetstream::Message, kind: AckKind) {
    if let Err(err) = message.ack_with(kind).await {
        // The message is redelivered after its ack wait, so it is delivered at least once.
        tracing::warn!(error = %err, "failed to acknowledge message");
    }
}

async fn pause(shutdown: &CancellationToken, duration: Duration) {
    tokio::select! {
        () = shutdown.cancelled() => {}
        () = tokio::time::sleep(duration) => {}
    }
}

/// Runs `work`, sending an in-progress ack every half ack wait until it finishes, so a
/// slow delivery keeps its message instead of JetStream handing it to another router.
///
/// The timer lives in the same task as the work, so a fast delivery costs one timer
/// registration and no extra task.
async fn with_progress<T>(
    message: &jetstream::Message,
    ack_wait: Duration,
    work: impl Future<Output = T>,
) -> T {
    let period = (ack_wait / 2).max(Duration::from_millis(100));
    let mut deadline = tokio::time::Instant::now() + period;
    let mut work = std::pin::pin!(work);
    loop {
        tokio::select! {
            biased;
            output = &mut work => return output,
            () = tokio::time::sleep_until(deadline) => {
                deadline += period;
                if let Err(err) = message.ack_with(AckKind::Progress).await {
                    tracing::debug!(error = %err, "failed to send in-progress ack");
                }
            }
        }
    }
}
