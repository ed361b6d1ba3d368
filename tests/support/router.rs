//! The built `switchyard` binary run as a child process with a config written by the test.
//!
//! Test files pass the binary path as `env!("CARGO_BIN_EXE_switchyard")`, which cargo sets
//! only for test targets of the package that owns the binary.

use std::ffi::OsString;
use std::fs::{self, File};
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use nix::sys::signal::Signal;
use tempfile::TempDir;
use tokio::process::{Child, Command};
use tokio::time::Instant;

use super::{POLL_INTERVAL, http_client_with_timeout, kill_and_reap, send_signal, wait_for_exit};

/// Default time allowed for `GET /readyz` to return 200 after a start.
pub const DEFAULT_READY_TIMEOUT: Duration = Duration::from_secs(20);

/// How long `stop` waits after SIGTERM before it kills the router.
const STOP_TIMEOUT: Duration = Duration::from_secs(20);

/// Name of the config file inside the router's temporary folder.
const CONFIG_FILE: &str = "switchyard.toml";

/// Name of the file that collects the router's stdout and stderr.
const LOG_FILE: &str = "switchyard.log";

/// Returns the repository root.
///
/// The harness is compiled into test targets of the `switchyard` package, whose manifest is
/// `crates/switchyard/Cargo.toml`, so the root is two folders above `CARGO_MANIFEST_DIR`.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Where the router's `schemas/` folder comes from.
#[derive(Clone, Debug)]
enum Schemas {
    /// A copy of the repository's `schemas/` folder.
    Repository,
    /// A copy of the given folder.
    Copy(PathBuf),
    /// No folder.
    Missing,
}

/// Options for starting a router, created by `Router::builder`.
pub struct RouterBuilder {
    bin: PathBuf,
    config_toml: String,
    envs: Vec<(OsString, OsString)>,
    schemas: Schemas,
    ready_timeout: Duration,
}

impl RouterBuilder {
    /// Sets an environment variable for the router process, overriding the harness's
    /// `RUST_LOG` and `NO_COLOR` when it names them.
    pub fn env(mut self, name: impl Into<OsString>, value: impl Into<OsString>) -> RouterBuilder {
        self.envs.push((name.into(), value.into()));
        self
    }

    /// Copies `dir` as the `schemas/` folder next to the config, in place of the
    /// repository's.
    pub fn schemas_dir(mut self, dir: impl Into<PathBuf>) -> RouterBuilder {
        self.schemas = Schemas::Copy(dir.into());
        self
    }

    /// Leaves out the `schemas/` folder.
    pub fn without_schemas(mut self) -> RouterBuilder {
        self.schemas = Schemas::Missing;
        self
    }

    /// Sets how long `start` and `restart` wait for `GET /readyz` to return 200.
    pub fn ready_timeout(mut self, timeout: Duration) -> RouterBuilder {
        self.ready_timeout = timeout;
        self
    }

    /// Spawns the router and waits until `GET /readyz` returns 200.
    ///
    /// Panics with the router's log if it exits or is not ready in time.
    pub async fn start(self) -> Router {
        let mut router = self.spawn().await;
        router.wait_ready().await;
        router
    }

    /// Spawns the router without waiting for readiness, for configs that must fail or for
    /// tests that watch start-up.
    pub async fn spawn(self) -> Router {
        let dir = tempfile::Builder::new()
            .prefix("switchyard-router-")
            .tempdir()
            .expect("failed to create a temporary folder for the router");
        let mut router = Router {
            bin: self.bin,
            envs: self.envs,
            ready_timeout: self.ready_timeout,
            addr: None,
            child: None,
            dir,
        };
        router.write_config(&self.config_toml);
        let schemas_target = router.dir.path().join("schemas");
        match self.schemas {
            Schemas::Repository => {
                let source = repo_root().join("schemas");
                // NOTE: a checkout without schemas/ starts the router without one, and the
                // router's own error in the log then names what is missing.
                if source.is_dir() {
                    copy_dir(&source, &schemas_target);
                }
            }
            Schemas::Copy(source) => copy_dir(&source, &schemas_target),
            Schemas::Missing => {}
        }
        router.spawn_process();
        router
    }
}

/// A `switchyard serve` child process with its config, schemas and log in a temporary folder.
///
/// The folder contains `switchyard.toml`, `schemas/` and `switchyard.log`, which collects
/// stdout and stderr of every run. `Drop` kills the process and removes the folder.
pub struct Router {
    bin: PathBuf,
    envs: Vec<(OsString, OsString)>,
    ready_timeout: Duration,
    /// `[server] listen` of the config, when the config parses and sets it.
    addr: Option<SocketAddr>,
    child: Option<Child>,
    // Declared last so the folder is removed after the process is gone.
    dir: TempDir,
}

impl Router {
    /// Starts `bin serve` with `config_toml` and the repository's schemas, and waits until
    /// `GET /readyz` returns 200.
    ///
    /// The config must set `[server] listen = "127.0.0.1:PORT"`, with a port from
    /// `support::free_port()`.
    pub async fn start(bin: &str, config_toml: &str) -> Router {
        Router::builder(bin, config_toml).start().await
    }

    /// Returns a builder for a router with more options than `start` takes.
    pub fn builder(bin: &str, config_toml: &str) -> RouterBuilder {
        RouterBuilder {
            bin: PathBuf::from(bin),
            config_toml: config_toml.to_owned(),
            envs: Vec::new(),
            schemas: Schemas::Repository,
            ready_timeout: DEFAULT_READY_TIMEOUT,
        }
    }

    /// Returns the `[server] listen` address of the config.
    pub fn addr(&self) -> SocketAddr {
        self.addr.unwrap_or_else(|| {
            panic!(
                "the router config has no valid [server] listen address:\n{}",
                self.config()
            )
        })
    }

    /// Returns `http://ADDR` followed by `path`, adding a `/` before it if missing.
    pub fn url(&self, path: &str) -> String {
        let separator = if path.starts_with('/') { "" } else { "/" };
        format!("http://{}{separator}{path}", self.addr())
    }

    /// Returns the temporary folder that contains the config, schemas and log.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join(CONFIG_FILE)
    }

    pub fn config(&self) -> String {
        fs::read_to_string(self.config_path()).unwrap_or_default()
    }

    /// Replaces the config file, which the next `restart` reads.
    pub fn write_config(&mut self, config_toml: &str) {
        fs::write(self.config_path(), config_toml).expect("failed to write the router config");
        self.addr = listen_addr(config_toml);
    }

    /// Returns what the router has written to stdout and stderr since the first start.
    pub fn logs(&self) -> String {
        fs::read_to_string(self.dir.path().join(LOG_FILE)).unwrap_or_default()
    }

    /// Returns the process id while the router runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(Child::id)
    }

    /// Reports whether the router process is running.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Waits until `GET /readyz` returns 200, panicking with the log if the router exits or
    /// the ready timeout passes first.
    pub async fn wait_ready(&mut self) {
        let url = self.url("/readyz");
        // A short timeout per request keeps a hung router from stalling the polling.
        let client = http_client_with_timeout(Duration::from_secs(1));
        let deadline = Instant::now() + self.ready_timeout;
        loop {
            if self.child.is_none() {
                panic!(
                    "wait_ready called on a router that is not running. Its log:\n{}",
                    self.logs()
                );
            }
            let outcome = match client.get(&url).send().await {
                Ok(response) if response.status() == reqwest::StatusCode::OK => return,
                Ok(response) => format!("status {}", response.status()),
                Err(error) => format!("request failed: {error}"),
            };
            if let Some(status) = self.try_exit_status() {
                panic!(
                    "switchyard exited with {status} before GET {url} returned 200. Its log:\n{}",
                    self.logs()
                );
            }
            if Instant::now() >= deadline {
                panic!(
                    "GET {url} did not return 200 within {:?} (last: {outcome}). \
                     Its log:\n{}",
                    self.ready_timeout,
                    self.logs()
                );
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// Waits until the log contains `needle`, panicking with the log after `timeout`.
    pub async fn wait_for_log(&self, needle: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.logs().contains(needle) {
            if Instant::now() >= deadline {
                panic!(
                    "the switchyard log did not contain {needle:?} within {timeout:?}. \
                     Its log:\n{}",
                    self.logs()
                );
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// Waits for the router to exit by itself and returns its exit status.
    ///
    /// Panics with the log if it still runs after `timeout`, after killing it.
    pub async fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let mut child = self
            .child
            .take()
            .expect("wait_exit called on a router that is not running");
        match wait_for_exit(&mut child, timeout).await {
            Some(status) => status,
            None => {
                kill_and_reap(&mut child);
                panic!(
                    "switchyard did not exit within {timeout:?}, so the harness killed it. \
                     Its log:\n{}",
                    self.logs()
                );
            }
        }
    }

    /// Sends a signal to the running router, e.g. SIGHUP.
    pub fn signal(&self, signal: Signal) {
        let child = self
            .child
            .as_ref()
            .expect("signal called on a router that is not running");
        send_signal(child, signal);
    }

    /// Sends SIGTERM and returns the exit status of the graceful shutdown.
    ///
    /// Panics with the log if the router still runs 20 s later, after killing it.
    pub async fn stop(&mut self) -> ExitStatus {
        self.signal(Signal::SIGTERM);
        self.wait_exit(STOP_TIMEOUT).await
    }

    /// Sends SIGKILL and waits for the exit, as in a crash. Does nothing when not running.
    pub async fn kill(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        send_signal(&child, Signal::SIGKILL);
        if wait_for_exit(&mut child, STOP_TIMEOUT).await.is_none() {
            panic!("switchyard did not exit within {STOP_TIMEOUT:?} after SIGKILL");
        }
    }

    /// Starts the router again with the current config file and waits until it is ready.
    ///
    /// A router that is still running is stopped with SIGTERM first.
    pub async fn restart(&mut self) {
        if self.is_running() {
            self.stop().await;
        }
        self.child = None;
        self.spawn_process();
        self.wait_ready().await;
    }

    /// Returns the exit status if the process has exited, reaping it.
    fn try_exit_status(&mut self) -> Option<ExitStatus> {
        let status = self.child.as_mut()?.try_wait().ok().flatten()?;
        self.child = None;
        Some(status)
    }

    fn spawn_process(&mut self) {
        let log_path = self.dir.path().join(LOG_FILE);
        let is_restart = log_path.exists();
        let mut log = File::options()
            .create(true)
            .append(true)
            .open(&log_path)
            .expect("failed to open the router log file");
        if is_restart {
            writeln!(log, "\n--- the test harness started switchyard again ---")
                .expect("failed to write to the router log file");
        }
        let stderr = log
            .try_clone()
            .expect("failed to clone the router log file handle");

        let mut command = Command::new(&self.bin);
        command
            .arg("serve")
            .arg("--config")
            .arg(self.config_path())
            .current_dir(self.dir.path())
            .env("RUST_LOG", "info,switchyard=debug")
            .env("NO_COLOR", "1")
            .envs(self.envs.iter().map(|(name, value)| (name, value)))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(stderr)
            .kill_on_drop(true);
        let child = command.spawn().unwrap_or_else(|error| {
            panic!("failed to start {}: {error}", self.bin.display());
        });
        self.child = Some(child);
    }
}

impl Drop for Router {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            kill_and_reap(child);
        }
    }
}

/// Reads `[server] listen` from a config, or returns `None` when it is missing or invalid.
fn listen_addr(config_toml: &str) -> Option<SocketAddr> {
    let config: toml::Table = toml::from_str(config_toml).ok()?;
    config.get("server")?.get("listen")?.as_str()?.parse().ok()
}

/// Copies a folder tree of regular files, skipping symbolic links.
fn copy_dir(source: &Path, target: &Path) {
    fs::create_dir_all(target)
        .unwrap_or_else(|error| panic!("failed to create {}: {error}", target.display()));
    let entries = fs::read_dir(source)
        .unwrap_or_else(|error| panic!("failed to read {}: {error}", source.display()));
    for entry in entries {
        let entry = entry.unwrap_or_else(|error| {
            panic!("failed to read an entry of {}: {error}", source.display())
        });
        let from = entry.path();
        let to = target.join(entry.file_name());
        let file_type = entry.file_type().unwrap_or_else(|error| {
            panic!(
                "failed to read the file type of {}: {error}",
                from.display()
            )
        });
        if file_type.is_dir() {
            copy_dir(&from, &to);
        } else if file_type.is_file() {
            fs::copy(&from, &to).unwrap_or_else(|error| {
                panic!(
                    "failed to copy {} to {}: {error}",
                    from.display(),
                    to.display()
                )
            });
        }
    }
}
