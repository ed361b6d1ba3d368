//! Checks on a deserialised [`Config`] that serde cannot express: names, patterns, URLs,
//! limits, and that every route names event types with a schema.

use std::collections::HashSet;
use std::fmt;
use std::time::Duration;

use super::{Config, DeliveryConfig, SinkConfig, SinkKind, StreamConfig};
use crate::event::EventPattern;
use crate::schema::SchemaRegistry;

/// Maximum length of a sink name; the consumer name adds a prefix.
pub const MAX_SINK_NAME_LEN: usize = 64;
/// Maximum concurrency of one sink.
pub const MAX_CONCURRENCY: usize = 1024;
/// Maximum replicas of a JetStream stream.
pub const MAX_REPLICAS: usize = 5;

/// One invalid value, named by its key path such as `sinks[0].url`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidationError {
    pub key: String,
    pub message: String,
}

impl fmt::Display for ValidationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "key `{}`: {}", self.key, self.message)
    }
}

/// Something valid but probably not intended, such as an n8n test URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Warning {
    pub key: String,
    pub message: String,
}

impl fmt::Display for Warning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "key `{}`: {}", self.key, self.message)
    }
}

impl Config {
    /// Checks every value; with `schemas`, also that each route matches a known event type.
    ///
    /// Returns the warnings when the configuration is valid, every error otherwise.
    pub fn validate(
        &self,
        schemas: Option<&SchemaRegistry>,
    ) -> Result<Vec<Warning>, Vec<ValidationError>> {
        let mut errors = Vec::new();
        let mut warnings = Vec::new();

        if self.server.max_body_bytes == 0 {
            errors.push(error("server.max_body_bytes", "must be at least 1"));
        }
        if self.server.max_batch_events == 0 {
            errors.push(error("server.max_batch_events", "must be at least 1"));
        }
        check_positive(
            &mut errors,
            "server.publish_timeout",
            self.server.publish_timeout,
        );
        if self.nats.url.trim().is_empty() {
            errors.push(error(
                "nats.url",
                "is empty: set a URL such as nats://127.0.0.1:4222",
            ));
        }
        check_stream(&mut errors, "streams.events", &self.streams.events);
        check_stream(&mut errors, "streams.dlq", &self.streams.dlq);
        if self.streams.events.name == self.streams.dlq.name {
            errors.push(error(
                "streams.dlq.name",
                &format!(
                    "\"{}\" is also the events stream: pick another name",
                    self.streams.dlq.name
                ),
            ));
        }

        let mut names = HashSet::new();
        for (index, sink) in self.sinks.iter().enumerate() {
            let key = format!("sinks[{index}]");
            if !names.insert(sink.name.as_str()) {
                errors.push(error(
                    &format!("{key}.name"),
                    &format!(
                        "\"{}\" is used by an earlier sink: sink names must be unique",
                        sink.name
                    ),
                ));
            }
            check_sink(&mut errors, &mut warnings, &key, sink, schemas);
        }

        if errors.is_empty() {
            Ok(warnings)
        } else {
            Err(errors)
        }
    }
}

fn error(key: &str, message: &str) -> ValidationError {
    ValidationError {
        key: key.to_owned(),
        message: message.to_owned(),
    }
}

fn check_positive(errors: &mut Vec<ValidationError>, key: &str, value: Duration) {
    if value.is_zero() {
        errors.push(error(key, "must be longer than zero, such as \"5s\""));
    }
}

fn check_stream(errors: &mut Vec<ValidationError>, key: &str, stream: &StreamConfig) {
    let valid_name = !stream.name.is_empty()
        && stream
            .name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if !valid_name {
        errors.push(error(
            &format!("{key}.name"),
            &format!(
                "\"{}\" is not a valid stream name: use letters, digits, '_' and '-'",
                stream.name
            ),
        ));
    }
    check_positive(errors, &format!("{key}.max_age"), stream.max_age);
    check_positive(
        errors,
        &format!("{key}.duplicate_window"),
        stream.duplicate_window,
    );
    if stream.duplicate_window > stream.max_age {
        errors.push(error(
            &format!("{key}.duplicate_window"),
            "is longer than max_age: JetStream requires it to be shorter",
        ));
    }
    if stream.replicas == 0 || stream.replicas > MAX_REPLICAS {
        errors.push(error(
            &format!("{key}.replicas"),
            &format!(
                "is {}: use 1 on a single server, 3 or 5 in a cluster",
                stream.replicas
            ),
        ));
    }
}

fn check_sink(
    errors: &mut Vec<ValidationError>,
    warnings: &mut Vec<Warning>,
    key: &str,
    sink: &SinkConfig,
    schemas: Option<&SchemaRegistry>,
) {
    let valid_name = !sink.name.is_empty()
        && sink.name.len() <= MAX_SINK_NAME_LEN
        && sink
            .name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
    if !valid_name {
        errors.push(error(
            &format!("{key}.name"),
            &format!(
                "\"{}\" is not a valid sink name: use 1 to {MAX_SINK_NAME_LEN} lowercase letters, \
                 digits, '_' and '-'",
                sink.name
            ),
        ));
    }

    match url::Url::parse(&sink.url) {
        Ok(url) if matches!(url.scheme(), "http" | "https") && url.host().is_some() => {
            if sink.kind == SinkKind::N8n && url.path().contains("/webhook-test/") {
                warnings.push(Warning {
                    key: format!("{key}.url"),
                    message: "is an n8n /webhook-test/ URL, which only listens while the editor \
                              waits for a test event: use the production /webhook/ URL"
                        .to_owned(),
                });
            }
        }
        Ok(_) => errors.push(error(
            &format!("{key}.url"),
            &format!(
                "\"{}\" is not an http or https URL with a host",
                super::redact_url(&sink.url)
            ),
        )),
        Err(err) => errors.push(error(
            &format!("{key}.url"),
            &format!("is not a valid URL: {err}"),
        )),
    }

    if sink.events.is_empty() {
        errors.push(error(
            &format!("{key}.events"),
            "is empty: list the event types this sink takes, such as [\"chat.created\"]",
        ));
    }
    for (index, pattern) in sink.events.iter().enumerate() {
        let pattern_key = format!("{key}.events[{index}]");
        match pattern.parse::<EventPattern>() {
            Ok(parsed) => {
                if let Some(schemas) = schemas
                    && !schemas.event_types().any(|t| parsed.matches(t.as_str()))
                {
                    errors.push(error(
                        &pattern_key,
                        &format!(
                            "\"{pattern}\" matches no event type with a schema: add \
                             schemas/<type>.json or fix the pattern"
                        ),
                    ));
                }
            }
            Err(err) => errors.push(error(&pattern_key, &err.to_string())),
        }
    }

    for (index, secret) in sink.secrets.iter().enumerate() {
        use secrecy::ExposeSecret;
        if let Err(message) = check_secret(secret.expose_secret()) {
            errors.push(error(&format!("{key}.secrets[{index}]"), message));
        }
    }

    check_delivery(errors, &format!("{key}.delivery"), &sink.delivery);
}

/// Checks the shape of a Standard Webhooks secret without revealing it in the message.
fn check_secret(secret: &str) -> Result<(), &'static str> {
    let encoded = secret.strip_prefix("whsec_").unwrap_or(secret);
    if encoded.len() < 16 {
        return Err(
            "is too short: use a secret of at least 24 random bytes, base64-encoded \
                    with the whsec_ prefix",
        );
    }
    Ok(())
}

fn check_delivery(errors: &mut Vec<ValidationError>, key: &str, delivery: &DeliveryConfig) {
    if delivery.concurrency == 0 || delivery.concurrency > MAX_CONCURRENCY {
        errors.push(error(
            &format!("{key}.concurrency"),
            &format!("is {}: use 1 to {MAX_CONCURRENCY}", delivery.concurrency),
        ));
    }
    if delivery.max_attempts == 0 {
        errors.push(error(&format!("{key}.max_attempts"), "must be at least 1"));
    }
    check_positive(errors, &format!("{key}.timeout"), delivery.timeout);
    check_positive(errors, &format!("{key}.ack_wait"), delivery.ack_wait);
    if delivery.backoff.is_empty() {
        errors.push(error(
            &format!("{key}.backoff"),
            "is empty: give at least one delay, such as [\"1s\"]",
        ));
    }
    for (index, delay) in delivery.backoff.iter().enumerate() {
        check_positive(errors, &format!("{key}.backoff[{index}]"), *delay);
    }
    if delivery.rate_limit_per_second == Some(0) {
        errors.push(error(
            &format!("{key}.rate_limit_per_second"),
            "is 0: remove it for no limit or set at least 1",
        ));
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::parse_str;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    fn sink_config(extra: &str) -> Config {
        let text = format!(
            "[[sinks]]\nname = \"hook\"\nkind = \"n8n\"\nurl = \"http://127.0.0.1:5678/webhook/x\"\n\
             events = [\"chat.created\"]\n{extra}"
        );
        parse_str(&text, Path::new("test.toml"), &no_env).expect("parses")
    }

    #[test]
    fn valid_sink_passes() {
        assert_eq!(sink_config("").validate(None), Ok(vec![]));
    }

    #[test]
    fn n8n_test_url_warns() {
        let mut config = sink_config("");
        config.sinks[0].url = "http://127.0.0.1:5678/webhook-test/x".to_owned();
        let warnings = config.validate(None).expect("valid");
        assert_eq!(warnings.len(), 1);
        assert_eq!(warnings[0].key, "sinks[0].url");
    }

    #[test]
    fn errors_name_key_and_value() {
        let mut config = sink_config("[sinks.delivery]\nconcurrency = 0\nbackoff = []\n");
        config.sinks[0].name = "Bad Name".to_owned();
        config.sinks[0].url = "ftp://example.test/".to_owned();
        config.sinks[0].events = vec!["chat.>.x".to_owned()];
        let errors = config.validate(None).expect_err("invalid");
        let keys: Vec<&str> = errors.iter().map(|e| e.key.as_str()).collect();
        assert!(keys.contains(&"sinks[0].name"), "{errors:?}");
        assert!(keys.contains(&"sinks[0].url"), "{errors:?}");
        assert!(keys.contains(&"sinks[0].events[0]"), "{errors:?}");
        assert!(
            keys.contains(&"sinks[0].delivery.concurrency"),
            "{errors:?}"
        );
        assert!(keys.contains(&"sinks[0].delivery.backoff"), "{errors:?}");
        assert!(
            errors.iter().any(|e| e.message.contains("Bad Name")),
            "{errors:?}"
        );
    }
}
