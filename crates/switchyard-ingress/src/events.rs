//! The publish handlers: one event, a batch, and the CloudEvents modes.
//!
//! Each accepted event goes through the same steps: check the type, check the id, validate
//! the payload against its schema, publish, and wait for the JetStream acknowledgement.

use std::sync::Arc;
use std::time::Instant;

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures::StreamExt;
use serde::Serialize;
use serde_json::Value;
use switchyard_core::event::{self, Event, EventType, headers as names};
use switchyard_core::nats::{self, PublishError};
use switchyard_telemetry::metrics::{EventTypeLabels, RejectLabels, UNKNOWN_TYPE, metrics};
use switchyard_telemetry::propagation;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tracing::Instrument;

use crate::Ingress;
use crate::body::{self, MediaType};
use crate::cloudevents;
use crate::problem::Problem;

/// Header that carries a producer-chosen event id.
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";

/// Publishes of one batch that wait for their acknowledgement at the same time.
const MAX_BATCH_PUBLISHES_IN_FLIGHT: usize = 256;

/// Response body for one accepted event.
#[derive(Debug, Serialize)]
pub struct Accepted {
    pub id: String,
    #[serde(rename = "type")]
    pub event_type: String,
    /// Sequence of the event in the `EVENTS` stream.
    pub seq: u64,
    /// True when the id was seen inside the duplicate window, so nothing new was stored.
    pub duplicate: bool,
}

/// Attributes of an event besides its type and payload, as the producer gave them.
#[derive(Debug, Default)]
pub struct Attributes {
    pub id: Option<String>,
    pub source: Option<String>,
    pub time: Option<String>,
    pub traceparent: Option<String>,
    pub tracestate: Option<String>,
}

impl Attributes {
    /// Reads the id, the binary-mode CloudEvents attributes and the trace context.
    fn from_headers(headers: &HeaderMap) -> Self {
        let text = |name: &str| {
            header_text(headers, name)
                .map(|value| value.trim().to_owned())
                .filter(|value| !value.is_empty())
        };
        Self {
            // An empty Idempotency-Key counts as absent.
            id: text(IDEMPOTENCY_KEY).or_else(|| text(names::CE_ID)),
            source: text(names::CE_SOURCE),
            time: text(names::CE_TIME),
            traceparent: text(names::TRACEPARENT).filter(|value| is_valid_traceparent(value)),
            tracestate: text(names::TRACESTATE),
        }
    }
}

/// Returns a header value as text, with any byte that is not UTF-8 replaced.
///
/// A value that is not visible ASCII still counts as present, so an `Idempotency-Key` or
/// `ce-type` with such bytes is rejected by its own check instead of being ignored.
fn header_text(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get(name)
        .map(|value| String::from_utf8_lossy(value.as_bytes()).into_owned())
}

/// Checks the W3C `traceparent` shape: `00-<32 hex>-<16 hex>-<2 hex>`, ids not all zero.
///
/// An invalid value is dropped, so the event starts a new trace instead of being rejected.
pub(crate) fn is_valid_traceparent(value: &str) -> bool {
    let parts: Vec<&str> = value.split('-').collect();
    let hex = |part: &str, len: usize| {
        part.len() == len && part.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    };
    let valid = parts.len() >= 4
        && hex(parts[0], 2)
        && parts[0] != "ff"
        && hex(parts[1], 32)
        && hex(parts[2], 16)
        && hex(parts[3], 2)
        && parts[1].bytes().any(|b| b != b'0')
        && parts[2].bytes().any(|b| b != b'0');
    if !valid {
        tracing::debug!(traceparent = value, "ignoring an invalid traceparent");
    }
    valid
}

/// `POST /v1/events/{type}`: the body is the data of one event.
pub async fn publish_one(
    State(ingress): State<Arc<Ingress>>,
    Path(event_type): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let result = accept_one(&ingress, &event_type, &headers, body).await;
    single_response(&ingress, Some(&event_type), result)
}

async fn accept_one(
    ingress: &Ingress,
    event_type: &str,
    headers: &HeaderMap,
    body: Body,
) -> Result<Accepted, Problem> {
    let media_type = body::media_type(headers)?;
    if media_type != MediaType::Json {
        return Err(Problem::unsupported_media_type(
            "CloudEvents structured mode goes to POST /v1/events; send the data of one event \
             here as application/json"
                .to_owned(),
        ));
    }
    let bytes = body::read_limited(headers, body, ingress.body_limit).await?;
    let (payload, value) = body::parse_json(&bytes)?;

    let attributes = Attributes::from_headers(headers);
    if let Some(ce_type) = header_text(headers, names::CE_TYPE)
        && ce_type != event_type
    {
        return Err(Problem::bad_request(
            "type-mismatch",
            format!(
                "ce-type header \"{ce_type}\" differs from the type \"{event_type}\" in the \
                 path: send one type"
            ),
        ));
    }
    let event = build_event(ingress, event_type, payload, &value, attributes)?;
    publish(ingress, &event).await
}

/// `POST /v1/events`: a batch, a structured CloudEvent, a CloudEvents batch, or a
/// binary-mode CloudEvent.
pub async fn publish_batch(
    State(ingress): State<Arc<Ingress>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let media_type = match body::media_type(&headers) {
        Ok(media_type) => media_type,
        Err(problem) => {
            count_rejected(&ingress, None, &problem);
            return problem.into_response();
        }
    };
    let bytes = match body::read_limited(&headers, body, ingress.body_limit).await {
        Ok(bytes) => bytes,
        Err(problem) => {
            count_rejected(&ingress, None, &problem);
            return problem.into_response();
        }
    };

    match media_type {
        MediaType::Json => match header_text(&headers, names::CE_TYPE) {
            Some(event_type) => {
                let result = accept_binary(&ingress, &event_type, &headers, &bytes).await;
                single_response(&ingress, Some(&event_type), result)
            }
            None => batch_response(&ingress, cloudevents::parse_batch(&ingress, &bytes)).await,
        },
        MediaType::CloudEvent => {
            let accepted = match cloudevents::parse_structured(&ingress, &bytes) {
                Ok(event) => publish(&ingress, &event).await,
                Err(problem) => Err(problem),
            };
            single_response(&ingress, None, accepted)
        }
        MediaType::CloudEventBatch => {
            batch_response(
                &ingress,
                cloudevents::parse_structured_batch(&ingress, &bytes),
            )
            .await
        }
    }
}

async fn accept_binary(
    ingress: &Ingress,
    event_type: &str,
    headers: &HeaderMap,
    bytes: &Bytes,
) -> Result<Accepted, Problem> {
    let (payload, value) = body::parse_json(bytes)?;
    let event = build_event(
        ingress,
        event_type,
        payload,
        &value,
        Attributes::from_headers(headers),
    )?;
    publish(ingress, &event).await
}

fn single_response(
    ingress: &Ingress,
    event_type: Option<&str>,
    result: Result<Accepted, Problem>,
) -> Response {
    match result {
        Ok(accepted) => (StatusCode::ACCEPTED, Json(accepted)).into_response(),
        Err(problem) => {
            count_rejected(ingress, event_type, &problem);
            problem.into_response()
        }
    }
}

/// Counts a rejection; the type is a label only when it has a schema, so arbitrary
/// request paths cannot grow the metric without bound.
fn count_rejected(ingress: &Ingress, event_type: Option<&str>, problem: &Problem) {
    let known = event_type
        .and_then(|name| name.parse::<EventType>().ok())
        .filter(|parsed| ingress.schemas.contains(parsed));
    let labels = RejectLabels {
        event_type: known.map_or_else(|| UNKNOWN_TYPE.to_owned(), |t| t.to_string()),
        reason: problem.slug().to_owned(),
    };
    metrics().events_rejected.get_or_create(&labels).inc();
}

/// One entry of a batch response.
#[derive(Debug, Serialize)]
struct BatchResult {
    index: usize,
    status: u16,
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    accepted: Option<Accepted>,
    #[serde(skip_serializing_if = "Option::is_none")]
    problem: Option<Problem>,
}

#[derive(Debug, Serialize)]
struct BatchAnswer {
    accepted: usize,
    failed: usize,
    results: Vec<BatchResult>,
}

/// Publishes the valid events of a batch, up to [`MAX_BATCH_PUBLISHES_IN_FLIGHT`] at a
/// time, and reports per item.
///
/// The status is 202 when every item was accepted, 503 when every item failed because
/// JetStream was unavailable, and 207 otherwise. Items reported 202 are durable, so a
/// client may resend the batch with the same ids and let deduplication drop the repeats.
async fn batch_response(
    ingress: &Ingress,
    parsed: Result<Vec<Result<Event, Problem>>, Problem>,
) -> Response {
    let items = match parsed {
        Ok(items) => items,
        Err(problem) => {
            count_rejected(ingress, None, &problem);
            return problem.into_response();
        }
    };

    // Each publish waits up to the publish timeout from its first poll, so publishing
    // thousands at once would time out items that JetStream stores moments later.
    let outcomes: Vec<Result<Accepted, Problem>> =
        futures::stream::iter(items.into_iter().map(|item| async move {
            match item {
                Ok(event) => publish(ingress, &event).await,
                Err(problem) => Err(problem),
            }
        }))
        .buffered(MAX_BATCH_PUBLISHES_IN_FLIGHT)
        .collect()
        .await;

    let all_unavailable = outcomes
        .iter()
        .all(|outcome| matches!(outcome, Err(p) if p.status == StatusCode::SERVICE_UNAVAILABLE));
    if all_unavailable && let Some(Err(problem)) = outcomes.first() {
        return problem.clone().into_response();
    }

    let mut answer = BatchAnswer {
        accepted: 0,
        failed: 0,
        results: Vec::new(),
    };
    for (index, outcome) in outcomes.into_iter().enumerate() {
        let result = match outcome {
            Ok(accepted) => {
                answer.accepted += 1;
                BatchResult {
                    index,
                    status: StatusCode::ACCEPTED.as_u16(),
                    accepted: Some(accepted),
                    problem: None,
                }
            }
            Err(problem) => {
                count_rejected(ingress, None, &problem);
                answer.failed += 1;
                BatchResult {
                    index,
                    status: problem.status.as_u16(),
                    accepted: None,
                    problem: Some(problem),
                }
            }
        };
        answer.results.push(result);
    }
    let status = if answer.failed == 0 {
        StatusCode::ACCEPTED
    } else {
        StatusCode::MULTI_STATUS
    };
    (status, Json(answer)).into_response()
}

/// Checks the type, the id and the schema, and builds the event to publish.
pub fn build_event(
    ingress: &Ingress,
    event_type: &str,
    payload: Bytes,
    value: &Value,
    attributes: Attributes,
) -> Result<Event, Problem> {
    let event_type: EventType = event_type.parse().map_err(|err: event::EventNameError| {
        Problem::bad_request("invalid-event-type", err.to_string())
    })?;
    let validation = tracing::debug_span!("schema.validate", event.r#type = %event_type);
    let Some(violations) = validation.in_scope(|| ingress.schemas.validate(&event_type, value))
    else {
        return Err(Problem::unknown_type(event_type.as_str()));
    };
    if !violations.is_empty() {
        return Err(Problem::schema_violation(event_type.as_str(), violations));
    }

    let mut event = Event::new(event_type, payload);
    if let Some(id) = attributes.id {
        event::validate_event_id(&id)
            .map_err(|err| Problem::bad_request("invalid-event-id", err.to_string()))?;
        event.id = id;
    }
    if let Some(source) = attributes.source {
        event.source = source;
    }
    if let Some(time) = attributes.time {
        event.time = OffsetDateTime::parse(&time, &Rfc3339).map_err(|_| {
            Problem::bad_request(
                "invalid-time",
                format!(
                    "time \"{time}\" is not an RFC 3339 timestamp such as 2026-01-31T12:00:00Z"
                ),
            )
        })?;
    }
    event.traceparent = attributes.traceparent;
    event.tracestate = attributes.tracestate;
    Ok(event)
}

/// Publishes and waits for the acknowledgement. A failure is a 503 with `Retry-After`,
/// except an event larger than the NATS server accepts, which is a 413.
///
/// The publish runs in a producer span whose trace context replaces the producer's
/// `traceparent` on the stored event, so every delivery joins the same trace.
pub async fn publish(ingress: &Ingress, event: &Event) -> Result<Accepted, Problem> {
    let subject = event.event_type.subject();
    let span = tracing::debug_span!(
        "publish",
        otel.name = %format!("publish {subject}"),
        otel.kind = "producer",
        messaging.system = "nats",
        messaging.operation.type = "publish",
        messaging.destination.name = %subject,
        messaging.message.id = %event.id,
    );
    let mut event = event.clone();
    if let Some((traceparent, tracestate)) = propagation::current_headers(&span) {
        event.traceparent = Some(traceparent);
        event.tracestate = tracestate;
    }

    let started = Instant::now();
    let published = nats::publish_event(&ingress.jetstream, &event, ingress.publish_timeout)
        .instrument(span)
        .await;
    match published {
        Ok(ack) => {
            let labels = EventTypeLabels {
                event_type: event.event_type.to_string(),
            };
            metrics().events_accepted.get_or_create(&labels).inc();
            metrics()
                .publish_duration
                .observe(started.elapsed().as_secs_f64());
            Ok(Accepted {
                id: event.id.clone(),
                event_type: event.event_type.to_string(),
                seq: ack.sequence,
                duplicate: ack.duplicate,
            })
        }
        Err(err) => {
            let detail = match &err {
                // A retry would fail the same way, so this is the client's 413, not a 503.
                PublishError::TooLarge(message) => {
                    return Err(Problem::new(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "event-too-large",
                        "Event too large",
                        format!(
                            "the event with its headers is larger than the NATS server's \
                             max_payload or JetStream's 64 KiB header limit ({message}): send a \
                             smaller body or shorter ce-source and tracestate headers"
                        ),
                    ));
                }
                PublishError::Disconnected => {
                    "NATS is not connected, so the event was not stored: retry later".to_owned()
                }
                // The server may have stored the event before the acknowledgement was lost,
                // so the id is given back for a retry that deduplicates.
                PublishError::TimedOut(_) | PublishError::Rejected(_) => format!(
                    "the event may not have been stored ({err}): retry later with the event id \
                     \"{}\" so that JetStream drops a stored copy as a duplicate",
                    event.id
                ),
            };
            Err(Problem::unavailable(detail, ingress.retry_after))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_shape() {
        assert!(is_valid_traceparent(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        ));
        assert!(!is_valid_traceparent(
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01"
        ));
        assert!(!is_valid_traceparent(
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01"
        ));
        assert!(!is_valid_traceparent("garbage"));
    }
}
