//! An HTTP server that records every request and sends a programmable response, in place
//! of a webhook or n8n endpoint.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::future::Future;
use std::net::SocketAddr;
use std::panic::Location;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Request, State as AxumState};
use axum::http::{HeaderName, HeaderValue, StatusCode};
use bytes::Bytes;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// One request as the receiver saw it.
#[derive(Clone, Debug)]
pub struct CapturedRequest {
    pub method: String,
    pub path: String,
    /// The query string without the leading `?`.
    pub query: Option<String>,
    /// Headers in arrival order, names lowercased. Values that are not UTF-8 are converted
    /// lossily.
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
    /// When the handler started, before the body was read.
    pub received_at: Instant,
}

impl CapturedRequest {
    /// Returns the first value of a header, matching the name case-insensitively.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_str())
    }

    /// Returns every value of a header, matching the name case-insensitively.
    pub fn header_values(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_str())
            .collect()
    }

    /// Returns the body as text, panicking when it is not UTF-8.
    pub fn body_text(&self) -> &str {
        std::str::from_utf8(&self.body).unwrap_or_else(|error| {
            panic!(
                "body of {} {} is not UTF-8: {error}",
                self.method, self.path
            )
        })
    }

    /// Parses the body as JSON, panicking with the body when it is invalid.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|error| {
            panic!(
                "body of {} {} is not valid JSON ({error}): {}",
                self.method,
                self.path,
                String::from_utf8_lossy(&self.body)
            )
        })
    }
}

/// A response the receiver sends: status, headers, body and an optional delay before it.
#[derive(Clone, Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
    /// Time to wait before responding. `None` in a scripted response means the receiver-wide
    /// delay of `Receiver::set_delay` applies, and `Some(Duration::ZERO)` overrides it.
    pub delay: Option<Duration>,
}

impl Response {
    /// Creates a response with an empty body. Panics on a status outside 100..=999.
    pub fn new(status: u16) -> Response {
        StatusCode::from_u16(status)
            .unwrap_or_else(|error| panic!("invalid HTTP status {status}: {error}"));
        Response {
            status,
            headers: Vec::new(),
            body: Bytes::new(),
            delay: None,
        }
    }

    /// Adds a header. Panics on an invalid name or value, so the test fails where it built
    /// the response rather than inside the server.
    pub fn with_header(mut self, name: &str, value: &str) -> Response {
        HeaderName::try_from(name)
            .unwrap_or_else(|error| panic!("invalid header name {name:?}: {error}"));
        HeaderValue::try_from(value)
            .unwrap_or_else(|error| panic!("invalid value {value:?} of header {name}: {error}"));
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }

    pub fn with_body(mut self, body: impl Into<Bytes>) -> Response {
        self.body = body.into();
        self
    }

    pub fn with_delay(mut self, delay: Duration) -> Response {
        self.delay = Some(delay);
        self
    }
}

impl Default for Response {
    fn default() -> Response {
        Response::new(200)
    }
}

struct State {
    requests: Vec<CapturedRequest>,
    default_response: Response,
    script: VecDeque<Response>,
    in_flight: usize,
    max_in_flight: usize,
}

struct Shared {
    state: Mutex<State>,
    /// Number of requests captured so far, for waiting without polling.
    count: watch::Sender<usize>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .expect("the receiver state is poisoned by a panicking handler")
    }
}

/// A capturing HTTP server on 127.0.0.1.
///
/// By default every request gets an empty 200. The response can be changed at any time with
/// `set_status`, `set_delay`, `set_default` and `set_script`. `Drop` aborts the server task.
pub struct Receiver {
    shared: Arc<Shared>,
    addr: SocketAddr,
    server: Option<JoinHandle<()>>,
}

impl Receiver {
    /// Starts a receiver on a free port.
    pub async fn start() -> Receiver {
        Receiver::start_on(0).await
    }

    /// Starts a receiver on the given port, or on a free one when `port` is 0.
    ///
    /// A fixed port lets a test write the receiver's URL into a router config before the
    /// receiver runs, with a port from `support::free_port()`.
    pub async fn start_on(port: u16) -> Receiver {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                requests: Vec::new(),
                default_response: Response::default(),
                script: VecDeque::new(),
                in_flight: 0,
                max_in_flight: 0,
            }),
            count: watch::Sender::new(0),
        });
        let listener = bind(port).await;
        let addr = listener
            .local_addr()
            .expect("failed to read the receiver's local address");
        Receiver {
            server: Some(serve(listener, shared.clone())),
            shared,
            addr,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Returns `http://127.0.0.1:PORT` followed by `path`, adding a `/` before it if missing.
    pub fn url(&self, path: &str) -> String {
        let separator = if path.starts_with('/') { "" } else { "/" };
        format!("http://{}{separator}{path}", self.addr)
    }

    /// Sets the status of the default response, which is sent when the script is empty.
    pub fn set_status(&self, status: u16) {
        let status = Response::new(status).status;
        self.shared.lock().default_response.status = status;
    }

    /// Sets the delay before each response, for every request from now on.
    pub fn set_delay(&self, delay: Duration) {
        self.shared.lock().default_response.delay = Some(delay);
    }

    /// Replaces the default response, which is sent when the script is empty.
    pub fn set_default(&self, response: Response) {
        self.shared.lock().default_response = response;
    }

    /// Replaces the script. Each request takes the next scripted response, in order, and the
    /// default response is sent once the script is used up.
    pub fn set_script(&self, responses: Vec<Response>) {
        self.shared.lock().script = responses.into();
    }

    /// Returns a copy of every request captured so far, in arrival order.
    pub fn requests(&self) -> Vec<CapturedRequest> {
        self.shared.lock().requests.clone()
    }

    pub fn count(&self) -> usize {
        self.shared.lock().requests.len()
    }

    /// Forgets the captured requests and the in-flight maximum. The responses stay.
    pub fn clear(&self) {
        let mut state = self.shared.lock();
        state.requests.clear();
        state.max_in_flight = state.in_flight;
        self.shared.count.send_replace(0);
    }

    /// Returns the highest number of requests that were in flight at once.
    ///
    /// A request is in flight from its arrival until its response is sent or its client
    /// disconnects.
    pub fn max_concurrent(&self) -> usize {
        self.shared.lock().max_in_flight
    }

    /// Waits until at least `count` requests have arrived and returns all captured requests.
    ///
    /// Panics after `timeout` with the expected and actual count, and the caller's line.
    #[track_caller]
    pub fn wait_for_count(
        &self,
        count: usize,
        timeout: Duration,
    ) -> impl Future<Output = Vec<CapturedRequest>> + '_ {
        let caller = Location::caller();
        async move {
            let mut counts = self.shared.count.subscribe();
            let reached = tokio::time::timeout(timeout, counts.wait_for(|n| *n >= count)).await;
            if reached.is_err() {
                panic!(
                    "receiver {} expected at least {count} requests within {timeout:?}, \
                     got {} (wait_for_count at {caller}):\n{}",
                    self.addr,
                    self.count(),
                    self.summary()
                );
            }
            self.requests()
        }
    }

    /// Waits for `duration` and panics as soon as the request count differs from `count`.
    ///
    /// Checks that no further delivery arrives, e.g. after a message was acknowledged.
    #[track_caller]
    pub fn assert_count_stays(
        &self,
        count: usize,
        duration: Duration,
    ) -> impl Future<Output = ()> + '_ {
        let caller = Location::caller();
        async move {
            let mut counts = self.shared.count.subscribe();
            let changed = tokio::time::timeout(duration, counts.wait_for(|n| *n != count)).await;
            if changed.is_ok() {
                panic!(
                    "receiver {} expected its request count to stay {count} for {duration:?}, \
                     got {} (assert_count_stays at {caller}):\n{}",
                    self.addr,
                    self.count(),
                    self.summary()
                );
            }
        }
    }

    /// Stops accepting connections and waits until the port is closed.
    ///
    /// Idle keep-alive connections are closed. Requests in flight still get their response.
    /// Captured requests and responses are kept for `restart`.
    pub async fn stop(&mut self) {
        if let Some(server) = self.server.take() {
            server.abort();
            let _ = server.await;
        }
    }

    /// Starts serving again on the same port, stopping first if needed.
    pub async fn restart(&mut self) {
        self.stop().await;
        let listener = bind(self.addr.port()).await;
        self.server = Some(serve(listener, self.shared.clone()));
    }

    /// Lists the captured requests, one line each, for panic messages.
    fn summary(&self) -> String {
        let state = self.shared.lock();
        let mut summary = String::new();
        let Some(first) = state.requests.first() else {
            return "  (no requests)".to_owned();
        };
        for (index, request) in state.requests.iter().enumerate() {
            let _ = writeln!(
                summary,
                "  #{index} +{:?} {} {} ({} bytes)",
                request.received_at.duration_since(first.received_at),
                request.method,
                request.path,
                request.body.len()
            );
        }
        summary
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        if let Some(server) = self.server.take() {
            server.abort();
        }
    }
}

async fn bind(port: u16) -> TcpListener {
    TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap_or_else(|error| panic!("failed to bind the receiver to 127.0.0.1:{port}: {error}"))
}

fn serve(listener: TcpListener, shared: Arc<Shared>) -> JoinHandle<()> {
    let app = axum::Router::new().fallback(handle).with_state(shared);
    tokio::spawn(async move {
        if let Err(error) = axum::serve(listener, app).await {
            eprintln!("receiver server failed: {error}");
        }
    })
}

/// Decrements the in-flight count when a request finishes or its client disconnects.
struct InFlightGuard(Arc<Shared>);

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.0.lock().in_flight -= 1;
    }
}

async fn handle(
    AxumState(shared): AxumState<Arc<Shared>>,
    request: Request,
) -> axum::response::Response {
    let received_at = Instant::now();
    let (parts, body) = request.into_parts();
    let body = match axum::body::to_bytes(body, usize::MAX).await {
        Ok(body) => body,
        Err(error) => {
            // The client went away mid-body, so nothing reads this response.
            return status_response(
                StatusCode::BAD_REQUEST,
                format!("failed to read body: {error}"),
            );
        }
    };

    let captured = CapturedRequest {
        method: parts.method.to_string(),
        path: parts.uri.path().to_owned(),
        query: parts.uri.query().map(str::to_owned),
        headers: parts
            .headers
            .iter()
            .map(|(name, value)| {
                let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
                (name.as_str().to_ascii_lowercase(), value)
            })
            .collect(),
        body,
        received_at,
    };

    let (response, delay, count) = {
        let mut state = shared.lock();
        state.requests.push(captured);
        state.in_flight += 1;
        state.max_in_flight = state.max_in_flight.max(state.in_flight);
        let default_delay = state.default_response.delay;
        let response = state
            .script
            .pop_front()
            .unwrap_or_else(|| state.default_response.clone());
        let delay = response.delay.or(default_delay);
        (response, delay, state.requests.len())
    };
    let _in_flight = InFlightGuard(shared.clone());
    shared.count.send_replace(count);

    if let Some(delay) = delay {
        tokio::time::sleep(delay).await;
    }
    build_response(&response)
}

fn build_response(response: &Response) -> axum::response::Response {
    let mut builder = axum::response::Response::builder().status(response.status);
    for (name, value) in &response.headers {
        builder = builder.header(name.as_str(), value.as_str());
    }
    builder
        .body(Body::from(response.body.clone()))
        .expect("status and headers were checked by Response::new and with_header")
}

fn status_response(status: StatusCode, message: String) -> axum::response::Response {
    let mut response = axum::response::Response::new(Body::from(message));
    *response.status_mut() = status;
    response
}
