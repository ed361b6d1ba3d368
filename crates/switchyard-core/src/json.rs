//! Strict JSON checks for request bodies.
//!
//! Switchyard stores the producer's bytes unchanged, so these checks only decide whether
//! the bytes are acceptable and build a [`Value`] for schema validation. They never
//! re-serialise the payload. Beyond what `serde_json` rejects on its own (NaN, trailing
//! commas, comments), a body is rejected when it is empty, not UTF-8, or when an object
//! repeats a key, because receivers disagree on which duplicate wins.

use std::collections::HashSet;
use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::Value;

const UTF8_BOM: &[u8] = b"\xEF\xBB\xBF";

/// Reason a body is not acceptable JSON.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum JsonError {
    #[error("request body is empty: send a JSON document")]
    Empty,
    #[error(
        "request body is not valid UTF-8 (first invalid byte at offset {offset}): send JSON \
         encoded as UTF-8"
    )]
    InvalidUtf8 { offset: usize },
    #[error("invalid JSON at line {line} column {column}: {message}")]
    Syntax {
        message: String,
        line: usize,
        column: usize,
    },
    #[error("duplicate key \"{key}\" in a JSON object at line {line} column {column}: keep one")]
    DuplicateKey {
        key: String,
        line: usize,
        column: usize,
    },
}

/// Strips a leading UTF-8 byte-order mark, which RFC 8259 allows parsers to ignore.
pub fn strip_bom(body: &[u8]) -> &[u8] {
    body.strip_prefix(UTF8_BOM).unwrap_or(body)
}

/// Checks that `body` is one strict JSON document and returns it parsed.
///
/// A leading byte-order mark must be stripped with [`strip_bom`] first.
pub fn parse_strict(body: &[u8]) -> Result<Value, JsonError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(JsonError::Empty);
    }
    if let Err(err) = std::str::from_utf8(body) {
        return Err(JsonError::InvalidUtf8 {
            offset: err.valid_up_to(),
        });
    }

    let value: Value = serde_json::from_slice(body).map_err(|err| syntax_error(&err))?;
    check_duplicate_keys(body)?;
    Ok(value)
}

/// Parses `body` with every check of [`parse_strict`] except the duplicate key pass.
///
/// For payloads that already passed [`parse_strict`] at the ingress, where a second walk
/// of the document would only cost time.
pub fn parse_checked_before(body: &[u8]) -> Result<Value, JsonError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(JsonError::Empty);
    }
    serde_json::from_slice(body).map_err(|err| syntax_error(&err))
}

fn syntax_error(err: &serde_json::Error) -> JsonError {
    // serde_json appends " at line L column C" to its message; the position is kept in
    // separate fields, so the suffix is dropped to avoid saying it twice.
    let text = err.to_string();
    let message = match text.rfind(" at line ") {
        Some(index) => text[..index].to_owned(),
        None => text,
    };
    JsonError::Syntax {
        message,
        line: err.line(),
        column: err.column(),
    }
}

/// Walks the document once more, rejecting any object that repeats a key.
fn check_duplicate_keys(body: &[u8]) -> Result<(), JsonError> {
    let mut deserializer = serde_json::Deserializer::from_slice(body);
    let mut duplicate = None;
    let seed = DuplicateCheck {
        duplicate: &mut duplicate,
    };
    match seed.deserialize(&mut deserializer) {
        Ok(()) => Ok(()),
        Err(err) => match duplicate {
            Some(key) => Err(JsonError::DuplicateKey {
                key,
                line: err.line(),
                column: err.column(),
            }),
            None => Err(syntax_error(&err)),
        },
    }
}

/// A visitor that accepts any JSON value and fails on the first repeated object key,
/// recording that key so the error can name it.
struct DuplicateCheck<'a> {
    duplicate: &'a mut Option<String>,
}

impl<'de> DeserializeSeed<'de> for DuplicateCheck<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for DuplicateCheck<'_> {
    type Value = ();

    fn expecting(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
        formatter.write_str("any JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }

    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }

    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }

    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }

    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }

    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq
            .next_element_seed(DuplicateCheck {
                duplicate: &mut *self.duplicate,
            })?
            .is_some()
        {}
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let mut seen = HashSet::new();
        while let Some(key) = map.next_key::<String>()? {
            if !seen.insert(key.clone()) {
                let message = format!("duplicate key \"{key}\"");
                *self.duplicate = Some(key);
                return Err(de::Error::custom(message));
            }
            map.next_value_seed(DuplicateCheck {
                duplicate: &mut *self.duplicate,
            })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_plain_object() {
        let value = parse_strict(br#"{"a": 1, "b": [true, null]}"#).expect("valid JSON");
        assert_eq!(value["a"], serde_json::json!(1));
    }

    #[test]
    fn rejects_empty_and_whitespace() {
        assert_eq!(parse_strict(b""), Err(JsonError::Empty));
        assert_eq!(parse_strict(b" \n\t "), Err(JsonError::Empty));
    }

    #[test]
    fn rejects_duplicate_key_with_name() {
        let err = parse_strict(br#"{"a": 1, "b": {"c": 1, "c": 2}}"#).expect_err("duplicate");
        match err {
            JsonError::DuplicateKey { key, line, .. } => {
                assert_eq!(key, "c");
                assert_eq!(line, 1);
            }
            other => panic!("expected a duplicate key error, got {other:?}"),
        }
    }

    #[test]
    fn rejects_non_json_with_position() {
        for body in [
            &b"{\"a\": NaN}"[..],
            b"[1, 2,]",
            b"{\"a\": 1,}",
            b"{'a': 1}",
        ] {
            match parse_strict(body) {
                Err(JsonError::Syntax { line, column, .. }) => {
                    assert_eq!(line, 1);
                    assert!(column > 0);
                }
                other => panic!("expected a syntax error for {body:?}, got {other:?}"),
            }
        }
    }

    #[test]
    fn rejects_invalid_utf8_with_offset() {
        let err = parse_strict(b"{\"a\": \"\xff\"}").expect_err("invalid UTF-8");
        assert_eq!(err, JsonError::InvalidUtf8 { offset: 7 });
    }

    #[test]
    fn keeps_numbers_beyond_f64() {
        let value = parse_strict(b"{\"n\": 1e400, \"m\": 123456789012345678901234567890}")
            .expect("large numbers are valid JSON");
        assert_eq!(value["m"].to_string(), "123456789012345678901234567890");
    }

    #[test]
    fn strips_only_leading_bom() {
        assert_eq!(strip_bom(b"\xEF\xBB\xBF{}"), b"{}");
        assert_eq!(strip_bom(b"{}"), b"{}");
    }
}
