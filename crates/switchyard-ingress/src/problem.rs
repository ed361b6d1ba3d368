//! Error responses as `application/problem+json` (RFC 9457).
//!
//! Every rejection states what failed, on which value, and what to do next. Client mistakes
//! are logged at debug; only failures on the Switchyard side are logged as warnings.

use std::sync::OnceLock;
use std::time::Duration;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use switchyard_core::json::JsonError;
use switchyard_core::schema::Violation;
use switchyard_telemetry::throttle::LogThrottle;

/// Base of the `type` URI of every problem.
pub const PROBLEM_TYPE_BASE: &str = "https://switchyard.dev/problems/";
pub const PROBLEM_CONTENT_TYPE: &str = "application/problem+json";

/// One RFC 9457 problem.
#[derive(Debug, Clone, Serialize)]
pub struct Problem {
    #[serde(rename = "type")]
    pub problem_type: String,
    pub title: &'static str,
    #[serde(serialize_with = "serialize_status")]
    pub status: StatusCode,
    pub detail: String,
    /// Line of a JSON syntax error, 1-based.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub line: Option<usize>,
    /// Column of a JSON syntax error, 1-based.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub column: Option<usize>,
    /// Body limit in bytes, on a 413.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit_bytes: Option<usize>,
    /// Schema violations, on a 422.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<Violation>,
    #[serde(skip)]
    pub retry_after: Option<Duration>,
}

fn serialize_status<S: serde::Serializer>(status: &StatusCode, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u16(status.as_u16())
}

impl Problem {
    pub fn new(status: StatusCode, slug: &str, title: &'static str, detail: String) -> Self {
        Self {
            problem_type: format!("{PROBLEM_TYPE_BASE}{slug}"),
            title,
            status,
            detail,
            line: None,
            column: None,
            limit_bytes: None,
            errors: Vec::new(),
            retry_after: None,
        }
    }

    /// Returns the last segment of the problem type, such as `invalid-json`.
    pub fn slug(&self) -> &str {
        self.problem_type
            .strip_prefix(PROBLEM_TYPE_BASE)
            .unwrap_or(&self.problem_type)
    }

    pub fn bad_request(slug: &str, detail: String) -> Self {
        Self::new(StatusCode::BAD_REQUEST, slug, "Bad request", detail)
    }

    pub fn invalid_json(err: &JsonError) -> Self {
        let mut problem = Self::new(
            StatusCode::BAD_REQUEST,
            "invalid-json",
            "Invalid JSON",
            err.to_string(),
        );
        match err {
            JsonError::Syntax { line, column, .. }
            | JsonError::DuplicateKey { line, column, .. } => {
                problem.line = Some(*line);
                problem.column = Some(*column);
            }
            JsonError::Empty | JsonError::InvalidUtf8 { .. } => {}
        }
        problem
    }

    pub fn unknown_type(event_type: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "unknown-event-type",
            "Unknown event type",
            format!(
                "no schema for event type \"{event_type}\": add schemas/{event_type}.json or \
                 check the spelling"
            ),
        )
    }

    pub fn schema_violation(event_type: &str, errors: Vec<Violation>) -> Self {
        let mut problem = Self::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "schema-violation",
            "Schema violation",
            format!(
                "the event does not match the schema of \"{event_type}\": {} error(s), each \
                 with its JSON Pointer",
                errors.len()
            ),
        );
        problem.errors = errors;
        problem
    }

    pub fn too_large(limit: usize) -> Self {
        let mut problem = Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body-too-large",
            "Request body too large",
            format!("request body is larger than the limit of {limit} bytes: send a smaller event"),
        );
        problem.limit_bytes = Some(limit);
        problem
    }

    pub fn unsupported_media_type(detail: String) -> Self {
        Self::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported-media-type",
            "Unsupported media type",
            detail,
        )
    }

    pub fn unavailable(detail: String, retry_after: Duration) -> Self {
        let mut problem = Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "Service unavailable",
            detail,
        );
        problem.retry_after = Some(retry_after);
        problem
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            // During an outage every request fails the same way, so repeats are counted.
            static THROTTLE: OnceLock<LogThrottle> = OnceLock::new();
            let throttle = THROTTLE.get_or_init(LogThrottle::default);
            if let Some(suppressed) = throttle.check(self.slug()) {
                tracing::warn!(status = self.status.as_u16(), detail = %self.detail, suppressed, "request failed");
            }
        } else {
            tracing::debug!(status = self.status.as_u16(), detail = %self.detail, "request rejected");
        }
        let body = serde_json::to_vec(&self).unwrap_or_default();
        let mut response = (self.status, body).into_response();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(PROBLEM_CONTENT_TYPE),
        );
        if let Some(retry_after) = self.retry_after {
            let seconds = retry_after.as_secs().max(1);
            headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}
