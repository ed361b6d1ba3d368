//! The Switchyard configuration: one TOML file.
//!
//! Every struct rejects unknown keys, every default is a named constant, and durations are
//! strings with units (`"30s"`, `"5m"`, `"7d"`). String values may read the environment
//! with `${VAR}` or `${VAR:-default}` (see [`load`]), so secrets stay out of the file.
//! [`Config::validate`] checks what serde cannot: names, patterns, URLs and limits.

mod load;
mod validate;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use secrecy::SecretString;
use serde::Deserialize;

pub use load::{ConfigError, expand_env, load_file, parse_str};
pub use validate::{ValidationError, Warning};

/// Address the ingress listens on by default.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
/// Largest accepted request body by default: 1 MiB.
pub const DEFAULT_MAX_BODY_BYTES: usize = 1024 * 1024;
/// Largest number of events in one batch request by default.
pub const DEFAULT_MAX_BATCH_EVENTS: usize = 100;
/// How long the ingress waits for JetStream to acknowledge a publish.
pub const DEFAULT_PUBLISH_TIMEOUT: Duration = Duration::from_secs(5);
/// `Retry-After` sent with a 503.
pub const DEFAULT_UNAVAILABLE_RETRY_AFTER: Duration = Duration::from_secs(2);

pub const DEFAULT_NATS_URL: &str = "nats://127.0.0.1:4222";
pub const DEFAULT_NATS_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
pub const DEFAULT_NATS_CLIENT_NAME: &str = "switchyard";

pub const DEFAULT_EVENTS_STREAM: &str = "EVENTS";
pub const DEFAULT_EVENTS_MAX_AGE: Duration = Duration::from_secs(7 * 24 * 3600);
pub const DEFAULT_DUPLICATE_WINDOW: Duration = Duration::from_secs(120);
pub const DEFAULT_DLQ_STREAM: &str = "DLQ";
pub const DEFAULT_DLQ_MAX_AGE: Duration = Duration::from_secs(30 * 24 * 3600);
pub const DEFAULT_REPLICAS: usize = 1;

pub const DEFAULT_SCHEMA_DIR: &str = "schemas";

pub const DEFAULT_CONCURRENCY: usize = 8;
pub const DEFAULT_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_MAX_ATTEMPTS: u32 = 10;
pub const DEFAULT_ACK_WAIT: Duration = Duration::from_secs(30);
pub const DEFAULT_MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);
/// Delay before retry N is the Nth entry; the last entry repeats.
pub const DEFAULT_BACKOFF: [Duration; 7] = [
    Duration::from_secs(1),
    Duration::from_secs(5),
    Duration::from_secs(30),
    Duration::from_secs(120),
    Duration::from_secs(600),
    Duration::from_secs(1800),
    Duration::from_secs(3600),
];
/// Retries of an n8n webhook that returns 404 "not registered".
pub const DEFAULT_N8N_NOT_REGISTERED_ATTEMPTS: u32 = 5;
/// Delay between retries of an n8n webhook that returns 404 "not registered".
pub const DEFAULT_N8N_NOT_REGISTERED_DELAY: Duration = Duration::from_secs(10);

/// The whole configuration file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub server: ServerConfig,
    #[serde(default)]
    pub nats: NatsConfig,
    #[serde(default)]
    pub streams: StreamsConfig,
    #[serde(default)]
    pub schemas: SchemasConfig,
    #[serde(default)]
    pub telemetry: TelemetryConfig,
    /// Destinations; each one is a durable consumer shared by every router.
    #[serde(default)]
    pub sinks: Vec<SinkConfig>,
}

/// Trace export. The standard `OTEL_EXPORTER_OTLP_ENDPOINT`, `OTEL_SERVICE_NAME` and
/// `OTEL_SDK_DISABLED` environment variables take precedence over these keys.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetryConfig {
    /// OTLP/HTTP endpoint such as `http://127.0.0.1:4318`; traces are off when absent.
    #[serde(default)]
    pub otlp_endpoint: Option<String>,
    /// Service name on every span; `switchyard` when absent.
    #[serde(default)]
    pub service_name: Option<String>,
}

/// The HTTP ingress.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Socket address to listen on.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Largest request body in bytes; capped at the NATS server's `max_payload`.
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: usize,
    /// Largest number of events in one batch request.
    #[serde(default = "default_max_batch_events")]
    pub max_batch_events: usize,
    /// How long to wait for JetStream to acknowledge a publish before returning 503.
    #[serde(default = "default_publish_timeout", with = "humantime_serde")]
    pub publish_timeout: Duration,
    /// `Retry-After` sent with a 503.
    #[serde(default = "default_unavailable_retry_after", with = "humantime_serde")]
    pub unavailable_retry_after: Duration,
}

/// The NATS connection.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatsConfig {
    /// Server URL, or several separated by commas.
    #[serde(default = "default_nats_url")]
    pub url: String,
    /// Client name shown by the server's monitoring.
    #[serde(default = "default_nats_client_name")]
    pub name: String,
    #[serde(default = "default_nats_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Path of a `.creds` file for NATS decentralised auth.
    #[serde(default)]
    pub credentials_file: Option<PathBuf>,
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub password: Option<SecretString>,
    #[serde(default)]
    pub token: Option<SecretString>,
}

/// The `EVENTS` and `DLQ` streams, created or updated at start.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamsConfig {
    #[serde(default = "default_events_stream")]
    pub events: StreamConfig,
    #[serde(default = "default_dlq_stream")]
    pub dlq: StreamConfig,
}

/// One JetStream stream.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamConfig {
    pub name: String,
    /// How long messages are kept.
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
    /// Window in which a repeated event id is dropped as a duplicate.
    #[serde(default = "default_duplicate_window", with = "humantime_serde")]
    pub duplicate_window: Duration,
    /// 1 on a single server, 3 in a cluster.
    #[serde(default = "default_replicas")]
    pub replicas: usize,
    /// Upper bound on the stream size in bytes; unlimited when absent.
    #[serde(default)]
    pub max_bytes: Option<i64>,
}

/// Location of the JSON Schemas.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SchemasConfig {
    /// Folder of `<type>.json` files; relative to the configuration file.
    #[serde(default = "default_schema_dir")]
    pub dir: PathBuf,
}

/// Kind of destination of a sink.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SinkKind {
    /// Any HTTP endpoint that takes the event as a JSON POST.
    Webhook,
    /// An n8n Webhook node.
    N8n,
}

impl SinkKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Webhook => "webhook",
            Self::N8n => "n8n",
        }
    }
}

/// One destination.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SinkConfig {
    /// Unique name of lowercase letters, digits, `_` and `-`; the consumer is `sink_<name>`.
    pub name: String,
    pub kind: SinkKind,
    /// Endpoint URL, `http` or `https`.
    pub url: String,
    /// Event types this sink takes, as NATS-style patterns: `chat.created`, `chat.*`, `user.>`.
    pub events: Vec<String>,
    /// A minijinja expression over `type`, `id`, `source`, `time` and `data`; events for which
    /// it is false are acknowledged without delivery.
    #[serde(default)]
    pub filter: Option<String>,
    /// A minijinja template that renders the request body; the payload is sent unchanged
    /// when absent.
    #[serde(default)]
    pub transform: Option<String>,
    /// Extra request headers.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Standard Webhooks signing secrets (`whsec_` and base64); one signature per secret,
    /// so a new secret can be added before the old one is removed.
    #[serde(default)]
    pub secrets: Vec<SecretString>,
    #[serde(default)]
    pub delivery: DeliveryConfig,
}

impl std::fmt::Debug for SinkConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SinkConfig")
            .field("name", &self.name)
            .field("kind", &self.kind)
            .field("url", &redact_url(&self.url))
            .field("events", &self.events)
            .field("filter", &self.filter)
            .field("transform", &self.transform.as_ref().map(|_| "..."))
            .field("headers", &self.headers.keys().collect::<Vec<_>>())
            .field("secrets", &self.secrets.len())
            .field("delivery", &self.delivery)
            .finish()
    }
}

/// Delivery settings of a sink: concurrency, timeouts, retries and rate.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeliveryConfig {
    /// Requests in flight at once per router.
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
    /// Deliver one event at a time in stream order; retries then wait in place.
    #[serde(default)]
    pub ordered: bool,
    /// Timeout of one attempt.
    #[serde(default = "default_attempt_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Attempts before an event goes to the dead letter stream.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// Delay before each retry; the last entry repeats.
    #[serde(default = "default_backoff", with = "humantime_serde_vec")]
    pub backoff: Vec<Duration>,
    /// Upper bound on a delay taken from a `Retry-After` response header.
    #[serde(default = "default_max_retry_after", with = "humantime_serde")]
    pub max_retry_after: Duration,
    /// JetStream ack wait of the consumer; a longer attempt sends in-progress acks.
    #[serde(default = "default_ack_wait", with = "humantime_serde")]
    pub ack_wait: Duration,
    /// Requests per second at most, across this router's workers for the sink.
    #[serde(default)]
    pub rate_limit_per_second: Option<u32>,
    /// n8n only: retries of a webhook that returns 404 "not registered".
    #[serde(default = "default_n8n_not_registered_attempts")]
    pub not_registered_attempts: u32,
    /// n8n only: delay between those retries.
    #[serde(default = "default_n8n_not_registered_delay", with = "humantime_serde")]
    pub not_registered_delay: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: default_listen(),
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            max_batch_events: DEFAULT_MAX_BATCH_EVENTS,
            publish_timeout: DEFAULT_PUBLISH_TIMEOUT,
            unavailable_retry_after: DEFAULT_UNAVAILABLE_RETRY_AFTER,
        }
    }
}

impl Default for NatsConfig {
    fn default() -> Self {
        Self {
            url: default_nats_url(),
            name: default_nats_client_name(),
            connect_timeout: DEFAULT_NATS_CONNECT_TIMEOUT,
            credentials_file: None,
            user: None,
            password: None,
            token: None,
        }
    }
}

impl Default for StreamsConfig {
    fn default() -> Self {
        Self {
            events: default_events_stream(),
            dlq: default_dlq_stream(),
        }
    }
}

impl Default for SchemasConfig {
    fn default() -> Self {
        Self {
            dir: default_schema_dir(),
        }
    }
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        Self {
            concurrency: DEFAULT_CONCURRENCY,
            ordered: false,
            timeout: DEFAULT_ATTEMPT_TIMEOUT,
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            backoff: default_backoff(),
            max_retry_after: DEFAULT_MAX_RETRY_AFTER,
            ack_wait: DEFAULT_ACK_WAIT,
            rate_limit_per_second: None,
            not_registered_attempts: DEFAULT_N8N_NOT_REGISTERED_ATTEMPTS,
            not_registered_delay: DEFAULT_N8N_NOT_REGISTERED_DELAY,
        }
    }
}

impl DeliveryConfig {
    /// Returns the delay before the retry that follows attempt `attempt` (1-based).
    pub fn backoff_after(&self, attempt: u32) -> Duration {
        let index = usize::try_from(attempt.saturating_sub(1)).unwrap_or(usize::MAX);
        self.backoff
            .get(index)
            .or_else(|| self.backoff.last())
            .copied()
            .unwrap_or(DEFAULT_BACKOFF[0])
    }
}

/// Drops the user info and query of a URL, which may carry credentials, for logs.
pub fn redact_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) => {
            let _ = parsed.set_username("");
            let _ = parsed.set_password(None);
            if parsed.query().is_some() {
                parsed.set_query(Some("redacted"));
            }
            parsed.to_string()
        }
        Err(_) => "<invalid url>".to_owned(),
    }
}

fn default_listen() -> SocketAddr {
    DEFAULT_LISTEN
        .parse()
        .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 8080)))
}

fn default_max_body_bytes() -> usize {
    DEFAULT_MAX_BODY_BYTES
}

fn default_max_batch_events() -> usize {
    DEFAULT_MAX_BATCH_EVENTS
}

fn default_publish_timeout() -> Duration {
    DEFAULT_PUBLISH_TIMEOUT
}

fn default_unavailable_retry_after() -> Duration {
    DEFAULT_UNAVAILABLE_RETRY_AFTER
}

fn default_nats_url() -> String {
    DEFAULT_NATS_URL.to_owned()
}

fn default_nats_client_name() -> String {
    DEFAULT_NATS_CLIENT_NAME.to_owned()
}

fn default_nats_connect_timeout() -> Duration {
    DEFAULT_NATS_CONNECT_TIMEOUT
}

fn default_events_stream() -> StreamConfig {
    StreamConfig {
        name: DEFAULT_EVENTS_STREAM.to_owned(),
        max_age: DEFAULT_EVENTS_MAX_AGE,
        duplicate_window: DEFAULT_DUPLICATE_WINDOW,
        replicas: DEFAULT_REPLICAS,
        max_bytes: None,
    }
}

fn default_dlq_stream() -> StreamConfig {
    StreamConfig {
        name: DEFAULT_DLQ_STREAM.to_owned(),
        max_age: DEFAULT_DLQ_MAX_AGE,
        duplicate_window: DEFAULT_DUPLICATE_WINDOW,
        replicas: DEFAULT_REPLICAS,
        max_bytes: None,
    }
}

fn default_duplicate_window() -> Duration {
    DEFAULT_DUPLICATE_WINDOW
}

fn default_replicas() -> usize {
    DEFAULT_REPLICAS
}

fn default_schema_dir() -> PathBuf {
    PathBuf::from(DEFAULT_SCHEMA_DIR)
}

fn default_concurrency() -> usize {
    DEFAULT_CONCURRENCY
}

fn default_attempt_timeout() -> Duration {
    DEFAULT_ATTEMPT_TIMEOUT
}

fn default_max_attempts() -> u32 {
    DEFAULT_MAX_ATTEMPTS
}

fn default_backoff() -> Vec<Duration> {
    DEFAULT_BACKOFF.to_vec()
}

fn default_max_retry_after() -> Duration {
    DEFAULT_MAX_RETRY_AFTER
}

fn default_ack_wait() -> Duration {
    DEFAULT_ACK_WAIT
}

fn default_n8n_not_registered_attempts() -> u32 {
    DEFAULT_N8N_NOT_REGISTERED_ATTEMPTS
}

fn default_n8n_not_registered_delay() -> Duration {
    DEFAULT_N8N_NOT_REGISTERED_DELAY
}

/// Serde support for a list of human-readable durations such as `["1s", "5m"]`.
mod humantime_serde_vec {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Vec<Duration>, D::Error> {
        #[derive(Deserialize)]
        struct Wrapped(#[serde(with = "humantime_serde")] Duration);

        let items = Vec::<Wrapped>::deserialize(deserializer)?;
        Ok(items
            .into_iter()
            .map(|Wrapped(duration)| duration)
            .collect())
    }
}
