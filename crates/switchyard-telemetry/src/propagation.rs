//! W3C trace context (`traceparent`, `tracestate`) across HTTP requests and NATS messages.
//!
//! The ingress continues an incoming `traceparent`, the publish writes the context of its
//! span into the NATS headers, each delivery continues that context, and the outgoing
//! request carries it on. When no exporter runs, spans have no OpenTelemetry context, so
//! callers pass the producer's `traceparent` through unchanged instead (see
//! [`current_headers`]).

use opentelemetry::Context;
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TraceContextExt;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt;

pub const TRACEPARENT: &str = "traceparent";
pub const TRACESTATE: &str = "tracestate";

/// Reads the trace context from any header map.
pub fn extract(headers: &dyn Extractor) -> Context {
    TraceContextPropagator::new().extract(headers)
}

/// Makes `span` a child of the context in `headers`, if they carry a valid one.
///
/// An invalid `traceparent` leaves the span as the root of a new trace.
pub fn continue_trace(span: &tracing::Span, headers: &dyn Extractor) {
    // Without an exporter the per-event spans are disabled, and parsing is wasted work.
    if span.is_disabled() {
        return;
    }
    let context = extract(headers);
    if context.span().span_context().is_valid() {
        let _ = span.set_parent(context);
    } else if headers.get(TRACEPARENT).is_some() {
        tracing::debug!("invalid traceparent; starting a new trace");
    }
}

/// Returns the `traceparent` and `tracestate` of `span`, if it has a valid context.
pub fn current_headers(span: &tracing::Span) -> Option<(String, Option<String>)> {
    let context = span.context();
    if !context.span().span_context().is_valid() {
        return None;
    }
    let mut carrier = Carrier::default();
    TraceContextPropagator::new().inject_context(&context, &mut carrier);
    let traceparent = carrier.traceparent?;
    Some((traceparent, carrier.tracestate))
}

#[derive(Default)]
struct Carrier {
    traceparent: Option<String>,
    tracestate: Option<String>,
}

impl Injector for Carrier {
    fn set(&mut self, key: &str, value: String) {
        match key {
            TRACEPARENT => self.traceparent = Some(value),
            TRACESTATE if !value.is_empty() => self.tracestate = Some(value),
            _ => {}
        }
    }
}

/// Adapts NATS message headers for extraction.
pub struct NatsHeaders<'a>(pub &'a async_nats::HeaderMap);

impl Extractor for NatsHeaders<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(|value| value.as_str())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|(name, _)| name.as_ref()).collect()
    }
}

/// Adapts HTTP request headers for extraction.
pub struct HttpHeaders<'a>(pub &'a http::HeaderMap);

impl Extractor for HttpHeaders<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|value| value.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}
