//! Parsing of batch bodies and structured-mode CloudEvents (JSON event format, spec 1.0).
//!
//! Event data is taken as a raw slice of the request body, so the stored payload keeps the
//! producer's bytes: key order, whitespace, escapes and large numbers.

use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;
use switchyard_core::event::CLOUDEVENTS_SPEC_VERSION;

use crate::Ingress;
use crate::body;
use crate::events::{Attributes, build_event};
use crate::problem::Problem;
use switchyard_core::event::Event;

/// One item of a plain batch: `{"type", "data", "id"?, "source"?, "time"?}`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchItem<'a> {
    #[serde(rename = "type")]
    event_type: String,
    #[serde(borrow)]
    data: &'a RawValue,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    source: Option<String>,
    #[serde(default)]
    time: Option<String>,
}

/// A structured-mode CloudEvent; extension attributes are accepted and not stored.
#[derive(Deserialize)]
struct StructuredEvent<'a> {
    specversion: String,
    id: String,
    source: String,
    #[serde(rename = "type")]
    event_type: String,
    #[serde(default)]
    datacontenttype: Option<String>,
    #[serde(default)]
    time: Option<String>,
    #[serde(default, borrow)]
    data: Option<&'a RawValue>,
    #[serde(default)]
    data_base64: Option<String>,
    #[serde(default)]
    traceparent: Option<String>,
    #[serde(default)]
    tracestate: Option<String>,
}

/// Parses `[{"type", "data", "id"?}, ...]`; per-item problems are returned in place.
pub fn parse_batch(
    ingress: &Ingress,
    bytes: &Bytes,
) -> Result<Vec<Result<Event, Problem>>, Problem> {
    let (payload, items) = parse_array(ingress, bytes)?;
    Ok(items
        .into_iter()
        .map(|item| {
            let parsed: BatchItem = serde_json::from_str(item.get()).map_err(|err| {
                Problem::bad_request(
                    "invalid-batch-item",
                    format!(
                        "batch item is not {{\"type\", \"data\", \"id\"?, \"source\"?, \
                         \"time\"?}}: {err}"
                    ),
                )
            })?;
            let attributes = Attributes {
                id: parsed.id.filter(|id| !id.is_empty()),
                source: parsed.source,
                time: parsed.time,
                ..Attributes::default()
            };
            let data = slice_of(&payload, parsed.data);
            let value = serde_json::from_str(parsed.data.get()).unwrap_or_default();
            build_event(ingress, &parsed.event_type, data, &value, attributes)
        })
        .collect())
}

/// Parses one structured-mode CloudEvent.
pub fn parse_structured(ingress: &Ingress, bytes: &Bytes) -> Result<Event, Problem> {
    let (payload, _) = body::parse_json(bytes)?;
    structured_event(ingress, &payload, payload_str(&payload))
}

/// Parses a CloudEvents batch: an array of structured-mode events.
pub fn parse_structured_batch(
    ingress: &Ingress,
    bytes: &Bytes,
) -> Result<Vec<Result<Event, Problem>>, Problem> {
    let (payload, items) = parse_array(ingress, bytes)?;
    Ok(items
        .into_iter()
        .map(|item| structured_event(ingress, &payload, item.get()))
        .collect())
}

fn structured_event(ingress: &Ingress, payload: &Bytes, text: &str) -> Result<Event, Problem> {
    let parsed: StructuredEvent = serde_json::from_str(text).map_err(|err| {
        Problem::bad_request(
            "invalid-cloudevent",
            format!("not a CloudEvent in structured mode (specversion, id, source, type): {err}"),
        )
    })?;
    if parsed.specversion != CLOUDEVENTS_SPEC_VERSION {
        return Err(Problem::bad_request(
            "invalid-cloudevent",
            format!(
                "specversion \"{}\" is not supported: send CloudEvents {CLOUDEVENTS_SPEC_VERSION}",
                parsed.specversion
            ),
        ));
    }
    if parsed.data_base64.is_some() {
        return Err(Problem::unsupported_media_type(
            "data_base64 is not supported: send the event data as JSON in \"data\"".to_owned(),
        ));
    }
    if let Some(content_type) = &parsed.datacontenttype {
        let is_json = content_type.starts_with("application/json")
            || content_type
                .split(';')
                .next()
                .is_some_and(|t| t.trim().ends_with("+json"));
        if !is_json {
            return Err(Problem::unsupported_media_type(format!(
                "datacontenttype \"{content_type}\" is not supported: send JSON data"
            )));
        }
    }
    let Some(data) = parsed.data else {
        return Err(Problem::bad_request(
            "invalid-cloudevent",
            "the CloudEvent has no \"data\": send the event data as JSON".to_owned(),
        ));
    };

    let attributes = Attributes {
        id: Some(parsed.id),
        source: Some(parsed.source),
        time: parsed.time,
        // As in binary mode, an invalid traceparent starts a new trace instead of being
        // stored and sent on to every sink.
        traceparent: parsed
            .traceparent
            .filter(|value| crate::events::is_valid_traceparent(value)),
        tracestate: parsed.tracestate,
    };
    let value = serde_json::from_str(data.get()).unwrap_or_default();
    build_event(
        ingress,
        &parsed.event_type,
        slice_of(payload, data),
        &value,
        attributes,
    )
}

/// Checks the whole body as strict JSON and splits the top-level array into raw items.
fn parse_array<'a>(
    ingress: &Ingress,
    bytes: &'a Bytes,
) -> Result<(Bytes, Vec<&'a RawValue>), Problem> {
    let (payload, _) = body::parse_json(bytes)?;
    let offset = bytes.len() - payload.len();
    let text = payload_str(&bytes[offset..]);
    let items: Vec<&RawValue> = serde_json::from_str(text).map_err(|_| {
        Problem::bad_request(
            "invalid-batch",
            "a batch is a JSON array of events: send [{\"type\": ..., \"data\": ...}] or POST \
             one event to /v1/events/{type}"
                .to_owned(),
        )
    })?;
    if items.is_empty() {
        return Err(Problem::bad_request(
            "empty-batch",
            "the batch is an empty array: send at least one event".to_owned(),
        ));
    }
    if items.len() > ingress.max_batch_events {
        return Err(Problem::new(
            axum::http::StatusCode::PAYLOAD_TOO_LARGE,
            "batch-too-large",
            "Batch too large",
            format!(
                "the batch has {} events, more than the limit of {}: split it",
                items.len(),
                ingress.max_batch_events
            ),
        ));
    }
    Ok((payload, items))
}

fn payload_str(payload: &[u8]) -> &str {
    // `body::parse_json` has already checked the bytes are UTF-8.
    std::str::from_utf8(payload).unwrap_or_default()
}

/// Returns the bytes of `raw`, which borrows from `payload`, without copying.
fn slice_of(payload: &Bytes, raw: &RawValue) -> Bytes {
    payload.slice_ref(raw.get().as_bytes())
}
