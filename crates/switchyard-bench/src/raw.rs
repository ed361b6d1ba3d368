//! The baselines: a bare ingress handler that publishes to JetStream and a bare pull
//! consumer that posts each message to the receiver, with none of Switchyard's checks.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream::{self, AckKind, consumer};
use axum::Router;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::post;
use bytes::Bytes;
use futures::StreamExt;
use tokio::runtime::Handle;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinHandle;

/// Counter behind the `Nats-Msg-Id` of the raw ingress, unique for the whole run so that
/// no publish is dropped as a duplicate.
static NEXT_RAW_ID: AtomicU64 = AtomicU64::new(0);

/// How long one pull request waits before it is renewed, as in the sink worker.
const PULL_EXPIRES: Duration = Duration::from_secs(5);

/// `POST /raw/{type}` on 127.0.0.1, which publishes the body to `events.<type>`, waits for
/// the ack and returns 202.
pub struct RawIngress {
    base_url: String,
    task: JoinHandle<()>,
}

impl RawIngress {
    /// Serves on the runtime of `handle`; `jetstream` should be connected from it too.
    pub async fn start(handle: &Handle, jetstream: jetstream::Context) -> anyhow::Result<Self> {
        let listener = handle
            .spawn(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .await?
            .context("failed to bind the raw ingress to 127.0.0.1")?;
        let addr = listener.local_addr()?;
        let app = Router::new()
            .route("/raw/{event_type}", post(publish))
            .with_state(jetstream);
        let task = handle.spawn(async move {
            if let Err(err) = axum::serve(listener, app).await {
                eprintln!("raw ingress stopped: {err}");
            }
        });
        Ok(Self {
            base_url: format!("http://{addr}"),
            task,
        })
    }

    pub fn url(&self, event_type: &str) -> String {
        format!("{}/raw/{event_type}", self.base_url)
    }
}

impl Drop for RawIngress {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn publish(
    State(jetstream): State<jetstream::Context>,
    Path(event_type): Path<String>,
    body: Bytes,
) -> StatusCode {
    let id = format!("raw-{}", NEXT_RAW_ID.fetch_add(1, Ordering::Relaxed));
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Msg-Id", id.as_str());
    let subject = format!("events.{event_type}");
    let Ok(ack) = jetstream.publish_with_headers(subject, headers, body).await else {
        return StatusCode::SERVICE_UNAVAILABLE;
    };
    match ack.await {
        Ok(_) => StatusCode::ACCEPTED,
        Err(_) => StatusCode::SERVICE_UNAVAILABLE,
    }
}

/// A durable pull consumer that posts every payload to `url` and acks after a 2xx.
///
/// It pulls like the sink worker: one batch request for as many messages as there are free
/// delivery slots, so at most `concurrency` deliveries run at once.
pub struct RawConsumer {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl RawConsumer {
    /// Creates the consumer on `stream` and delivers on the runtime of `handle`.
    pub async fn start(
        handle: &Handle,
        stream: &jetstream::stream::Stream,
        name: &str,
        deliver_policy: consumer::DeliverPolicy,
        client: reqwest::Client,
        url: &str,
        concurrency: usize,
    ) -> anyhow::Result<Self> {
        let config = consumer::pull::Config {
            durable_name: Some(name.to_owned()),
            name: Some(name.to_owned()),
            filter_subject: "events.chat.created".to_owned(),
            deliver_policy,
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait: Duration::from_secs(30),
            max_ack_pending: 10_000,
            ..Default::default()
        };
        let consumer = stream
            .create_consumer(config)
            .await
            .with_context(|| format!("failed to create the consumer {name}"))?;
        let (stop, stopped) = watch::channel(false);
        let url: Arc<str> = Arc::from(url);
        let task = handle.spawn(run(consumer, client, url, concurrency, stopped));
        Ok(Self { stop, task })
    }

    /// Stops pulling and waits for the deliveries in flight.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

async fn run(
    consumer: consumer::PullConsumer,
    client: reqwest::Client,
    url: Arc<str>,
    concurrency: usize,
    mut stopped: watch::Receiver<bool>,
) {
    let slots = Arc::new(Semaphore::new(concurrency));
    'pull: loop {
        let first = tokio::select! {
            _ = stopped.wait_for(|stop| *stop) => break,
            permit = slots.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
        };
        let mut permits = vec![first];
        while let Ok(permit) = slots.clone().try_acquire_owned() {
            permits.push(permit);
        }
        let batch = consumer
            .batch()
            .max_messages(permits.len())
            .expires(PULL_EXPIRES)
            .messages()
            .await;
        let mut batch = match batch {
            Ok(batch) => batch,
            Err(err) => {
                eprintln!("raw consumer: pull request failed: {err}");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        loop {
            let next = tokio::select! {
                _ = stopped.wait_for(|stop| *stop) => break 'pull,
                next = batch.next() => next,
            };
            let Some(Ok(message)) = next else { break };
            let Some(permit) = permits.pop() else { break };
            let client = client.clone();
            let url = url.clone();
            tokio::spawn(async move {
                deliver(&client, &url, message).await;
                drop(permit);
            });
        }
    }
    let in_flight = u32::try_from(concurrency).unwrap_or(u32::MAX);
    let _ = slots.acquire_many(in_flight).await;
}

async fn deliver(client: &reqwest::Client, url: &str, message: jetstream::Message) {
    let delivered = match client
        .post(url)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(message.payload.clone())
        .send()
        .await
    {
        Ok(response) => {
            let success = response.status().is_success();
            let _ = response.bytes().await;
            success
        }
        Err(_) => false,
    };
    let kind = if delivered {
        AckKind::Ack
    } else {
        AckKind::Nak(Some(Duration::from_millis(100)))
    };
    if let Err(err) = message.ack_with(kind).await {
        eprintln!("raw consumer: ack failed: {err}");
    }
}
