//! Dead letters: writing them, listing them, and replaying them to their sink.
//!
//! A dead letter is the original message (headers and payload unchanged) on
//! `dlq.<sink>.<type>` in the `DLQ` stream. Its `Switchyard-*` headers record which sink
//! gave it up and why, after how many attempts, the last status and error, and where the
//! original is in the `EVENTS` stream. A replay publishes it to
//! `replay.<sink>.<type>`, which only that sink's consumer reads, then deletes it from
//! `DLQ`.

use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, message::PublishMessage};
use bytes::Bytes;
use opentelemetry::trace::TraceContextExt;
use switchyard_core::event::{DLQ_SUBJECT_PREFIX, REPLAY_SUBJECT_PREFIX, headers as names};
use switchyard_core::nats::{PublishError, publish_acked};
use switchyard_telemetry::propagation;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// Maximum length of a header value written for an error or a response excerpt, in bytes.
const MAX_HEADER_TEXT_BYTES: usize = 256;

/// Dead letter details stored besides the original message.
#[derive(Debug, Clone)]
pub struct DeadLetterInfo<'a> {
    pub sink: &'a str,
    pub reason: &'a str,
    pub attempts: u32,
    pub last_status: Option<u16>,
    pub last_error: &'a str,
    pub response_excerpt: &'a str,
    pub original_subject: &'a str,
    pub original_sequence: u64,
    /// Token for the subject: the event type, or `unknown` when it has none.
    pub event_type: &'a str,
}

/// Publishes a dead letter and waits for the acknowledgement.
///
/// The `Nats-Msg-Id` is derived from the sink and the original sequence, so a router that
/// crashes between this publish and the `term` writes no second copy inside the window.
pub async fn publish_dead_letter(
    jetstream: &jetstream::Context,
    original_headers: Option<&HeaderMap>,
    payload: Bytes,
    info: &DeadLetterInfo<'_>,
    timeout: Duration,
) -> Result<u64, PublishError> {
    let mut headers = original_headers.cloned().unwrap_or_default();
    let message_id = format!("dlq:{}:{}", info.sink, info.original_sequence);
    headers.insert(names::NATS_MSG_ID, message_id.as_str());
    headers.insert(names::DLQ_SINK, info.sink);
    headers.insert(names::DLQ_REASON, info.reason);
    headers.insert(names::DLQ_ATTEMPTS, info.attempts.to_string().as_str());
    if let Some(status) = info.last_status {
        headers.insert(names::DLQ_LAST_STATUS, status.to_string().as_str());
    }
    headers.insert(names::DLQ_LAST_ERROR, header_text(info.last_error).as_str());
    if !info.response_excerpt.is_empty() {
        headers.insert(
            names::DLQ_RESPONSE_EXCERPT,
            header_text(info.response_excerpt).as_str(),
        );
    }
    headers.insert(names::DLQ_ORIGINAL_SUBJECT, info.original_subject);
    headers.insert(
        names::DLQ_ORIGINAL_SEQUENCE,
        info.original_sequence.to_string().as_str(),
    );
    let failed_at = OffsetDateTime::now_utc()
        .format(&Rfc3339)
        .unwrap_or_default();
    headers.insert(names::DLQ_FAILED_AT, failed_at.as_str());

    let subject = format!("{DLQ_SUBJECT_PREFIX}.{}.{}", info.sink, info.event_type);
    let publish = PublishMessage::build().headers(headers).payload(payload);
    let ack = publish_acked(jetstream, subject, publish, timeout).await?;
    Ok(ack.sequence)
}

/// Makes text safe for a header value: one line, printable, bounded.
fn header_text(text: &str) -> String {
    let mut clean: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if clean.len() > MAX_HEADER_TEXT_BYTES {
        let mut end = MAX_HEADER_TEXT_BYTES;
        while !clean.is_char_boundary(end) {
            end -= 1;
        }
        clean.truncate(end);
    }
    clean.trim().to_owned()
}

/// A dead letter as read back from the `DLQ` stream.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DeadLetter {
    pub seq: u64,
    pub subject: String,
    pub sink: String,
    pub reason: String,
    pub attempts: String,
    pub last_status: String,
    pub last_error: String,
    pub response_excerpt: String,
    pub event_id: String,
    pub event_type: String,
    pub original_subject: String,
    pub original_sequence: String,
    pub failed_at: String,
    #[serde(skip)]
    pub headers: HeaderMap,
    #[serde(skip)]
    pub payload: Bytes,
}

impl DeadLetter {
    fn from_stream_message(message: jetstream::message::StreamMessage) -> Self {
        let header = |name: &str| {
            message
                .headers
                .get(name)
                .map(|value| value.as_str().to_owned())
                .unwrap_or_default()
        };
        Self {
            seq: message.sequence,
            subject: message.subject.to_string(),
            sink: header(names::DLQ_SINK),
            reason: header(names::DLQ_REASON),
            attempts: header(names::DLQ_ATTEMPTS),
            last_status: header(names::DLQ_LAST_STATUS),
            last_error: header(names::DLQ_LAST_ERROR),
            response_excerpt: header(names::DLQ_RESPONSE_EXCERPT),
            event_id: header(names::CE_ID),
            event_type: header(names::CE_TYPE),
            original_subject: header(names::DLQ_ORIGINAL_SUBJECT),
            original_sequence: header(names::DLQ_ORIGINAL_SEQUENCE),
            failed_at: header(names::DLQ_FAILED_AT),
            headers: message.headers,
            payload: message.payload,
        }
    }
}

/// A failure to read or replay dead letters.
#[derive(Debug, thiserror::Error)]
pub enum DlqError {
    #[error("failed to open stream {stream}: {message}")]
    Stream { stream: String, message: String },
    #[error("no dead letter with sequence {0} in the DLQ stream")]
    NotFound(u64),
    #[error("failed to read dead letter {seq}: {message}")]
    Read { seq: u64, message: String },
    #[error("dead letter {0} has no Switchyard-Sink header, so it cannot be replayed")]
    NoSink(u64),
    #[error("failed to replay dead letter {seq}: {error}")]
    Publish { seq: u64, error: PublishError },
    #[error("replayed dead letter {seq}, but failed to delete it from the DLQ stream: {message}")]
    Delete { seq: u64, message: String },
}

/// Opens a stream by name; opening also fetches its info.
async fn open_stream(
    jetstream: &jetstream::Context,
    stream_name: &str,
) -> Result<jetstream::stream::Stream, DlqError> {
    jetstream
        .get_stream(stream_name)
        .await
        .map_err(|err| DlqError::Stream {
            stream: stream_name.to_owned(),
            message: err.to_string(),
        })
}

/// Reads dead letters in stream order, optionally only those of `sink`, at most `limit`.
pub async fn list(
    jetstream: &jetstream::Context,
    stream_name: &str,
    sink: Option<&str>,
    limit: usize,
) -> Result<Vec<DeadLetter>, DlqError> {
    // Opening the stream fetches its info, so the state is current.
    let stream = open_stream(jetstream, stream_name).await?;
    let state = stream.cached_info().state.clone();

    let mut letters = Vec::new();
    if state.messages == 0 {
        return Ok(letters);
    }
    for seq in state.first_sequence..=state.last_sequence {
        if letters.len() >= limit {
            break;
        }
        // Replayed letters are deleted, which leaves gaps in the sequence.
        let Ok(message) = stream.get_raw_message(seq).await else {
            continue;
        };
        let letter = DeadLetter::from_stream_message(message);
        if sink.is_none_or(|name| name == letter.sink) {
            letters.push(letter);
        }
    }
    Ok(letters)
}

/// Reads one dead letter by its `DLQ` sequence.
pub async fn show(
    jetstream: &jetstream::Context,
    stream_name: &str,
    seq: u64,
) -> Result<DeadLetter, DlqError> {
    let stream = open_stream(jetstream, stream_name).await?;
    let message = stream.get_raw_message(seq).await.map_err(|err| {
        if err.kind() == jetstream::stream::RawMessageErrorKind::NoMessageFound {
            DlqError::NotFound(seq)
        } else {
            DlqError::Read {
                seq,
                message: err.to_string(),
            }
        }
    })?;
    Ok(DeadLetter::from_stream_message(message))
}

/// Sends a dead letter again to its sink only, then deletes it from `DLQ`.
///
/// Returns the sequence of the replayed event in the events stream. The replay keeps the
/// event id, so the receiver gets the same `webhook-id` as on the original attempts.
pub async fn replay(
    jetstream: &jetstream::Context,
    stream_name: &str,
    seq: u64,
    timeout: Duration,
) -> Result<u64, DlqError> {
    let letter = show(jetstream, stream_name, seq).await?;
    if letter.sink.is_empty() {
        return Err(DlqError::NoSink(seq));
    }

    let mut headers = HeaderMap::new();
    for (name, values) in letter.headers.iter() {
        let name_text: &str = name.as_ref();
        let replaced = [names::NATS_MSG_ID, names::TRACEPARENT, names::TRACESTATE];
        if name_text.starts_with("Switchyard-") || replaced.contains(&name_text) {
            continue;
        }
        for value in values {
            headers.append(name.clone(), value.clone());
        }
    }
    // Replaying the same letter twice inside the duplicate window stores it once.
    let message_id = format!("replay:{stream_name}:{seq}");
    headers.insert(names::NATS_MSG_ID, message_id.as_str());

    // A replay is a new trace, linked to the trace of the original event.
    let span = tracing::debug_span!(
        "replay",
        otel.kind = "producer",
        messaging.system = "nats",
        messaging.operation.type = "publish",
        sink = %letter.sink,
        // i64, because tracing-opentelemetry 0.34 exports unsigned integers as strings.
        dlq_sequence = i64::try_from(seq).unwrap_or(i64::MAX),
    );
    let _ = span.set_parent(opentelemetry::Context::new());
    let original = propagation::extract(&propagation::NatsHeaders(&letter.headers));
    let original_span = original.span().span_context().clone();
    if original_span.is_valid() {
        span.add_link(original_span);
    }
    let original_trace = |name: &str| letter.headers.get(name).map(|v| v.as_str().to_owned());
    let (traceparent, tracestate) = match propagation::current_headers(&span) {
        Some((traceparent, tracestate)) => (Some(traceparent), tracestate),
        None => (
            original_trace(names::TRACEPARENT),
            original_trace(names::TRACESTATE),
        ),
    };
    if let Some(traceparent) = traceparent {
        headers.insert(names::TRACEPARENT, traceparent.as_str());
    }
    if let Some(tracestate) = tracestate {
        headers.insert(names::TRACESTATE, tracestate.as_str());
    }

    let event_type = if letter.event_type.is_empty() {
        "unknown"
    } else {
        letter.event_type.as_str()
    };
    let subject = format!("{REPLAY_SUBJECT_PREFIX}.{}.{event_type}", letter.sink);
    let publish = PublishMessage::build()
        .headers(headers)
        .payload(letter.payload.clone());
    let ack = publish_acked(jetstream, subject, publish, timeout)
        .instrument(span)
        .await
        .map_err(|error| DlqError::Publish { seq, error })?;

    let stream = open_stream(jetstream, stream_name).await?;
    stream
        .delete_message(seq)
        .await
        .map_err(|err| DlqError::Delete {
            seq,
            message: err.to_string(),
        })?;
    Ok(ack.sequence)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_text_is_one_bounded_line() {
        assert_eq!(header_text("a\r\nb"), "a  b");
        let long = "é".repeat(300);
        let clean = header_text(&long);
        assert!(clean.len() <= MAX_HEADER_TEXT_BYTES);
        assert!(clean.chars().all(|c| c == 'é'));
    }
}
