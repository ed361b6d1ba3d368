//! One compiled JSON Schema (draft 2020-12) per event type.
//!
//! Schemas are read from `<dir>/<type>.json` and compiled once at start, so a schema that
//! does not compile stops the start with its file name instead of failing on first use.
//! Validation only reads the parsed payload; the stored bytes are never rewritten.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use jsonschema::Validator;
use serde::Serialize;
use serde_json::Value;

use crate::event::EventType;

/// Maximum number of violations reported for one payload.
pub const MAX_REPORTED_VIOLATIONS: usize = 50;

/// Failure to load the schema folder.
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    #[error("failed to read schema folder {}: {error}", path.display())]
    ReadDir {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("failed to read schema {}: {error}", path.display())]
    ReadFile {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("schema {} is not valid JSON: {error}", path.display())]
    Parse {
        path: PathBuf,
        error: serde_json::Error,
    },
    #[error(
        "schema file name {} is not an event type: name it <type>.json, such as \
         chat.created.json",
        path.display()
    )]
    FileName { path: PathBuf },
    #[error("schema {} does not compile: {message}", path.display())]
    Compile { path: PathBuf, message: String },
}

/// One failed schema rule, located by a JSON Pointer into the payload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Violation {
    /// JSON Pointer to the offending value; empty for the document root.
    pub pointer: String,
    pub message: String,
}

/// The compiled schemas, keyed by event type.
pub struct SchemaRegistry {
    validators: BTreeMap<EventType, Validator>,
    documents: BTreeMap<EventType, Value>,
}

impl SchemaRegistry {
    /// Reads and compiles every `*.json` file in `dir`.
    pub fn load_dir(dir: &Path) -> Result<Self, SchemaError> {
        let entries = std::fs::read_dir(dir).map_err(|error| SchemaError::ReadDir {
            path: dir.to_owned(),
            error,
        })?;

        let mut paths = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|error| SchemaError::ReadDir {
                path: dir.to_owned(),
                error,
            })?;
            let path = entry.path();
            if path.extension().is_some_and(|ext| ext == "json") {
                paths.push(path);
            }
        }
        paths.sort();

        let mut schemas = Vec::with_capacity(paths.len());
        for path in paths {
            let event_type = path
                .file_stem()
                .and_then(|stem| stem.to_str())
                .and_then(|stem| stem.parse::<EventType>().ok())
                .ok_or_else(|| SchemaError::FileName { path: path.clone() })?;
            let text = std::fs::read(&path).map_err(|error| SchemaError::ReadFile {
                path: path.clone(),
                error,
            })?;
            let document: Value =
                serde_json::from_slice(&text).map_err(|error| SchemaError::Parse {
                    path: path.clone(),
                    error,
                })?;
            schemas.push((path, event_type, document));
        }
        Self::compile(schemas)
    }

    /// Compiles schema documents given as `(origin, type, document)`; `origin` names the
    /// schema in errors.
    pub fn compile(
        schemas: impl IntoIterator<Item = (PathBuf, EventType, Value)>,
    ) -> Result<Self, SchemaError> {
        let mut validators = BTreeMap::new();
        let mut documents = BTreeMap::new();
        for (path, event_type, document) in schemas {
            // Formats such as `date-time` and `uri` are only annotations in draft 2020-12
            // unless enabled; producers expect them checked, so they are asserted here.
            let validator = jsonschema::options()
                .with_draft(jsonschema::Draft::Draft202012)
                .should_validate_formats(true)
                .build(&document)
                .map_err(|err| SchemaError::Compile {
                    path: path.clone(),
                    message: err.to_string(),
                })?;
            validators.insert(event_type.clone(), validator);
            documents.insert(event_type, document);
        }
        Ok(Self {
            validators,
            documents,
        })
    }

    /// Reports whether a schema exists for `event_type`.
    pub fn contains(&self, event_type: &EventType) -> bool {
        self.validators.contains_key(event_type)
    }

    /// Lists the known event types in order.
    pub fn event_types(&self) -> impl Iterator<Item = &EventType> {
        self.validators.keys()
    }

    /// Returns the schema document of `event_type`.
    pub fn document(&self, event_type: &EventType) -> Option<&Value> {
        self.documents.get(event_type)
    }

    /// Validates `payload` against the schema of `event_type`.
    ///
    /// Returns `None` when no schema exists for the type, otherwise every violation found,
    /// up to [`MAX_REPORTED_VIOLATIONS`].
    pub fn validate(&self, event_type: &EventType, payload: &Value) -> Option<Vec<Violation>> {
        let validator = self.validators.get(event_type)?;
        let violations = validator
            .iter_errors(payload)
            .take(MAX_REPORTED_VIOLATIONS)
            .map(|err| Violation {
                pointer: err.instance_path().to_string(),
                message: err.to_string(),
            })
            .collect();
        Some(violations)
    }
}

impl std::fmt::Debug for SchemaRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SchemaRegistry")
            .field("event_types", &self.validators.keys().collect::<Vec<_>>())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn registry() -> SchemaRegistry {
        let schema = json!({
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "type": "object",
            "required": ["id", "count"],
            "properties": {
                "id": {"type": "string"},
                "count": {"type": "integer", "minimum": 0}
            }
        });
        let event_type: EventType = "thing.created".parse().expect("valid type");
        SchemaRegistry::compile([(PathBuf::from("thing.created.json"), event_type, schema)])
            .expect("schema compiles")
    }

    #[test]
    fn validate_reports_each_violation_with_pointer() {
        let event_type: EventType = "thing.created".parse().expect("valid type");
        let violations = registry()
            .validate(&event_type, &json!({"count": -1}))
            .expect("schema exists");
        let pointers: Vec<&str> = violations.iter().map(|v| v.pointer.as_str()).collect();
        assert!(
            pointers.contains(&""),
            "missing `id` is reported at the root"
        );
        assert!(
            pointers.contains(&"/count"),
            "negative count is reported at /count"
        );
    }

    #[test]
    fn validate_unknown_type_is_none() {
        let other: EventType = "thing.deleted".parse().expect("valid type");
        assert!(registry().validate(&other, &json!({})).is_none());
    }

    #[test]
    fn compile_error_names_the_file() {
        let event_type: EventType = "bad.schema".parse().expect("valid type");
        let schema = json!({"type": "no-such-type"});
        let err = SchemaRegistry::compile([(PathBuf::from("bad.schema.json"), event_type, schema)])
            .expect_err("invalid schema");
        assert!(err.to_string().contains("bad.schema.json"), "{err}");
    }
}
