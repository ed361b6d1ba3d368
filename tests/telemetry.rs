//! End-to-end tests of telemetry. They cover one trace per event from the ingress through
//! every delivery attempt and the dead letter, and W3C trace context passed through
//! without an exporter. They also cover dead letter replays as new linked traces, the
//! Prometheus metrics, throttled retry logs, and logs free of secrets.
//!
//! Each test starts its own nats-server, `switchyard serve` and HTTP receivers on
//! 127.0.0.1. Tests that check traces also run an OTLP/HTTP collector on 127.0.0.1 and
//! point the router at it with `OTEL_EXPORTER_OTLP_ENDPOINT`, which the exporter extends
//! with `/v1/traces`.

mod support;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::process::Output;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AttributeValue;
use opentelemetry_proto::tonic::trace::v1::Span as ProtoSpan;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use prost::Message as _;
use serde_json::Value;
use support::{CapturedRequest, NatsServer, Receiver, Router, free_port, http_client};
use tokio::task::JoinHandle;
use tokio::time::Instant;

const BIN: &str = env!("CARGO_BIN_EXE_switchyard");

/// Upper bound of every wait for a request, a span, a metric or a log line.
const TIMEOUT: Duration = Duration::from_secs(20);
/// How long the collected spans must stay unchanged before exact counts are checked.
const QUIET: Duration = Duration::from_secs(1);
/// Interval between two polls of the collector, `/metrics` or the router log.
const POLL_INTERVAL: Duration = Duration::from_millis(50);
/// Upper bound of one run of the command line.
const CLI_TIMEOUT: Duration = Duration::from_secs(30);
/// Batch span processor delay in milliseconds, so spans reach the collector quickly.
const BSP_SCHEDULE_DELAY_MS: &str = "100";
/// Window in which the router logs one retry or give-up line per sink and failure kind,
/// as `switchyard_telemetry::throttle::DEFAULT_WINDOW` sets it.
const LOG_THROTTLE_WINDOW: Duration = Duration::from_secs(10);

/// The producer's trace context: trace id, parent span id and the `traceparent` of both.
const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT_SPAN_ID: &str = "00f067aa0ba902b7";
const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
const TRACESTATE: &str = "vendor=opaque-value";

/// Route of the request span of `POST /v1/events/{type}`.
const EVENT_ROUTE: &str = "/v1/events/{event_type}";

/// Environment variables that turn trace export on. A test that runs without an exporter
/// needs all of them unset in its own environment, because the router inherits it.
const OTLP_VARIABLES: [&str; 2] = [
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
];

// Secrets of the log test. Each is distinctive, so a match in the log is a leak.
/// Raw signing key. The sink secret is `whsec_` followed by its base64.
const SIGNING_KEY: &[u8] = b"telemetry-tests-signing-key-5f1e2d3c";
/// Token in the query string of the reachable sink's URL.
const URL_TOKEN: &str = "SECRET123-url-token-a41c";
/// Token in the query string of the unreachable sink's URL.
const DOWN_URL_TOKEN: &str = "SECRET456-url-token-9b07";
/// Value of the `x-api-key` header both sinks send.
const HEADER_SECRET: &str = "header-secret-value-77e2";
/// Token the nats-server requires from clients.
const NATS_TOKEN: &str = "nats-secret-token-c3d8";

// ---------------------------------------------------------------------------------------
// OTLP/HTTP collector
// ---------------------------------------------------------------------------------------

/// One span as the collector decoded it, with ids in lowercase hex.
#[derive(Clone, Debug)]
struct ExportedSpan {
    trace_id: String,
    span_id: String,
    /// Empty for the root span of a trace.
    parent_span_id: String,
    name: String,
    kind: SpanKind,
    attributes: BTreeMap<String, AttributeValue>,
    /// Linked span contexts as (trace id, span id).
    links: Vec<(String, String)>,
}

impl ExportedSpan {
    fn from_proto(span: ProtoSpan) -> ExportedSpan {
        ExportedSpan {
            trace_id: hex(&span.trace_id),
            span_id: hex(&span.span_id),
            parent_span_id: hex(&span.parent_span_id),
            kind: SpanKind::try_from(span.kind).unwrap_or(SpanKind::Unspecified),
            name: span.name,
            attributes: span
                .attributes
                .into_iter()
                .filter_map(|pair| Some((pair.key, pair.value?.value?)))
                .collect(),
            links: span
                .links
                .into_iter()
                .map(|link| (hex(&link.trace_id), hex(&link.span_id)))
                .collect(),
        }
    }

    fn str_attribute(&self, key: &str) -> Option<&str> {
        match self.attributes.get(key)? {
            AttributeValue::StringValue(value) => Some(value),
            _ => None,
        }
    }

    fn int_attribute(&self, key: &str) -> Option<i64> {
        match self.attributes.get(key)? {
            AttributeValue::IntValue(value) => Some(*value),
            _ => None,
        }
    }

    /// Reports whether this is the server span of `POST /v1/events/{type}`.
    fn is_event_request(&self) -> bool {
        self.kind == SpanKind::Server && self.str_attribute("http.route") == Some(EVENT_ROUTE)
    }

    fn is_publish(&self) -> bool {
        self.kind == SpanKind::Producer && self.name.starts_with("publish events.")
    }

    fn is_deliver(&self) -> bool {
        self.kind == SpanKind::Consumer
    }

    fn is_attempt(&self) -> bool {
        self.kind == SpanKind::Client && self.attributes.contains_key("attempt")
    }

    fn is_dead_letter(&self) -> bool {
        self.kind == SpanKind::Producer && self.name.starts_with("publish dlq.")
    }

    fn is_sink(&self, sink: &str) -> bool {
        self.str_attribute("sink") == Some(sink)
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

#[derive(Default)]
struct CollectorState {
    spans: Vec<ExportedSpan>,
    /// Export requests whose body did not decode, with the decode error.
    decode_errors: Vec<String>,
}

/// An OTLP/HTTP trace receiver on 127.0.0.1. It decodes the protobuf
/// `ExportTraceServiceRequest` of `POST /v1/traces` and returns an empty
/// `ExportTraceServiceResponse`.
struct Collector {
    state: Arc<Mutex<CollectorState>>,
    addr: SocketAddr,
    server: JoinHandle<()>,
}

impl Collector {
    async fn start() -> Collector {
        let state = Arc::new(Mutex::new(CollectorState::default()));
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
            .await
            .expect("failed to bind the OTLP collector to 127.0.0.1:0");
        let addr = listener
            .local_addr()
            .expect("failed to read the collector's local address");
        let app = axum::Router::new()
            .route("/v1/traces", axum::routing::post(export_traces))
            .with_state(state.clone());
        let server = tokio::spawn(async move {
            if let Err(error) = axum::serve(listener, app).await {
                eprintln!("OTLP collector failed: {error}");
            }
        });
        Collector {
            state,
            addr,
            server,
        }
    }

    /// Returns the base URL for `OTEL_EXPORTER_OTLP_ENDPOINT`.
    fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Returns the environment that makes a `switchyard` process export to this collector.
    fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("OTEL_EXPORTER_OTLP_ENDPOINT", self.endpoint()),
            ("OTEL_BSP_SCHEDULE_DELAY", BSP_SCHEDULE_DELAY_MS.to_owned()),
        ]
    }

    fn lock(&self) -> MutexGuard<'_, CollectorState> {
        self.state
            .lock()
            .expect("the collector state is poisoned by a panicking handler")
    }

    fn spans(&self) -> Vec<ExportedSpan> {
        self.lock().spans.clone()
    }

    /// Waits until `condition` holds for the spans collected so far, then until no new
    /// span arrives for `QUIET`, and returns the spans.
    ///
    /// Panics after `TIMEOUT` with `what` and a summary of the spans.
    async fn wait_for_spans(
        &self,
        what: &str,
        condition: impl Fn(&[ExportedSpan]) -> bool,
    ) -> Vec<ExportedSpan> {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let spans = self.spans();
            if condition(&spans) {
                break;
            }
            if Instant::now() >= deadline {
                panic!(
                    "the collector did not receive {what} within {TIMEOUT:?}. Decode errors: \
                     {:?}. Spans:\n{}",
                    self.lock().decode_errors,
                    summarize(&spans)
                );
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
        let mut count = self.lock().spans.len();
        loop {
            tokio::time::sleep(QUIET).await;
            let now = self.lock().spans.len();
            if now == count {
                break;
            }
            count = now;
        }
        let state = self.lock();
        assert!(
            state.decode_errors.is_empty(),
            "export requests that did not decode: {:?}",
            state.decode_errors
        );
        state.spans.clone()
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.server.abort();
    }
}

async fn export_traces(
    State(state): State<Arc<Mutex<CollectorState>>>,
    body: Bytes,
) -> axum::response::Response {
    let decoded = ExportTraceServiceRequest::decode(body);
    let mut state = state
        .lock()
        .expect("the collector state is poisoned by a panicking handler");
    match decoded {
        Ok(request) => {
            let spans = request
                .resource_spans
                .into_iter()
                .flat_map(|resource| resource.scope_spans)
                .flat_map(|scope| scope.spans)
                .map(ExportedSpan::from_proto);
            state.spans.extend(spans);
            let response = ExportTraceServiceResponse::default().encode_to_vec();
            (
                StatusCode::OK,
                [(CONTENT_TYPE, "application/x-protobuf")],
                response,
            )
                .into_response()
        }
        Err(error) => {
            state.decode_errors.push(error.to_string());
            (StatusCode::BAD_REQUEST, error.to_string()).into_response()
        }
    }
}

/// Lists spans one a line, for panic messages.
fn summarize(spans: &[ExportedSpan]) -> String {
    if spans.is_empty() {
        return "  (no spans)".to_owned();
    }
    spans
        .iter()
        .map(|span| {
            format!(
                "  {:?} {:?} trace={} span={} parent={} sink={:?} attempt={:?} decision={:?}",
                span.kind,
                span.name,
                span.trace_id,
                span.span_id,
                span.parent_span_id,
                span.str_attribute("sink"),
                span.int_attribute("attempt"),
                span.str_attribute("decision"),
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Returns the one span that matches `predicate`, panicking with the spans otherwise.
fn only<'a>(
    spans: &'a [ExportedSpan],
    what: &str,
    predicate: impl Fn(&ExportedSpan) -> bool,
) -> &'a ExportedSpan {
    let matching: Vec<&ExportedSpan> = spans.iter().filter(|span| predicate(span)).collect();
    assert_eq!(
        matching.len(),
        1,
        "expected exactly one {what} span. Spans:\n{}",
        summarize(spans)
    );
    matching[0]
}

/// Splits a `traceparent` into its trace id and parent span id.
fn parse_traceparent(traceparent: &str) -> Option<(&str, &str)> {
    let mut parts = traceparent.split('-');
    let _version = parts.next()?;
    let trace_id = parts.next()?;
    let span_id = parts.next()?;
    Some((trace_id, span_id))
}

/// Returns the trace id and parent span id of the `traceparent` a receiver captured.
fn received_trace_context(request: &CapturedRequest) -> (String, String) {
    let traceparent = request
        .header("traceparent")
        .unwrap_or_else(|| panic!("the request to {} has no traceparent", request.path));
    let (trace_id, span_id) = parse_traceparent(traceparent)
        .unwrap_or_else(|| panic!("the traceparent {traceparent:?} has fewer than 3 parts"));
    (trace_id.to_owned(), span_id.to_owned())
}

// ---------------------------------------------------------------------------------------
// Router stack
// ---------------------------------------------------------------------------------------

/// One `[[sinks]]` entry of a router config.
struct SinkSpec {
    settings: toml::Table,
    delivery: toml::Table,
}

impl SinkSpec {
    /// Creates a webhook sink for `chat.created` that retries after 100 ms.
    fn webhook(name: &str, url: &str) -> SinkSpec {
        let spec = SinkSpec {
            settings: toml::Table::new(),
            delivery: toml::Table::new(),
        };
        spec.set("name", name)
            .set("kind", "webhook")
            .set("url", url)
            .set("events", vec!["chat.created"])
            .delivery("backoff", vec!["100ms"])
            .delivery("timeout", "5s")
            .delivery("ack_wait", "5s")
    }

    /// Sets a key of the `[[sinks]]` table, replacing an earlier value.
    fn set(mut self, key: &str, value: impl Into<toml::Value>) -> SinkSpec {
        self.settings.insert(key.to_owned(), value.into());
        self
    }

    /// Sets a key of the `[sinks.delivery]` table, replacing an earlier value.
    fn delivery(mut self, key: &str, value: impl Into<toml::Value>) -> SinkSpec {
        self.delivery.insert(key.to_owned(), value.into());
        self
    }

    fn to_table(&self) -> toml::Table {
        let mut table = self.settings.clone();
        table.insert(
            "delivery".to_owned(),
            toml::Value::Table(self.delivery.clone()),
        );
        table
    }
}

/// Builds a config text with a free listen port, the NATS URL and token, and the sinks.
fn config_text(nats_url: &str, nats_token: Option<&str>, sinks: &[SinkSpec]) -> String {
    let mut server = toml::Table::new();
    server.insert(
        "listen".to_owned(),
        format!("127.0.0.1:{}", free_port()).into(),
    );
    let mut nats = toml::Table::new();
    nats.insert("url".to_owned(), nats_url.into());
    if let Some(token) = nats_token {
        nats.insert("token".to_owned(), token.into());
    }
    let mut config = toml::Table::new();
    config.insert("server".to_owned(), toml::Value::Table(server));
    config.insert("nats".to_owned(), toml::Value::Table(nats));
    let sinks = sinks
        .iter()
        .map(|sink| toml::Value::Table(sink.to_table()))
        .collect();
    config.insert("sinks".to_owned(), toml::Value::Array(sinks));
    toml::to_string(&config).expect("failed to serialise the router config")
}

/// A nats-server and a router serving the given sinks.
struct Stack {
    router: Router,
    client: reqwest::Client,
    // Declared last so the server stops after the router.
    _nats: NatsServer,
}

impl Stack {
    /// Starts a nats-server and a router with the sinks and extra environment variables.
    async fn start(sinks: &[SinkSpec], envs: &[(&str, String)]) -> Stack {
        let nats = NatsServer::start().await;
        Stack::start_on(nats, None, sinks, envs).await
    }

    /// Starts a router on a running nats-server, with `nats_token` as its `[nats] token`.
    async fn start_on(
        nats: NatsServer,
        nats_token: Option<&str>,
        sinks: &[SinkSpec],
        envs: &[(&str, String)],
    ) -> Stack {
        let config = config_text(&nats.url(), nats_token, sinks);
        let mut builder = Router::builder(BIN, &config);
        for (name, value) in envs {
            builder = builder.env(name, value);
        }
        Stack {
            router: builder.start().await,
            client: http_client(),
            _nats: nats,
        }
    }

    /// Posts `body` as one `chat.created` event with extra headers and returns the response
    /// status and body.
    async fn post(&self, body: &str, headers: &[(&str, &str)]) -> (u16, String) {
        let url = self.router.url("/v1/events/chat.created");
        let mut request = self
            .client
            .post(&url)
            .header("content-type", "application/json")
            .body(body.to_owned());
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let response = request
            .send()
            .await
            .unwrap_or_else(|error| panic!("POST {url} failed: {error}"));
        let status = response.status().as_u16();
        let text = response
            .text()
            .await
            .unwrap_or_else(|error| panic!("failed to read the response of POST {url}: {error}"));
        (status, text)
    }

    /// Publishes a valid `chat.created` event with extra headers, asserts the 202 and
    /// returns the event id.
    async fn publish(&self, n: usize, headers: &[(&str, &str)]) -> String {
        let (status, text) = self.post(&chat_created(n), headers).await;
        assert_eq!(
            status, 202,
            "POST with headers {headers:?} returned {status}: {text}"
        );
        let accepted: Value = serde_json::from_str(&text)
            .unwrap_or_else(|error| panic!("the 202 response is not JSON ({error}): {text}"));
        accepted["id"]
            .as_str()
            .unwrap_or_else(|| panic!("the 202 response has no id: {text}"))
            .to_owned()
    }

    /// Scrapes `GET /metrics` and returns its samples.
    async fn metrics(&self) -> Vec<Sample> {
        let url = self.router.url("/metrics");
        let response = self
            .client
            .get(&url)
            .send()
            .await
            .unwrap_or_else(|error| panic!("GET {url} failed: {error}"));
        assert_eq!(response.status(), 200, "GET {url}");
        let text = response
            .text()
            .await
            .unwrap_or_else(|error| panic!("failed to read the response of GET {url}: {error}"));
        parse_metrics(&text)
    }

    /// Waits until the metric with these labels reaches `expected` and returns the samples.
    async fn wait_for_metric(
        &self,
        name: &str,
        labels: &[(&str, &str)],
        expected: f64,
    ) -> Vec<Sample> {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let samples = self.metrics().await;
            if metric_value(&samples, name, labels) == Some(expected) {
                return samples;
            }
            if Instant::now() >= deadline {
                panic!(
                    "{name}{labels:?} was {:?}, not {expected}, after {TIMEOUT:?}. Router \
                     log:\n{}",
                    metric_value(&samples, name, labels),
                    self.router.logs()
                );
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// Runs `switchyard dlq ARGS --config CONFIG` with extra environment variables.
    async fn dlq(&self, args: &[&str], envs: &[(&str, String)]) -> Output {
        let config = self.router.config_path();
        let config = config.to_str().expect("the temporary folder path is UTF-8");
        let mut full_args = vec!["dlq"];
        full_args.extend_from_slice(args);
        full_args.extend_from_slice(&["--config", config]);
        run_cli(&full_args, envs).await
    }
}

/// Runs the `switchyard` binary with `args` and returns its output, killing it after
/// `CLI_TIMEOUT`.
///
/// Environment variables that the repository's config reads are removed, and `NATS_URL`
/// names a closed port on 127.0.0.1, so no default address is used.
async fn run_cli(args: &[&str], envs: &[(&str, String)]) -> Output {
    let closed_nats_url = format!("nats://127.0.0.1:{}", free_port());
    let mut command = tokio::process::Command::new(BIN);
    command
        .args(args)
        .env("RUST_LOG", "warn")
        .env("NO_COLOR", "1")
        .env("NATS_URL", closed_nats_url)
        .env_remove("SWITCHYARD_CONFIG")
        .env_remove("SWITCHYARD_LOG_FORMAT")
        .env_remove("SWITCHYARD_INBOX_URL")
        .env_remove("SWITCHYARD_INBOX_SECRET")
        .env_remove("N8N_WEBHOOK_URL")
        .envs(envs.iter().map(|(name, value)| (name, value)))
        .kill_on_drop(true);
    match tokio::time::timeout(CLI_TIMEOUT, command.output()).await {
        Ok(output) => output.unwrap_or_else(|error| panic!("failed to run {BIN}: {error}")),
        Err(_elapsed) => panic!("switchyard {args:?} did not exit within {CLI_TIMEOUT:?}"),
    }
}

/// Formats the exit status, stdout and stderr of a command for assert messages.
fn describe(output: &Output) -> String {
    format!(
        "{}\nstdout:\n{}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Returns the data of a valid `chat.created` event for chat `chat_{n}`.
fn chat_created(n: usize) -> String {
    format!(
        r#"{{"chat_id": "chat_{n}", "created_at": "2025-01-15T09:30:00Z", "created_by": "user_42", "participants": ["user_42", "user_7"]}}"#
    )
}

/// Returns the captured request whose `ce-id` is `event_id`.
fn request_for<'a>(requests: &'a [CapturedRequest], event_id: &str) -> &'a CapturedRequest {
    requests
        .iter()
        .find(|request| request.header("ce-id") == Some(event_id))
        .unwrap_or_else(|| panic!("no captured request has ce-id {event_id}"))
}

// ---------------------------------------------------------------------------------------
// Prometheus text format
// ---------------------------------------------------------------------------------------

/// One sample line of the Prometheus text format.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// Parses the sample lines of a Prometheus or OpenMetrics text exposition.
fn parse_metrics(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .map(|line| parse_sample(line).unwrap_or_else(|| panic!("invalid metrics line {line:?}")))
        .collect()
}

fn parse_sample(line: &str) -> Option<Sample> {
    let (series, rest) = if line.contains('{') {
        line.split_at(line.rfind('}')? + 1)
    } else {
        line.split_at(line.find(' ')?)
    };
    let value = rest.split_whitespace().next()?.parse().ok()?;
    let (name, labels) = match series.split_once('{') {
        Some((name, labels)) => (name, parse_labels(labels.strip_suffix('}')?)?),
        None => (series, BTreeMap::new()),
    };
    Some(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}

/// Parses `a="x",b="y"` with the format's `\\`, `\"` and `\n` escapes.
fn parse_labels(text: &str) -> Option<BTreeMap<String, String>> {
    let mut labels = BTreeMap::new();
    let mut rest = text;
    while !rest.is_empty() {
        let (key, after_key) = rest.split_once("=\"")?;
        let mut value = String::new();
        let mut chars = after_key.char_indices();
        let end = loop {
            let (index, c) = chars.next()?;
            match c {
                '"' => break index,
                '\\' => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    escaped => value.push(escaped),
                },
                other => value.push(other),
            }
        };
        labels.insert(key.trim_start_matches(',').to_owned(), value);
        rest = &after_key[end + 1..];
    }
    Some(labels)
}

/// Returns the sum of the samples named `name` whose labels include `labels`, or `None`
/// when there is no such sample.
fn metric_value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let matching: Vec<f64> = samples
        .iter()
        .filter(|sample| sample.name == name)
        .filter(|sample| {
            labels
                .iter()
                .all(|(key, value)| sample.labels.get(*key).map(String::as_str) == Some(*value))
        })
        .map(|sample| sample.value)
        .collect();
    if matching.is_empty() {
        None
    } else {
        Some(matching.iter().sum())
    }
}

// ---------------------------------------------------------------------------------------
// Traces
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn event_trace_covers_retry_and_dead_letter() {
    let collector = Collector::start().await;
    let failing = Receiver::start().await;
    failing.set_status(503);
    let healthy = Receiver::start().await;
    let sinks = [
        SinkSpec::webhook("failing", &failing.url("/failing"))
            .delivery("max_attempts", 2)
            .delivery("backoff", vec!["200ms"]),
        SinkSpec::webhook("healthy", &healthy.url("/healthy")),
    ];
    let stack = Stack::start(&sinks, &collector.env()).await;

    let event_id = stack.publish(1, &[("traceparent", TRACEPARENT)]).await;

    let failing_requests = failing.wait_for_count(2, TIMEOUT).await;
    let healthy_requests = healthy.wait_for_count(1, TIMEOUT).await;
    let spans = collector
        .wait_for_spans("the spans of the event and its dead letter", |spans| {
            let in_trace = |predicate: fn(&ExportedSpan) -> bool| {
                spans
                    .iter()
                    .filter(|span| span.trace_id == TRACE_ID && predicate(span))
                    .count()
            };
            in_trace(ExportedSpan::is_event_request) >= 1
                && in_trace(|span| span.name == "schema.validate") >= 1
                && in_trace(ExportedSpan::is_publish) >= 1
                && in_trace(ExportedSpan::is_deliver) >= 3
                && in_trace(ExportedSpan::is_attempt) >= 3
                && in_trace(ExportedSpan::is_dead_letter) >= 1
        })
        .await;

    // Every span except those of the harness's readiness polls belongs to the event.
    for span in &spans {
        let readiness =
            span.kind == SpanKind::Server && span.str_attribute("http.route") == Some("/readyz");
        if !readiness {
            assert_eq!(
                span.trace_id,
                TRACE_ID,
                "span {:?} is outside the event's trace. Spans:\n{}",
                span.name,
                summarize(&spans)
            );
        }
    }

    let request = only(&spans, "event request", ExportedSpan::is_event_request);
    assert_eq!(request.parent_span_id, PARENT_SPAN_ID);
    assert_eq!(
        request.int_attribute("http.response.status_code"),
        Some(202),
        "{request:?}"
    );
    let validation = only(&spans, "schema.validate", |span| {
        span.name == "schema.validate"
    });
    assert_eq!(validation.parent_span_id, request.span_id);

    let publish = only(&spans, "publish", ExportedSpan::is_publish);
    assert_eq!(publish.name, "publish events.chat.created");
    assert_eq!(
        publish.str_attribute("messaging.message.id"),
        Some(event_id.as_str())
    );
    let by_id: HashMap<&str, &ExportedSpan> = spans
        .iter()
        .map(|span| (span.span_id.as_str(), span))
        .collect();
    let mut ancestor = publish;
    for _ in 0..spans.len() {
        if ancestor.span_id == request.span_id {
            break;
        }
        ancestor = by_id
            .get(ancestor.parent_span_id.as_str())
            .unwrap_or_else(|| {
                panic!(
                    "the parent chain of the publish span breaks at {:?}. Spans:\n{}",
                    ancestor.name,
                    summarize(&spans)
                )
            });
    }
    assert_eq!(
        ancestor.span_id, request.span_id,
        "the parent chain of the publish span does not reach the request span"
    );

    let delivers: Vec<&ExportedSpan> = spans.iter().filter(|span| span.is_deliver()).collect();
    assert_eq!(delivers.len(), 3, "spans:\n{}", summarize(&spans));
    for deliver in &delivers {
        assert_eq!(
            deliver.parent_span_id, publish.span_id,
            "a deliver span does not continue the publish span"
        );
        assert_eq!(
            deliver.str_attribute("messaging.message.id"),
            Some(event_id.as_str())
        );
    }
    let failing_delivers: Vec<&ExportedSpan> = delivers
        .iter()
        .copied()
        .filter(|span| span.is_sink("failing"))
        .collect();
    assert_eq!(failing_delivers.len(), 2, "spans:\n{}", summarize(&spans));

    let mut failing_attempts: Vec<&ExportedSpan> = spans
        .iter()
        .filter(|span| span.is_attempt() && span.is_sink("failing"))
        .collect();
    failing_attempts.sort_by_key(|span| span.int_attribute("attempt"));
    assert_eq!(failing_attempts.len(), 2, "spans:\n{}", summarize(&spans));
    let first = failing_attempts[0];
    let second = failing_attempts[1];
    assert_eq!(first.int_attribute("attempt"), Some(1));
    assert_eq!(first.str_attribute("decision"), Some("retry"));
    assert_eq!(first.int_attribute("retry_delay_ms"), Some(200));
    assert_eq!(first.int_attribute("http.response.status_code"), Some(503));
    assert_eq!(second.int_attribute("attempt"), Some(2));
    assert_eq!(second.str_attribute("decision"), Some("exhausted"));
    assert_eq!(second.int_attribute("retry_delay_ms"), None);
    assert_eq!(second.int_attribute("http.response.status_code"), Some(503));
    let deliver_of = |attempt: &ExportedSpan| {
        failing_delivers
            .iter()
            .find(|deliver| deliver.span_id == attempt.parent_span_id)
            .copied()
            .unwrap_or_else(|| panic!("attempt {attempt:?} has no deliver span as its parent"))
    };
    assert_eq!(deliver_of(first).int_attribute("delivery_count"), Some(1));
    assert_eq!(deliver_of(second).int_attribute("delivery_count"), Some(2));

    // Each request carries the context of the attempt span that sent it.
    assert_eq!(failing_requests.len(), 2);
    for (request, attempt) in failing_requests.iter().zip([first, second]) {
        let (trace_id, parent_id) = received_trace_context(request);
        assert_eq!(trace_id, TRACE_ID);
        assert_eq!(parent_id, attempt.span_id);
    }
    let healthy_attempt = only(&spans, "healthy attempt", |span| {
        span.is_attempt() && span.is_sink("healthy")
    });
    assert_eq!(healthy_attempt.str_attribute("decision"), Some("ack"));
    assert_eq!(
        healthy_attempt.int_attribute("http.response.status_code"),
        Some(200)
    );
    let (trace_id, parent_id) = received_trace_context(&healthy_requests[0]);
    assert_eq!(trace_id, TRACE_ID);
    assert_eq!(parent_id, healthy_attempt.span_id);

    let dead_letter = only(&spans, "dead_letter", ExportedSpan::is_dead_letter);
    assert_eq!(dead_letter.name, "publish dlq.failing.chat.created");
    assert_eq!(dead_letter.str_attribute("reason"), Some("exhausted"));
    assert_eq!(dead_letter.parent_span_id, deliver_of(second).span_id);
}

#[tokio::test]
async fn invalid_traceparent_starts_new_trace() {
    let invalid = [
        "garbage",
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
        "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "00-4BF92F3577B34DA6A3CE929D0E0E4736-00F067AA0BA902B7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
    ];
    let collector = Collector::start().await;
    let receiver = Receiver::start().await;
    let sinks = [SinkSpec::webhook("hook", &receiver.url("/hook"))];
    let stack = Stack::start(&sinks, &collector.env()).await;

    let mut event_ids = Vec::new();
    for (n, traceparent) in invalid.iter().enumerate() {
        event_ids.push(stack.publish(n, &[("traceparent", traceparent)]).await);
    }

    let requests = receiver.wait_for_count(invalid.len(), TIMEOUT).await;
    let mut trace_ids = Vec::new();
    for (traceparent, event_id) in invalid.iter().zip(&event_ids) {
        let (trace_id, _) = received_trace_context(request_for(&requests, event_id));
        assert_ne!(
            trace_id, TRACE_ID,
            "the event sent with traceparent {traceparent:?} kept its trace id"
        );
        assert!(
            !trace_ids.contains(&trace_id),
            "the event sent with traceparent {traceparent:?} shares trace {trace_id}"
        );
        trace_ids.push(trace_id);
    }

    let spans = collector
        .wait_for_spans("a request span in each new trace", |spans| {
            trace_ids.iter().all(|trace_id| {
                spans
                    .iter()
                    .any(|span| &span.trace_id == trace_id && span.is_event_request())
            })
        })
        .await;
    for (traceparent, trace_id) in invalid.iter().zip(&trace_ids) {
        let request = only(&spans, "event request", |span| {
            &span.trace_id == trace_id && span.is_event_request()
        });
        assert_eq!(
            request.parent_span_id, "",
            "the request span of traceparent {traceparent:?} has a parent"
        );
    }
}

#[tokio::test]
async fn traceparent_passes_through_without_exporter() {
    for name in OTLP_VARIABLES {
        assert!(
            std::env::var_os(name).is_none(),
            "unset {name} to run this test: the router inherits it and would export traces"
        );
    }
    let receiver = Receiver::start().await;
    let sinks = [SinkSpec::webhook("hook", &receiver.url("/hook"))];
    let stack = Stack::start(&sinks, &[]).await;

    let traced = stack
        .publish(
            1,
            &[("traceparent", TRACEPARENT), ("tracestate", TRACESTATE)],
        )
        .await;
    let untraced = stack.publish(2, &[("traceparent", "garbage")]).await;

    let requests = receiver.wait_for_count(2, TIMEOUT).await;
    let traced_request = request_for(&requests, &traced);
    assert_eq!(traced_request.header("traceparent"), Some(TRACEPARENT));
    assert_eq!(traced_request.header("tracestate"), Some(TRACESTATE));
    let untraced_request = request_for(&requests, &untraced);
    assert_eq!(untraced_request.header("traceparent"), None);
}

#[tokio::test]
async fn dlq_replay_starts_linked_trace() {
    let collector = Collector::start().await;
    let receiver = Receiver::start().await;
    receiver.set_status(400);
    let sinks = [SinkSpec::webhook("primary", &receiver.url("/primary"))];
    let stack = Stack::start(&sinks, &collector.env()).await;

    stack.publish(1, &[("traceparent", TRACEPARENT)]).await;
    stack
        .wait_for_metric(
            "switchyard_dead_letters_total",
            &[("sink", "primary"), ("reason", "permanent")],
            1.0,
        )
        .await;
    let list = stack.dlq(&["list"], &[]).await;
    assert!(list.status.success(), "dlq list: {}", describe(&list));
    let letter: Value = serde_json::from_slice(&list.stdout)
        .unwrap_or_else(|error| panic!("dlq list printed no JSON ({error}): {list:?}"));
    let seq = letter["seq"]
        .as_u64()
        .unwrap_or_else(|| panic!("dlq list printed no seq: {}", describe(&list)))
        .to_string();

    receiver.set_status(200);
    let replay = stack.dlq(&["replay", &seq], &collector.env()).await;
    assert!(replay.status.success(), "dlq replay: {}", describe(&replay));
    let requests = receiver.wait_for_count(2, TIMEOUT).await;

    let spans = collector
        .wait_for_spans("the replay span and the replayed delivery", |spans| {
            let replay = spans.iter().find(|span| span.name == "replay");
            replay.is_some_and(|replay| {
                spans.iter().any(|span| {
                    span.trace_id == replay.trace_id && span.is_attempt() && span.is_sink("primary")
                })
            })
        })
        .await;
    let original_publish = only(&spans, "original publish", |span| {
        span.trace_id == TRACE_ID && span.is_publish()
    });
    let replay_span = only(&spans, "replay", |span| span.name == "replay");
    assert_ne!(replay_span.trace_id, TRACE_ID);
    assert_eq!(replay_span.parent_span_id, "");
    assert_eq!(replay_span.kind, SpanKind::Producer);
    assert_eq!(replay_span.str_attribute("sink"), Some("primary"));
    assert_eq!(
        replay_span.links,
        vec![(TRACE_ID.to_owned(), original_publish.span_id.clone())]
    );

    let replayed_deliver = only(&spans, "replayed deliver", |span| {
        span.trace_id == replay_span.trace_id && span.is_deliver()
    });
    assert_eq!(replayed_deliver.parent_span_id, replay_span.span_id);
    let (trace_id, _) = received_trace_context(&requests[1]);
    assert_eq!(trace_id, replay_span.trace_id);
}

// ---------------------------------------------------------------------------------------
// Metrics
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn metrics_count_deliveries_retries_and_dead_letters() {
    let failing = Receiver::start().await;
    failing.set_status(503);
    let healthy = Receiver::start().await;
    let sinks = [
        SinkSpec::webhook("failing", &failing.url("/failing")).delivery("max_attempts", 2),
        SinkSpec::webhook("healthy", &healthy.url("/healthy")),
    ];
    let stack = Stack::start(&sinks, &[]).await;

    // The pending gauges are refreshed every 5 s, the first time at start.
    let deadline = Instant::now() + Duration::from_secs(6);
    let before = loop {
        let samples = stack.metrics().await;
        let present = ["failing", "healthy"].iter().all(|sink| {
            metric_value(
                &samples,
                "switchyard_consumer_pending_messages",
                &[("sink", sink)],
            )
            .is_some()
        });
        if present || Instant::now() >= deadline {
            break samples;
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    };
    for sink in ["failing", "healthy"] {
        assert_eq!(
            metric_value(
                &before,
                "switchyard_consumer_pending_messages",
                &[("sink", sink)]
            ),
            Some(0.0),
            "switchyard_consumer_pending_messages of sink {sink} within 6 s of start"
        );
    }
    assert_eq!(
        metric_value(&before, "switchyard_events_accepted_total", &[]),
        None
    );
    assert_eq!(
        metric_value(&before, "switchyard_publish_duration_seconds_count", &[]),
        Some(0.0)
    );

    stack.publish(1, &[]).await;
    stack.publish(2, &[]).await;
    let (status, text) = stack.post("{}", &[]).await;
    assert_eq!(status, 422, "POST of an empty object: {text}");

    stack
        .wait_for_metric(
            "switchyard_dead_letters_total",
            &[("sink", "failing"), ("reason", "exhausted")],
            2.0,
        )
        .await;
    let after = stack
        .wait_for_metric(
            "switchyard_deliveries_total",
            &[("sink", "healthy"), ("outcome", "delivered")],
            2.0,
        )
        .await;
    let value = |name: &str, labels: &[(&str, &str)]| metric_value(&after, name, labels);

    assert_eq!(
        value(
            "switchyard_events_accepted_total",
            &[("event_type", "chat.created")]
        ),
        Some(2.0)
    );
    assert_eq!(
        value(
            "switchyard_events_rejected_total",
            &[
                ("event_type", "chat.created"),
                ("reason", "schema-violation")
            ]
        ),
        Some(1.0)
    );
    assert_eq!(value("switchyard_events_rejected_total", &[]), Some(1.0));
    assert_eq!(
        value(
            "switchyard_deliveries_total",
            &[("sink", "failing"), ("outcome", "retried")]
        ),
        Some(2.0)
    );
    assert_eq!(
        value(
            "switchyard_deliveries_total",
            &[("sink", "failing"), ("outcome", "dead_lettered")]
        ),
        Some(2.0)
    );
    assert_eq!(
        value(
            "switchyard_deliveries_total",
            &[("sink", "failing"), ("outcome", "delivered")]
        ),
        None
    );
    assert_eq!(
        value(
            "switchyard_deliveries_total",
            &[("sink", "healthy"), ("outcome", "retried")]
        ),
        None
    );
    assert_eq!(
        value("switchyard_retries_total", &[("sink", "failing")]),
        Some(2.0)
    );
    assert_eq!(
        value("switchyard_retries_total", &[("sink", "healthy")]),
        None
    );
    assert_eq!(
        value("switchyard_dead_letters_total", &[("sink", "healthy")]),
        None
    );
    assert_eq!(
        value("switchyard_publish_duration_seconds_count", &[]),
        Some(2.0)
    );
    assert_eq!(
        value(
            "switchyard_delivery_duration_seconds_count",
            &[("sink", "failing")]
        ),
        Some(4.0)
    );
    assert_eq!(
        value(
            "switchyard_delivery_duration_seconds_count",
            &[("sink", "healthy")]
        ),
        Some(2.0)
    );
}

// ---------------------------------------------------------------------------------------
// Logs
// ---------------------------------------------------------------------------------------

/// What a run of the secret scenario left behind.
struct SecretRun {
    logs: String,
    /// Every `webhook-signature` entry the receiver captured, without its `v1,` prefix.
    signatures: Vec<String>,
    /// Spans the router exported, when a collector was given.
    spans: Vec<ExportedSpan>,
}

/// Runs a router whose sinks carry secrets in the URL, a header and the signing key, on a
/// nats-server that requires a token, with `RUST_LOG=trace` and `envs`. One sink fails
/// with 503 and then with a refused connection. The other cannot connect at all. Both give
/// the event up, then the router is stopped so that its log is complete.
async fn run_with_secrets(envs: &[(&str, String)], collector: Option<&Collector>) -> SecretRun {
    let signing_secret = format!("whsec_{}", BASE64.encode(SIGNING_KEY));
    let mut receiver = Receiver::start().await;
    receiver.set_status(503);
    let closed_port = free_port();
    let headers = toml::Table::from_iter([("x-api-key".to_owned(), HEADER_SECRET.into())]);
    let sinks = [
        SinkSpec::webhook("hook", &receiver.url(&format!("/hook?token={URL_TOKEN}")))
            .set("secrets", vec![signing_secret.as_str()])
            .set("headers", headers.clone())
            .delivery("max_attempts", 4)
            .delivery("backoff", vec!["500ms"]),
        SinkSpec::webhook(
            "down",
            &format!("http://127.0.0.1:{closed_port}/hook?token={DOWN_URL_TOKEN}"),
        )
        .set("secrets", vec![signing_secret.as_str()])
        .set("headers", headers)
        .delivery("max_attempts", 2),
    ];
    let mut all_envs = vec![("RUST_LOG", "trace".to_owned())];
    all_envs.extend_from_slice(envs);
    if let Some(collector) = collector {
        all_envs.extend(collector.env());
    }
    let nats = NatsServer::start_with_args(&["--auth", NATS_TOKEN]).await;
    let mut stack = Stack::start_on(nats, Some(NATS_TOKEN), &sinks, &all_envs).await;

    stack.publish(1, &[("traceparent", TRACEPARENT)]).await;
    let requests = receiver.wait_for_count(2, TIMEOUT).await;
    receiver.stop().await;
    for sink in ["hook", "down"] {
        stack
            .wait_for_metric(
                "switchyard_dead_letters_total",
                &[("sink", sink), ("reason", "exhausted")],
                1.0,
            )
            .await;
    }
    let spans = match collector {
        Some(collector) => {
            collector
                .wait_for_spans("the dead letter spans of both sinks", |spans| {
                    spans.iter().filter(|span| span.is_dead_letter()).count() >= 2
                })
                .await
        }
        None => Vec::new(),
    };
    let status = stack.router.stop().await;
    assert!(status.success(), "switchyard exited with {status}");

    let signatures = requests
        .iter()
        .flat_map(|request| request.header_values("webhook-signature"))
        .flat_map(|value| value.split(' '))
        .map(|entry| entry.trim_start_matches("v1,").to_owned())
        .collect();
    SecretRun {
        logs: stack.router.logs(),
        signatures,
        spans,
    }
}

/// Asserts that no secret of the scenario and no signature appears in `text`.
fn assert_no_secret(text: &str, signatures: &[String], place: &str) {
    let encoded_key = BASE64.encode(SIGNING_KEY);
    let raw_key = String::from_utf8_lossy(SIGNING_KEY);
    let secrets = [
        ("the signing key in base64", encoded_key.as_str()),
        ("the raw signing key", &raw_key),
        ("the URL token", URL_TOKEN),
        ("the unreachable sink's URL token", DOWN_URL_TOKEN),
        ("the header value", HEADER_SECRET),
        ("the NATS token", NATS_TOKEN),
    ];
    for (what, secret) in secrets {
        assert!(!text.contains(secret), "{place} contains {what}: {secret}");
    }
    assert!(
        !signatures.is_empty(),
        "the receiver got no webhook-signature"
    );
    for signature in signatures {
        assert!(
            !text.contains(signature.as_str()),
            "{place} contains the webhook signature {signature}"
        );
    }
}

#[tokio::test]
async fn trace_text_logs_contain_no_secret() {
    let run = run_with_secrets(&[], None).await;

    assert!(
        run.logs.contains(" TRACE "),
        "the log has no TRACE line, so RUST_LOG=trace did not apply:\n{}",
        run.logs
    );
    assert!(
        run.logs.contains("giving up; dead-lettering"),
        "the log has no give-up line:\n{}",
        run.logs
    );
    assert_no_secret(&run.logs, &run.signatures, "the router log");
}

#[tokio::test]
async fn trace_json_logs_contain_no_secret() {
    let collector = Collector::start().await;
    let run = run_with_secrets(
        &[("SWITCHYARD_LOG_FORMAT", "json".to_owned())],
        Some(&collector),
    )
    .await;

    let mut levels = HashSet::new();
    for line in run.logs.lines().filter(|line| !line.trim().is_empty()) {
        let parsed: Value = serde_json::from_str(line)
            .unwrap_or_else(|error| panic!("log line is not JSON ({error}): {line}"));
        let level = parsed["level"]
            .as_str()
            .unwrap_or_else(|| panic!("log line has no level: {line}"));
        levels.insert(level.to_owned());
    }
    assert!(
        levels.contains("TRACE"),
        "the log has no TRACE line, so RUST_LOG=trace did not apply"
    );
    assert!(
        run.logs.contains("giving up; dead-lettering"),
        "the log has no give-up line:\n{}",
        run.logs
    );
    assert_no_secret(&run.logs, &run.signatures, "the router log");

    let mut attributes = String::new();
    for span in &run.spans {
        attributes.push_str(&format!("{} {:?}\n", span.name, span.attributes));
    }
    assert_no_secret(&attributes, &run.signatures, "the exported span attributes");
}

/// Returns the lines of `logs` that contain every one of `needles`.
fn lines_with<'a>(logs: &'a str, needles: &[&str]) -> Vec<&'a str> {
    logs.lines()
        .filter(|line| needles.iter().all(|needle| line.contains(needle)))
        .collect()
}

/// Returns the `suppressed=N` value of a text log line.
fn suppressed(line: &str) -> u64 {
    let (_, after) = line
        .split_once("suppressed=")
        .unwrap_or_else(|| panic!("log line has no suppressed field: {line}"));
    let digits: String = after.chars().take_while(char::is_ascii_digit).collect();
    digits
        .parse()
        .unwrap_or_else(|error| panic!("invalid suppressed value ({error}) in: {line}"))
}

#[tokio::test]
async fn retry_logs_are_throttled() {
    const RETRY: &str = "delivery failed; will retry";
    const GIVE_UP: &str = "giving up; dead-lettering";
    const BURST: usize = 50;
    let receiver = Receiver::start().await;
    receiver.set_status(503);
    let sinks =
        [SinkSpec::webhook("failing", &receiver.url("/failing")).delivery("max_attempts", 2)];
    let stack = Stack::start(&sinks, &[]).await;

    // The first failure of each kind is logged in full.
    let first = stack.publish(0, &[]).await;
    stack.router.wait_for_log(GIVE_UP, TIMEOUT).await;
    // Both lines were written before now, so both throttle windows end before now + window.
    let window_start = Instant::now();
    let logs = stack.router.logs();
    let event_field = format!("event.id={first}");
    let retry_lines = lines_with(&logs, &[RETRY, &event_field]);
    assert_eq!(
        retry_lines.len(),
        1,
        "retry lines:\n{}",
        retry_lines.join("\n")
    );
    assert!(retry_lines[0].contains(" WARN "), "{}", retry_lines[0]);
    assert!(
        retry_lines[0].contains("sink=failing"),
        "{}",
        retry_lines[0]
    );
    assert!(retry_lines[0].contains("attempt=1"), "{}", retry_lines[0]);
    let give_up_lines = lines_with(&logs, &[GIVE_UP, &event_field]);
    assert_eq!(
        give_up_lines.len(),
        1,
        "give-up lines:\n{}",
        give_up_lines.join("\n")
    );
    assert!(give_up_lines[0].contains(" ERROR "), "{}", give_up_lines[0]);
    assert!(
        give_up_lines[0].contains("sink=failing"),
        "{}",
        give_up_lines[0]
    );
    assert!(
        give_up_lines[0].contains("attempt=2"),
        "{}",
        give_up_lines[0]
    );
    assert!(
        give_up_lines[0].contains("reason=\"exhausted\""),
        "{}",
        give_up_lines[0]
    );

    // Failures of the same kind inside the window are counted, not logged.
    for n in 1..=BURST {
        stack.publish(n, &[]).await;
    }
    stack
        .wait_for_metric(
            "switchyard_dead_letters_total",
            &[("sink", "failing")],
            (BURST + 1) as f64,
        )
        .await;
    let logs = stack.router.logs();
    let burst_retry_lines = lines_with(&logs, &[RETRY]).len();
    assert!(
        burst_retry_lines < 10,
        "{burst_retry_lines} retry lines for {} events",
        BURST + 1
    );
    let burst_give_up_lines = lines_with(&logs, &[GIVE_UP]).len();
    assert!(
        burst_give_up_lines < 10,
        "{burst_give_up_lines} give-up lines for {} events",
        BURST + 1
    );

    // The first line after the window reports how many were left out.
    tokio::time::sleep_until(window_start + LOG_THROTTLE_WINDOW + Duration::from_millis(500)).await;
    let last = stack.publish(BURST + 1, &[]).await;
    let last_field = format!("event.id={last}");
    stack.router.wait_for_log(&last_field, TIMEOUT).await;
    let deadline = Instant::now() + TIMEOUT;
    while lines_with(&stack.router.logs(), &[GIVE_UP, &last_field]).is_empty() {
        assert!(
            Instant::now() < deadline,
            "no give-up line for event {last}:\n{}",
            stack.router.logs()
        );
        tokio::time::sleep(POLL_INTERVAL).await;
    }
    let logs = stack.router.logs();
    let last_retry = lines_with(&logs, &[RETRY, &last_field]);
    assert_eq!(last_retry.len(), 1, "{}", logs);
    assert!(suppressed(last_retry[0]) > 0, "{}", last_retry[0]);

    // Every failure is either logged or counted in a later line's `suppressed`.
    let total_events = (BURST + 2) as u64;
    for message in [RETRY, GIVE_UP] {
        let lines = lines_with(&logs, &[message]);
        let reported: u64 =
            lines.iter().map(|line| suppressed(line)).sum::<u64>() + lines.len() as u64;
        assert_eq!(
            reported,
            total_events,
            "{message:?} lines:\n{}",
            lines.join("\n")
        );
    }
}
