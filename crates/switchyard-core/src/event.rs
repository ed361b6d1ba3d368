//! The event as it travels through NATS: its type, its id, its subject and its headers.
//!
//! An event is stored on the subject `events.<type>` with its payload as the bytes the
//! producer sent and its attributes as CloudEvents binary-mode headers, so a consumer that
//! speaks CloudEvents can read it without knowing Switchyard.

use std::fmt;
use std::str::FromStr;

use async_nats::HeaderMap;
use bytes::Bytes;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// Prefix of every event subject in the `EVENTS` stream.
pub const EVENT_SUBJECT_PREFIX: &str = "events";
/// Prefix of the subjects that replay an event to a single sink.
pub const REPLAY_SUBJECT_PREFIX: &str = "replay";
/// Prefix of every dead letter subject in the `DLQ` stream.
pub const DLQ_SUBJECT_PREFIX: &str = "dlq";

/// Maximum length of an event type, in bytes.
pub const MAX_EVENT_TYPE_LEN: usize = 200;
/// Maximum length of an event id, in bytes.
pub const MAX_EVENT_ID_LEN: usize = 200;

/// CloudEvents spec version written on every event.
pub const CLOUDEVENTS_SPEC_VERSION: &str = "1.0";
/// Source written on events that arrive without one.
pub const DEFAULT_EVENT_SOURCE: &str = "switchyard";

/// Header names, as stored on NATS messages.
pub mod headers {
    /// JetStream deduplication id; Switchyard sets it to the event id.
    pub const NATS_MSG_ID: &str = "Nats-Msg-Id";
    pub const CE_SPECVERSION: &str = "ce-specversion";
    pub const CE_ID: &str = "ce-id";
    pub const CE_TYPE: &str = "ce-type";
    pub const CE_SOURCE: &str = "ce-source";
    pub const CE_TIME: &str = "ce-time";
    pub const CONTENT_TYPE: &str = "content-type";
    pub const TRACEPARENT: &str = "traceparent";
    pub const TRACESTATE: &str = "tracestate";

    /// Sink that gave the event up; set on dead letters.
    pub const DLQ_SINK: &str = "Switchyard-Sink";
    /// Why the event was dead-lettered: `permanent`, `exhausted`, `invalid`, `transform`.
    pub const DLQ_REASON: &str = "Switchyard-Reason";
    pub const DLQ_ATTEMPTS: &str = "Switchyard-Attempts";
    pub const DLQ_LAST_STATUS: &str = "Switchyard-Last-Status";
    pub const DLQ_LAST_ERROR: &str = "Switchyard-Last-Error";
    pub const DLQ_RESPONSE_EXCERPT: &str = "Switchyard-Response-Excerpt";
    pub const DLQ_ORIGINAL_SUBJECT: &str = "Switchyard-Original-Subject";
    pub const DLQ_ORIGINAL_SEQUENCE: &str = "Switchyard-Original-Sequence";
    pub const DLQ_FAILED_AT: &str = "Switchyard-Failed-At";
}

/// A rejected event type, id or route pattern.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EventNameError {
    #[error("event type is empty")]
    EmptyType,
    #[error("event type \"{0}\" is longer than {MAX_EVENT_TYPE_LEN} bytes")]
    TypeTooLong(String),
    #[error(
        "invalid event type \"{0}\": use lowercase dot-separated segments of a-z, 0-9, '_' \
         and '-', such as \"chat.created\""
    )]
    InvalidType(String),
    #[error(
        "invalid route pattern \"{0}\": use event type segments, '*' for one segment or a \
         final '>' for the rest, such as \"chat.*\" or \"user.>\""
    )]
    InvalidPattern(String),
    #[error(
        "invalid event id \"{0}\": use 1 to {MAX_EVENT_ID_LEN} printable ASCII characters \
         without spaces"
    )]
    InvalidId(String),
}

/// A validated event type such as `chat.created`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EventType(String);

impl EventType {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Returns the subject the event is stored on: `events.<type>`.
    pub fn subject(&self) -> String {
        format!("{EVENT_SUBJECT_PREFIX}.{}", self.0)
    }

    /// Extracts the event type from an `events.<type>` or `replay.<sink>.<type>` subject.
    pub fn from_subject(subject: &str) -> Option<Self> {
        let rest = match subject.strip_prefix("events.") {
            Some(rest) => rest,
            None => {
                let after_prefix = subject.strip_prefix("replay.")?;
                after_prefix.split_once('.')?.1
            }
        };
        rest.parse().ok()
    }
}

impl FromStr for EventType {
    type Err = EventNameError;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        if value.is_empty() {
            return Err(EventNameError::EmptyType);
        }
        if value.len() > MAX_EVENT_TYPE_LEN {
            return Err(EventNameError::TypeTooLong(value.to_owned()));
        }
        if !value.split('.').all(is_valid_segment) {
            return Err(EventNameError::InvalidType(value.to_owned()));
        }
        Ok(Self(value.to_owned()))
    }
}

impl fmt::Display for EventType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn is_valid_segment(segment: &str) -> bool {
    !segment.is_empty()
        && segment
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

/// A NATS-style pattern over event types: `chat.created`, `chat.*` or `user.>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventPattern(String);

impl EventPattern {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Returns the subject filter for a consumer: `events.<pattern>`.
    pub fn subject_filter(&self) -> String {
        format!("{EVENT_SUBJECT_PREFIX}.{}", self.0)
    }

    /// Reports whether `event_type` matches, with NATS wildcard rules.
    pub fn matches(&self, event_type: &str) -> bool {
        let mut tokens = event_type.split('.');
        for pattern_token in self.0.split('.') {
            match pattern_token {
                ">" => return tokens.next().is_some(),
                "*" => {
                    if tokens.next().is_none() {
                        return false;
                    }
                }
                literal => {
                    if tokens.next() != Some(literal) {
                        return false;
                    }
                }
            }
        }
        tokens.next().is_none()
    }
}

impl FromStr for EventPattern {
    type Err = EventNameError;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        let invalid = || EventNameError::InvalidPattern(value.to_owned());
        if value.is_empty() || value.len() > MAX_EVENT_TYPE_LEN {
            return Err(invalid());
        }
        let tokens: Vec<&str> = value.split('.').collect();
        for (index, token) in tokens.iter().enumerate() {
            let is_last = index + 1 == tokens.len();
            let valid = *token == "*" || (*token == ">" && is_last) || is_valid_segment(token);
            if !valid {
                return Err(invalid());
            }
        }
        Ok(Self(value.to_owned()))
    }
}

impl fmt::Display for EventPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Checks an event id supplied by a producer (an `Idempotency-Key` or a CloudEvents `id`).
///
/// The id becomes a NATS header value, so control characters and spaces are rejected.
pub fn validate_event_id(id: &str) -> Result<(), EventNameError> {
    let valid =
        !id.is_empty() && id.len() <= MAX_EVENT_ID_LEN && id.bytes().all(|b| b.is_ascii_graphic());
    if valid {
        Ok(())
    } else {
        Err(EventNameError::InvalidId(id.to_owned()))
    }
}

/// Generates a new event id: a UUIDv7, so ids sort by creation time.
pub fn new_event_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

/// An event ready to be published to the `EVENTS` stream.
#[derive(Debug, Clone)]
pub struct Event {
    pub id: String,
    pub event_type: EventType,
    pub source: String,
    pub time: OffsetDateTime,
    pub content_type: String,
    /// The payload exactly as the producer sent it.
    pub data: Bytes,
    pub traceparent: Option<String>,
    pub tracestate: Option<String>,
}

impl Event {
    /// Creates an event with a generated id, the default source and the current time.
    pub fn new(event_type: EventType, data: Bytes) -> Self {
        Self {
            id: new_event_id(),
            event_type,
            source: DEFAULT_EVENT_SOURCE.to_owned(),
            time: OffsetDateTime::now_utc(),
            content_type: "application/json".to_owned(),
            data,
            traceparent: None,
            tracestate: None,
        }
    }

    /// Builds the NATS headers: deduplication id, CloudEvents attributes and trace context.
    pub fn headers(&self) -> HeaderMap {
        let mut map = HeaderMap::new();
        map.insert(headers::NATS_MSG_ID, self.id.as_str());
        map.insert(headers::CE_SPECVERSION, CLOUDEVENTS_SPEC_VERSION);
        map.insert(headers::CE_ID, self.id.as_str());
        map.insert(headers::CE_TYPE, self.event_type.as_str());
        map.insert(headers::CE_SOURCE, self.source.as_str());
        let time = self.time.format(&Rfc3339).unwrap_or_default();
        map.insert(headers::CE_TIME, time.as_str());
        map.insert(headers::CONTENT_TYPE, self.content_type.as_str());
        if let Some(traceparent) = &self.traceparent {
            map.insert(headers::TRACEPARENT, traceparent.as_str());
        }
        if let Some(tracestate) = &self.tracestate {
            map.insert(headers::TRACESTATE, tracestate.as_str());
        }
        map
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_type_accepts_dotted_lowercase() {
        for name in [
            "chat.created",
            "stripe.payment_intent.succeeded",
            "a-b.c_d.9",
        ] {
            assert!(name.parse::<EventType>().is_ok(), "{name}");
        }
    }

    #[test]
    fn event_type_rejects_bad_names() {
        for name in [
            "",
            "Chat.created",
            "chat..created",
            ".chat",
            "chat.",
            "chat created",
            "a.*",
        ] {
            assert!(name.parse::<EventType>().is_err(), "{name:?}");
        }
    }

    #[test]
    fn pattern_matches_like_nats() {
        let star: EventPattern = "chat.*".parse().expect("valid pattern");
        assert!(star.matches("chat.created"));
        assert!(!star.matches("chat.created.late"));
        assert!(!star.matches("chat"));

        let tail: EventPattern = "user.>".parse().expect("valid pattern");
        assert!(tail.matches("user.updated"));
        assert!(tail.matches("user.profile.updated"));
        assert!(!tail.matches("user"));

        let exact: EventPattern = "file.uploaded".parse().expect("valid pattern");
        assert!(exact.matches("file.uploaded"));
        assert!(!exact.matches("file.deleted"));
    }

    #[test]
    fn pattern_rejects_inner_tail_wildcard() {
        assert!("user.>.x".parse::<EventPattern>().is_err());
        assert!("User.*".parse::<EventPattern>().is_err());
    }

    #[test]
    fn event_type_from_replay_subject() {
        let parsed = EventType::from_subject("replay.n8n-chat.chat.created");
        assert_eq!(parsed.as_ref().map(EventType::as_str), Some("chat.created"));
        let parsed = EventType::from_subject("events.chat.created");
        assert_eq!(parsed.as_ref().map(EventType::as_str), Some("chat.created"));
    }

    #[test]
    fn event_id_rejects_spaces_and_control() {
        assert!(validate_event_id("order-42").is_ok());
        assert!(validate_event_id("").is_err());
        assert!(validate_event_id("a b").is_err());
        assert!(validate_event_id("a\nb").is_err());
    }
}
