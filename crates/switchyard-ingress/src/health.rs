//! Liveness and readiness probes.

use std::sync::Arc;
use std::time::Duration;

use async_nats::connection::State;
use axum::extract::State as AxumState;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use crate::Ingress;

/// How long readiness waits for the stream lookups.
const READINESS_TIMEOUT: Duration = Duration::from_secs(2);

/// Returns 200 while the process serves requests.
pub async fn healthz() -> &'static str {
    "ok"
}

/// Returns 200 when NATS is connected and both streams exist, 503 otherwise.
pub async fn readyz(AxumState(ingress): AxumState<Arc<Ingress>>) -> Response {
    let state = ingress.jetstream.client().connection_state();
    if state != State::Connected {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("NATS is {state}\n"),
        )
            .into_response();
    }
    for name in &ingress.stream_names {
        let lookup = tokio::time::timeout(READINESS_TIMEOUT, ingress.jetstream.get_stream(name));
        match lookup.await {
            Ok(Ok(_)) => {}
            Ok(Err(err)) => {
                let message = format!("stream {name} is not available: {err}\n");
                return (StatusCode::SERVICE_UNAVAILABLE, message).into_response();
            }
            Err(_) => {
                let message = format!("stream {name} lookup timed out\n");
                return (StatusCode::SERVICE_UNAVAILABLE, message).into_response();
            }
        }
    }
    (StatusCode::OK, "ready\n").into_response()
}

/// Serves the Prometheus metrics of the process.
pub async fn metrics() -> Response {
    let body = switchyard_telemetry::metrics::metrics().encode();
    (
        [(
            axum::http::header::CONTENT_TYPE,
            switchyard_telemetry::metrics::CONTENT_TYPE,
        )],
        body,
    )
        .into_response()
}
