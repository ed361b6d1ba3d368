//! Reading a request body: media type, size limit and strict JSON.

use axum::body::Body;
use axum::http::{HeaderMap, header};
use bytes::Bytes;
use serde_json::Value;
use switchyard_core::json;

use crate::problem::Problem;

/// The JSON flavour a request declared with its `Content-Type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MediaType {
    /// `application/json` or any `application/*+json` other than the CloudEvents ones.
    Json,
    /// `application/cloudevents+json`: one structured-mode CloudEvent.
    CloudEvent,
    /// `application/cloudevents-batch+json`: an array of structured-mode CloudEvents.
    CloudEventBatch,
}

/// Classifies the `Content-Type`; anything but JSON in UTF-8 is a 415.
pub fn media_type(headers: &HeaderMap) -> Result<MediaType, Problem> {
    let Some(value) = headers.get(header::CONTENT_TYPE) else {
        return Err(Problem::unsupported_media_type(
            "Content-Type is missing: send the event as JSON with Content-Type: application/json"
                .to_owned(),
        ));
    };
    let text = value.to_str().unwrap_or("<not ASCII>");
    let unsupported = || {
        Problem::unsupported_media_type(format!(
            "Content-Type \"{text}\" is not supported: send JSON with Content-Type: \
             application/json (or an application/*+json type) in UTF-8"
        ))
    };
    let parsed: mime::Mime = text.parse().map_err(|_| unsupported())?;
    if let Some(charset) = parsed.get_param(mime::CHARSET)
        && !charset.as_str().eq_ignore_ascii_case("utf-8")
    {
        return Err(unsupported());
    }
    if parsed.type_() != mime::APPLICATION {
        return Err(unsupported());
    }
    match (
        parsed.subtype().as_str(),
        parsed.suffix().map(|s| s.as_str()),
    ) {
        ("cloudevents", Some("json")) => Ok(MediaType::CloudEvent),
        ("cloudevents-batch", Some("json")) => Ok(MediaType::CloudEventBatch),
        ("json", None) | (_, Some("json")) => Ok(MediaType::Json),
        _ => Err(unsupported()),
    }
}

/// Reads the whole body, rejecting it with a 413 as soon as it passes `limit` bytes.
pub async fn read_limited(headers: &HeaderMap, body: Body, limit: usize) -> Result<Bytes, Problem> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok());
    if declared.is_some_and(|length| length > limit as u64) {
        return Err(Problem::too_large(limit));
    }
    axum::body::to_bytes(body, limit).await.map_err(|err| {
        let inner = err.into_inner();
        if inner.is::<http_body_util::LengthLimitError>() {
            Problem::too_large(limit)
        } else {
            Problem::bad_request(
                "body-read-failed",
                format!("failed to read the request body: {inner}"),
            )
        }
    })
}

/// Strips a byte-order mark and parses strict JSON.
///
/// Returns the payload to store (the body without the byte-order mark) and its parsed value.
pub fn parse_json(body: &Bytes) -> Result<(Bytes, Value), Problem> {
    let stripped = json::strip_bom(body);
    let payload = body.slice(body.len() - stripped.len()..);
    let value = json::parse_strict(&payload).map_err(|err| Problem::invalid_json(&err))?;
    Ok((payload, value))
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;

    use super::*;

    fn headers(content_type: &str) -> HeaderMap {
        let mut map = HeaderMap::new();
        map.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_str(content_type).expect("ASCII"),
        );
        map
    }

    #[test]
    fn media_type_accepts_json_flavours() {
        for value in [
            "application/json",
            "application/json; charset=utf-8",
            "application/JSON; charset=UTF-8",
            "application/vnd.acme.order+json",
        ] {
            assert_eq!(
                media_type(&headers(value)).ok(),
                Some(MediaType::Json),
                "{value}"
            );
        }
        assert_eq!(
            media_type(&headers("application/cloudevents+json")).ok(),
            Some(MediaType::CloudEvent)
        );
        assert_eq!(
            media_type(&headers(
                "application/cloudevents-batch+json; charset=utf-8"
            ))
            .ok(),
            Some(MediaType::CloudEventBatch)
        );
    }

    #[test]
    fn media_type_rejects_others() {
        for value in [
            "text/plain",
            "application/xml",
            "application/x-www-form-urlencoded",
            "application/json; charset=latin1",
            "not a type",
        ] {
            let problem = media_type(&headers(value)).expect_err(value);
            assert_eq!(problem.status.as_u16(), 415, "{value}");
        }
        assert!(media_type(&HeaderMap::new()).is_err());
    }
}
