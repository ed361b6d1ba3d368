//! Sending one event to a `webhook` or `n8n` endpoint.
//!
//! The request is a POST of the event body with CloudEvents binary-mode headers, the trace
//! context, the configured headers and, when the sink has secrets, Standard Webhooks
//! signature headers. Redirects are never followed and the response body is read only up
//! to a short excerpt, so a misbehaving endpoint cannot grow the router's memory.

use std::borrow::Cow;
use std::str::FromStr;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use reqwest::header::{CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue, RETRY_AFTER};
use switchyard_core::config::{SinkConfig, SinkKind};

use crate::retry::{AttemptOutcome, parse_retry_after};
use crate::signing::{self, Signer};

/// Maximum length of the response excerpt kept for logs and dead letters, in bytes.
pub const RESPONSE_EXCERPT_BYTES: usize = 512;

/// A sink setting that cannot be turned into requests.
#[derive(Debug, thiserror::Error)]
pub enum HttpSetupError {
    #[error("invalid url: {0}")]
    Url(String),
    #[error("invalid header name \"{0}\"")]
    HeaderName(String),
    #[error("invalid value for header \"{0}\": use visible ASCII")]
    HeaderValue(String),
    #[error(transparent)]
    Secret(#[from] signing::SecretError),
}

/// The event attributes that travel as request headers.
#[derive(Debug, Clone)]
pub struct EventHeaders<'a> {
    pub id: &'a str,
    pub event_type: &'a str,
    pub source: &'a str,
    pub time: &'a str,
    pub traceparent: Option<&'a str>,
    pub tracestate: Option<&'a str>,
}

/// The HTTP side of one sink.
#[derive(Debug)]
pub struct HttpTarget {
    pub kind: SinkKind,
    url: reqwest::Url,
    headers: HeaderMap,
    signer: Signer,
    client: reqwest::Client,
    timeout: Duration,
}

impl HttpTarget {
    /// Builds the target from its configuration, sharing `client` across sinks.
    pub fn new(config: &SinkConfig, client: reqwest::Client) -> Result<Self, HttpSetupError> {
        let url =
            reqwest::Url::parse(&config.url).map_err(|err| HttpSetupError::Url(err.to_string()))?;
        let mut headers = HeaderMap::new();
        for (name, value) in &config.headers {
            let header_name =
                HeaderName::from_str(name).map_err(|_| HttpSetupError::HeaderName(name.clone()))?;
            let header_value = HeaderValue::from_str(value)
                .map_err(|_| HttpSetupError::HeaderValue(name.clone()))?;
            headers.insert(header_name, header_value);
        }
        Ok(Self {
            kind: config.kind,
            url,
            headers,
            signer: Signer::new(&config.secrets)?,
            client,
            timeout: config.delivery.timeout,
        })
    }

    /// Returns the host of the endpoint, for span attributes.
    pub fn host(&self) -> &str {
        self.url.host_str().unwrap_or_default()
    }

    /// Sends one attempt and reports its outcome; never returns an error.
    pub async fn send(
        &self,
        event: &EventHeaders<'_>,
        content_type: &str,
        body: Bytes,
    ) -> AttemptOutcome {
        // Producers that publish to NATS directly, and structured CloudEvents, can store
        // attributes with control characters. reqwest rejects such a header, and every
        // attempt would fail, so they are percent-encoded as the CloudEvents HTTP binding
        // does.
        let id = encode_control_characters(event.id);
        let event_type = encode_control_characters(event.event_type);
        let source = encode_control_characters(event.source);
        let time = encode_control_characters(event.time);
        let content_type = encode_control_characters(content_type);
        let mut request = self
            .client
            .post(self.url.clone())
            .timeout(self.timeout)
            .headers(self.headers.clone())
            .header(CONTENT_TYPE, content_type.as_ref())
            .header("ce-specversion", "1.0")
            .header("ce-id", id.as_ref())
            .header("ce-type", event_type.as_ref())
            .header("ce-source", source.as_ref())
            .header("ce-time", time.as_ref());
        // An encoded trace context would be invalid anyway, so an invalid one is left out.
        let trace_headers = [
            ("traceparent", event.traceparent),
            ("tracestate", event.tracestate),
        ];
        for (name, value) in trace_headers {
            if let Some(value) = value.and_then(|text| HeaderValue::from_str(text).ok()) {
                request = request.header(name, value);
            }
        }
        if !self.signer.is_empty() {
            // The id is the event id on every attempt, so receivers can deduplicate; the
            // timestamp is the attempt's, as the Standard Webhooks replay window expects.
            let timestamp = unix_seconds(SystemTime::now());
            request = request
                .header(signing::WEBHOOK_ID, id.as_ref())
                .header(signing::WEBHOOK_TIMESTAMP, timestamp.to_string())
                .header(
                    signing::WEBHOOK_SIGNATURE,
                    self.signer.sign(&id, timestamp, &body),
                );
        }

        match request.body(body).send().await {
            Ok(response) => read_outcome(response).await,
            Err(err) if err.is_timeout() => AttemptOutcome::TimedOut,
            // The URL may carry a token in its query, so it is left out of the message.
            Err(err) => AttemptOutcome::Connection(error_chain(&err.without_url())),
        }
    }
}

/// Builds the HTTP client shared by all sinks: no redirects, pooled connections.
pub fn build_client() -> Result<reqwest::Client, reqwest::Error> {
    // reqwest is built without a default TLS provider; install ring once for the process.
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("switchyard/", env!("CARGO_PKG_VERSION")))
        .pool_idle_timeout(Duration::from_secs(60))
        .build()
}

async fn read_outcome(mut response: reqwest::Response) -> AttemptOutcome {
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get(RETRY_AFTER)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| parse_retry_after(value, SystemTime::now()));

    let mut excerpt = Vec::new();
    while excerpt.len() < RESPONSE_EXCERPT_BYTES {
        match response.chunk().await {
            Ok(Some(chunk)) => excerpt.extend_from_slice(&chunk),
            Ok(None) => break,
            Err(err) if err.is_timeout() && !(200..300).contains(&status) => break,
            Err(err) if err.is_timeout() => return AttemptOutcome::TimedOut,
            Err(_) => break,
        }
    }
    excerpt.truncate(RESPONSE_EXCERPT_BYTES);
    AttemptOutcome::Response {
        status,
        retry_after,
        excerpt: String::from_utf8_lossy(&excerpt).into_owned(),
    }
}

/// Percent-encodes the ASCII control characters other than tab, which are the only
/// characters that an HTTP field value cannot carry. Other text is returned unchanged.
fn encode_control_characters(text: &str) -> Cow<'_, str> {
    let is_forbidden = |c: char| c.is_ascii_control() && c != '\t';
    if !text.contains(is_forbidden) {
        return Cow::Borrowed(text);
    }
    let mut encoded = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if is_forbidden(c) {
            encoded.push_str(&format!("%{:02X}", u32::from(c)));
        } else {
            encoded.push(c);
        }
    }
    Cow::Owned(encoded)
}

fn unix_seconds(time: SystemTime) -> i64 {
    let seconds = time
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|elapsed| elapsed.as_secs())
        .unwrap_or_default();
    i64::try_from(seconds).unwrap_or(i64::MAX)
}

/// Joins an error and its sources into one line; reqwest's top-level message alone hides
/// the cause (connection refused, reset, DNS).
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_percent_encoded() {
        assert_eq!(encode_control_characters("/orders"), "/orders");
        assert_eq!(encode_control_characters("a\u{1}b\u{7f}"), "a%01b%7F");
        assert_eq!(encode_control_characters("a\r\nb"), "a%0D%0Ab");
        assert_eq!(encode_control_characters("tab\tand ü"), "tab\tand ü");
        for text in ["a\u{1}b", "x\u{0}", "ü\u{1b}"] {
            let encoded = encode_control_characters(text);
            assert!(HeaderValue::from_str(&encoded).is_ok(), "{encoded:?}");
        }
    }
}
