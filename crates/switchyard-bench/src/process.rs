//! Child processes of the benchmark: its own nats-server and the release `switchyard`
//! binary, both on 127.0.0.1, each stopped by the process id the benchmark spawned.

use std::fs::{self, File};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context as _, bail};
use nix::sys::signal::{self, Signal};
use nix::unistd::Pid;
use tempfile::TempDir;
use tokio::process::{Child, Command};
use tokio::time::Instant;

/// nats-server settings that have no command-line flag.
const NATS_CONFIG: &str = "max_payload: 8MB\n";

/// How long a process may take to start or to stop after SIGTERM.
const START_TIMEOUT: Duration = Duration::from_secs(20);
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// Returns a TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("failed to bind 127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// A nats-server with JetStream, its store in a temporary folder.
pub struct NatsServer {
    child: Child,
    port: u16,
    dir: TempDir,
}

impl NatsServer {
    pub async fn start(bin: &Path) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("switchyard-bench-nats-")
            .tempdir()?;
        let config = dir.path().join("nats-server.conf");
        fs::write(&config, NATS_CONFIG)?;
        let log = File::create(dir.path().join("nats-server.log"))?;
        let port = free_port()?;
        let child = Command::new(bin)
            .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
            .arg(dir.path().join("jetstream"))
            .arg("-c")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("failed to start {}", bin.display()))?;
        let mut server = Self { child, port, dir };
        let deadline = Instant::now() + START_TIMEOUT;
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            if let Some(status) = server.child.try_wait()? {
                bail!(
                    "nats-server exited during start-up with {status}:\n{}",
                    server.log()
                );
            }
            if Instant::now() >= deadline {
                bail!("nats-server did not listen within {START_TIMEOUT:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(server)
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("nats-server.log")).unwrap_or_default()
    }

    pub async fn stop(mut self) -> anyhow::Result<()> {
        terminate(&mut self.child, "nats-server").await
    }
}

/// A `switchyard serve` process with its config and log in a folder of the benchmark.
pub struct RouterProcess {
    child: Child,
    addr: SocketAddr,
    log: PathBuf,
}

impl RouterProcess {
    /// Spawns `bin serve --config <config>` and waits until `GET /readyz` returns 200.
    pub async fn start(
        bin: &Path,
        config: &Path,
        addr: SocketAddr,
        probe: &reqwest::Client,
    ) -> anyhow::Result<Self> {
        let log = config.with_extension("log");
        let file = File::options().create(true).append(true).open(&log)?;
        let child = Command::new(bin)
            .arg("serve")
            .arg("--config")
            .arg(config)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            // No trace export: an inherited endpoint would add its cost and could point
            // away from this machine.
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .env_remove("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("failed to start {}", bin.display()))?;
        let mut router = Self { child, addr, log };
        router.wait_ready(probe).await?;
        Ok(router)
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    async fn wait_ready(&mut self, probe: &reqwest::Client) -> anyhow::Result<()> {
        let url = self.url("/readyz");
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let request = probe.get(&url).timeout(Duration::from_secs(1)).send();
            if let Ok(response) = request.await
                && response.status() == reqwest::StatusCode::OK
            {
                return Ok(());
            }
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "switchyard exited with {status} before it was ready:\n{}",
                    self.log_tail()
                );
            }
            if Instant::now() >= deadline {
                bail!(
                    "switchyard was not ready within {START_TIMEOUT:?}:\n{}",
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Returns the peak resident set size so far (VmHWM), in bytes.
    pub fn peak_rss(&self) -> Option<u64> {
        let pid = self.child.id()?;
        let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let line = status.lines().find(|line| line.starts_with("VmHWM:"))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib * 1024)
    }

    /// Returns the last lines of the router's log.
    pub fn log_tail(&self) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// Sends SIGTERM and waits for the graceful stop.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        terminate(&mut self.child, "switchyard").await
    }
}

/// Sends SIGTERM to the child and waits, then kills it if it outlives [`STOP_TIMEOUT`].
async fn terminate(child: &mut Child, name: &str) -> anyhow::Result<()> {
    let Some(id) = child.id() else {
        return Ok(());
    };
    let pid = Pid::from_raw(i32::try_from(id)?);
    if let Err(err) = signal::kill(pid, Signal::SIGTERM)
        && err != nix::errno::Errno::ESRCH
    {
        bail!("failed to send SIGTERM to {name} ({id}): {err}");
    }
    match tokio::time::timeout(STOP_TIMEOUT, child.wait()).await {
        Ok(status) => {
            status?;
            Ok(())
        }
        Err(_) => {
            child.kill().await?;
            bail!("{name} ({id}) did not stop within {STOP_TIMEOUT:?} of SIGTERM; killed it");
        }
    }
}
