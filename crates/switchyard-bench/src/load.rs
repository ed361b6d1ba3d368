//! HTTP load: a closed loop of keep-alive clients for throughput, and a paced open loop
//! for latency.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use reqwest::StatusCode;
use tokio::sync::Semaphore;
use tokio::time::Instant;

use crate::payload::{chat_created, now_ns};

/// Sequence for the `chat_id` of every payload sent in the run.
static NEXT_SEQ: AtomicU64 = AtomicU64::new(0);

/// Requests the paced load keeps in flight at most, so a stalled server cannot make it
/// open connections without bound.
const PACED_MAX_IN_FLIGHT: usize = 512;

/// Builds the load generator's client: HTTP/1.1 with one kept-alive connection per worker.
pub fn client(concurrency: usize) -> anyhow::Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .http1_only()
        .tcp_nodelay(true)
        .pool_max_idle_per_host(concurrency)
        .timeout(Duration::from_secs(30))
        .build()?)
}

/// Outcome of a closed-loop run.
pub struct ClosedLoop {
    pub elapsed: Duration,
    pub ok: u64,
    pub failed: u64,
    pub first_error: Option<String>,
    pub latencies_ns: Vec<u64>,
}

/// Posts `total` payloads to `url` from `concurrency` clients, each sending its next
/// request when the response to the previous one has arrived.
pub async fn closed_loop(
    client: &reqwest::Client,
    url: &str,
    total: u64,
    concurrency: usize,
    expected: StatusCode,
) -> ClosedLoop {
    let issued = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let workers = (0..concurrency.max(1)).map(|_| {
        let client = client.clone();
        let url = url.to_owned();
        let issued = issued.clone();
        tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut failed = 0;
            let mut first_error = None;
            while issued.fetch_add(1, Ordering::Relaxed) < total {
                let sent = Instant::now();
                match post(&client, &url, expected).await {
                    Ok(()) => latencies.push(elapsed_ns(sent)),
                    Err(err) => {
                        failed += 1;
                        first_error.get_or_insert(err);
                    }
                }
            }
            (latencies, failed, first_error)
        })
    });
    let results = futures::future::join_all(workers).await;
    let elapsed = started.elapsed();

    let mut outcome = ClosedLoop {
        elapsed,
        ok: 0,
        failed: 0,
        first_error: None,
        latencies_ns: Vec::with_capacity(usize::try_from(total).unwrap_or(0)),
    };
    for result in results {
        match result {
            Ok((latencies, failed, first_error)) => {
                outcome.ok += latencies.len() as u64;
                outcome.latencies_ns.extend(latencies);
                outcome.failed += failed;
                if outcome.first_error.is_none() {
                    outcome.first_error = first_error;
                }
            }
            Err(err) => {
                outcome
                    .first_error
                    .get_or_insert(format!("load worker failed: {err}"));
            }
        }
    }
    outcome
}

/// Outcome of a paced run.
pub struct Paced {
    pub sent: u64,
    pub failed: u64,
    pub first_error: Option<String>,
    /// Largest delay between a request's planned and actual start.
    pub max_lag: Duration,
}

/// Posts `rate` payloads a second to `url` for `duration`, each at its planned time even
/// while earlier requests are pending, with at most 512 in flight.
pub async fn paced(
    client: &reqwest::Client,
    url: &str,
    rate: u64,
    duration: Duration,
    expected: StatusCode,
) -> Paced {
    let total = (rate as f64 * duration.as_secs_f64()).round() as u64;
    let slots = Arc::new(Semaphore::new(PACED_MAX_IN_FLIGHT));
    let failures = Arc::new(std::sync::Mutex::new((0_u64, None::<String>)));
    let started = Instant::now();
    let mut max_lag = Duration::ZERO;
    for index in 0..total {
        let planned = started + Duration::from_nanos(index.saturating_mul(1_000_000_000) / rate);
        tokio::time::sleep_until(planned).await;
        let Ok(permit) = slots.clone().acquire_owned().await else {
            break;
        };
        max_lag = max_lag.max(Instant::now().saturating_duration_since(planned));
        let client = client.clone();
        let url = url.to_owned();
        let failures = failures.clone();
        tokio::spawn(async move {
            if let Err(err) = post(&client, &url, expected).await {
                let mut failures = failures
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                failures.0 += 1;
                failures.1.get_or_insert(err);
            }
            drop(permit);
        });
    }
    let all = u32::try_from(PACED_MAX_IN_FLIGHT).unwrap_or(u32::MAX);
    let _ = slots.acquire_many(all).await;
    let (failed, first_error) = failures
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    Paced {
        sent: total,
        failed,
        first_error,
        max_lag,
    }
}

/// Sends one payload stamped with the current time and reads the whole response.
async fn post(client: &reqwest::Client, url: &str, expected: StatusCode) -> Result<(), String> {
    let seq = NEXT_SEQ.fetch_add(1, Ordering::Relaxed);
    let body = chat_created(seq, now_ns());
    let response = client
        .post(url)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(body)
        .send()
        .await
        .map_err(|err| format!("request failed: {err}"))?;
    let status = response.status();
    let text = response
        .bytes()
        .await
        .map_err(|err| format!("reading the answer failed: {err}"))?;
    if status == expected {
        Ok(())
    } else {
        Err(format!(
            "status {status}: {}",
            String::from_utf8_lossy(&text[..text.len().min(300)])
        ))
    }
}

fn elapsed_ns(since: Instant) -> u64 {
    u64::try_from(since.elapsed().as_nanos()).unwrap_or(u64::MAX)
}
