//! The benchmark payload, a `chat.created` event of about 400 bytes, and the clock that
//! stamps it.
//!
//! The sender writes its send time into the payload as `sent_at_ns`. The receiver runs in
//! the same process and subtracts that time from the arrival time, so both ends read one
//! monotonic clock.

use std::sync::OnceLock;
use std::time::Instant;

use bytes::Bytes;

/// Field of the payload that carries the send time.
const SENT_AT_KEY: &[u8] = b"\"sent_at_ns\":";

static EPOCH: OnceLock<Instant> = OnceLock::new();

/// Returns the nanoseconds since the first call in this process, at least 1.
pub fn now_ns() -> u64 {
    let epoch = EPOCH.get_or_init(Instant::now);
    u64::try_from(epoch.elapsed().as_nanos())
        .unwrap_or(u64::MAX)
        .max(1)
}

/// Builds a `chat.created` payload, valid for `schemas/chat.created.json`, with the extra
/// field `sent_at_ns` last.
pub fn chat_created(seq: u64, sent_at_ns: u64) -> Bytes {
    Bytes::from(format!(
        concat!(
            r#"{{"chat_id":"chat_01HZX3J8Q4{seq:010}","created_at":"2025-01-15T09:30:00Z","#,
            r#""created_by":"user_4242","participants":["user_4242","user_0007","user_1093","#,
            r#""user_2201","user_3150"],"title":"Quarterly planning: "#,
            r#"infrastructure budget, on-call rotation and incident review","#,
            r#""kind":"group","workspace_id":"ws_7f3a9c2e51d4","client":{{"app":"web","#,
            r#""version":"5.12.3","locale":"en-US"}},"sent_at_ns":{sent_at_ns}}}"#
        ),
        seq = seq,
        sent_at_ns = sent_at_ns,
    ))
}

/// Reads `sent_at_ns` out of a payload built by [`chat_created`].
pub fn sent_at(body: &[u8]) -> Option<u64> {
    let start = body
        .windows(SENT_AT_KEY.len())
        .rposition(|window| window == SENT_AT_KEY)?
        + SENT_AT_KEY.len();
    let digits = &body[start..];
    let end = digits
        .iter()
        .position(|b| !b.is_ascii_digit())
        .unwrap_or(digits.len());
    std::str::from_utf8(&digits[..end]).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_size_and_fields() {
        let payload = chat_created(7, 123_456_789_012);
        assert!((380..=420).contains(&payload.len()), "{}", payload.len());
        let value: serde_json::Value =
            serde_json::from_slice(&payload).expect("the payload is JSON");
        assert_eq!(value["kind"], "group");
        assert_eq!(sent_at(&payload), Some(123_456_789_012));
    }
}
