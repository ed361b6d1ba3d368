//! End-to-end tests of the HTTP ingress: the built `switchyard` binary, a real nats-server
//! per test and a capturing receiver as the webhook sink.
//!
//! Each test checks the response a producer gets (status, JSON body, problem details),
//! what JetStream stores, and what the sink receives.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use async_nats::jetstream::message::StreamMessage;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, KeyInit, Mac};
use serde_json::Value;
use sha2::Sha256;
use support::{CapturedRequest, NatsServer, Receiver, Router, free_port, http_client, wait_until};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Signing secret of the test sink: `whsec_` and the base64 of
/// `ingress-tests-signing-key-32byte`.
const SECRET: &str = "whsec_aW5ncmVzcy10ZXN0cy1zaWduaW5nLWtleS0zMmJ5dGU=";

/// Upper bound of every wait for a delivery, a readiness change or a recovery.
const TIMEOUT: Duration = Duration::from_secs(20);

/// How long a test watches the receiver to check that no further delivery arrives.
const QUIET_PERIOD: Duration = Duration::from_secs(1);

const PROBLEM_JSON: &str = "application/problem+json";

/// A valid `chat.created` payload with odd key order, irregular whitespace, a unicode
/// escape and extra fields whose numbers fit neither u64 nor f64.
const ODD_CHAT_CREATED: &str = concat!(
    "{\n  \"participants\" : [ \"user_42\",\"user_7\" ],\"kind\":\"direct\",\n",
    "\t\"title\": \"Caf\\u00e9 crew\",   \"created_by\":\"user_42\",\n",
    "  \"chat_id\": \"chat_odd\", \"created_at\":\"2025-01-15T09:30:00Z\",\n",
    "  \"big_int\": 123456789012345678901234567890, \"huge\" : 1e400 ,",
    " \"precise\": 0.10000000000000000000000001 }  \n",
);

/// Returns a compact valid `chat.created` payload for the chat `chat_id`.
fn chat_created(chat_id: &str) -> String {
    format!(
        r#"{{"chat_id":"{chat_id}","created_at":"2025-01-15T09:30:00Z","created_by":"user_42","participants":["user_42","user_7"]}}"#
    )
}

/// Builds a router config: the ingress on a free port, the given NATS server, and one
/// signed webhook sink for `chat.*` at the receiver with a 100 ms retry delay.
///
/// `server_settings` contains extra lines of the `[server]` table, such as
/// `max_body_bytes = 256`.
fn config_toml(nats_url: &str, receiver: &Receiver, server_settings: &str) -> String {
    let listen_port = free_port();
    let sink_url = receiver.url("/hook");
    format!(
        r#"[server]
listen = "127.0.0.1:{listen_port}"
publish_timeout = "2s"
unavailable_retry_after = "3s"
{server_settings}

[nats]
url = "{nats_url}"
connect_timeout = "5s"

[[sinks]]
name = "inbox"
kind = "webhook"
url = "{sink_url}"
events = ["chat.*"]
secrets = ["{SECRET}"]

[sinks.delivery]
timeout = "5s"
backoff = ["100ms"]
"#
    )
}

/// A running router with its own NATS server and sink receiver.
struct TestRouter {
    // Declared first so the router stops before the servers it uses.
    router: Router,
    receiver: Receiver,
    nats: NatsServer,
    http: reqwest::Client,
}

impl TestRouter {
    /// Starts NATS, the receiver and the router with the default server settings.
    async fn start() -> TestRouter {
        TestRouter::start_with(NatsServer::start().await, "").await
    }

    /// Starts the receiver and the router on `nats`, with extra `[server]` lines.
    async fn start_with(nats: NatsServer, server_settings: &str) -> TestRouter {
        let receiver = Receiver::start().await;
        let config = config_toml(&nats.url(), &receiver, server_settings);
        let router = Router::start(env!("CARGO_BIN_EXE_switchyard"), &config).await;
        TestRouter {
            router,
            receiver,
            nats,
            http: http_client(),
        }
    }

    /// POSTs `body` to `path` with the given `Content-Type`, or none.
    async fn post(
        &self,
        path: &str,
        content_type: Option<&str>,
        body: impl Into<reqwest::Body>,
    ) -> reqwest::Response {
        let url = self.router.url(path);
        let mut request = self.http.post(&url).body(body);
        if let Some(content_type) = content_type {
            request = request.header("content-type", content_type);
        }
        request
            .send()
            .await
            .unwrap_or_else(|error| panic!("POST {url} failed: {error}"))
    }

    /// POSTs one event of `event_type` as `application/json`.
    async fn post_event(
        &self,
        event_type: &str,
        body: impl Into<reqwest::Body>,
    ) -> reqwest::Response {
        self.post(
            &format!("/v1/events/{event_type}"),
            Some("application/json"),
            body,
        )
        .await
    }

    /// POSTs `body` to `path` as `application/json` with extra request headers.
    async fn post_with_headers(
        &self,
        path: &str,
        headers: &[(&str, &str)],
        body: impl Into<reqwest::Body>,
    ) -> reqwest::Response {
        let url = self.router.url(path);
        let mut request = self
            .http
            .post(&url)
            .header("content-type", "application/json")
            .body(body);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        request
            .send()
            .await
            .unwrap_or_else(|error| panic!("POST {url} failed: {error}"))
    }

    /// POSTs one `chat.created` event with an `Idempotency-Key` header.
    async fn post_with_key(&self, key: &str, body: &str) -> reqwest::Response {
        self.post_with_headers(
            "/v1/events/chat.created",
            &[("idempotency-key", key)],
            body.to_owned(),
        )
        .await
    }

    async fn get_status(&self, path: &str) -> u16 {
        let url = self.router.url(path);
        self.http
            .get(&url)
            .send()
            .await
            .unwrap_or_else(|error| panic!("GET {url} failed: {error}"))
            .status()
            .as_u16()
    }

    /// Reads the message with sequence `seq` from the `EVENTS` stream.
    async fn stored_message(&self, seq: u64) -> StreamMessage {
        let stream = self
            .nats
            .jetstream()
            .await
            .get_stream("EVENTS")
            .await
            .expect("stream EVENTS is missing");
        stream
            .get_raw_message(seq)
            .await
            .unwrap_or_else(|error| panic!("failed to read message {seq} of EVENTS: {error}"))
    }

    /// Returns the number of messages in the `EVENTS` stream.
    async fn stored_count(&self) -> u64 {
        let mut stream = self
            .nats
            .jetstream()
            .await
            .get_stream("EVENTS")
            .await
            .expect("stream EVENTS is missing");
        stream
            .info()
            .await
            .expect("failed to read the info of stream EVENTS")
            .state
            .messages
    }
}

/// Reads a response body as JSON, panicking with the body when it is not JSON.
async fn json_body(response: reqwest::Response) -> Value {
    let bytes = response
        .bytes()
        .await
        .expect("failed to read the response body");
    serde_json::from_slice(&bytes).unwrap_or_else(|error| {
        panic!(
            "response body is not JSON ({error}): {}",
            String::from_utf8_lossy(&bytes)
        )
    })
}

/// Checks that `response` is a 202 and returns its JSON body.
async fn expect_accepted(response: reqwest::Response, case: &str) -> Value {
    let status = response.status().as_u16();
    let body = json_body(response).await;
    assert_eq!(status, 202, "{case}: expected 202, got {status}: {body}");
    body
}

/// Checks that `response` is an `application/problem+json` with `status`, whose own
/// `status` field matches, and returns the problem.
async fn expect_problem(response: reqwest::Response, status: u16, case: &str) -> Value {
    let actual = response.status().as_u16();
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let body = json_body(response).await;
    assert_eq!(
        actual, status,
        "{case}: expected {status}, got {actual}: {body}"
    );
    assert_eq!(
        content_type, PROBLEM_JSON,
        "{case}: content type of the problem"
    );
    assert_eq!(
        body["status"], status,
        "{case}: status field of the problem {body}"
    );
    body
}

/// Returns the `detail` of a problem, panicking when it has none.
fn detail(problem: &Value) -> &str {
    problem["detail"]
        .as_str()
        .unwrap_or_else(|| panic!("problem has no string detail: {problem}"))
}

fn str_field<'a>(value: &'a Value, field: &str) -> &'a str {
    value[field]
        .as_str()
        .unwrap_or_else(|| panic!("field {field} is not a string in {value}"))
}

fn seq_field(value: &Value) -> u64 {
    value["seq"]
        .as_u64()
        .unwrap_or_else(|| panic!("field seq is not an unsigned integer in {value}"))
}

/// Returns a header of a stored message, panicking when it is missing.
fn stored_header<'a>(message: &'a StreamMessage, name: &str) -> &'a str {
    message
        .headers
        .get(name)
        .unwrap_or_else(|| {
            panic!(
                "stored message {} has no {name} header: {:?}",
                message.sequence, message.headers
            )
        })
        .as_str()
}

/// Returns a header of a captured request, panicking when it is missing.
fn request_header<'a>(request: &'a CapturedRequest, name: &str) -> &'a str {
    request
        .header(name)
        .unwrap_or_else(|| panic!("delivery has no {name} header: {:?}", request.headers))
}

/// Computes the Standard Webhooks `v1` signature of a delivery with [`SECRET`]: HMAC-SHA256
/// over `{webhook-id}.{webhook-timestamp}.{body}` under the base64-decoded secret.
fn expected_signature(request: &CapturedRequest) -> String {
    let id = request_header(request, "webhook-id");
    let timestamp = request_header(request, "webhook-timestamp");
    let encoded_key = SECRET
        .strip_prefix("whsec_")
        .expect("SECRET starts with whsec_");
    let key = STANDARD
        .decode(encoded_key)
        .expect("SECRET is base64 after whsec_");
    let mut mac =
        <Hmac<Sha256> as KeyInit>::new_from_slice(&key).expect("HMAC accepts a key of any length");
    mac.update(format!("{id}.{timestamp}.").as_bytes());
    mac.update(&request.body);
    format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()))
}

/// Reports whether `id` is a UUID of version 7 in its hyphenated lowercase form.
fn is_uuid_v7(id: &str) -> bool {
    let bytes = id.as_bytes();
    let shape = bytes.len() == 36
        && bytes.iter().enumerate().all(|(index, byte)| match index {
            8 | 13 | 18 | 23 => *byte == b'-',
            _ => byte.is_ascii_digit() || (b'a'..=b'f').contains(byte),
        });
    // The version nibble opens the third group and the RFC 9562 variant (10xx) the fourth.
    shape && bytes[14] == b'7' && matches!(bytes[19], b'8' | b'9' | b'a' | b'b')
}

/// Returns the Unix time in milliseconds that a UUIDv7 carries in its first 48 bits.
fn uuid_v7_millis(id: &str) -> i128 {
    let hex: String = id.chars().filter(|c| *c != '-').take(12).collect();
    i128::from_str_radix(&hex, 16).unwrap_or_else(|error| panic!("{id} is not hex: {error}"))
}

/// POSTs `body` as `application/json` in 100-byte chunks over a new connection and returns
/// the whole response as text.
///
/// reqwest sends a `Content-Length` with every in-memory body, so this writes the
/// HTTP/1.1 request itself.
async fn post_chunked(addr: SocketAddr, path: &str, body: &str) -> String {
    let mut request = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    )
    .into_bytes();
    for chunk in body.as_bytes().chunks(100) {
        request.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        request.extend_from_slice(chunk);
        request.extend_from_slice(b"\r\n");
    }
    request.extend_from_slice(b"0\r\n\r\n");

    let mut stream = TcpStream::connect(addr)
        .await
        .unwrap_or_else(|error| panic!("failed to connect to {addr}: {error}"));
    stream
        .write_all(&request)
        .await
        .unwrap_or_else(|error| panic!("failed to send the chunked request to {addr}: {error}"));
    let mut response = Vec::new();
    tokio::time::timeout(TIMEOUT, stream.read_to_end(&mut response))
        .await
        .unwrap_or_else(|_| panic!("{addr} did not close the connection within {TIMEOUT:?}"))
        .unwrap_or_else(|error| panic!("failed to read the response from {addr}: {error}"));
    String::from_utf8_lossy(&response).into_owned()
}

/// Finds the delivery whose body is `body`.
fn delivery_with_body<'a>(requests: &'a [CapturedRequest], body: &str) -> &'a CapturedRequest {
    requests
        .iter()
        .find(|request| request.body == body.as_bytes())
        .unwrap_or_else(|| {
            let bodies: Vec<String> = requests
                .iter()
                .map(|request| String::from_utf8_lossy(&request.body).into_owned())
                .collect();
            panic!("no delivery has the body {body:?}. Delivered bodies: {bodies:?}")
        })
}

#[tokio::test]
async fn event_delivered_byte_for_byte() {
    let test = TestRouter::start().await;

    let response = test.post_event("chat.created", ODD_CHAT_CREATED).await;
    let response_body = expect_accepted(response, "odd chat.created").await;

    let id = str_field(&response_body, "id");
    assert!(
        !id.is_empty(),
        "the response has an empty id: {response_body}"
    );
    assert_eq!(
        response_body["type"], "chat.created",
        "type in the response"
    );
    assert!(
        seq_field(&response_body) >= 1,
        "seq in the response: {response_body}"
    );
    assert_eq!(
        response_body["duplicate"], false,
        "duplicate in the response"
    );

    let requests = test.receiver.wait_for_count(1, TIMEOUT).await;
    let delivery = &requests[0];
    assert_eq!(
        delivery.body_text(),
        ODD_CHAT_CREATED,
        "the sink received other bytes than the producer sent"
    );
    assert_eq!(delivery.method, "POST", "method of the delivery");
    assert_eq!(delivery.path, "/hook", "path of the delivery");
    assert_eq!(
        request_header(delivery, "webhook-id"),
        id,
        "webhook-id is the event id"
    );
    assert_eq!(
        request_header(delivery, "ce-id"),
        id,
        "ce-id is the event id"
    );
    assert_eq!(
        request_header(delivery, "ce-type"),
        "chat.created",
        "ce-type of the delivery"
    );
    let signature = request_header(delivery, "webhook-signature");
    let expected = expected_signature(delivery);
    assert!(
        signature.split(' ').any(|entry| entry == expected),
        "webhook-signature {signature:?} has no entry {expected:?}"
    );

    test.receiver.assert_count_stays(1, QUIET_PERIOD).await;
}

#[tokio::test]
async fn event_stored_with_cloudevents_headers() {
    let test = TestRouter::start().await;

    let response = test.post_event("chat.created", ODD_CHAT_CREATED).await;
    let response_body = expect_accepted(response, "odd chat.created").await;
    let id = str_field(&response_body, "id");
    let message = test.stored_message(seq_field(&response_body)).await;

    assert_eq!(
        message.payload, ODD_CHAT_CREATED,
        "the stored payload differs from the request body"
    );
    assert_eq!(
        message.subject.as_str(),
        "events.chat.created",
        "subject of the stored event"
    );
    assert_eq!(stored_header(&message, "Nats-Msg-Id"), id, "Nats-Msg-Id");
    assert_eq!(stored_header(&message, "ce-id"), id, "ce-id");
    assert_eq!(
        stored_header(&message, "ce-type"),
        "chat.created",
        "ce-type"
    );
    assert_eq!(
        stored_header(&message, "ce-source"),
        "switchyard",
        "ce-source"
    );
    assert_eq!(
        stored_header(&message, "ce-specversion"),
        "1.0",
        "ce-specversion"
    );
    assert_eq!(
        stored_header(&message, "content-type"),
        "application/json",
        "content-type"
    );
    let time = stored_header(&message, "ce-time");
    let parsed = OffsetDateTime::parse(time, &Rfc3339)
        .unwrap_or_else(|error| panic!("ce-time {time:?} is not RFC 3339: {error}"));
    let age = OffsetDateTime::now_utc() - parsed;
    assert!(
        age.whole_seconds().abs() < 60,
        "ce-time {time} is not close to now"
    );
}

/// A body that the ingress must reject as invalid JSON.
struct InvalidJsonCase {
    name: &'static str,
    body: &'static [u8],
    /// Text that the problem detail must contain.
    detail: &'static str,
    /// Expected `line` and `column` of the problem, present for syntax errors only.
    position: Option<(u64, u64)>,
}

#[tokio::test]
async fn invalid_json_rejected_with_reason() {
    let test = TestRouter::start().await;

    let cases = [
        InvalidJsonCase {
            name: "missing colon",
            body: b"{\"chat_id\": \"c1\",\n  \"created_at\" \"2025\"}",
            detail: "line 2 column 16",
            position: Some((2, 16)),
        },
        InvalidJsonCase {
            name: "duplicate key",
            body: b"{\"chat_id\": \"c1\", \"chat_id\": \"c2\"}",
            detail: "\"chat_id\"",
            position: Some((1, 27)),
        },
        InvalidJsonCase {
            name: "empty body",
            body: b"",
            detail: "empty",
            position: None,
        },
        InvalidJsonCase {
            name: "whitespace body",
            body: b" \r\n\t ",
            detail: "empty",
            position: None,
        },
        InvalidJsonCase {
            name: "NaN",
            body: b"{\"n\": NaN}",
            detail: "line 1 column 7",
            position: Some((1, 7)),
        },
        InvalidJsonCase {
            name: "trailing comma",
            body: b"{\"a\": 1,}",
            detail: "trailing comma",
            position: Some((1, 9)),
        },
        InvalidJsonCase {
            name: "invalid UTF-8",
            body: b"{\"title\": \"caf\xe9\"}",
            detail: "offset 14",
            position: None,
        },
    ];

    for InvalidJsonCase {
        name: case,
        body,
        detail: needle,
        position,
    } in cases
    {
        let response = test.post_event("chat.created", body.to_vec()).await;
        let problem = expect_problem(response, 400, case).await;
        assert!(
            detail(&problem).contains(needle),
            "{case}: detail {:?} does not contain {needle:?}",
            detail(&problem)
        );
        match position {
            Some((line, column)) => {
                assert_eq!(problem["line"], line, "{case}: line in {problem}");
                assert_eq!(problem["column"], column, "{case}: column in {problem}");
            }
            None => {
                assert!(problem.get("line").is_none(), "{case}: line in {problem}");
                assert!(
                    problem.get("column").is_none(),
                    "{case}: column in {problem}"
                );
            }
        }
    }

    assert_eq!(test.stored_count().await, 0, "a rejected event was stored");
}

#[tokio::test]
async fn byte_order_mark_tolerated() {
    let test = TestRouter::start().await;
    let json = chat_created("chat_bom");
    let mut body = b"\xEF\xBB\xBF".to_vec();
    body.extend_from_slice(json.as_bytes());

    let response = test.post_event("chat.created", body).await;
    let response_body = expect_accepted(response, "body with a byte-order mark").await;

    let message = test.stored_message(seq_field(&response_body)).await;
    assert_eq!(
        message.payload,
        json.as_bytes(),
        "the stored payload is not the body without its byte-order mark"
    );
    let requests = test.receiver.wait_for_count(1, TIMEOUT).await;
    assert_eq!(
        requests[0].body_text(),
        json,
        "the delivery is not the body without its byte-order mark"
    );
}

#[tokio::test]
async fn event_type_unknown_or_invalid() {
    let test = TestRouter::start().await;
    let body = chat_created("chat_type");

    let response = test.post_event("chat.archived", body.clone()).await;
    let unknown = expect_problem(response, 404, "unknown type").await;
    assert!(
        detail(&unknown).contains("\"chat.archived\""),
        "detail {:?} does not name the type",
        detail(&unknown)
    );

    let response = test.post_event("Chat.Created", body.clone()).await;
    let invalid = expect_problem(response, 400, "uppercase type").await;
    assert!(
        detail(&invalid).contains("\"Chat.Created\""),
        "detail {:?} does not name the type",
        detail(&invalid)
    );

    let headers = [("ce-type", "chat.updated")];
    let response = test
        .post_with_headers("/v1/events/chat.created", &headers, body)
        .await;
    let mismatch = expect_problem(response, 400, "ce-type differs from the path").await;
    assert!(
        detail(&mismatch).contains("\"chat.updated\""),
        "detail {:?} does not name the ce-type",
        detail(&mismatch)
    );

    assert_eq!(test.stored_count().await, 0, "a rejected event was stored");
}

#[tokio::test]
async fn schema_violation_lists_pointers() {
    let test = TestRouter::start().await;
    let body = r#"{"chat_id":"c1","created_at":"2025-01-15T09:30:00Z","created_by":"user_42","participants":[],"kind":"meeting"}"#;

    let response = test.post_event("chat.created", body).await;
    let problem = expect_problem(response, 422, "schema violation").await;

    assert!(
        detail(&problem).contains("\"chat.created\""),
        "detail {:?} does not name the type",
        detail(&problem)
    );
    let errors = problem["errors"]
        .as_array()
        .unwrap_or_else(|| panic!("the problem has no errors array: {problem}"));
    let pointers: Vec<&str> = errors
        .iter()
        .map(|error| str_field(error, "pointer"))
        .collect();
    assert!(
        pointers.contains(&"/participants"),
        "no error points at /participants: {problem}"
    );
    assert!(
        pointers.contains(&"/kind"),
        "no error points at /kind: {problem}"
    );
    for error in errors {
        assert!(
            !str_field(error, "message").is_empty(),
            "an error has an empty message: {problem}"
        );
    }
    assert_eq!(test.stored_count().await, 0, "a rejected event was stored");
}

#[tokio::test]
async fn content_type_checked() {
    let test = TestRouter::start().await;
    let body = chat_created("chat_media");

    for (case, content_type) in [
        ("text/plain", Some("text/plain")),
        (
            "charset other than UTF-8",
            Some("application/json; charset=latin1"),
        ),
        ("missing Content-Type", None),
    ] {
        let response = test
            .post("/v1/events/chat.created", content_type, body.clone())
            .await;
        let problem = expect_problem(response, 415, case).await;
        let expected = content_type.unwrap_or("Content-Type is missing");
        assert!(
            detail(&problem).contains(expected),
            "{case}: detail {:?} does not contain {expected:?}",
            detail(&problem)
        );
    }
    assert_eq!(test.stored_count().await, 0, "a rejected event was stored");

    for content_type in ["application/json; charset=utf-8", "application/vnd.x+json"] {
        let response = test
            .post("/v1/events/chat.created", Some(content_type), body.clone())
            .await;
        expect_accepted(response, content_type).await;
    }
    assert_eq!(test.stored_count().await, 2, "accepted events in EVENTS");
}

#[tokio::test]
async fn body_over_limit_rejected() {
    let test = TestRouter::start_with(NatsServer::start().await, "max_body_bytes = 256").await;
    let padding = "x".repeat(300);
    let body = format!(
        r#"{{"chat_id":"c1","created_at":"2025-01-15T09:30:00Z","created_by":"u1","participants":["u1"],"padding":"{padding}"}}"#
    );

    let response = test.post_event("chat.created", body.clone()).await;
    let problem = expect_problem(response, 413, "body over max_body_bytes").await;

    assert_eq!(problem["limit_bytes"], 256, "limit_bytes in {problem}");
    assert!(
        detail(&problem).contains("256 bytes"),
        "detail {:?} does not state the limit",
        detail(&problem)
    );

    // Without Content-Length the size is known only while the body is read.
    let chunked = post_chunked(test.router.addr(), "/v1/events/chat.created", &body).await;
    assert!(
        chunked.starts_with("HTTP/1.1 413 "),
        "chunked body over max_body_bytes got:\n{chunked}"
    );
    assert!(
        chunked.contains("\"limit_bytes\":256"),
        "no limit_bytes 256 in the response to a chunked body:\n{chunked}"
    );
    assert_eq!(
        test.stored_count().await,
        0,
        "an event over the limit was stored"
    );

    let small = chat_created("chat_small");
    assert!(
        small.len() < 256,
        "the small event has {} bytes",
        small.len()
    );
    let response = test.post_event("chat.created", small).await;
    expect_accepted(response, "body under max_body_bytes").await;
}

#[tokio::test]
async fn body_limit_capped_by_max_payload() {
    let nats = NatsServer::start_with_config("max_payload: 4096\n").await;
    let test = TestRouter::start_with(nats, "max_body_bytes = 1048576").await;
    let padding = "x".repeat(5000);
    let body = format!(
        r#"{{"chat_id":"c1","created_at":"2025-01-15T09:30:00Z","created_by":"u1","participants":["u1"],"padding":"{padding}"}}"#
    );

    let response = test.post_event("chat.created", body).await;
    let problem = expect_problem(response, 413, "body over max_payload").await;

    let limit = problem["limit_bytes"]
        .as_u64()
        .unwrap_or_else(|| panic!("the problem has no limit_bytes: {problem}"));
    assert!(
        limit < 4096,
        "limit_bytes {limit} does not leave room under max_payload 4096"
    );
    assert_eq!(
        test.stored_count().await,
        0,
        "an event over the limit was stored"
    );
}

#[tokio::test]
async fn event_over_max_payload_rejected() {
    // max_payload 65536 leaves a body limit of 57344 bytes, so the 50 kB body passes the
    // limit, and its 20 kB ce-source header pushes the NATS message past max_payload.
    let nats = NatsServer::start_with_config("max_payload: 65536\n").await;
    let test = TestRouter::start_with(nats, "").await;
    let padding = "x".repeat(50_000);
    let body = format!(
        r#"{{"chat_id":"c1","created_at":"2025-01-15T09:30:00Z","created_by":"u1","participants":["u1"],"padding":"{padding}"}}"#
    );
    assert!(body.len() < 57_344, "the body has {} bytes", body.len());
    let source = format!("/{}", "s".repeat(20_000));
    let headers = [("ce-type", "chat.created"), ("ce-source", source.as_str())];

    let response = test.post_with_headers("/v1/events", &headers, body).await;
    let problem = expect_problem(response, 413, "event over max_payload").await;

    assert!(
        detail(&problem).contains("max_payload"),
        "detail {:?} does not name max_payload",
        detail(&problem)
    );
    assert_eq!(
        test.stored_count().await,
        0,
        "an event over max_payload was stored"
    );
}

#[tokio::test]
async fn event_over_header_limit_rejected() {
    // JetStream rejects more than 64 KiB of headers whatever max_payload is, so a retry
    // cannot succeed and the response is a 413, not a 503.
    let test = TestRouter::start().await;
    let source = format!("/{}", "s".repeat(70_000));
    let headers = [("ce-type", "chat.created"), ("ce-source", source.as_str())];

    let response = test
        .post_with_headers("/v1/events", &headers, chat_created("chat_long_source"))
        .await;
    let problem = expect_problem(response, 413, "ce-source over the header limit").await;

    assert!(
        detail(&problem).contains("header"),
        "detail {:?} does not name the header limit",
        detail(&problem)
    );
    assert_eq!(
        test.stored_count().await,
        0,
        "an event over the limit was stored"
    );
}

#[tokio::test]
async fn idempotency_key_deduplicates() {
    let test = TestRouter::start().await;
    let body = chat_created("chat_idempotent");

    let first = expect_accepted(test.post_with_key("order-42", &body).await, "first post").await;
    let second = expect_accepted(test.post_with_key("order-42", &body).await, "second post").await;

    assert_eq!(first["id"], "order-42", "the key becomes the event id");
    assert_eq!(second["id"], "order-42", "the key becomes the event id");
    assert_eq!(first["duplicate"], false, "duplicate of the first post");
    assert_eq!(second["duplicate"], true, "duplicate of the second post");
    assert_eq!(
        seq_field(&first),
        seq_field(&second),
        "a duplicate answers the sequence of the stored event"
    );
    assert_eq!(test.stored_count().await, 1, "events in EVENTS");

    test.receiver.wait_for_count(1, TIMEOUT).await;
    test.receiver.assert_count_stays(1, QUIET_PERIOD).await;
}

#[tokio::test]
async fn empty_idempotency_key_ignored() {
    let test = TestRouter::start().await;
    let body = chat_created("chat_no_key");

    let first = expect_accepted(test.post_with_key("", &body).await, "first post").await;
    let second = expect_accepted(test.post_with_key("", &body).await, "second post").await;

    let first_id = str_field(&first, "id");
    let second_id = str_field(&second, "id");
    assert_ne!(first_id, second_id, "two posts without a key share an id");
    assert_eq!(second["duplicate"], false, "duplicate of the second post");
    assert_ne!(
        seq_field(&first),
        seq_field(&second),
        "two posts without a key share a sequence"
    );
    test.receiver.wait_for_count(2, TIMEOUT).await;
}

#[tokio::test]
async fn invalid_idempotency_key_rejected() {
    let test = TestRouter::start().await;

    let response = test
        .post_with_key("order 42", &chat_created("chat_bad_key"))
        .await;
    let problem = expect_problem(response, 400, "Idempotency-Key with a space").await;

    assert!(
        detail(&problem).contains("\"order 42\""),
        "detail {:?} does not name the key",
        detail(&problem)
    );
    assert_eq!(test.stored_count().await, 0, "a rejected event was stored");
}

#[tokio::test]
async fn non_ascii_idempotency_key_rejected() {
    let test = TestRouter::start().await;

    let response = test
        .post_with_key("order-\u{e9}-42", &chat_created("chat_unicode_key"))
        .await;
    expect_problem(response, 400, "Idempotency-Key with a non-ASCII character").await;

    let response = test
        .post_with_headers(
            "/v1/events/chat.created",
            &[("ce-type", "ch\u{e4}t.created")],
            chat_created("chat_unicode_type"),
        )
        .await;
    expect_problem(response, 400, "ce-type with a non-ASCII character").await;
    assert_eq!(test.stored_count().await, 0, "a rejected event was stored");
}

#[tokio::test]
async fn generated_ids_are_uuid_v7() {
    let test = TestRouter::start().await;
    let before = OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000;

    let mut ids = Vec::new();
    for index in 0..3 {
        let body = chat_created(&format!("chat_uuid_{index}"));
        let response_body =
            expect_accepted(test.post_event("chat.created", body).await, "post").await;
        ids.push(str_field(&response_body, "id").to_owned());
    }
    let after = OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000;

    for id in &ids {
        assert!(is_uuid_v7(id), "{id} is not a UUIDv7");
        let millis = uuid_v7_millis(id);
        // The router runs on the same clock, so its timestamp lies between the two readings.
        assert!(
            (before..=after).contains(&millis),
            "{id} carries {millis} ms, outside {before}..={after}"
        );
    }
}

#[tokio::test]
async fn batch_all_valid_accepted() {
    let test = TestRouter::start().await;
    let first_data = chat_created("chat_batch_1");
    let second_data = chat_created("chat_batch_2");
    let body = format!(
        r#"[{{"type":"chat.created","data":{first_data}}}, {{"type": "chat.created", "id": "batch-2", "data": {second_data}}}]"#
    );

    let response = test
        .post("/v1/events", Some("application/json"), body)
        .await;
    let response_body = expect_accepted(response, "batch").await;

    assert_eq!(
        response_body["accepted"], 2,
        "accepted count in {response_body}"
    );
    assert_eq!(
        response_body["failed"], 0,
        "failed count in {response_body}"
    );
    let results = response_body["results"]
        .as_array()
        .unwrap_or_else(|| panic!("the response has no results array: {response_body}"));
    assert_eq!(results.len(), 2, "results in {response_body}");
    for (index, result) in results.iter().enumerate() {
        assert_eq!(result["index"], index, "index of result {index}");
        assert_eq!(result["status"], 202, "status of result {index}");
        assert_eq!(result["type"], "chat.created", "type of result {index}");
        assert_eq!(result["duplicate"], false, "duplicate of result {index}");
        assert!(seq_field(result) >= 1, "seq of result {index}");
    }
    assert!(
        is_uuid_v7(str_field(&results[0], "id")),
        "an item without id gets a UUIDv7: {response_body}"
    );
    assert_eq!(results[1]["id"], "batch-2", "an item keeps its own id");

    let requests = test.receiver.wait_for_count(2, TIMEOUT).await;
    let second = delivery_with_body(&requests, &second_data);
    assert_eq!(
        request_header(second, "ce-id"),
        "batch-2",
        "ce-id of item 1"
    );
    delivery_with_body(&requests, &first_data);
}

#[tokio::test]
async fn batch_mixed_answers_per_item() {
    let test = TestRouter::start().await;
    let valid_data = chat_created("chat_mixed");
    let body = format!(
        r#"[
  {{"type": "chat.created", "data": {valid_data}}},
  {{"type": "chat.created", "data": {{"chat_id": "c2"}}}},
  {{"type": "chat.archived", "data": {{"chat_id": "c3"}}}}
]"#
    );

    let response = test
        .post("/v1/events", Some("application/json"), body)
        .await;
    let status = response.status().as_u16();
    let response_body = json_body(response).await;

    assert_eq!(status, 207, "status of a mixed batch: {response_body}");
    assert_eq!(
        response_body["accepted"], 1,
        "accepted count in {response_body}"
    );
    assert_eq!(
        response_body["failed"], 2,
        "failed count in {response_body}"
    );
    let statuses: Vec<Option<u64>> = response_body["results"]
        .as_array()
        .unwrap_or_else(|| panic!("the response has no results array: {response_body}"))
        .iter()
        .map(|result| result["status"].as_u64())
        .collect();
    assert_eq!(
        statuses,
        [Some(202), Some(422), Some(404)],
        "per-item statuses in {response_body}"
    );
    let schema_problem = &response_body["results"][1]["problem"];
    assert!(
        schema_problem["errors"]
            .as_array()
            .is_some_and(|errors| !errors.is_empty()),
        "the 422 item lists no schema errors: {response_body}"
    );
    assert_eq!(
        response_body["results"][2]["problem"]["status"], 404,
        "problem of the unknown type in {response_body}"
    );

    assert_eq!(
        test.stored_count().await,
        1,
        "only the valid item is stored"
    );
    let requests = test.receiver.wait_for_count(1, TIMEOUT).await;
    assert_eq!(requests[0].body_text(), valid_data, "body of the delivery");
    test.receiver.assert_count_stays(1, QUIET_PERIOD).await;
}

#[tokio::test]
async fn batch_empty_or_too_large() {
    let test = TestRouter::start_with(NatsServer::start().await, "max_batch_events = 3").await;

    let response = test
        .post("/v1/events", Some("application/json"), "[]")
        .await;
    let empty = expect_problem(response, 400, "empty batch").await;
    assert!(
        detail(&empty).contains("empty"),
        "detail {:?} does not say the batch is empty",
        detail(&empty)
    );

    let item = format!(
        r#"{{"type":"chat.created","data":{}}}"#,
        chat_created("chat_many")
    );
    let body = format!("[{}]", vec![item; 4].join(","));
    let response = test
        .post("/v1/events", Some("application/json"), body)
        .await;
    let too_large = expect_problem(response, 413, "batch over max_batch_events").await;
    assert!(
        detail(&too_large).contains("4 events"),
        "detail {:?} does not state the batch size",
        detail(&too_large)
    );
    assert!(
        detail(&too_large).contains("limit of 3"),
        "detail {:?} does not state the limit",
        detail(&too_large)
    );

    assert_eq!(test.stored_count().await, 0, "a rejected batch was stored");
}

#[tokio::test]
async fn cloudevent_structured_mode() {
    let test = TestRouter::start().await;
    let body = format!(
        r#"{{"specversion" : "1.0", "id": "ce-structured-1", "source": "/tests/ingress",
  "type": "chat.created", "time": "2025-01-15T09:30:00Z", "data":{ODD_CHAT_CREATED}}}"#
    );

    let response = test
        .post("/v1/events", Some("application/cloudevents+json"), body)
        .await;
    let response_body = expect_accepted(response, "structured CloudEvent").await;

    assert_eq!(response_body["id"], "ce-structured-1", "id in the response");
    assert_eq!(
        response_body["type"], "chat.created",
        "type in the response"
    );
    let requests = test.receiver.wait_for_count(1, TIMEOUT).await;
    let delivery = &requests[0];
    // The data value ends at its closing brace, so the whitespace after it is not data.
    assert_eq!(
        delivery.body_text(),
        ODD_CHAT_CREATED.trim_end(),
        "the sink received other bytes than the CloudEvent data"
    );
    assert_eq!(
        request_header(delivery, "ce-id"),
        "ce-structured-1",
        "ce-id"
    );
    assert_eq!(
        request_header(delivery, "ce-source"),
        "/tests/ingress",
        "ce-source"
    );
    assert_eq!(
        request_header(delivery, "ce-time"),
        "2025-01-15T09:30:00Z",
        "ce-time"
    );
}

#[tokio::test]
async fn cloudevent_invalid_traceparent_dropped() {
    let test = TestRouter::start().await;
    let body = format!(
        r#"{{"specversion": "1.0", "id": "ce-bad-trace", "source": "/tests/ingress",
  "type": "chat.created", "traceparent": "garbage\u0002", "data": {}}}"#,
        chat_created("chat_bad_trace")
    );

    let response = test
        .post("/v1/events", Some("application/cloudevents+json"), body)
        .await;
    let response_body = expect_accepted(response, "CloudEvent with an invalid traceparent").await;

    let stored = test.stored_message(seq_field(&response_body)).await;
    let traceparent = stored
        .headers
        .get("traceparent")
        .map(|value| value.as_str());
    assert_ne!(
        traceparent,
        Some("garbage\u{2}"),
        "the invalid traceparent was stored"
    );
    let requests = test.receiver.wait_for_count(1, TIMEOUT).await;
    assert_eq!(request_header(&requests[0], "ce-id"), "ce-bad-trace");
}

#[tokio::test]
async fn cloudevent_batch_mode() {
    let test = TestRouter::start().await;
    let first_data = chat_created("chat_ce_batch_1");
    let second_data = chat_created("chat_ce_batch_2");
    let body = format!(
        r#"[
  {{"specversion": "1.0", "id": "ce-batch-1", "source": "/tests", "type": "chat.created", "data": {first_data}}},
  {{"specversion": "1.0", "id": "ce-batch-2", "source": "/tests", "type": "chat.created", "data": {second_data}}}
]"#
    );

    let response = test
        .post(
            "/v1/events",
            Some("application/cloudevents-batch+json"),
            body,
        )
        .await;
    let response_body = expect_accepted(response, "CloudEvents batch").await;

    assert_eq!(
        response_body["accepted"], 2,
        "accepted count in {response_body}"
    );
    assert_eq!(
        response_body["results"][0]["id"], "ce-batch-1",
        "id of item 0"
    );
    assert_eq!(
        response_body["results"][1]["id"], "ce-batch-2",
        "id of item 1"
    );
    let requests = test.receiver.wait_for_count(2, TIMEOUT).await;
    let first = delivery_with_body(&requests, &first_data);
    assert_eq!(
        request_header(first, "ce-id"),
        "ce-batch-1",
        "ce-id of item 0"
    );
    let second = delivery_with_body(&requests, &second_data);
    assert_eq!(
        request_header(second, "ce-id"),
        "ce-batch-2",
        "ce-id of item 1"
    );
}

#[tokio::test]
async fn cloudevent_binary_mode() {
    let test = TestRouter::start().await;
    let body = chat_created("chat_binary");
    let headers = [
        ("ce-specversion", "1.0"),
        ("ce-type", "chat.created"),
        ("ce-id", "ce-binary-1"),
        ("ce-source", "/tests/binary"),
    ];

    let response = test
        .post_with_headers("/v1/events", &headers, body.clone())
        .await;
    let response_body = expect_accepted(response, "binary-mode CloudEvent").await;

    assert_eq!(response_body["id"], "ce-binary-1", "id in the response");
    let message = test.stored_message(seq_field(&response_body)).await;
    assert_eq!(message.payload, body.as_bytes(), "stored payload");
    assert_eq!(
        stored_header(&message, "ce-source"),
        "/tests/binary",
        "stored ce-source"
    );
    let requests = test.receiver.wait_for_count(1, TIMEOUT).await;
    assert_eq!(requests[0].body_text(), body, "body of the delivery");
    assert_eq!(
        request_header(&requests[0], "ce-id"),
        "ce-binary-1",
        "ce-id of the delivery"
    );
}

#[tokio::test]
async fn cloudevent_invalid_rejected() {
    let test = TestRouter::start().await;
    let data = chat_created("chat_ce_invalid");

    let missing_id = format!(
        r#"{{"specversion": "1.0", "source": "/tests", "type": "chat.created", "data": {data}}}"#
    );
    let response = test
        .post(
            "/v1/events",
            Some("application/cloudevents+json"),
            missing_id,
        )
        .await;
    let problem_missing_id = expect_problem(response, 400, "CloudEvent without id").await;
    assert!(
        detail(&problem_missing_id).contains("`id`"),
        "detail {:?} does not name the id attribute",
        detail(&problem_missing_id)
    );

    let base64_data = r#"{"specversion": "1.0", "id": "ce-b64", "source": "/tests", "type": "chat.created", "data_base64": "e30="}"#;
    let response = test
        .post(
            "/v1/events",
            Some("application/cloudevents+json"),
            base64_data,
        )
        .await;
    let problem_base64 = expect_problem(response, 415, "CloudEvent with data_base64").await;
    assert!(
        detail(&problem_base64).contains("data_base64"),
        "detail {:?} does not name data_base64",
        detail(&problem_base64)
    );

    assert_eq!(
        test.stored_count().await,
        0,
        "a rejected CloudEvent was stored"
    );
}

#[tokio::test]
async fn nats_outage_then_recovery() {
    let mut test = TestRouter::start().await;
    let before = chat_created("chat_before_outage");
    expect_accepted(
        test.post_event("chat.created", before.clone()).await,
        "before outage",
    )
    .await;
    test.receiver.wait_for_count(1, TIMEOUT).await;

    test.nats.stop().await;
    wait_until(TIMEOUT, || async {
        test.get_status("/readyz").await == 503
    })
    .await;

    let during = chat_created("chat_during_outage");
    let response = test.post_event("chat.created", during).await;
    let retry_after = response
        .headers()
        .get("retry-after")
        .and_then(|value| value.to_str().ok())
        .map(str::to_owned);
    let outage = expect_problem(response, 503, "publish while NATS is down").await;
    assert_eq!(retry_after.as_deref(), Some("3"), "Retry-After of the 503");
    assert!(
        detail(&outage).contains("retry"),
        "detail {:?} does not tell the client to retry",
        detail(&outage)
    );

    let batch = format!(
        r#"[{{"type":"chat.created","data":{}}}]"#,
        chat_created("chat_batch_during_outage")
    );
    let response = test
        .post("/v1/events", Some("application/json"), batch)
        .await;
    expect_problem(response, 503, "batch while NATS is down").await;
    assert_eq!(
        test.get_status("/readyz").await,
        503,
        "/readyz during the outage"
    );
    assert_eq!(
        test.get_status("/healthz").await,
        200,
        "/healthz during the outage"
    );

    test.nats.restart().await;

    // Every try sends the same Idempotency-Key, so a try that timed out after JetStream
    // stored its event cannot add a second one.
    let recovered = chat_created("chat_after_outage");
    wait_until(TIMEOUT, || async {
        let response = test.post_with_key("after-outage-1", &recovered).await;
        response.status().as_u16() == 202
    })
    .await;
    wait_until(TIMEOUT, || async {
        test.get_status("/readyz").await == 200
    })
    .await;
    let later = chat_created("chat_later");
    expect_accepted(
        test.post_event("chat.created", later.clone()).await,
        "after recovery",
    )
    .await;

    let requests = test.receiver.wait_for_count(3, TIMEOUT).await;
    delivery_with_body(&requests, &before);
    let recovered_delivery = delivery_with_body(&requests, &recovered);
    assert_eq!(
        request_header(recovered_delivery, "ce-id"),
        "after-outage-1",
        "ce-id of the event accepted after recovery"
    );
    delivery_with_body(&requests, &later);
}

#[tokio::test]
async fn health_and_readiness() {
    let test = TestRouter::start().await;

    assert_eq!(test.get_status("/healthz").await, 200, "/healthz");
    assert_eq!(test.get_status("/readyz").await, 200, "/readyz");
}
