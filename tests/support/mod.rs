//! Harness for the end-to-end tests: a real `nats-server` with JetStream, a capturing
//! HTTP receiver in place of webhook and n8n sinks, and the built `switchyard`
//! binary run as a child process.
//!
//! Each file in `tests/` includes it with `mod support;`. Every server listens on
//! 127.0.0.1 only, every wait is bounded, and `Drop` stops whatever a test started.

// Each test file uses a different subset of the harness.
#![allow(dead_code)]

pub mod nats;
pub mod receiver;
pub mod router;

use std::collections::HashSet;
use std::future::Future;
use std::net::TcpListener;
use std::panic::Location;
use std::process::ExitStatus;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use nix::sys::signal::{self, Signal};
use nix::unistd::Pid;
use tokio::process::Child;
use tokio::time::Instant;

#[allow(unused_imports)]
pub use nats::NatsServer;
#[allow(unused_imports)]
pub use receiver::{CapturedRequest, Receiver, Response};
#[allow(unused_imports)]
pub use router::{Router, RouterBuilder};

/// Interval between two checks of a polled condition.
const POLL_INTERVAL: Duration = Duration::from_millis(25);

/// Returns a TCP port on 127.0.0.1 that was free a moment ago.
///
/// The port is found by binding port 0 and releasing it, so another process can still take
/// it before the caller binds. Ports already returned to this test binary are never returned
/// again, which keeps tests that run in parallel from sharing one.
pub fn free_port() -> u16 {
    static HANDED_OUT: OnceLock<Mutex<HashSet<u16>>> = OnceLock::new();
    let handed_out = HANDED_OUT.get_or_init(Default::default);
    for _ in 0..100 {
        let listener =
            TcpListener::bind("127.0.0.1:0").expect("failed to bind 127.0.0.1:0 to find a port");
        let port = listener
            .local_addr()
            .expect("failed to read the local address of a bound socket")
            .port();
        let mut handed_out = handed_out
            .lock()
            .expect("the free port set is poisoned by a panicking test");
        if handed_out.insert(port) {
            return port;
        }
    }
    panic!("found no unused port on 127.0.0.1 in 100 tries");
}

/// Builds an HTTP client for plain `http://` requests to the servers of a test, with a 30 s
/// timeout per request so a hung server fails the test instead of stalling it.
pub fn http_client() -> reqwest::Client {
    http_client_with_timeout(Duration::from_secs(30))
}

/// Builds an HTTP client whose requests time out after `timeout`.
///
/// reqwest is built without a bundled crypto provider, so this installs rustls's `ring`
/// provider first even though no request uses TLS.
pub fn http_client_with_timeout(timeout: Duration) -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .timeout(timeout)
        .build()
        .expect("failed to build the reqwest client")
}

/// Polls `condition` until it returns `true`, and panics if `timeout` passes first.
///
/// The panic message names the line of the caller.
#[track_caller]
pub fn wait_until<F, Fut>(timeout: Duration, mut condition: F) -> impl Future<Output = ()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let caller = Location::caller();
    async move {
        let deadline = Instant::now() + timeout;
        loop {
            if condition().await {
                return;
            }
            if Instant::now() >= deadline {
                panic!("condition of wait_until at {caller} was still false after {timeout:?}");
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }
}

/// Sends `signal` to a child process unless it has already been reaped.
fn send_signal(child: &Child, signal: Signal) {
    let Some(id) = child.id() else {
        return;
    };
    let pid = Pid::from_raw(i32::try_from(id).expect("a process id fits in i32"));
    // ESRCH means the process exited between the id check and the signal, which is fine.
    if let Err(error) = signal::kill(pid, signal)
        && error != nix::errno::Errno::ESRCH
    {
        panic!("failed to send {signal} to process {id}: {error}");
    }
}

/// Waits up to `timeout` for a child process to exit.
async fn wait_for_exit(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    match tokio::time::timeout(timeout, child.wait()).await {
        Ok(status) => Some(status.expect("failed to wait for a child process")),
        Err(_elapsed) => None,
    }
}

/// Kills a child process and reaps it without an async runtime, for use in `Drop`.
fn kill_and_reap(child: &mut Child) {
    send_signal(child, Signal::SIGKILL);
    // SIGKILL cannot be caught, so the process exits almost at once. The bound only keeps a
    // process stuck in the kernel from hanging the test.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while std::time::Instant::now() < deadline {
        match child.try_wait() {
            Ok(Some(_)) | Err(_) => return,
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

/// Reports whether a process exit status comes from `signal`.
pub fn killed_by(status: ExitStatus, signal: Signal) -> bool {
    use std::os::unix::process::ExitStatusExt;
    status.signal() == Some(signal as i32)
}
