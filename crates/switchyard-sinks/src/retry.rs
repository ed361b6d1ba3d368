//! The retry decision: what to do with an event after one delivery attempt.
//!
//! Every sink kind reports an [`AttemptOutcome`]; [`decide`] is the only place that turns
//! an outcome into acknowledge, retry later, or dead-letter.

use std::time::{Duration, SystemTime};

use switchyard_core::config::{DeliveryConfig, SinkKind};

/// Result of one delivery attempt.
#[derive(Debug, Clone)]
pub enum AttemptOutcome {
    /// The endpoint returned a response.
    Response {
        status: u16,
        /// Parsed `Retry-After`, if the response had a valid one.
        retry_after: Option<Duration>,
        /// The first bytes of the response body, for dead letters and logs.
        excerpt: String,
    },
    /// No response within the attempt timeout.
    TimedOut,
    /// The connection failed (refused, reset, DNS, TLS).
    Connection(String),
}

impl AttemptOutcome {
    /// Returns the HTTP status, if there was a response.
    pub fn status(&self) -> Option<u16> {
        match self {
            Self::Response { status, .. } => Some(*status),
            Self::TimedOut | Self::Connection(_) => None,
        }
    }

    /// Returns a short, stable name of the outcome for log keys and span attributes.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Response { status, .. } if (200..300).contains(status) => "success",
            Self::Response { status, .. } if (300..400).contains(status) => "redirect",
            Self::Response { status, .. } if (400..500).contains(status) => "client_error",
            Self::Response { .. } => "server_error",
            Self::TimedOut => "timeout",
            Self::Connection(_) => "connection",
        }
    }

    /// Describes the failure in a few words for logs and dead letter headers.
    pub fn describe(&self) -> String {
        match self {
            Self::Response { status, .. } => format!("HTTP {status}"),
            Self::TimedOut => "timed out".to_owned(),
            Self::Connection(message) => format!("connection failed: {message}"),
        }
    }
}

/// Reason an event was given up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeadLetterReason {
    /// The endpoint rejected the event in a way a retry cannot fix (most 4xx, 3xx).
    Permanent,
    /// Every allowed attempt failed.
    Exhausted,
    /// The event does not match its schema, or its type has none.
    Invalid,
    /// The sink's filter or transform failed on this event.
    Transform,
}

impl DeadLetterReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Permanent => "permanent",
            Self::Exhausted => "exhausted",
            Self::Invalid => "invalid",
            Self::Transform => "transform",
        }
    }
}

/// Next step for the event after an attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Ack,
    /// Deliver again after `delay`.
    Retry {
        delay: Duration,
    },
    DeadLetter(DeadLetterReason),
}

/// Decides after attempt number `attempt` (1-based) of a sink of kind `kind`.
///
/// - 2xx acknowledges.
/// - 408, 425, 429, 5xx, timeouts and connection errors retry, after the server's
///   `Retry-After` (capped by `max_retry_after`) or the next backoff delay.
/// - n8n's 404 for a webhook that is not registered (the workflow is inactive) retries on
///   its own short schedule, because activating the workflow fixes it.
/// - Redirects are failures and are never followed; they and other 4xx are permanent.
/// - A retryable failure on the last allowed attempt is exhausted.
pub fn decide(
    kind: SinkKind,
    delivery: &DeliveryConfig,
    attempt: u32,
    outcome: &AttemptOutcome,
) -> Decision {
    let retry_after = match outcome {
        AttemptOutcome::Response { status, .. } if (200..300).contains(status) => {
            return Decision::Ack;
        }
        AttemptOutcome::Response {
            status: 404,
            excerpt,
            ..
        } if kind == SinkKind::N8n && is_n8n_not_registered(excerpt) => {
            return if attempt < delivery.not_registered_attempts {
                Decision::Retry {
                    delay: delivery.not_registered_delay,
                }
            } else {
                Decision::DeadLetter(DeadLetterReason::Exhausted)
            };
        }
        AttemptOutcome::Response {
            status,
            retry_after,
            ..
        } => {
            if !is_retryable_status(*status) {
                return Decision::DeadLetter(DeadLetterReason::Permanent);
            }
            *retry_after
        }
        AttemptOutcome::TimedOut | AttemptOutcome::Connection(_) => None,
    };

    if attempt >= delivery.max_attempts {
        return Decision::DeadLetter(DeadLetterReason::Exhausted);
    }
    let delay = match retry_after {
        Some(requested) => requested.min(delivery.max_retry_after),
        None => delivery.backoff_after(attempt),
    };
    Decision::Retry { delay }
}

/// Reports whether an HTTP status is worth retrying.
pub fn is_retryable_status(status: u16) -> bool {
    matches!(status, 408 | 425 | 429) || (500..600).contains(&status)
}

/// Recognises n8n's response for a production webhook whose workflow is not active:
/// `404 {"code":404,"message":"The requested webhook \"POST x\" is not registered.", ...}`.
fn is_n8n_not_registered(excerpt: &str) -> bool {
    excerpt.contains("is not registered")
}

/// Parses `Retry-After` as delay-seconds or an HTTP date, relative to `now`.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let date = httpdate::parse_http_date(value).ok()?;
    Some(date.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn response(status: u16) -> AttemptOutcome {
        AttemptOutcome::Response {
            status,
            retry_after: None,
            excerpt: String::new(),
        }
    }

    fn delivery() -> DeliveryConfig {
        DeliveryConfig {
            max_attempts: 3,
            backoff: vec![Duration::from_secs(1), Duration::from_secs(7)],
            max_retry_after: Duration::from_secs(60),
            ..DeliveryConfig::default()
        }
    }

    #[test]
    fn success_acks() {
        for status in [200, 201, 202, 204, 299] {
            assert_eq!(
                decide(SinkKind::Webhook, &delivery(), 1, &response(status)),
                Decision::Ack
            );
        }
    }

    #[test]
    fn retryable_failures_follow_backoff() {
        let config = delivery();
        for outcome in [
            response(408),
            response(425),
            response(429),
            response(500),
            response(503),
            AttemptOutcome::TimedOut,
            AttemptOutcome::Connection("refused".into()),
        ] {
            let first = decide(SinkKind::Webhook, &config, 1, &outcome);
            assert_eq!(
                first,
                Decision::Retry {
                    delay: Duration::from_secs(1)
                },
                "{outcome:?}"
            );
            let second = decide(SinkKind::Webhook, &config, 2, &outcome);
            assert_eq!(
                second,
                Decision::Retry {
                    delay: Duration::from_secs(7)
                },
                "{outcome:?}"
            );
        }
    }

    #[test]
    fn last_attempt_is_exhausted() {
        let decision = decide(SinkKind::Webhook, &delivery(), 3, &response(503));
        assert_eq!(decision, Decision::DeadLetter(DeadLetterReason::Exhausted));
    }

    #[test]
    fn redirects_and_client_errors_are_permanent() {
        for status in [301, 302, 307, 400, 401, 403, 404, 410, 422] {
            let decision = decide(SinkKind::Webhook, &delivery(), 1, &response(status));
            assert_eq!(
                decision,
                Decision::DeadLetter(DeadLetterReason::Permanent),
                "{status}"
            );
        }
    }

    #[test]
    fn retry_after_is_honoured_and_capped() {
        let outcome = |seconds| AttemptOutcome::Response {
            status: 429,
            retry_after: Some(Duration::from_secs(seconds)),
            excerpt: String::new(),
        };
        let config = delivery();
        assert_eq!(
            decide(SinkKind::Webhook, &config, 1, &outcome(12)),
            Decision::Retry {
                delay: Duration::from_secs(12)
            }
        );
        assert_eq!(
            decide(SinkKind::Webhook, &config, 1, &outcome(7200)),
            Decision::Retry {
                delay: Duration::from_secs(60)
            }
        );
    }

    #[test]
    fn n8n_not_registered_retries_on_its_schedule() {
        let config = DeliveryConfig {
            not_registered_attempts: 2,
            not_registered_delay: Duration::from_secs(3),
            ..delivery()
        };
        let outcome = AttemptOutcome::Response {
            status: 404,
            retry_after: None,
            excerpt:
                r#"{"code":404,"message":"The requested webhook \"POST chat\" is not registered."}"#
                    .into(),
        };
        assert_eq!(
            decide(SinkKind::N8n, &config, 1, &outcome),
            Decision::Retry {
                delay: Duration::from_secs(3)
            }
        );
        assert_eq!(
            decide(SinkKind::N8n, &config, 2, &outcome),
            Decision::DeadLetter(DeadLetterReason::Exhausted)
        );
        assert_eq!(
            decide(SinkKind::Webhook, &config, 1, &outcome),
            Decision::DeadLetter(DeadLetterReason::Permanent)
        );
    }

    #[test]
    fn retry_after_parses_seconds_and_dates() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        assert_eq!(parse_retry_after("30", now), Some(Duration::from_secs(30)));
        let later = httpdate::fmt_http_date(now + Duration::from_secs(90));
        assert_eq!(
            parse_retry_after(&later, now),
            Some(Duration::from_secs(90))
        );
        let earlier = httpdate::fmt_http_date(now - Duration::from_secs(90));
        assert_eq!(parse_retry_after(&earlier, now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("soon", now), None);
    }
}
