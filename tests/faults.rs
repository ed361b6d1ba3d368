//! End-to-end fault tests: a router, nats-server or the sink endpoint fails while events
//! flow, and every event that the ingress accepted with 202 must still reach the receiver.
//!
//! Each test runs the built `switchyard` binary against its own nats-server(s) and a
//! capturing receiver on 127.0.0.1, sends a bounded number of events and waits a bounded
//! time. Delivery is at least once, so duplicates are allowed, and the tests print their
//! count (run with `--nocapture`).

mod support;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use futures::StreamExt;
use serde_json::Value;
use support::{NatsServer, Receiver, Router, free_port, http_client_with_timeout, wait_until};
use tokio::task::JoinHandle;

const BIN: &str = env!("CARGO_BIN_EXE_switchyard");

/// The only event type the tests send, and the only one the sink subscribes to.
const EVENT_TYPE: &str = "chat.created";
const SINK_NAME: &str = "faults";
const EVENTS_STREAM: &str = "EVENTS";
const DLQ_STREAM: &str = "DLQ";

/// Delivery settings of the sink. The short ack wait makes JetStream redeliver the messages
/// of a dead router within seconds. The backoff is short and `max_attempts` high, so no
/// outage in these tests exhausts the attempts of an event.
const DELIVERY: &str = r#"concurrency = 8
timeout = "5s"
ack_wait = "2s"
backoff = ["200ms"]
max_attempts = 200
"#;

/// Upper bound on the wait for every accepted event to reach the receiver.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(60);

/// Timeout of one POST to the ingress. It exceeds the configured 1 s publish timeout, so
/// a request times out on the client only when the router hangs.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Lets one test of this file run at a time. Each test times a fault against requests and
/// deliveries in flight, and parallel runs on a small machine stretch those timings.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Returns a router config with one webhook sink for [`EVENT_TYPE`] that posts to
/// `sink_url`, with both streams at `replicas` replicas.
///
/// The 1 s publish timeout bounds how long a request that meets a failing nats-server
/// blocks its load worker, so the workers keep sampling the ingress during an outage.
fn router_config(listen_port: u16, nats_url: &str, sink_url: &str, replicas: usize) -> String {
    format!(
        r#"[server]
listen = "127.0.0.1:{listen_port}"
publish_timeout = "1s"
unavailable_retry_after = "1s"

[nats]
url = "{nats_url}"
connect_timeout = "2s"

[streams.events]
name = "{EVENTS_STREAM}"
max_age = "1h"
duplicate_window = "2m"
replicas = {replicas}

[streams.dlq]
name = "{DLQ_STREAM}"
max_age = "1h"
duplicate_window = "2m"
replicas = {replicas}

[[sinks]]
name = "{SINK_NAME}"
kind = "webhook"
url = "{sink_url}"
events = ["{EVENT_TYPE}"]

[sinks.delivery]
{DELIVERY}"#
    )
}

/// Starts a router on a free port with [`router_config`].
async fn start_router(nats_url: &str, receiver: &Receiver, replicas: usize) -> Router {
    let config = router_config(free_port(), nats_url, &receiver.url("/hook"), replicas);
    Router::start(BIN, &config).await
}

/// Returns the ingress URL for one [`EVENT_TYPE`] event.
fn events_url(router: &Router) -> String {
    router.url(&format!("/v1/events/{EVENT_TYPE}"))
}

/// What one POST to the ingress returned.
#[derive(Clone, Debug)]
enum Outcome {
    /// The router responded with this status and `Retry-After` header.
    Status {
        code: u16,
        retry_after: Option<String>,
    },
    /// No status arrived: the connection was refused or reset, or the request timed out.
    Failed(String),
}

/// One POST to the ingress and its outcome.
#[derive(Clone, Debug)]
struct Attempt {
    id: String,
    sent_at: Instant,
    finished_at: Instant,
    outcome: Outcome,
}

impl Attempt {
    /// Reports whether the ingress responded 202, which promises that the event is stored.
    fn accepted(&self) -> bool {
        matches!(self.outcome, Outcome::Status { code: 202, .. })
    }
}

/// POSTs one valid [`EVENT_TYPE`] event with `id` as its Idempotency-Key.
async fn post_event(client: &reqwest::Client, url: &str, id: &str) -> Attempt {
    let body = serde_json::json!({
        "chat_id": id,
        "created_at": "2025-01-15T09:30:00Z",
        "created_by": "user_1",
        "participants": ["user_1", "user_2"],
    });
    let sent_at = Instant::now();
    let result = client
        .post(url)
        .header("content-type", "application/json")
        .header("idempotency-key", id)
        .body(body.to_string())
        .send()
        .await;
    let outcome = match result {
        Ok(response) => {
            let code = response.status().as_u16();
            let retry_after = response
                .headers()
                .get("retry-after")
                .map(|value| String::from_utf8_lossy(value.as_bytes()).into_owned());
            // Reading the body lets the client reuse the connection. A body cut off by a
            // dying router does not change the status that already arrived.
            let _ = response.bytes().await;
            Outcome::Status { code, retry_after }
        }
        Err(error) => Outcome::Failed(error_chain(&error)),
    };
    Attempt {
        id: id.to_owned(),
        sent_at,
        finished_at: Instant::now(),
        outcome,
    }
}

/// Returns the message of an error followed by the messages of its sources.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut chain = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        chain.push_str(": ");
        chain.push_str(&cause.to_string());
        source = cause.source();
    }
    chain
}

/// POSTs one event per id, 16 at a time, spreading them over `urls` in turn.
async fn post_all(urls: &[String], ids: &[String]) -> Vec<Attempt> {
    let client = http_client_with_timeout(REQUEST_TIMEOUT);
    futures::stream::iter(ids.iter().enumerate())
        .map(|(index, id)| {
            let client = client.clone();
            let url = urls[index % urls.len()].clone();
            async move { post_event(&client, &url, id).await }
        })
        .buffer_unordered(16)
        .collect()
        .await
}

/// Returns the ids of the attempts that got a 202.
fn accepted_ids(attempts: &[Attempt]) -> HashSet<String> {
    attempts
        .iter()
        .filter(|attempt| attempt.accepted())
        .map(|attempt| attempt.id.clone())
        .collect()
}

/// Returns the attempts that got a status other than 202, or 503 with `Retry-After`, the
/// two responses the ingress sends while NATS fails.
fn unexpected_responses(attempts: &[Attempt]) -> Vec<&Attempt> {
    attempts
        .iter()
        .filter(|attempt| match &attempt.outcome {
            Outcome::Status { code: 202, .. } => false,
            Outcome::Status {
                code: 503,
                retry_after,
            } => retry_after.is_none(),
            Outcome::Status { .. } => true,
            Outcome::Failed(_) => false,
        })
        .collect()
}

/// Background tasks that POST events until stopped or until each has sent its maximum.
struct Load {
    stop: Arc<AtomicBool>,
    accepted: Arc<AtomicUsize>,
    workers: Vec<JoinHandle<Vec<Attempt>>>,
}

impl Load {
    /// Starts `workers` tasks that each POST up to `max_per_worker` events with the ids
    /// `{prefix}-{worker}-{n}`, to the routers of `urls` in turn, pausing `pause` after each
    /// response and 20 ms after each failed request.
    fn start(
        urls: Vec<String>,
        prefix: &str,
        workers: usize,
        max_per_worker: usize,
        pause: Duration,
    ) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicUsize::new(0));
        let client = http_client_with_timeout(REQUEST_TIMEOUT);
        let workers = (0..workers)
            .map(|worker| {
                let urls = urls.clone();
                let prefix = prefix.to_owned();
                let stop = stop.clone();
                let accepted = accepted.clone();
                let client = client.clone();
                tokio::spawn(async move {
                    let mut attempts = Vec::new();
                    for n in 0..max_per_worker {
                        if stop.load(Ordering::SeqCst) {
                            break;
                        }
                        let url = &urls[n % urls.len()];
                        let attempt =
                            post_event(&client, url, &format!("{prefix}-{worker}-{n}")).await;
                        let wait = match attempt.outcome {
                            Outcome::Failed(_) => Duration::from_millis(20),
                            Outcome::Status { .. } => pause,
                        };
                        if attempt.accepted() {
                            accepted.fetch_add(1, Ordering::SeqCst);
                        }
                        attempts.push(attempt);
                        tokio::time::sleep(wait).await;
                    }
                    attempts
                })
            })
            .collect();
        Load {
            stop,
            accepted,
            workers,
        }
    }

    /// Returns how many requests got a 202 so far.
    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Waits until at least `count` requests got a 202, panicking after `timeout`.
    async fn wait_accepted(&self, count: usize, timeout: Duration) {
        let accepted = self.accepted.clone();
        wait_until(timeout, || {
            let accepted = accepted.clone();
            async move { accepted.load(Ordering::SeqCst) >= count }
        })
        .await;
    }

    /// Stops the workers after their requests in flight and returns every attempt.
    async fn finish(self) -> Vec<Attempt> {
        self.stop.store(true, Ordering::SeqCst);
        self.join().await
    }

    /// Waits for the workers to send their maximum, or to stop, and returns every attempt.
    async fn join(self) -> Vec<Attempt> {
        let mut attempts = Vec::new();
        for worker in self.workers {
            attempts.extend(worker.await.expect("a load worker panicked"));
        }
        attempts
    }
}

/// Returns, for every event id the receiver got, the arrival times of its requests.
///
/// The id is the `ce-id` header, which the router sets on every delivery attempt.
fn receipts_by_id(receiver: &Receiver) -> HashMap<String, Vec<Instant>> {
    let mut receipts: HashMap<String, Vec<Instant>> = HashMap::new();
    for request in receiver.requests() {
        let id = request
            .header("ce-id")
            .unwrap_or_else(|| panic!("a delivery has no ce-id header: {request:?}"));
        receipts
            .entry(id.to_owned())
            .or_default()
            .push(request.received_at);
    }
    receipts
}

/// Polls the receiver until every id of `expected` has arrived at least once, and returns
/// the ids still missing when `timeout` passes, sorted, or an empty list.
async fn missing_deliveries(
    receiver: &Receiver,
    expected: &HashSet<String>,
    timeout: Duration,
) -> Vec<String> {
    let deadline = Instant::now() + timeout;
    loop {
        let receipts = receipts_by_id(receiver);
        let mut missing: Vec<String> = expected
            .iter()
            .filter(|id| !receipts.contains_key(*id))
            .cloned()
            .collect();
        if missing.is_empty() || Instant::now() >= deadline {
            missing.sort();
            return missing;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Returns the number of requests the receiver captured beyond the first one per event id.
fn duplicate_count(receiver: &Receiver) -> usize {
    receipts_by_id(receiver)
        .values()
        .map(|arrivals| arrivals.len() - 1)
        .sum()
}

/// Returns the `Nats-Msg-Id` of every message in the events stream, read one sequence at a
/// time.
async fn stored_ids(jetstream: &jetstream::Context) -> HashSet<String> {
    let mut stream = jetstream
        .get_stream(EVENTS_STREAM)
        .await
        .expect("failed to look up the events stream");
    let state = stream
        .info()
        .await
        .expect("failed to read the events stream info")
        .state
        .clone();
    let mut ids = HashSet::new();
    if state.messages == 0 {
        return ids;
    }
    for sequence in state.first_sequence..=state.last_sequence {
        let message = stream
            .get_raw_message(sequence)
            .await
            .unwrap_or_else(|error| panic!("failed to read events message {sequence}: {error}"));
        let id = message
            .headers
            .get("Nats-Msg-Id")
            .unwrap_or_else(|| panic!("events message {sequence} has no Nats-Msg-Id header"));
        ids.insert(id.as_str().to_owned());
    }
    ids
}

/// Upper bound of the wait for a stream to answer, which covers a leader election after a
/// node of a cluster is killed.
const STREAM_LOOKUP_TIMEOUT: Duration = Duration::from_secs(30);

/// Returns the number of messages in stream `name`, retrying while the stream has no
/// leader.
async fn message_count(jetstream: &jetstream::Context, name: &str) -> u64 {
    let deadline = Instant::now() + STREAM_LOOKUP_TIMEOUT;
    loop {
        let info = match jetstream.get_stream(name).await {
            Ok(stream) => Ok(stream.cached_info().state.messages),
            Err(error) => Err(error),
        };
        match info {
            Ok(messages) => return messages,
            Err(error) if Instant::now() < deadline => {
                eprintln!("stream {name} not available yet, retrying: {error}");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(error) => {
                panic!("failed to look up stream {name} within {STREAM_LOOKUP_TIMEOUT:?}: {error}")
            }
        }
    }
}

/// Returns the value of the sample of metric `name` whose labels contain `label`, such as
/// `sink="faults"`, from the router's `GET /metrics`.
async fn metric_value(router: &Router, name: &str, label: &str) -> f64 {
    let text = http_client_with_timeout(REQUEST_TIMEOUT)
        .get(router.url("/metrics"))
        .send()
        .await
        .expect("GET /metrics failed")
        .text()
        .await
        .expect("failed to read the GET /metrics body");
    let sample = text
        .lines()
        .find(|line| line.starts_with(&format!("{name}{{")) && line.contains(label))
        .unwrap_or_else(|| panic!("GET /metrics has no {name} sample with {label}:\n{text}"));
    let value = sample.rsplit(' ').next().unwrap_or_default();
    value
        .parse()
        .unwrap_or_else(|error| panic!("invalid value in metric sample {sample:?}: {error}"))
}

/// Returns the last `count` lines of a log, for panic messages.
fn tail(log: &str, count: usize) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(count)..].join("\n")
}

/// Returns the first ids of a sorted list, for panic messages.
fn sample(ids: &[String]) -> &[String] {
    &ids[..ids.len().min(10)]
}

/// SIGKILL of the router with 8 deliveries in flight: every accepted event still
/// arrives, and each delivery cut off by the kill is sent again after the restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_kill_mid_delivery() {
    const EVENTS: usize = 300;
    // The receiver delays each response this long, so about 8 requests are in flight at any
    // moment.
    const RECEIVER_DELAY: Duration = Duration::from_millis(200);
    let _serial = SERIAL.lock().await;

    let nats = NatsServer::start().await;
    let receiver = Receiver::start().await;
    receiver.set_delay(RECEIVER_DELAY);
    let mut router = start_router(&nats.url(), &receiver, 1).await;

    let ids: Vec<String> = (0..EVENTS).map(|n| format!("kill-{n}")).collect();
    let attempts = post_all(&[events_url(&router)], &ids).await;
    let accepted = accepted_ids(&attempts);
    assert_eq!(
        accepted.len(),
        EVENTS,
        "the ingress did not accept every event before the fault: {:?}",
        attempts.iter().find(|attempt| !attempt.accepted())
    );

    // Waiting for a request that has not arrived yet puts the kill right after an arrival,
    // so at least that delivery is in flight.
    let kill_after = receiver.count().max(32) + 8;
    receiver
        .wait_for_count(kill_after, Duration::from_secs(30))
        .await;
    let killed_at = Instant::now();
    router.kill().await;
    let seen_before_kill = receipts_by_id(&receiver);
    assert!(
        seen_before_kill.len() < accepted.len(),
        "every event arrived before the kill, so the kill interrupted nothing"
    );
    // A request that arrived less than half the receiver delay before the kill had its
    // response sent after the router died, so the router never acknowledged its message.
    let cut_off: HashSet<String> = seen_before_kill
        .iter()
        .filter(|(_, arrivals)| {
            arrivals
                .iter()
                .any(|arrival| *arrival + RECEIVER_DELAY / 2 > killed_at)
        })
        .map(|(id, _)| id.clone())
        .collect();
    assert!(
        !cut_off.is_empty(),
        "no delivery was in flight when the router was killed"
    );

    let restarting_at = Instant::now();
    router.restart().await;
    let missing = missing_deliveries(&receiver, &accepted, DELIVERY_TIMEOUT).await;
    assert!(
        missing.is_empty(),
        "{} of {} accepted events never reached the receiver, e.g. {:?}. Router log tail:\n{}",
        missing.len(),
        accepted.len(),
        sample(&missing),
        tail(&router.logs(), 40)
    );

    let receipts = receipts_by_id(&receiver);
    let mut not_redelivered: Vec<String> = cut_off
        .iter()
        .filter(|id| !receipts[*id].iter().any(|arrival| *arrival > restarting_at))
        .cloned()
        .collect();
    not_redelivered.sort();
    assert!(
        not_redelivered.is_empty(),
        "{} of {} deliveries cut off by the kill were not sent again after the restart: {:?}",
        not_redelivered.len(),
        cut_off.len(),
        sample(&not_redelivered)
    );
    assert_eq!(message_count(&nats.jetstream().await, DLQ_STREAM).await, 0);

    println!(
        "router_kill_mid_delivery: accepted {}, seen before the kill {}, cut off by the kill {}, \
         lost 0, duplicates {}",
        accepted.len(),
        seen_before_kill.len(),
        cut_off.len(),
        duplicate_count(&receiver)
    );
}

/// SIGKILL of the router while 8 clients publish: every event accepted with 202 is in the
/// events stream, and the restarted router delivers all of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_kill_under_publish_load() {
    let _serial = SERIAL.lock().await;

    let nats = NatsServer::start().await;
    let receiver = Receiver::start().await;
    let mut router = start_router(&nats.url(), &receiver, 1).await;

    let load = Load::start(vec![events_url(&router)], "ingress", 8, 100, Duration::ZERO);
    load.wait_accepted(150, Duration::from_secs(30)).await;
    let killed_at = Instant::now();
    router.kill().await;
    // The clients keep sending for a moment, so requests meet the closed port too.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let attempts = load.finish().await;

    let accepted = accepted_ids(&attempts);
    let cut_off: Vec<&str> = attempts
        .iter()
        .filter(|attempt| attempt.sent_at < killed_at && attempt.finished_at >= killed_at)
        .filter_map(|attempt| match &attempt.outcome {
            Outcome::Failed(error) => Some(error.as_str()),
            Outcome::Status { .. } => None,
        })
        .collect();
    let unexpected: Vec<&Attempt> = attempts
        .iter()
        .filter(|attempt| matches!(attempt.outcome, Outcome::Status { code, .. } if code != 202))
        .collect();
    assert!(
        unexpected.is_empty(),
        "the ingress responded other than 202: {:?}",
        &unexpected[..unexpected.len().min(5)]
    );
    assert!(
        !cut_off.is_empty(),
        "no request was in flight when the router was killed"
    );

    let stored = stored_ids(&nats.jetstream().await).await;
    let mut lost: Vec<String> = accepted.difference(&stored).cloned().collect();
    lost.sort();
    assert!(
        lost.is_empty(),
        "{} of {} events accepted with 202 are not in the events stream, e.g. {:?}",
        lost.len(),
        accepted.len(),
        sample(&lost)
    );

    router.restart().await;
    let missing = missing_deliveries(&receiver, &accepted, DELIVERY_TIMEOUT).await;
    assert!(
        missing.is_empty(),
        "{} of {} accepted events never reached the receiver, e.g. {:?}. Router log tail:\n{}",
        missing.len(),
        accepted.len(),
        sample(&missing),
        tail(&router.logs(), 40)
    );

    println!(
        "router_kill_under_publish_load: requests {}, accepted {}, cut off by the kill {}, \
         stored without a 202 {}, lost 0, duplicates {}; a cut-off request failed with: {}",
        attempts.len(),
        accepted.len(),
        cut_off.len(),
        stored.len() - accepted.len(),
        duplicate_count(&receiver),
        cut_off[0]
    );
}

/// nats-server stopped for 2 s under load: the ingress responds 503 with Retry-After
/// meanwhile, accepts again after the restart without a router restart, and every accepted
/// event is stored and delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_outage_under_load() {
    const OUTAGE: Duration = Duration::from_secs(2);
    let _serial = SERIAL.lock().await;

    let mut nats = NatsServer::start().await;
    let receiver = Receiver::start().await;
    let mut router = start_router(&nats.url(), &receiver, 1).await;
    let router_pid = router.pid();

    let load = Load::start(
        vec![events_url(&router)],
        "outage",
        2,
        400,
        Duration::from_millis(40),
    );
    load.wait_accepted(40, Duration::from_secs(30)).await;
    nats.stop().await;
    let stopped_at = Instant::now();
    tokio::time::sleep(OUTAGE).await;
    let restarting_at = Instant::now();
    nats.restart().await;

    // async-nats 0.52 waits at most 4 s between reconnect attempts, so 202s resume within
    // seconds.
    let accepted_before_restart = load.accepted();
    load.wait_accepted(accepted_before_restart + 40, Duration::from_secs(30))
        .await;
    let attempts = load.finish().await;

    assert_eq!(
        router.pid(),
        router_pid,
        "the router process changed during the outage"
    );
    assert!(router.is_running(), "the router exited during the outage");

    let unexpected = unexpected_responses(&attempts);
    assert!(
        unexpected.is_empty(),
        "the ingress responded other than 202, or 503 with Retry-After: {:?}",
        &unexpected[..unexpected.len().min(5)]
    );
    // Requests sent after the server exited and finished before it started again cannot
    // have been stored.
    let during_outage: Vec<&Attempt> = attempts
        .iter()
        .filter(|attempt| attempt.sent_at >= stopped_at && attempt.finished_at <= restarting_at)
        .collect();
    assert!(
        during_outage.len() >= 5,
        "only {} requests fell inside the outage",
        during_outage.len()
    );
    for attempt in &during_outage {
        match &attempt.outcome {
            Outcome::Status { code, retry_after } => {
                assert_eq!(
                    *code, 503,
                    "event {} got {code} while nats-server was down",
                    attempt.id
                );
                let retry_after = retry_after
                    .as_deref()
                    .unwrap_or_else(|| panic!("the 503 for {} has no Retry-After", attempt.id));
                assert!(
                    retry_after.parse::<u64>().is_ok(),
                    "Retry-After {retry_after:?} is not a number of seconds"
                );
            }
            Outcome::Failed(_) => {}
        }
    }
    let accepted_after_restart = attempts
        .iter()
        .filter(|attempt| attempt.sent_at > restarting_at && attempt.accepted())
        .count();
    assert!(
        accepted_after_restart > 0,
        "no request sent after the restart was accepted"
    );

    let accepted = accepted_ids(&attempts);
    let stored = stored_ids(&nats.jetstream().await).await;
    let mut lost: Vec<String> = accepted.difference(&stored).cloned().collect();
    lost.sort();
    assert!(
        lost.is_empty(),
        "{} of {} events accepted with 202 are not in the events stream, e.g. {:?}",
        lost.len(),
        accepted.len(),
        sample(&lost)
    );
    let missing = missing_deliveries(&receiver, &accepted, DELIVERY_TIMEOUT).await;
    assert!(
        missing.is_empty(),
        "{} of {} accepted events never reached the receiver, e.g. {:?}. Router log tail:\n{}",
        missing.len(),
        accepted.len(),
        sample(&missing),
        tail(&router.logs(), 40)
    );

    let unavailable = attempts
        .iter()
        .filter(|attempt| matches!(attempt.outcome, Outcome::Status { code: 503, .. }))
        .count();
    let failed = attempts
        .iter()
        .filter(|attempt| matches!(attempt.outcome, Outcome::Failed(_)))
        .count();
    println!(
        "nats_outage_under_load: requests {}, accepted {}, 503 {}, failed without status {}, \
         inside the outage {}, accepted after the restart {}, stored without a 202 {}, lost 0, \
         duplicates {}",
        attempts.len(),
        accepted.len(),
        unavailable,
        failed,
        during_outage.len(),
        accepted_after_restart,
        stored.len() - accepted.len(),
        duplicate_count(&receiver)
    );
}

/// The receiver refuses connections for 3 s while events flow: the router retries, and
/// after the receiver is back every accepted event arrives and none is dead-lettered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sink_outage_retries() {
    const OUTAGE: Duration = Duration::from_secs(3);
    let _serial = SERIAL.lock().await;

    let nats = NatsServer::start().await;
    let mut receiver = Receiver::start().await;
    let router = start_router(&nats.url(), &receiver, 1).await;

    let load = Load::start(
        vec![events_url(&router)],
        "sink",
        1,
        200,
        Duration::from_millis(20),
    );
    receiver.wait_for_count(30, Duration::from_secs(30)).await;
    receiver.stop().await;
    let stopped_at = Instant::now();
    tokio::time::sleep(OUTAGE).await;
    receiver.restart().await;
    let restarted_at = Instant::now();
    let attempts = load.join().await;

    let accepted = accepted_ids(&attempts);
    assert_eq!(
        accepted.len(),
        attempts.len(),
        "the ingress rejected events while only the sink was down: {:?}",
        attempts.iter().find(|attempt| !attempt.accepted())
    );
    let accepted_during_outage: HashSet<String> = attempts
        .iter()
        .filter(|attempt| attempt.finished_at >= stopped_at && attempt.finished_at < restarted_at)
        .map(|attempt| attempt.id.clone())
        .collect();
    assert!(
        accepted_during_outage.len() >= 10,
        "only {} events were accepted during the sink outage",
        accepted_during_outage.len()
    );

    let missing = missing_deliveries(&receiver, &accepted, DELIVERY_TIMEOUT).await;
    assert!(
        missing.is_empty(),
        "{} of {} accepted events never reached the receiver, e.g. {:?}. Router log tail:\n{}",
        missing.len(),
        accepted.len(),
        sample(&missing),
        tail(&router.logs(), 40)
    );
    // Events accepted during the outage could only arrive after the restart, so at least
    // some of them went through failed attempts first.
    let receipts = receipts_by_id(&receiver);
    let delayed_by_outage = accepted_during_outage
        .iter()
        .filter(|id| receipts[*id].iter().all(|arrival| *arrival >= restarted_at))
        .count();
    assert!(
        delayed_by_outage > 0,
        "no event accepted during the sink outage waited for the receiver to restart"
    );
    assert_eq!(
        message_count(&nats.jetstream().await, DLQ_STREAM).await,
        0,
        "events were dead-lettered. Router log tail:\n{}",
        tail(&router.logs(), 40)
    );

    let retries = metric_value(
        &router,
        "switchyard_retries_total",
        &format!("sink=\"{SINK_NAME}\""),
    )
    .await;
    assert!(retries > 0.0, "the router counted no retries");
    println!(
        "sink_outage_retries: accepted {}, accepted during the outage {}, delivered only after \
         the restart {}, retries {}, lost 0, duplicates {}, dead letters 0",
        accepted.len(),
        accepted_during_outage.len(),
        delayed_by_outage,
        retries,
        duplicate_count(&receiver)
    );
}

/// Returns the ids of the events that a router's JSON log reports as delivered.
///
/// The worker logs the message `delivered` inside a `deliver` span whose `event.id` field
/// is the event id. Lines that are not JSON, such as the harness's restart marker, are
/// skipped.
fn delivered_in_log(log: &str) -> HashSet<String> {
    let mut ids = HashSet::new();
    for line in log.lines() {
        let Ok(entry) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        if entry["message"] != "delivered" {
            continue;
        }
        let spans = entry["spans"].as_array().into_iter().flatten();
        let id = spans
            .chain(std::iter::once(&entry["span"]))
            .find_map(|span| span["event.id"].as_str());
        if let Some(id) = id {
            ids.insert(id.to_owned());
        }
    }
    ids
}

/// Two routers with the same config on one nats-server share the sink's durable consumer:
/// together they deliver every event, and each delivers a share.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_routers_split_work() {
    const EVENTS: usize = 200;
    let _serial = SERIAL.lock().await;

    let nats = NatsServer::start().await;
    let receiver = Receiver::start().await;
    receiver.set_delay(Duration::from_millis(20));
    let sink_url = receiver.url("/hook");
    let mut routers = Vec::new();
    for _ in 0..2 {
        let config = router_config(free_port(), &nats.url(), &sink_url, 1);
        let router = Router::builder(BIN, &config)
            .env("SWITCHYARD_LOG_FORMAT", "json")
            .env("RUST_LOG", "info,switchyard_sinks=debug")
            .start()
            .await;
        routers.push(router);
    }

    let urls: Vec<String> = routers.iter().map(events_url).collect();
    let ids: Vec<String> = (0..EVENTS).map(|n| format!("split-{n}")).collect();
    let attempts = post_all(&urls, &ids).await;
    let accepted = accepted_ids(&attempts);
    assert_eq!(
        accepted.len(),
        EVENTS,
        "the ingress did not accept every event: {:?}",
        attempts.iter().find(|attempt| !attempt.accepted())
    );

    let missing = missing_deliveries(&receiver, &accepted, DELIVERY_TIMEOUT).await;
    assert!(
        missing.is_empty(),
        "{} of {} accepted events never reached the receiver, e.g. {:?}",
        missing.len(),
        accepted.len(),
        sample(&missing)
    );
    // A router logs `delivered` after the receiver responded, so the logs may lag a moment.
    wait_until(Duration::from_secs(10), || {
        let logged: HashSet<String> = routers
            .iter()
            .flat_map(|router| delivered_in_log(&router.logs()))
            .collect();
        let complete = accepted.is_subset(&logged);
        async move { complete }
    })
    .await;

    let shares: Vec<HashSet<String>> = routers
        .iter()
        .map(|router| delivered_in_log(&router.logs()))
        .collect();
    let minimum_share = EVENTS / 10;
    for (index, share) in shares.iter().enumerate() {
        assert!(
            share.len() >= minimum_share,
            "router {index} delivered {} of {EVENTS} events, fewer than {minimum_share}",
            share.len()
        );
    }
    let by_both = shares[0].intersection(&shares[1]).count();
    println!(
        "two_routers_split_work: accepted {}, delivered by router 0 {}, by router 1 {}, \
         by both {}, lost 0, duplicates {}",
        accepted.len(),
        shares[0].len(),
        shares[1].len(),
        by_both,
        duplicate_count(&receiver)
    );
}

/// Returns the config of one node of a 3-node cluster named `faults`.
///
/// The harness adds the client address, port, JetStream and store folder flags.
fn cluster_node_config(name: &str, cluster_port: u16, peer_ports: &[u16]) -> String {
    let routes: String = peer_ports
        .iter()
        .map(|port| format!("    nats-route://127.0.0.1:{port}\n"))
        .collect();
    format!(
        "server_name: {name}
cluster {{
  name: faults
  listen: 127.0.0.1:{cluster_port}
  routes: [
{routes}  ]
}}
"
    )
}

/// A 3-node cluster with both streams at 3 replicas loses the leader of the events stream
/// to SIGKILL under load: publishing resumes on the other two nodes, and every accepted
/// event is delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_node_loss() {
    let _serial = SERIAL.lock().await;

    let names = ["n1", "n2", "n3"];
    let cluster_ports: Vec<u16> = names.iter().map(|_| free_port()).collect();
    let mut nodes = Vec::new();
    for (index, name) in names.iter().enumerate() {
        let peers: Vec<u16> = cluster_ports
            .iter()
            .enumerate()
            .filter(|(peer, _)| *peer != index)
            .map(|(_, port)| *port)
            .collect();
        let config = cluster_node_config(name, cluster_ports[index], &peers);
        nodes.push(NatsServer::start_with_config(&config).await);
    }
    let nats_url = nodes
        .iter()
        .map(NatsServer::url)
        .collect::<Vec<_>>()
        .join(",");

    // A meta leader can respond before it counts all three nodes as peers, and until then
    // a stream with 3 replicas fails with "no suitable peers for placement". A probe
    // stream of 3 replicas is created, and deleted, once placement works.
    let jetstream = nodes[0].jetstream().await;
    wait_until(Duration::from_secs(30), || {
        let jetstream = jetstream.clone();
        async move {
            let probe = jetstream
                .create_stream(jetstream::stream::Config {
                    name: "PLACEMENT_PROBE".to_owned(),
                    subjects: vec!["placement-probe".to_owned()],
                    num_replicas: 3,
                    ..Default::default()
                })
                .await;
            probe.is_ok()
        }
    })
    .await;
    jetstream
        .delete_stream("PLACEMENT_PROBE")
        .await
        .expect("failed to delete the placement probe stream");

    let receiver = Receiver::start().await;
    let router = start_router(&nats_url, &receiver, 3).await;

    let load = Load::start(
        vec![events_url(&router)],
        "cluster",
        2,
        400,
        Duration::from_millis(25),
    );
    load.wait_accepted(50, Duration::from_secs(30)).await;

    let leader = jetstream
        .get_stream(EVENTS_STREAM)
        .await
        .expect("failed to look up the events stream")
        .info()
        .await
        .expect("failed to read the events stream info")
        .cluster
        .clone()
        .and_then(|cluster| cluster.leader)
        .expect("the events stream has no leader");
    let leader_index = names
        .iter()
        .position(|name| *name == leader)
        .unwrap_or_else(|| panic!("the events stream leader {leader:?} is not a node name"));
    nodes[leader_index].kill().await;
    let killed_at = Instant::now();

    let accepted_before_kill = load.accepted();
    load.wait_accepted(accepted_before_kill + 50, Duration::from_secs(30))
        .await;
    let attempts = load.finish().await;

    let accepted = accepted_ids(&attempts);
    let accepted_after_kill: Vec<&Attempt> = attempts
        .iter()
        .filter(|attempt| attempt.sent_at > killed_at && attempt.accepted())
        .collect();
    let resumed_after = accepted_after_kill
        .iter()
        .map(|attempt| attempt.finished_at - killed_at)
        .min()
        .expect("no request sent after the node loss was accepted");
    let unexpected = unexpected_responses(&attempts);
    assert!(
        unexpected.is_empty(),
        "the ingress responded other than 202, or 503 with Retry-After: {:?}",
        &unexpected[..unexpected.len().min(5)]
    );

    let survivor = &nodes[(leader_index + 1) % nodes.len()];
    let survivor_jetstream = survivor.jetstream().await;
    let stored = stored_ids(&survivor_jetstream).await;
    let mut lost: Vec<String> = accepted.difference(&stored).cloned().collect();
    lost.sort();
    assert!(
        lost.is_empty(),
        "{} of {} events accepted with 202 are not in the events stream, e.g. {:?}",
        lost.len(),
        accepted.len(),
        sample(&lost)
    );
    let missing = missing_deliveries(&receiver, &accepted, DELIVERY_TIMEOUT).await;
    assert!(
        missing.is_empty(),
        "{} of {} accepted events never reached the receiver, e.g. {:?}. Router log tail:\n{}",
        missing.len(),
        accepted.len(),
        sample(&missing),
        tail(&router.logs(), 40)
    );
    assert_eq!(message_count(&survivor_jetstream, DLQ_STREAM).await, 0);

    let not_accepted = attempts.len() - accepted.len();
    println!(
        "cluster_node_loss: killed {leader}, requests {}, accepted {}, not accepted {}, \
         accepted after the kill {}, first 202 after the kill {resumed_after:?}, lost 0, \
         duplicates {}",
        attempts.len(),
        accepted.len(),
        not_accepted,
        accepted_after_kill.len(),
        duplicate_count(&receiver)
    );
}
