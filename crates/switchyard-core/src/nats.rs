//! NATS plumbing: connecting, checking the server, creating the streams and publishing
//! events with a JetStream acknowledgement.

use std::time::Duration;

use async_nats::jetstream::{self, message::PublishMessage, publish::PublishAck, stream};
use async_nats::{Client, ConnectOptions};
use secrecy::ExposeSecret;

use crate::config::{NatsConfig, StreamConfig, StreamsConfig};
use crate::event::{DLQ_SUBJECT_PREFIX, EVENT_SUBJECT_PREFIX, Event, REPLAY_SUBJECT_PREFIX};

/// Oldest nats-server release Switchyard runs on: consumers with several filter subjects
/// arrived in 2.10.
pub const MIN_SERVER_VERSION: (u64, u64) = (2, 10);

/// A failure to reach or prepare NATS.
#[derive(Debug, thiserror::Error)]
pub enum NatsError {
    #[error("failed to read NATS credentials file {path}: {error}")]
    Credentials { path: String, error: std::io::Error },
    #[error("failed to connect to NATS at {url}: {error}; check that nats-server is running")]
    Connect {
        url: String,
        error: async_nats::ConnectError,
    },
    #[error(
        "nats-server {version} is too old: Switchyard needs 2.10 or newer for consumers with \
         several filter subjects; upgrade the server"
    )]
    ServerTooOld { version: String },
    #[error("failed to create or update stream {stream}: {message}; is JetStream enabled (-js)?")]
    Stream { stream: String, message: String },
}

/// Reason a publish is not durable.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("NATS is not connected")]
    Disconnected,
    #[error("JetStream did not acknowledge the publish within {0:?}")]
    TimedOut(Duration),
    #[error("JetStream rejected the publish: {0}")]
    Rejected(String),
    /// The payload plus headers exceed the server's `max_payload`, or the headers exceed
    /// JetStream's header limit, so a retry fails again.
    #[error("the message is larger than the NATS server allows: {0}")]
    TooLarge(String),
}

/// Connects with the configured credentials, and checks the server version.
pub async fn connect(config: &NatsConfig) -> Result<Client, NatsError> {
    let mut options = ConnectOptions::new()
        .name(&config.name)
        .connection_timeout(config.connect_timeout)
        // Keep reconnecting for as long as the router runs; readiness reports the outage.
        .max_reconnects(None)
        .event_callback(|event| async move {
            tracing::info!(event = %event, "NATS connection event");
        });
    if let Some(path) = &config.credentials_file {
        options = options
            .credentials_file(path)
            .await
            .map_err(|error| NatsError::Credentials {
                path: path.display().to_string(),
                error,
            })?;
    }
    if let (Some(user), Some(password)) = (&config.user, &config.password) {
        options = options.user_and_password(user.clone(), password.expose_secret().to_owned());
    }
    if let Some(token) = &config.token {
        options = options.token(token.expose_secret().to_owned());
    }

    // async-nats parses a single string as one URL, so a comma-separated server list is
    // split here.
    let urls: Vec<&str> = config
        .url
        .split(',')
        .map(str::trim)
        .filter(|url| !url.is_empty())
        .collect();
    let client = options
        .connect(urls)
        .await
        .map_err(|error| NatsError::Connect {
            url: redact_nats_url(&config.url),
            error,
        })?;
    check_server_version(&client.server_info().version)?;
    Ok(client)
}

/// Returns the server list of `nats.url` without the user and password of each URL, for
/// messages and logs.
pub fn redact_nats_url(url: &str) -> String {
    url.split(',')
        .map(|server| {
            let server = server.trim();
            let (scheme, rest) = match server.split_once("://") {
                Some((scheme, rest)) => (&server[..scheme.len() + 3], rest),
                None => ("", server),
            };
            match rest.rsplit_once('@') {
                Some((_, host)) => format!("{scheme}{host}"),
                None => server.to_owned(),
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// Rejects a server older than [`MIN_SERVER_VERSION`].
pub fn check_server_version(version: &str) -> Result<(), NatsError> {
    let mut parts = version
        .trim_start_matches('v')
        .split(['.', '-'])
        .map(|part| part.parse::<u64>().ok());
    let major = parts.next().flatten();
    let minor = parts.next().flatten();
    match (major, minor) {
        (Some(major), Some(minor)) if (major, minor) >= MIN_SERVER_VERSION => Ok(()),
        _ => Err(NatsError::ServerTooOld {
            version: version.to_owned(),
        }),
    }
}

/// Creates the `EVENTS` and `DLQ` streams, or updates them to match the configuration.
///
/// `EVENTS` also takes `replay.<sink>.<type>`, the subjects that send an event again to one
/// sink only.
pub async fn ensure_streams(
    jetstream: &jetstream::Context,
    config: &StreamsConfig,
) -> Result<(), NatsError> {
    let events_subjects = vec![
        format!("{EVENT_SUBJECT_PREFIX}.>"),
        format!("{REPLAY_SUBJECT_PREFIX}.>"),
    ];
    ensure_stream(jetstream, &config.events, events_subjects).await?;
    ensure_stream(
        jetstream,
        &config.dlq,
        vec![format!("{DLQ_SUBJECT_PREFIX}.>")],
    )
    .await
}

async fn ensure_stream(
    jetstream: &jetstream::Context,
    config: &StreamConfig,
    subjects: Vec<String>,
) -> Result<(), NatsError> {
    let stream_config = stream::Config {
        name: config.name.clone(),
        subjects,
        storage: stream::StorageType::File,
        retention: stream::RetentionPolicy::Limits,
        max_age: config.max_age,
        duplicate_window: config.duplicate_window,
        num_replicas: config.replicas,
        max_bytes: config.max_bytes.unwrap_or(-1),
        // Direct gets let every router read the oldest pending event for its metrics.
        allow_direct: true,
        ..Default::default()
    };
    jetstream
        .create_or_update_stream(stream_config)
        .await
        .map_err(|err| NatsError::Stream {
            stream: config.name.clone(),
            message: err.to_string(),
        })?;
    tracing::debug!(stream = %config.name, "stream ready");
    Ok(())
}

/// Publishes `event` to `events.<type>` and waits for the JetStream acknowledgement.
pub async fn publish_event(
    jetstream: &jetstream::Context,
    event: &Event,
    timeout: Duration,
) -> Result<PublishAck, PublishError> {
    let publish = PublishMessage::build()
        .headers(event.headers())
        .payload(event.data.clone());
    publish_acked(jetstream, event.event_type.subject(), publish, timeout).await
}

/// Publishes one message and waits up to `timeout` for the acknowledgement.
pub async fn publish_acked(
    jetstream: &jetstream::Context,
    subject: String,
    publish: PublishMessage,
    timeout: Duration,
) -> Result<PublishAck, PublishError> {
    if jetstream.client().connection_state() != async_nats::connection::State::Connected {
        return Err(PublishError::Disconnected);
    }
    let acked = async {
        let ack_future = jetstream
            .send_publish(subject, publish)
            .await
            .map_err(|err| match err.kind() {
                jetstream::context::PublishErrorKind::MaxPayloadExceeded => {
                    PublishError::TooLarge(err.to_string())
                }
                _ => PublishError::Rejected(err.to_string()),
            })?;
        ack_future.await.map_err(|err| {
            if is_header_too_large(&err) {
                PublishError::TooLarge(err.to_string())
            } else {
                PublishError::Rejected(err.to_string())
            }
        })
    };
    match tokio::time::timeout(timeout, acked).await {
        Ok(result) => result,
        Err(_) => Err(PublishError::TimedOut(timeout)),
    }
}

/// Reports whether JetStream rejected a message because its headers exceed the server's
/// 64 KiB limit, which a retry cannot fix.
fn is_header_too_large(err: &jetstream::context::PublishError) -> bool {
    std::error::Error::source(err)
        .and_then(|source| source.downcast_ref::<jetstream::Error>())
        .is_some_and(|api_error| {
            api_error.error_code() == jetstream::ErrorCode::STREAM_HEADER_EXCEEDS_MAXIMUM
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nats_url_redaction_drops_credentials() {
        assert_eq!(
            redact_nats_url("nats://alice:s3cret@127.0.0.1:4222"),
            "nats://127.0.0.1:4222"
        );
        assert_eq!(
            redact_nats_url("nats://a:b@n1:4222, tls://token@n2:4222,nats://n3:4222"),
            "nats://n1:4222,tls://n2:4222,nats://n3:4222"
        );
        assert_eq!(redact_nats_url("user:pw@127.0.0.1:4222"), "127.0.0.1:4222");
        assert_eq!(redact_nats_url("127.0.0.1:4222"), "127.0.0.1:4222");
    }

    #[test]
    fn server_version_gate() {
        assert!(check_server_version("2.10.0").is_ok());
        assert!(check_server_version("2.15.1").is_ok());
        assert!(check_server_version("3.0.0-beta").is_ok());
        assert!(check_server_version("2.9.10").is_err());
        assert!(check_server_version("").is_err());
    }
}
