//! The Switchyard HTTP ingress.
//!
//! Producers POST events. The ingress checks the media type, the size, the JSON and the
//! schema, publishes to JetStream, and returns 202 only after JetStream acknowledged the
//! message. Routes:
//!
//! - `POST /v1/events/{type}`: one event, the body is its data.
//! - `POST /v1/events`: a batch, a structured CloudEvent, a CloudEvents batch, or one
//!   binary-mode CloudEvent (a `ce-type` header).
//! - `GET /healthz` (the process runs) and `GET /readyz` (NATS connected, streams present).

// `Problem` is the error of most functions here and becomes the HTTP response at once.
// It is built only on the rejection path, so boxing it would buy nothing.
#![allow(clippy::result_large_err)]

mod body;
mod cloudevents;
mod events;
mod health;
mod problem;

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use axum::Router;
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, MatchedPath};
use axum::http::{Method, Request, StatusCode, Uri};
use axum::routing::{get, post};
use switchyard_core::config::Config;
use switchyard_core::schema::SchemaRegistry;
use switchyard_telemetry::propagation;
use tower_http::timeout::{RequestBodyTimeoutLayer, TimeoutLayer};
use tower_http::trace::TraceLayer;
use tracing::Span;

pub use problem::{PROBLEM_CONTENT_TYPE, Problem};

/// Time a client has to send its whole request body.
pub const BODY_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Time a request may take in all, including the JetStream acknowledgement.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// Maximum length of a request path echoed back in an error, in bytes.
const MAX_ECHOED_PATH_BYTES: usize = 200;

/// Bytes kept free under the server's `max_payload` for the headers Switchyard adds.
pub const HEADER_RESERVE_BYTES: usize = 8 * 1024;

/// Shared state of the ingress handlers.
pub struct Ingress {
    jetstream: jetstream::Context,
    schemas: Arc<SchemaRegistry>,
    body_limit: usize,
    max_batch_events: usize,
    publish_timeout: Duration,
    retry_after: Duration,
    stream_names: [String; 2],
}

impl Ingress {
    /// Builds the ingress state.
    ///
    /// The body limit is the configured one, lowered when needed so that a body plus its
    /// headers fits the NATS server's `max_payload` (read at connect).
    pub fn new(
        config: &Config,
        jetstream: jetstream::Context,
        schemas: Arc<SchemaRegistry>,
    ) -> Self {
        let max_payload = jetstream.client().server_info().max_payload;
        let body_limit = effective_body_limit(config.server.max_body_bytes, max_payload);
        if body_limit < config.server.max_body_bytes {
            // NATS's default max_payload equals the default body limit, so this is routine.
            tracing::info!(
                configured = config.server.max_body_bytes,
                max_payload,
                body_limit,
                "server.max_body_bytes lowered to fit the NATS server's max_payload"
            );
        }
        Self {
            jetstream,
            schemas,
            body_limit,
            max_batch_events: config.server.max_batch_events,
            publish_timeout: config.server.publish_timeout,
            retry_after: config.server.unavailable_retry_after,
            stream_names: [
                config.streams.events.name.clone(),
                config.streams.dlq.name.clone(),
            ],
        }
    }

    /// Returns the body limit in force, in bytes.
    pub fn body_limit(&self) -> usize {
        self.body_limit
    }
}

/// Returns the largest body that fits both the configuration and `max_payload`.
pub fn effective_body_limit(configured: usize, max_payload: usize) -> usize {
    if max_payload == 0 {
        return configured;
    }
    // A server with a small max_payload keeps a quarter of it for headers, so events
    // still fit instead of every body being rejected.
    let reserve = HEADER_RESERVE_BYTES.min(max_payload / 4);
    configured.min(max_payload - reserve)
}

/// Builds the axum router of the ingress.
pub fn router(ingress: Arc<Ingress>) -> Router {
    Router::new()
        .route("/v1/events", post(events::publish_batch))
        .route("/v1/events/{event_type}", post(events::publish_one))
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/metrics", get(health::metrics))
        .fallback(unknown_route)
        .method_not_allowed_fallback(method_not_allowed)
        // The handlers enforce the configured limit themselves, with a problem response.
        .layer(DefaultBodyLimit::disable())
        // A client that sends its body too slowly, or a request that takes too long, is
        // cut off so it cannot hold a connection and a task forever.
        .layer(RequestBodyTimeoutLayer::new(BODY_READ_TIMEOUT))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            REQUEST_TIMEOUT,
        ))
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(request_span)
                .on_response(record_response)
                // Problem responses log server-side failures themselves, rate-limited.
                .on_failure(()),
        )
        .with_state(ingress)
}

/// Returns a 404 problem for a path that no route serves.
async fn unknown_route(uri: Uri) -> Problem {
    Problem::new(
        StatusCode::NOT_FOUND,
        "not-found",
        "Not found",
        format!(
            "no route for {}: POST events to /v1/events/{{type}} or /v1/events",
            truncate(uri.path(), MAX_ECHOED_PATH_BYTES)
        ),
    )
}

/// Returns a 405 problem for a known path requested with the wrong method.
async fn method_not_allowed(method: Method, uri: Uri) -> Problem {
    Problem::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method-not-allowed",
        "Method not allowed",
        format!(
            "{method} is not allowed on {}: events are sent with POST, probes with GET",
            truncate(uri.path(), MAX_ECHOED_PATH_BYTES)
        ),
    )
}

/// Shortens text echoed back in an error, at a character boundary.
fn truncate(text: &str, max_bytes: usize) -> &str {
    if text.len() <= max_bytes {
        return text;
    }
    let mut end = max_bytes;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// Opens the server span of a request, continuing the caller's trace when its
/// `traceparent` is valid.
fn request_span(request: &Request<Body>) -> Span {
    let route = request.extensions().get::<MatchedPath>().map_or_else(
        || request.uri().path().to_owned(),
        |path| path.as_str().to_owned(),
    );
    let span = tracing::debug_span!(
        "request",
        otel.name = %format!("{} {route}", request.method()),
        otel.kind = "server",
        http.request.method = %request.method(),
        http.route = %route,
        url.path = %request.uri().path(),
        http.response.status_code = tracing::field::Empty,
    );
    propagation::continue_trace(&span, &propagation::HttpHeaders(request.headers()));
    span
}

fn record_response(response: &axum::response::Response, latency: Duration, span: &Span) {
    // i64, because tracing-opentelemetry 0.34 exports unsigned integers as strings.
    span.record(
        "http.response.status_code",
        i64::from(response.status().as_u16()),
    );
    tracing::debug!(
        status = response.status().as_u16(),
        latency_ms = latency.as_millis() as u64,
        "request finished"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_limit_fits_max_payload() {
        assert_eq!(
            effective_body_limit(1024 * 1024, 8 * 1024 * 1024),
            1024 * 1024
        );
        assert_eq!(
            effective_body_limit(1024 * 1024, 1024 * 1024),
            1024 * 1024 - HEADER_RESERVE_BYTES
        );
        assert_eq!(effective_body_limit(1000, 0), 1000);
        assert_eq!(effective_body_limit(1024 * 1024, 4096), 3072);
    }
}
