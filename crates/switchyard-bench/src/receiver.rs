//! The webhook receiver that both delivery paths post to. It returns 204, counts requests,
//! and records the end-to-end latency of each payload while recording is on.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::Context as _;
use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use bytes::Bytes;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::payload::{now_ns, sent_at};
use crate::threads::{RECEIVER_THREADS, Threads};

/// Header that Switchyard sets on signed deliveries.
const SIGNATURE_HEADER: &str = "webhook-signature";

#[derive(Default)]
struct Counters {
    count: AtomicU64,
    signed: AtomicU64,
    first_ns: AtomicU64,
    last_ns: AtomicU64,
    recording: AtomicBool,
    latencies: Mutex<Vec<u64>>,
}

/// An in-process HTTP receiver on 127.0.0.1, on threads of its own.
pub struct Receiver {
    url: String,
    counters: Arc<Counters>,
    task: JoinHandle<()>,
    // Declared last, so the server task is aborted before its runtime goes.
    _threads: Threads,
}

/// Requests received since the last reset.
pub struct Received {
    pub count: u64,
    pub signed: u64,
    /// Time from the first to the last arrival.
    pub span: Duration,
    pub latencies_ns: Vec<u64>,
}

impl Receiver {
    pub async fn start() -> anyhow::Result<Self> {
        let threads = Threads::new(RECEIVER_THREADS, 2)?;
        let handle = threads.handle();
        // Bound inside the receiver's runtime, so its connections are served there.
        let listener = handle
            .spawn(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .await?
            .context("failed to bind the receiver to 127.0.0.1")?;
        let addr = listener.local_addr()?;
        let counters = Arc::new(Counters::default());
        let app = Router::new()
            .route("/hook", post(hook))
            // An OTLP/HTTP trace endpoint that accepts and drops every export, for the
            // runs with tracing on.
            .route("/v1/traces", post(accept_traces))
            .with_state(counters.clone());
        let task = handle.spawn(async move {
            if let Err(err) = axum::serve(listener, app).await {
                eprintln!("receiver stopped: {err}");
            }
        });
        Ok(Self {
            url: format!("http://{addr}/hook"),
            counters,
            task,
            _threads: threads,
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// Returns the OTLP/HTTP base endpoint served next to the hook.
    pub fn otlp_endpoint(&self) -> &str {
        self.url.strip_suffix("/hook").unwrap_or(&self.url)
    }

    /// Clears the counters; with `record`, the latency of every later arrival is kept.
    pub fn reset(&self, record: bool) {
        let counters = &self.counters;
        counters.recording.store(false, Ordering::SeqCst);
        counters
            .latencies
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
        counters.count.store(0, Ordering::SeqCst);
        counters.signed.store(0, Ordering::SeqCst);
        counters.first_ns.store(0, Ordering::SeqCst);
        counters.last_ns.store(0, Ordering::SeqCst);
        counters.recording.store(record, Ordering::SeqCst);
    }

    pub fn count(&self) -> u64 {
        self.counters.count.load(Ordering::SeqCst)
    }

    /// Waits until `expected` requests arrived; returns false if `timeout` passed first.
    pub async fn wait_for(&self, expected: u64, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.count() >= expected {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// Returns what arrived since the last reset and stops recording.
    pub fn take(&self) -> Received {
        let counters = &self.counters;
        counters.recording.store(false, Ordering::SeqCst);
        let first = counters.first_ns.load(Ordering::SeqCst);
        let last = counters.last_ns.load(Ordering::SeqCst);
        Received {
            count: counters.count.load(Ordering::SeqCst),
            signed: counters.signed.load(Ordering::SeqCst),
            span: Duration::from_nanos(last.saturating_sub(first)),
            latencies_ns: std::mem::take(
                &mut *counters
                    .latencies
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner),
            ),
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn hook(
    State(counters): State<Arc<Counters>>,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    let now = now_ns();
    let _ = counters
        .first_ns
        .compare_exchange(0, now, Ordering::SeqCst, Ordering::SeqCst);
    counters.last_ns.fetch_max(now, Ordering::SeqCst);
    if headers.contains_key(SIGNATURE_HEADER) {
        counters.signed.fetch_add(1, Ordering::SeqCst);
    }
    if counters.recording.load(Ordering::SeqCst)
        && let Some(sent) = sent_at(&body)
    {
        counters
            .latencies
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(now.saturating_sub(sent));
    }
    // Counted last, so a waiter that reads the count also finds the latency stored.
    counters.count.fetch_add(1, Ordering::SeqCst);
    StatusCode::NO_CONTENT
}

/// Accepts an OTLP trace export; an empty body is an empty `ExportTraceServiceResponse`.
async fn accept_traces() -> axum::http::StatusCode {
    axum::http::StatusCode::OK
}
