//! Checks of the end-to-end test harness itself: the NATS server wrapper and the capturing
//! receiver. The router wrapper is covered by the end-to-end tests that use it.

mod support;

use std::time::Duration;

use async_nats::jetstream::stream::{Config as StreamConfig, StorageType};
use support::{NatsServer, Receiver, Response, free_port, http_client, wait_until};

const TIMEOUT: Duration = Duration::from_secs(10);

/// Creates a file-backed stream `HARNESS` on `harness.>` and publishes one message to it,
/// returning the stream sequence of that message.
async fn publish_one(server: &NatsServer, payload: &'static str) -> u64 {
    let jetstream = server.jetstream().await;
    jetstream
        .create_stream(StreamConfig {
            name: "HARNESS".to_owned(),
            subjects: vec!["harness.>".to_owned()],
            storage: StorageType::File,
            ..Default::default()
        })
        .await
        .expect("failed to create stream HARNESS");
    let ack = jetstream
        .publish("harness.one", payload.into())
        .await
        .expect("failed to publish to harness.one")
        .await
        .expect("JetStream did not acknowledge the publish");
    assert_eq!(ack.stream, "HARNESS");
    ack.sequence
}

/// Reads one message of stream `HARNESS` back through a new connection.
async fn read_back(server: &NatsServer, sequence: u64) -> bytes::Bytes {
    let jetstream = server.jetstream().await;
    let stream = jetstream
        .get_stream("HARNESS")
        .await
        .expect("stream HARNESS is missing");
    stream
        .get_raw_message(sequence)
        .await
        .expect("failed to read the message back")
        .payload
}

#[tokio::test]
async fn nats_message_survives_restart() {
    let mut server = NatsServer::start().await;
    let port = server.port();
    assert_eq!(server.url(), format!("nats://127.0.0.1:{port}"));
    let sequence = publish_one(&server, "before restart").await;

    server.restart().await;

    assert_eq!(server.port(), port);
    assert!(server.is_running());
    assert_eq!(read_back(&server, sequence).await, "before restart");
}

#[tokio::test]
async fn nats_message_survives_kill() {
    let mut server = NatsServer::start().await;
    let sequence = publish_one(&server, "before kill").await;

    server.kill().await;
    assert!(!server.is_running());
    let refused = tokio::net::TcpStream::connect(("127.0.0.1", server.port())).await;
    assert!(
        refused.is_err(),
        "a killed server still accepts connections"
    );
    server.restart().await;

    assert_eq!(read_back(&server, sequence).await, "before kill");
}

#[tokio::test]
async fn nats_config_file_reaches_server() {
    let server = NatsServer::start_with_config("max_payload: 4096\n").await;
    let client = server.client().await;

    assert_eq!(client.server_info().max_payload, 4096);
    assert_eq!(client.server_info().port, server.port());
}

#[tokio::test]
async fn nats_extra_args_reach_server() {
    let server = NatsServer::start_with_args(&["--server_name", "harness-check"]).await;
    let client = server.client().await;

    assert_eq!(client.server_info().server_name, "harness-check");
}

#[test]
fn nats_version_parsing() {
    use support::nats::parse_version;

    assert_eq!(parse_version("nats-server: v2.15.1\n"), Some((2, 15)));
    assert_eq!(parse_version("nats-server: v2.9.10"), Some((2, 9)));
    assert_eq!(parse_version("nats-server: v2.11.0-RC.1"), Some((2, 11)));
    assert_eq!(parse_version("version 2.10.0"), None);
}

#[tokio::test]
async fn receiver_script_then_default() {
    let receiver = Receiver::start().await;
    receiver.set_script(vec![
        Response::new(503).with_header("Retry-After", "2"),
        Response::new(201).with_body("created"),
    ]);
    let client = http_client();
    let url = receiver.url("/hook?source=test");

    let first = client
        .post(&url)
        .body("one")
        .send()
        .await
        .expect("request 1 failed");
    assert_eq!(first.status(), 503);
    assert_eq!(first.headers()["retry-after"], "2");

    let second = client
        .post(&url)
        .body("two")
        .send()
        .await
        .expect("request 2 failed");
    assert_eq!(second.status(), 201);
    assert_eq!(
        second.text().await.expect("failed to read body 2"),
        "created"
    );

    let third = client
        .post(&url)
        .body("three")
        .send()
        .await
        .expect("request 3 failed");
    assert_eq!(third.status(), 200);

    receiver.set_status(500);
    let fourth = client
        .post(&url)
        .body("four")
        .send()
        .await
        .expect("request 4 failed");
    assert_eq!(fourth.status(), 500);

    let requests = receiver.wait_for_count(4, TIMEOUT).await;
    let bodies: Vec<&str> = requests.iter().map(|request| request.body_text()).collect();
    assert_eq!(bodies, ["one", "two", "three", "four"]);
    assert_eq!(requests[0].method, "POST");
    assert_eq!(requests[0].path, "/hook");
    assert_eq!(requests[0].query.as_deref(), Some("source=test"));
    assert_eq!(receiver.count(), 4);
}

#[tokio::test]
async fn receiver_captures_headers_and_json() {
    let receiver = Receiver::start().await;

    let response = http_client()
        .put(receiver.url("events"))
        .header("X-Switchyard-Event", "order.created")
        .header("Content-Type", "application/json")
        .body(r#"{"id": 7}"#)
        .send()
        .await
        .expect("request failed");
    assert_eq!(response.status(), 200);

    let requests = receiver.wait_for_count(1, TIMEOUT).await;
    let request = &requests[0];
    assert_eq!(request.method, "PUT");
    assert_eq!(request.path, "/events");
    assert_eq!(request.query, None);
    assert_eq!(request.header("x-switchyard-event"), Some("order.created"));
    assert_eq!(request.header("Content-Type"), Some("application/json"));
    assert!(
        request
            .headers
            .iter()
            .any(|(name, _)| name == "x-switchyard-event"),
        "header names are not lowercased: {:?}",
        request.headers
    );
    assert_eq!(request.json()["id"], 7);
}

#[tokio::test]
async fn receiver_counts_concurrent_requests() {
    let receiver = Receiver::start().await;
    receiver.set_delay(Duration::from_millis(300));
    let client = http_client();
    let url = receiver.url("/slow");

    let started = std::time::Instant::now();
    let responses =
        futures::future::join_all((0..3).map(|_| client.post(&url).body("x").send())).await;
    for response in responses {
        assert_eq!(response.expect("request failed").status(), 200);
    }
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_eq!(receiver.max_concurrent(), 3);

    receiver.clear();
    receiver.set_script(vec![Response::new(200).with_delay(Duration::ZERO)]);
    let response = client.post(&url).send().await.expect("request failed");
    assert_eq!(response.status(), 200);
    assert_eq!(receiver.max_concurrent(), 1);
    assert_eq!(receiver.count(), 1);
}

#[tokio::test]
async fn receiver_stop_and_restart() {
    let mut receiver = Receiver::start().await;
    let client = http_client();
    let url = receiver.url("/");
    client
        .get(&url)
        .send()
        .await
        .expect("request before stop failed");

    receiver.stop().await;
    let refused = client.get(&url).send().await;
    assert!(refused.is_err(), "a stopped receiver still answered");

    receiver.restart().await;
    let response = client
        .get(&url)
        .send()
        .await
        .expect("request after restart failed");
    assert_eq!(response.status(), 200);
    assert_eq!(receiver.count(), 2);
}

#[tokio::test]
async fn receiver_count_stays() {
    let receiver = Receiver::start().await;
    http_client()
        .get(receiver.url("/once"))
        .send()
        .await
        .expect("request failed");

    receiver
        .assert_count_stays(1, Duration::from_millis(200))
        .await;
}

#[tokio::test]
#[should_panic(expected = "expected at least 2 requests within 200ms, got 0")]
async fn receiver_wait_for_count_timeout() {
    let receiver = Receiver::start().await;
    receiver.wait_for_count(2, Duration::from_millis(200)).await;
}

#[tokio::test]
async fn wait_until_polls_condition() {
    let started = tokio::time::Instant::now();
    wait_until(TIMEOUT, || async move {
        started.elapsed() >= Duration::from_millis(100)
    })
    .await;
}

#[tokio::test]
#[should_panic(expected = "was still false after 100ms")]
async fn wait_until_timeout() {
    wait_until(Duration::from_millis(100), || async { false }).await;
}

#[test]
fn free_port_unique() {
    let ports: std::collections::HashSet<u16> = (0..20).map(|_| free_port()).collect();
    assert_eq!(ports.len(), 20);
}
