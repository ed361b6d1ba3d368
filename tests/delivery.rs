//! End-to-end tests of delivery: retries, `Retry-After`, dead letters and their replay,
//! slow and failing sinks, concurrency and order, n8n sinks, filters and transforms,
//! producers that publish to NATS directly, and `switchyard check`.
//!
//! Each test starts its own nats-server, `switchyard serve` and HTTP receivers on
//! 127.0.0.1. Sinks retry after 100 ms and then 200 ms, so most retries finish within a
//! second.

mod support;

use std::process::Output;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::HeaderMap;
use async_nats::jetstream::{self, consumer, message::StreamMessage};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use hmac::{Hmac, KeyInit, Mac};
use serde_json::{Value, json};
use sha2::Sha256;
use support::{CapturedRequest, NatsServer, Receiver, Response, Router, free_port, http_client};
use tokio::time::Instant;

const BIN: &str = env!("CARGO_BIN_EXE_switchyard");

/// Upper bound of every wait for a request, a dead letter or a consumer state.
const TIMEOUT: Duration = Duration::from_secs(15);
/// How long a request count must stay unchanged to count as final.
const QUIET: Duration = Duration::from_secs(1);
/// Upper bound of one run of the command line.
const CLI_TIMEOUT: Duration = Duration::from_secs(30);
/// Interval between two reads of the DLQ stream or a consumer.
const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// Signing secret of every webhook sink: `whsec_` and the base64 of a 34-byte key.
const SECRET: &str = "whsec_ZGVsaXZlcnktdGVzdHMtc2lnbmluZy1rZXktMDEyMzQ1Ng==";
/// Standard Webhooks receivers reject timestamps further than this from their clock.
const SIGNATURE_TOLERANCE: Duration = Duration::from_secs(300);
/// `ce-source` of the events the tests publish through the ingress.
const EVENT_SOURCE: &str = "delivery-tests";
/// A valid W3C trace context.
const TRACEPARENT: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

/// n8n's response body for a production webhook whose workflow is not active.
const N8N_NOT_REGISTERED: &str =
    r#"{"code":404,"message":"The requested webhook \"POST x\" is not registered."}"#;

/// One `[[sinks]]` entry of a router config.
struct SinkSpec {
    settings: toml::Table,
    delivery: toml::Table,
}

impl SinkSpec {
    /// Creates a sink of `kind` for `chat.created` that retries after 100 ms, then 200 ms.
    fn new(name: &str, kind: &str, url: &str) -> SinkSpec {
        let spec = SinkSpec {
            settings: toml::Table::new(),
            delivery: toml::Table::new(),
        };
        spec.set("name", name)
            .set("kind", kind)
            .set("url", url)
            .set("events", vec!["chat.created"])
            .delivery("backoff", vec!["100ms", "200ms"])
            .delivery("timeout", "5s")
            .delivery("ack_wait", "5s")
    }

    /// Creates a webhook sink that signs every request with `SECRET`.
    fn webhook(name: &str, url: &str) -> SinkSpec {
        SinkSpec::new(name, "webhook", url).set("secrets", vec![SECRET])
    }

    fn n8n(name: &str, url: &str) -> SinkSpec {
        SinkSpec::new(name, "n8n", url)
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

/// Builds a config text with the given listen port, NATS URL and sinks.
///
/// Without `schemas_dir`, the schemas are read from `schemas/` next to the config file.
fn config_text(
    listen_port: u16,
    nats_url: &str,
    schemas_dir: Option<&str>,
    sinks: &[SinkSpec],
) -> String {
    let mut server = toml::Table::new();
    server.insert(
        "listen".to_owned(),
        format!("127.0.0.1:{listen_port}").into(),
    );
    let mut nats = toml::Table::new();
    nats.insert("url".to_owned(), nats_url.into());
    let mut config = toml::Table::new();
    config.insert("server".to_owned(), toml::Value::Table(server));
    config.insert("nats".to_owned(), toml::Value::Table(nats));
    if let Some(dir) = schemas_dir {
        let mut schemas = toml::Table::new();
        schemas.insert("dir".to_owned(), dir.into());
        config.insert("schemas".to_owned(), toml::Value::Table(schemas));
    }
    let sinks = sinks
        .iter()
        .map(|sink| toml::Value::Table(sink.to_table()))
        .collect();
    config.insert("sinks".to_owned(), toml::Value::Array(sinks));
    toml::to_string(&config).expect("failed to serialise the router config")
}

/// The id and stream sequence from the ingress's 202 response.
struct Accepted {
    id: String,
    seq: u64,
}

/// A nats-server and a router serving the given sinks.
struct Stack {
    router: Router,
    jetstream: jetstream::Context,
    client: reqwest::Client,
    // The server, kept running as long as the stack and declared last so it stops last.
    _nats: NatsServer,
}

impl Stack {
    async fn start(sinks: Vec<SinkSpec>) -> Stack {
        let nats = NatsServer::start().await;
        let config = config_text(free_port(), &nats.url(), None, &sinks);
        let router = Router::start(BIN, &config).await;
        Stack {
            router,
            jetstream: nats.jetstream().await,
            client: http_client(),
            _nats: nats,
        }
    }

    /// Posts `body` as the data of one `event_type` event and returns its id and sequence.
    async fn publish(&self, event_type: &str, body: &str) -> Accepted {
        let url = self.router.url(&format!("/v1/events/{event_type}"));
        let response = self
            .client
            .post(&url)
            .header("content-type", "application/json")
            .header("ce-source", EVENT_SOURCE)
            .body(body.to_owned())
            .send()
            .await
            .unwrap_or_else(|error| panic!("POST {url} failed: {error}"));
        let status = response.status();
        let text = response
            .text()
            .await
            .unwrap_or_else(|error| panic!("failed to read the response of POST {url}: {error}"));
        assert_eq!(status, 202, "POST {url} returned {status}: {text}");
        let accepted: Value = serde_json::from_str(&text)
            .unwrap_or_else(|error| panic!("response of POST {url} is not JSON ({error}): {text}"));
        Accepted {
            id: accepted["id"]
                .as_str()
                .unwrap_or_else(|| panic!("response of POST {url} has no id: {text}"))
                .to_owned(),
            seq: accepted["seq"]
                .as_u64()
                .unwrap_or_else(|| panic!("response of POST {url} has no seq: {text}")),
        }
    }

    /// Reads every message of the DLQ stream, oldest first.
    async fn dead_letters(&self) -> Vec<StreamMessage> {
        let mut stream = self
            .jetstream
            .get_stream("DLQ")
            .await
            .expect("failed to open stream DLQ");
        let state = stream
            .info()
            .await
            .expect("failed to read the info of stream DLQ")
            .state
            .clone();
        let mut letters = Vec::new();
        if state.messages == 0 {
            return letters;
        }
        for seq in state.first_sequence..=state.last_sequence {
            // A replayed dead letter is deleted, which leaves a gap.
            if let Ok(message) = stream.get_raw_message(seq).await {
                letters.push(message);
            }
        }
        letters
    }

    /// Waits until the DLQ stream contains at least `count` messages and returns them all.
    async fn wait_for_dead_letters(&self, count: usize) -> Vec<StreamMessage> {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let letters = self.dead_letters().await;
            if letters.len() >= count {
                return letters;
            }
            if Instant::now() >= deadline {
                panic!(
                    "expected at least {count} dead letters within {TIMEOUT:?}, found {}. \
                     Router log:\n{}",
                    letters.len(),
                    self.router.logs()
                );
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// Waits until the consumer of `sink` has no message left to deliver or awaiting an
    /// acknowledgement, and returns its info.
    async fn wait_for_consumer_settled(&self, sink: &str) -> consumer::Info {
        let name = format!("sink_{sink}");
        let stream = self
            .jetstream
            .get_stream("EVENTS")
            .await
            .expect("failed to open stream EVENTS");
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let info = stream
                .consumer_info(&name)
                .await
                .unwrap_or_else(|error| panic!("failed to read consumer {name}: {error}"));
            if info.num_pending == 0 && info.num_ack_pending == 0 {
                return info;
            }
            if Instant::now() >= deadline {
                panic!(
                    "consumer {name} still had {} pending and {} ack-pending messages after \
                     {TIMEOUT:?}. Router log:\n{}",
                    info.num_pending,
                    info.num_ack_pending,
                    self.router.logs()
                );
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// Runs `switchyard dlq ARGS` against the router's config file.
    async fn dlq(&self, args: &[&str]) -> Output {
        let config = self.router.config_path();
        let config = config.to_str().expect("the temporary folder path is UTF-8");
        let mut full_args = vec!["dlq", "--config", config];
        full_args.extend_from_slice(args);
        run_cli(&full_args).await
    }
}

/// Runs the `switchyard` binary with `args` and returns its output, killing it after
/// `CLI_TIMEOUT`.
///
/// Environment variables that the repository's config reads are removed, and `NATS_URL`
/// names a closed port on 127.0.0.1, so no default address is used.
async fn run_cli(args: &[&str]) -> Output {
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

/// Runs `switchyard check` on a config with `sinks`, the repository's schemas and a closed
/// NATS port, and returns the output.
async fn check_sinks(sinks: &[SinkSpec]) -> Output {
    let dir = tempfile::Builder::new()
        .prefix("switchyard-check-")
        .tempdir()
        .expect("failed to create a temporary folder for the config");
    let schemas = support::router::repo_root().join("schemas");
    let schemas = schemas.to_str().expect("the repository path is UTF-8");
    let nats_url = format!("nats://127.0.0.1:{}", free_port());
    let text = config_text(free_port(), &nats_url, Some(schemas), sinks);
    let path = dir.path().join("switchyard.toml");
    std::fs::write(&path, text).expect("failed to write the config");
    let path = path.to_str().expect("the temporary folder path is UTF-8");
    run_cli(&["check", "--config", path]).await
}

/// Returns the data of a valid `chat.created` event for chat `chat_{n}`.
fn chat_created(n: usize) -> String {
    format!(
        r#"{{"chat_id": "chat_{n}", "created_at": "2025-01-15T09:30:00Z", "created_by": "user_42", "participants": ["user_42", "user_7"]}}"#
    )
}

/// Returns the data of a valid `file.uploaded` event.
fn file_uploaded(file_id: &str, size_bytes: u64) -> String {
    format!(
        r#"{{"file_id": "{file_id}", "name": "report.pdf", "url": "https://files.example.com/{file_id}", "size_bytes": {size_bytes}, "content_type": "application/pdf", "uploaded_by": "user_42", "uploaded_at": "2025-01-15T09:30:45Z"}}"#
    )
}

/// Returns a header of a NATS message.
fn header<'a>(message: &'a StreamMessage, name: &str) -> Option<&'a str> {
    message.headers.get(name).map(|value| value.as_str())
}

/// Returns the trace id field of a W3C `traceparent` value.
fn trace_id(traceparent: &str) -> Option<&str> {
    traceparent.split('-').nth(1)
}

/// Returns the time between request `index` and the one before it.
fn gap_before(requests: &[CapturedRequest], index: usize) -> Duration {
    requests[index]
        .received_at
        .duration_since(requests[index - 1].received_at)
}

/// Checks the Standard Webhooks signature of a request against `SECRET`: HMAC-SHA256 over
/// `{webhook-id}.{webhook-timestamp}.{body}`, keyed with the base64-decoded secret.
fn verify_signature(request: &CapturedRequest) -> Result<(), String> {
    let id = request
        .header("webhook-id")
        .ok_or("webhook-id is missing")?;
    let timestamp = request
        .header("webhook-timestamp")
        .ok_or("webhook-timestamp is missing")?;
    let signatures = request
        .header("webhook-signature")
        .ok_or("webhook-signature is missing")?;

    let seconds: u64 = timestamp
        .parse()
        .map_err(|error| format!("webhook-timestamp {timestamp:?} is invalid: {error}"))?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("the clock is after 1970");
    if now.abs_diff(Duration::from_secs(seconds)) > SIGNATURE_TOLERANCE {
        return Err(format!(
            "webhook-timestamp {timestamp} is more than {SIGNATURE_TOLERANCE:?} from now"
        ));
    }

    let encoded_key = SECRET
        .strip_prefix("whsec_")
        .expect("SECRET has the prefix");
    let key = BASE64.decode(encoded_key).expect("SECRET is valid base64");
    for entry in signatures.split(' ') {
        let Some(encoded) = entry.strip_prefix("v1,") else {
            continue;
        };
        let Ok(candidate) = BASE64.decode(encoded) else {
            continue;
        };
        let mut mac = Hmac::<Sha256>::new_from_slice(&key).expect("HMAC takes any key length");
        mac.update(id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.as_bytes());
        mac.update(b".");
        mac.update(&request.body);
        if mac.verify_slice(&candidate).is_ok() {
            return Ok(());
        }
    }
    Err(format!(
        "no v1 entry of webhook-signature {signatures:?} matches the body and SECRET"
    ))
}

/// Formats a time as an HTTP-date (RFC 9110), such as `Sun, 06 Nov 1994 08:49:37 GMT`.
fn http_date(unix_seconds: u64) -> String {
    let seconds = i64::try_from(unix_seconds).expect("the time fits in i64");
    let time = time::OffsetDateTime::from_unix_timestamp(seconds).expect("the time is valid");
    let weekday = time.weekday().to_string();
    let month = time.month().to_string();
    format!(
        "{}, {:02} {} {} {:02}:{:02}:{:02} GMT",
        &weekday[..3],
        time.day(),
        &month[..3],
        time.year(),
        time.hour(),
        time.minute(),
        time.second()
    )
}

#[tokio::test]
async fn retry_then_success_keeps_id_and_body() {
    let receiver = Receiver::start().await;
    receiver.set_script(vec![Response::new(503), Response::new(500)]);
    let stack = Stack::start(vec![SinkSpec::webhook("hook", &receiver.url("/hook"))]).await;

    let body = chat_created(1);
    let accepted = stack.publish("chat.created", &body).await;

    let requests = receiver.wait_for_count(3, TIMEOUT).await;
    receiver.assert_count_stays(3, QUIET).await;
    for (index, request) in requests.iter().enumerate() {
        let attempt = index + 1;
        assert_eq!(
            &request.body[..],
            body.as_bytes(),
            "body of attempt {attempt}"
        );
        assert_eq!(
            request.header("webhook-id"),
            Some(accepted.id.as_str()),
            "webhook-id of attempt {attempt}"
        );
        assert_eq!(
            verify_signature(request),
            Ok(()),
            "signature of attempt {attempt}"
        );
    }
    assert!(
        gap_before(&requests, 1) >= Duration::from_millis(100),
        "attempt 2 came {:?} after attempt 1, before the 100ms backoff",
        gap_before(&requests, 1)
    );
    assert!(
        gap_before(&requests, 2) >= Duration::from_millis(200),
        "attempt 3 came {:?} after attempt 2, before the 200ms backoff",
        gap_before(&requests, 2)
    );

    let info = stack.wait_for_consumer_settled("hook").await;
    assert_eq!(info.num_ack_pending, 0);
    assert!(stack.dead_letters().await.is_empty());
}

#[tokio::test]
async fn retry_after_seconds_delays_retry() {
    let receiver = Receiver::start().await;
    receiver.set_script(vec![Response::new(429).with_header("Retry-After", "2")]);
    let stack = Stack::start(vec![SinkSpec::webhook("hook", &receiver.url("/hook"))]).await;

    stack.publish("chat.created", &chat_created(1)).await;

    let requests = receiver.wait_for_count(2, TIMEOUT).await;
    let gap = gap_before(&requests, 1);
    assert!(
        gap >= Duration::from_secs(2),
        "retry came {gap:?} after the 429, before its Retry-After of 2 s"
    );
    assert!(
        gap < Duration::from_secs(10),
        "retry came {gap:?} after the 429 with Retry-After of 2 s"
    );
    stack.wait_for_consumer_settled("hook").await;
    assert!(stack.dead_letters().await.is_empty());
}

#[tokio::test]
async fn retry_after_http_date_delays_retry() {
    let receiver = Receiver::start().await;
    let retry_at = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("the clock is after 1970")
        .as_secs()
        + 3;
    receiver.set_script(vec![
        Response::new(503).with_header("Retry-After", &http_date(retry_at)),
    ]);
    let stack = Stack::start(vec![SinkSpec::webhook("hook", &receiver.url("/hook"))]).await;

    stack.publish("chat.created", &chat_created(1)).await;

    let requests = receiver.wait_for_count(2, TIMEOUT).await;
    // The receiver records monotonic instants; the Retry-After date is wall-clock time.
    let first_at = SystemTime::now() - requests[0].received_at.elapsed();
    let retry_at = UNIX_EPOCH + Duration::from_secs(retry_at);
    let expected_gap = retry_at.duration_since(first_at).unwrap_or_default();
    // Allows for the two clock readings that convert between monotonic and wall time.
    let slack = Duration::from_millis(50);
    let gap = gap_before(&requests, 1);
    assert!(
        expected_gap > Duration::from_millis(500),
        "the first attempt came only {expected_gap:?} before the Retry-After date, too \
         late to tell the date from the 100ms backoff"
    );
    assert!(
        gap + slack >= expected_gap,
        "retry came {gap:?} after the 503, before its Retry-After date {expected_gap:?} later"
    );
    assert!(
        gap < Duration::from_secs(10),
        "retry came {gap:?} after the 503 with a Retry-After date {expected_gap:?} later"
    );
}

#[tokio::test]
async fn max_retry_after_caps_delay() {
    let receiver = Receiver::start().await;
    receiver.set_script(vec![Response::new(429).with_header("Retry-After", "3600")]);
    let sink = SinkSpec::webhook("hook", &receiver.url("/hook")).delivery("max_retry_after", "1s");
    let stack = Stack::start(vec![sink]).await;

    stack.publish("chat.created", &chat_created(1)).await;

    let requests = receiver.wait_for_count(2, TIMEOUT).await;
    let gap = gap_before(&requests, 1);
    assert!(
        gap >= Duration::from_secs(1),
        "retry came {gap:?} after the 429, before max_retry_after of 1 s"
    );
    assert!(
        gap < Duration::from_secs(5),
        "retry came {gap:?} after the 429, so Retry-After: 3600 was not capped at 1 s"
    );
}

#[tokio::test]
async fn permanent_failure_dead_letters_original() {
    let receiver = Receiver::start().await;
    receiver.set_default(Response::new(400).with_body("chat_id is unknown"));
    let stack = Stack::start(vec![SinkSpec::webhook("hook", &receiver.url("/hook"))]).await;

    // Unusual spacing shows that the dead letter keeps the producer's bytes.
    let body = r#"{ "chat_id":"chat_raw",  "created_at" : "2025-01-15T09:30:00Z", "created_by":"user_42","participants":["user_42"] }"#;
    let accepted = stack.publish("chat.created", body).await;

    let letters = stack.wait_for_dead_letters(1).await;
    receiver.assert_count_stays(1, QUIET).await;
    assert_eq!(letters.len(), 1);
    let letter = &letters[0];
    assert_eq!(letter.subject.as_str(), "dlq.hook.chat.created");
    assert_eq!(&letter.payload[..], body.as_bytes());
    assert_eq!(header(letter, "ce-id"), Some(accepted.id.as_str()));
    assert_eq!(header(letter, "ce-type"), Some("chat.created"));
    assert_eq!(header(letter, "ce-source"), Some(EVENT_SOURCE));
    assert_eq!(header(letter, "ce-specversion"), Some("1.0"));
    assert!(header(letter, "ce-time").is_some());
    assert_eq!(header(letter, "content-type"), Some("application/json"));
    assert_eq!(header(letter, "Switchyard-Sink"), Some("hook"));
    assert_eq!(header(letter, "Switchyard-Reason"), Some("permanent"));
    assert_eq!(header(letter, "Switchyard-Attempts"), Some("1"));
    assert_eq!(header(letter, "Switchyard-Last-Status"), Some("400"));
    assert_eq!(header(letter, "Switchyard-Last-Error"), Some("HTTP 400"));
    assert_eq!(
        header(letter, "Switchyard-Response-Excerpt"),
        Some("chat_id is unknown")
    );
    assert_eq!(
        header(letter, "Switchyard-Original-Subject"),
        Some("events.chat.created")
    );
    let original_sequence = accepted.seq.to_string();
    assert_eq!(
        header(letter, "Switchyard-Original-Sequence"),
        Some(original_sequence.as_str())
    );

    let info = stack.wait_for_consumer_settled("hook").await;
    assert_eq!(info.num_pending, 0);
    assert_eq!(info.num_ack_pending, 0);
}

#[tokio::test]
async fn redirect_is_permanent_failure() {
    let target = Receiver::start().await;
    let receiver = Receiver::start().await;
    receiver.set_default(Response::new(302).with_header("Location", &target.url("/moved")));
    let stack = Stack::start(vec![SinkSpec::webhook("hook", &receiver.url("/hook"))]).await;

    stack.publish("chat.created", &chat_created(1)).await;

    let letters = stack.wait_for_dead_letters(1).await;
    receiver.assert_count_stays(1, QUIET).await;
    assert_eq!(target.count(), 0, "the redirect target got a request");
    assert_eq!(header(&letters[0], "Switchyard-Reason"), Some("permanent"));
    assert_eq!(header(&letters[0], "Switchyard-Last-Status"), Some("302"));
    let info = stack.wait_for_consumer_settled("hook").await;
    assert_eq!(info.num_ack_pending, 0);
}

#[tokio::test]
async fn exhausted_attempts_dead_letter() {
    let receiver = Receiver::start().await;
    receiver.set_status(503);
    let sink = SinkSpec::webhook("hook", &receiver.url("/hook")).delivery("max_attempts", 3);
    let stack = Stack::start(vec![sink]).await;

    let accepted = stack.publish("chat.created", &chat_created(1)).await;

    let letters = stack.wait_for_dead_letters(1).await;
    receiver.assert_count_stays(3, QUIET).await;
    assert_eq!(letters.len(), 1);
    let letter = &letters[0];
    assert_eq!(header(letter, "ce-id"), Some(accepted.id.as_str()));
    assert_eq!(header(letter, "Switchyard-Reason"), Some("exhausted"));
    assert_eq!(header(letter, "Switchyard-Attempts"), Some("3"));
    assert_eq!(header(letter, "Switchyard-Last-Status"), Some("503"));
    let info = stack.wait_for_consumer_settled("hook").await;
    assert_eq!(info.num_ack_pending, 0);
}

#[tokio::test]
async fn dlq_replay_delivers_to_one_sink() {
    let receiver = Receiver::start().await;
    receiver.set_status(400);
    let other = Receiver::start().await;
    let stack = Stack::start(vec![
        SinkSpec::webhook("primary", &receiver.url("/primary")),
        SinkSpec::webhook("secondary", &other.url("/secondary")),
    ])
    .await;

    let body = chat_created(5);
    let accepted = stack.publish("chat.created", &body).await;
    receiver.wait_for_count(1, TIMEOUT).await;
    other.wait_for_count(1, TIMEOUT).await;
    stack.wait_for_dead_letters(1).await;

    let list_output = stack.dlq(&["list"]).await;
    assert!(
        list_output.status.success(),
        "dlq list: {}",
        describe(&list_output)
    );
    let letters: Vec<Value> = String::from_utf8_lossy(&list_output.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).expect("dlq list prints JSON lines"))
        .collect();
    assert_eq!(letters.len(), 1, "dlq list: {}", describe(&list_output));
    let letter = &letters[0];
    assert_eq!(letter["sink"], "primary");
    assert_eq!(letter["reason"], "permanent");
    assert_eq!(letter["event_id"], accepted.id.as_str());
    assert_eq!(letter["event_type"], "chat.created");
    let seq = letter["seq"]
        .as_u64()
        .expect("dlq list prints a numeric seq")
        .to_string();

    let show_output = stack.dlq(&["show", &seq]).await;
    assert!(
        show_output.status.success(),
        "dlq show: {}",
        describe(&show_output)
    );
    let show_text = String::from_utf8_lossy(&show_output.stdout);
    assert!(
        show_text.contains("subject: dlq.primary.chat.created"),
        "dlq show: {show_text}"
    );
    assert!(
        show_text.contains("Switchyard-Reason: permanent"),
        "dlq show: {show_text}"
    );
    assert!(show_text.contains(&body), "dlq show: {show_text}");

    receiver.set_status(200);
    let replay_output = stack.dlq(&["replay", &seq]).await;
    assert!(
        replay_output.status.success(),
        "dlq replay: {}",
        describe(&replay_output)
    );
    let replay_result: Value = serde_json::from_slice(&replay_output.stdout)
        .unwrap_or_else(|error| panic!("dlq replay printed no JSON ({error}): {replay_output:?}"));
    assert_eq!(replay_result["dlq_seq"].to_string(), seq);

    let requests = receiver.wait_for_count(2, TIMEOUT).await;
    let replay = &requests[1];
    assert_eq!(&replay.body[..], body.as_bytes());
    assert_eq!(replay.header("webhook-id"), Some(accepted.id.as_str()));
    assert_eq!(verify_signature(replay), Ok(()));
    stack.wait_for_consumer_settled("primary").await;

    let list_after_replay = stack.dlq(&["list"]).await;
    assert!(
        list_after_replay.status.success(),
        "dlq list: {}",
        describe(&list_after_replay)
    );
    assert!(
        list_after_replay.stdout.is_empty(),
        "dlq list after the replay: {}",
        describe(&list_after_replay)
    );
    other.assert_count_stays(1, QUIET).await;
}

#[tokio::test]
async fn slow_sink_beyond_ack_wait_delivers_once() {
    let receiver = Receiver::start().await;
    receiver.set_delay(Duration::from_millis(3500));
    let sink = SinkSpec::webhook("slow", &receiver.url("/slow"))
        .delivery("ack_wait", "1s")
        .delivery("timeout", "10s");
    let stack = Stack::start(vec![sink]).await;

    stack.publish("chat.created", &chat_created(1)).await;

    receiver.wait_for_count(1, TIMEOUT).await;
    // Covers the 3.5 s response and more than one ack wait after it.
    receiver.assert_count_stays(1, Duration::from_secs(5)).await;
    assert_eq!(receiver.max_concurrent(), 1);
    let info = stack.wait_for_consumer_settled("slow").await;
    assert_eq!(info.num_ack_pending, 0);
    assert!(stack.dead_letters().await.is_empty());
}

#[tokio::test]
async fn failing_sink_does_not_block_other() {
    const EVENTS: usize = 10;
    let failing = Receiver::start().await;
    failing.set_status(503);
    let healthy = Receiver::start().await;
    let stack = Stack::start(vec![
        SinkSpec::webhook("failing", &failing.url("/failing")).delivery("backoff", vec!["1h"]),
        SinkSpec::webhook("healthy", &healthy.url("/healthy")),
    ])
    .await;

    let mut ids = Vec::new();
    for n in 0..EVENTS {
        ids.push(stack.publish("chat.created", &chat_created(n)).await.id);
    }

    let requests = healthy.wait_for_count(EVENTS, Duration::from_secs(5)).await;
    let mut delivered: Vec<String> = requests
        .iter()
        .map(|request| request.header("ce-id").unwrap_or_default().to_owned())
        .collect();
    delivered.sort();
    ids.sort();
    assert_eq!(delivered, ids);
    failing.wait_for_count(EVENTS, TIMEOUT).await;
    stack.wait_for_consumer_settled("healthy").await;
}

#[tokio::test]
async fn concurrency_limits_requests_in_flight() {
    const EVENTS: usize = 20;
    let receiver = Receiver::start().await;
    receiver.set_delay(Duration::from_millis(300));
    let sink = SinkSpec::webhook("hook", &receiver.url("/hook")).delivery("concurrency", 4);
    let stack = Stack::start(vec![sink]).await;

    for n in 0..EVENTS {
        stack.publish("chat.created", &chat_created(n)).await;
    }

    receiver.wait_for_count(EVENTS, TIMEOUT).await;
    stack.wait_for_consumer_settled("hook").await;
    assert_eq!(receiver.count(), EVENTS);
    assert!(
        receiver.max_concurrent() <= 4,
        "{} requests were in flight at once with concurrency 4",
        receiver.max_concurrent()
    );
    assert!(
        receiver.max_concurrent() > 1,
        "requests never overlapped with concurrency 4"
    );
}

#[tokio::test]
async fn ordered_sink_keeps_publish_order() {
    const EVENTS: usize = 8;
    let receiver = Receiver::start().await;
    receiver.set_delay(Duration::from_millis(50));
    receiver.set_script(vec![Response::new(503)]);
    let sink = SinkSpec::webhook("hook", &receiver.url("/hook")).delivery("ordered", true);
    let stack = Stack::start(vec![sink]).await;

    let mut ids = Vec::new();
    for n in 0..EVENTS {
        ids.push(stack.publish("chat.created", &chat_created(n)).await.id);
    }

    // The first event fails once and is retried before any later event.
    let mut expected = vec![ids[0].clone()];
    expected.extend(ids.iter().cloned());
    let requests = receiver.wait_for_count(expected.len(), TIMEOUT).await;
    receiver.assert_count_stays(expected.len(), QUIET).await;
    let delivered: Vec<String> = requests
        .iter()
        .map(|request| request.header("ce-id").unwrap_or_default().to_owned())
        .collect();
    assert_eq!(delivered, expected);
    assert_eq!(receiver.max_concurrent(), 1);
}

#[tokio::test]
async fn n8n_not_registered_retries_until_active() {
    let receiver = Receiver::start().await;
    let not_registered = Response::new(404)
        .with_header("content-type", "application/json")
        .with_body(N8N_NOT_REGISTERED);
    receiver.set_script(vec![not_registered.clone(), not_registered]);
    let sink = SinkSpec::n8n("flow", &receiver.url("/webhook/flow"))
        .delivery("not_registered_delay", "200ms");
    let stack = Stack::start(vec![sink]).await;

    let body = chat_created(1);
    stack.publish("chat.created", &body).await;

    let requests = receiver.wait_for_count(3, TIMEOUT).await;
    receiver.assert_count_stays(3, QUIET).await;
    assert_eq!(&requests[2].body[..], body.as_bytes());
    assert!(
        gap_before(&requests, 1) >= Duration::from_millis(200),
        "attempt 2 came {:?} after attempt 1, before not_registered_delay",
        gap_before(&requests, 1)
    );
    assert!(
        gap_before(&requests, 2) >= Duration::from_millis(200),
        "attempt 3 came {:?} after attempt 2, before not_registered_delay",
        gap_before(&requests, 2)
    );
    stack.wait_for_consumer_settled("flow").await;
    assert!(stack.dead_letters().await.is_empty());
}

#[tokio::test]
async fn n8n_not_registered_exhausts_attempts() {
    let receiver = Receiver::start().await;
    receiver.set_default(Response::new(404).with_body(N8N_NOT_REGISTERED));
    let sink = SinkSpec::n8n("flow", &receiver.url("/webhook/flow"))
        .delivery("not_registered_delay", "200ms")
        .delivery("not_registered_attempts", 2);
    let stack = Stack::start(vec![sink]).await;

    stack.publish("chat.created", &chat_created(1)).await;

    let letters = stack.wait_for_dead_letters(1).await;
    receiver.assert_count_stays(2, QUIET).await;
    assert_eq!(header(&letters[0], "Switchyard-Reason"), Some("exhausted"));
    assert_eq!(header(&letters[0], "Switchyard-Attempts"), Some("2"));
    assert_eq!(header(&letters[0], "Switchyard-Last-Status"), Some("404"));
}

#[tokio::test]
async fn webhook_not_found_is_permanent() {
    let receiver = Receiver::start().await;
    receiver.set_default(Response::new(404).with_body(N8N_NOT_REGISTERED));
    let stack = Stack::start(vec![SinkSpec::webhook("hook", &receiver.url("/hook"))]).await;

    stack.publish("chat.created", &chat_created(1)).await;

    let letters = stack.wait_for_dead_letters(1).await;
    receiver.assert_count_stays(1, QUIET).await;
    assert_eq!(header(&letters[0], "Switchyard-Reason"), Some("permanent"));
    assert_eq!(header(&letters[0], "Switchyard-Attempts"), Some("1"));
}

#[tokio::test]
async fn filter_skips_small_files() {
    let receiver = Receiver::start().await;
    let sink = SinkSpec::webhook("files", &receiver.url("/files"))
        .set("events", vec!["file.uploaded"])
        .set("filter", "data.size_bytes > 100");
    let stack = Stack::start(vec![sink]).await;

    stack
        .publish("file.uploaded", &file_uploaded("file_small", 10))
        .await;
    let large = file_uploaded("file_large", 5000);
    stack.publish("file.uploaded", &large).await;

    let requests = receiver.wait_for_count(1, TIMEOUT).await;
    stack.wait_for_consumer_settled("files").await;
    receiver.assert_count_stays(1, QUIET).await;
    assert_eq!(&requests[0].body[..], large.as_bytes());
    assert!(stack.dead_letters().await.is_empty());
}

#[tokio::test]
async fn transform_renders_body() {
    let receiver = Receiver::start().await;
    let sink = SinkSpec::webhook("files", &receiver.url("/files"))
        .set("events", vec!["file.uploaded"])
        .set("transform", r#"{"file": {{ data.file_id | tojson }}}"#);
    let stack = Stack::start(vec![sink]).await;

    stack
        .publish("file.uploaded", &file_uploaded("file_9f2c", 48213))
        .await;

    let requests = receiver.wait_for_count(1, TIMEOUT).await;
    assert_eq!(requests[0].json(), json!({"file": "file_9f2c"}));
    assert_eq!(requests[0].header("content-type"), Some("application/json"));
    assert_eq!(verify_signature(&requests[0]), Ok(()));
}

#[tokio::test]
async fn transform_error_dead_letters() {
    let receiver = Receiver::start().await;
    let sink = SinkSpec::webhook("files", &receiver.url("/files"))
        .set("events", vec!["file.uploaded"])
        .set("transform", r#"{"file": {{ dta.file_id | tojson }}}"#);
    let stack = Stack::start(vec![sink]).await;

    stack
        .publish("file.uploaded", &file_uploaded("file_9f2c", 48213))
        .await;

    let letters = stack.wait_for_dead_letters(1).await;
    assert_eq!(letters[0].subject.as_str(), "dlq.files.file.uploaded");
    assert_eq!(header(&letters[0], "Switchyard-Reason"), Some("transform"));
    receiver.assert_count_stays(0, QUIET).await;
    let info = stack.wait_for_consumer_settled("files").await;
    assert_eq!(info.num_ack_pending, 0);
}

#[tokio::test]
async fn runaway_transform_dead_letters() {
    let receiver = Receiver::start().await;
    let nested = "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}\
                  {% endfor %}";
    let sink = SinkSpec::webhook("files", &receiver.url("/files"))
        .set("events", vec!["file.uploaded"])
        .set("transform", nested);
    let stack = Stack::start(vec![sink]).await;

    stack
        .publish("file.uploaded", &file_uploaded("file_9f2c", 48213))
        .await;

    let letters = stack.wait_for_dead_letters(1).await;
    assert_eq!(header(&letters[0], "Switchyard-Reason"), Some("transform"));
    let last_error = header(&letters[0], "Switchyard-Last-Error").unwrap_or_default();
    assert!(
        last_error.contains("fuel"),
        "Switchyard-Last-Error: {last_error}"
    );
    receiver.assert_count_stays(0, QUIET).await;
    let health = stack
        .client
        .get(stack.router.url("/healthz"))
        .timeout(Duration::from_secs(2))
        .send()
        .await
        .expect("the ingress did not answer /healthz after the transform");
    assert_eq!(health.status(), 200);
}

#[tokio::test]
async fn direct_publish_invalid_payload_dead_letters() {
    let receiver = Receiver::start().await;
    let stack = Stack::start(vec![SinkSpec::webhook("hook", &receiver.url("/hook"))]).await;

    let payload = r#"{"chat_id": 5}"#;
    stack
        .jetstream
        .publish("events.chat.created", payload.into())
        .await
        .expect("failed to publish to events.chat.created")
        .await
        .expect("JetStream did not acknowledge the publish");

    let letters = stack.wait_for_dead_letters(1).await;
    let letter = &letters[0];
    assert_eq!(letter.subject.as_str(), "dlq.hook.chat.created");
    assert_eq!(&letter.payload[..], payload.as_bytes());
    assert_eq!(header(letter, "Switchyard-Reason"), Some("invalid"));
    let last_error = header(letter, "Switchyard-Last-Error").unwrap_or_default();
    assert!(
        last_error.contains("schema violation"),
        "Switchyard-Last-Error: {last_error}"
    );
    receiver.assert_count_stays(0, QUIET).await;
}

#[tokio::test]
async fn direct_publish_keeps_traceparent() {
    let receiver = Receiver::start().await;
    let stack = Stack::start(vec![SinkSpec::webhook("hook", &receiver.url("/hook"))]).await;

    let body = chat_created(1);
    let mut headers = HeaderMap::new();
    headers.insert("traceparent", TRACEPARENT);
    stack
        .jetstream
        .publish_with_headers("events.chat.created", headers, body.clone().into())
        .await
        .expect("failed to publish to events.chat.created")
        .await
        .expect("JetStream did not acknowledge the publish");

    let requests = receiver.wait_for_count(1, TIMEOUT).await;
    // The router may send its own span as the parent, as W3C Trace Context allows, so
    // only the trace id has to match.
    let traceparent = requests[0].header("traceparent").unwrap_or_default();
    assert_eq!(
        trace_id(traceparent),
        trace_id(TRACEPARENT),
        "traceparent: {traceparent:?}"
    );
    assert_eq!(requests[0].header("ce-type"), Some("chat.created"));
    assert_eq!(&requests[0].body[..], body.as_bytes());
    stack.wait_for_consumer_settled("hook").await;
    assert!(stack.dead_letters().await.is_empty());
}

#[tokio::test]
async fn direct_publish_control_characters_delivers() {
    let receiver = Receiver::start().await;
    let stack = Stack::start(vec![SinkSpec::webhook("hook", &receiver.url("/hook"))]).await;

    let body = chat_created(1);
    let mut headers = HeaderMap::new();
    headers.insert("ce-id", "evt-ctrl-1");
    headers.insert("ce-source", "/orders\u{1}eu");
    headers.insert("traceparent", "not-a-trace\u{2}");
    stack
        .jetstream
        .publish_with_headers("events.chat.created", headers, body.clone().into())
        .await
        .expect("failed to publish to events.chat.created")
        .await
        .expect("JetStream did not acknowledge the publish");

    let requests = receiver.wait_for_count(1, TIMEOUT).await;
    assert_eq!(requests[0].header("ce-id"), Some("evt-ctrl-1"));
    assert_eq!(requests[0].header("ce-source"), Some("/orders%01eu"));
    assert_eq!(&requests[0].body[..], body.as_bytes());
    assert_eq!(verify_signature(&requests[0]), Ok(()));
    receiver.assert_count_stays(1, QUIET).await;
    assert!(stack.dead_letters().await.is_empty());
}

#[tokio::test]
async fn check_rejects_unknown_key() {
    let sink = SinkSpec::webhook("hook", "http://127.0.0.1:9/hook").delivery("concurency", 3);
    let output = check_sinks(&[sink]).await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "check: {}", describe(&output));
    assert!(stderr.contains("sinks[0].delivery"), "stderr: {stderr}");
    assert!(stderr.contains("concurency"), "stderr: {stderr}");
}

#[tokio::test]
async fn check_rejects_bad_duration() {
    let sink =
        SinkSpec::webhook("hook", "http://127.0.0.1:9/hook").delivery("timeout", "5 parsecs");
    let output = check_sinks(&[sink]).await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "check: {}", describe(&output));
    assert!(
        stderr.contains("sinks[0].delivery.timeout"),
        "stderr: {stderr}"
    );
    assert!(stderr.contains("5 parsecs"), "stderr: {stderr}");
}

#[tokio::test]
async fn check_rejects_invalid_url() {
    let unparsable = check_sinks(&[SinkSpec::webhook("hook", "not a url")]).await;
    let stderr = String::from_utf8_lossy(&unparsable.stderr);
    assert!(
        !unparsable.status.success(),
        "check: {}",
        describe(&unparsable)
    );
    // The message leaves out a URL that does not parse, because it may contain credentials.
    assert_eq!(
        stderr.matches("key `sinks[0].url`").count(),
        1,
        "stderr: {stderr}"
    );

    let wrong_scheme = check_sinks(&[SinkSpec::webhook("hook", "ftp://127.0.0.1/hook")]).await;
    let stderr = String::from_utf8_lossy(&wrong_scheme.stderr);
    assert!(
        !wrong_scheme.status.success(),
        "check: {}",
        describe(&wrong_scheme)
    );
    assert!(stderr.contains("sinks[0].url"), "stderr: {stderr}");
    assert!(stderr.contains("ftp://127.0.0.1/hook"), "stderr: {stderr}");
}

#[tokio::test]
async fn check_rejects_pattern_without_schema() {
    let sink =
        SinkSpec::webhook("hook", "http://127.0.0.1:9/hook").set("events", vec!["order.created"]);
    let output = check_sinks(&[sink]).await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "check: {}", describe(&output));
    assert!(stderr.contains("sinks[0].events[0]"), "stderr: {stderr}");
    assert!(stderr.contains("order.created"), "stderr: {stderr}");
}

#[tokio::test]
async fn check_rejects_bad_template() {
    let sink = SinkSpec::webhook("hook", "http://127.0.0.1:9/hook")
        .set("transform", r#"{"file": {{ data.file_id "#);
    let output = check_sinks(&[sink]).await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "check: {}", describe(&output));
    assert!(stderr.contains("sinks[0].transform"), "stderr: {stderr}");
}

#[tokio::test]
async fn check_warns_on_n8n_test_url() {
    let sink = SinkSpec::n8n("flow", "http://127.0.0.1:9/webhook-test/flow");
    let output = check_sinks(&[sink]).await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "check: {}", describe(&output));
    assert!(stderr.contains("WARN"), "stderr: {stderr}");
    assert!(stderr.contains("webhook-test"), "stderr: {stderr}");
}

#[tokio::test]
async fn check_accepts_repository_config() {
    let path = support::router::repo_root().join("switchyard.toml");
    let path = path.to_str().expect("the repository path is UTF-8");
    let output = run_cli(&["check", "--config", path]).await;
    assert!(output.status.success(), "check: {}", describe(&output));
}
