//! Filters and transforms in minijinja, the one expression and template language of every
//! sink.
//!
//! Both see the same variables: `type`, `id`, `source`, `time` and `data` (the parsed
//! payload). A filter is an expression such as `data.size_bytes > 0`; a transform is a
//! template that renders the request body, such as `{"text": {{ data.text | tojson }}}`.

use minijinja::{Environment, UndefinedBehavior, Value};

const FILTER_NAME: &str = "filter";
const TRANSFORM_NAME: &str = "transform";

/// Fuel for one filter evaluation or transform render (minijinja's `fuel` feature).
///
/// One fuel pays for one instruction or 64 bytes of produced data, so a render stops after
/// about 4 million instructions or 256 MB. A template with nested loops over `range` or
/// over the event data then fails with "engine ran out of fuel" and the event is
/// dead-lettered, instead of blocking a runtime thread and growing memory without bound.
/// The budget still covers `{{ data | tojson }}` of a 12 MB payload, above the 8 MB
/// `max_payload` that `switchyard dev` sets.
pub const TEMPLATE_FUEL: u64 = 4_000_000;

/// A filter or transform that does not compile, or fails on an event.
#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("invalid filter expression: {0}")]
    Filter(String),
    #[error("invalid transform template: {0}")]
    Transform(String),
}

/// The compiled filter and transform of one sink.
pub struct SinkTemplates {
    env: Environment<'static>,
    has_filter: bool,
    has_transform: bool,
}

impl std::fmt::Debug for SinkTemplates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SinkTemplates")
            .field("has_filter", &self.has_filter)
            .field("has_transform", &self.has_transform)
            .finish()
    }
}

impl SinkTemplates {
    /// Compiles the filter and the transform; either may be absent.
    pub fn new(filter: Option<&str>, transform: Option<&str>) -> Result<Self, TemplateError> {
        let mut env = Environment::new();
        // A misspelt variable is an error, not an empty string in the body.
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        env.set_fuel(Some(TEMPLATE_FUEL));
        if let Some(filter) = filter {
            env.compile_expression(filter)
                .map_err(|err| TemplateError::Filter(describe(&err)))?;
            env.add_template_owned(FILTER_NAME, format!("{{% if ({filter}) %}}1{{% endif %}}"))
                .map_err(|err| TemplateError::Filter(describe(&err)))?;
        }
        if let Some(transform) = transform {
            env.add_template_owned(TRANSFORM_NAME, transform.to_owned())
                .map_err(|err| TemplateError::Transform(describe(&err)))?;
        }
        Ok(Self {
            env,
            has_filter: filter.is_some(),
            has_transform: transform.is_some(),
        })
    }

    pub fn has_transform(&self) -> bool {
        self.has_transform
    }

    pub fn has_filter(&self) -> bool {
        self.has_filter
    }

    /// Evaluates the filter; without one every event passes.
    pub fn passes(&self, context: &Value) -> Result<bool, TemplateError> {
        if !self.has_filter {
            return Ok(true);
        }
        let rendered = self
            .env
            .get_template(FILTER_NAME)
            .and_then(|template| template.render(context))
            .map_err(|err| TemplateError::Filter(describe(&err)))?;
        Ok(rendered == "1")
    }

    /// Renders the transform; returns `None` without one.
    pub fn render(&self, context: &Value) -> Result<Option<String>, TemplateError> {
        if !self.has_transform {
            return Ok(None);
        }
        self.env
            .get_template(TRANSFORM_NAME)
            .and_then(|template| template.render(context))
            .map(Some)
            .map_err(|err| TemplateError::Transform(describe(&err)))
    }
}

fn describe(err: &minijinja::Error) -> String {
    match err.detail() {
        Some(detail) => format!("{err} ({detail})"),
        None => err.to_string(),
    }
}

/// Builds the variables passed to a filter or transform.
pub fn context(
    event_type: &str,
    id: &str,
    source: &str,
    time: &str,
    data: &serde_json::Value,
) -> Value {
    minijinja::context! {
        type => event_type,
        id => id,
        source => source,
        time => time,
        data => json_to_value(data),
    }
}

/// Converts a JSON value for minijinja.
///
/// With serde_json's `arbitrary_precision`, numbers serialise as a private map, so they
/// are converted by hand: integers and floats as numbers, anything beyond as a string.
pub fn json_to_value(value: &serde_json::Value) -> Value {
    match value {
        serde_json::Value::Null => Value::from(()),
        serde_json::Value::Bool(flag) => Value::from(*flag),
        serde_json::Value::Number(number) => {
            if let Some(integer) = number.as_i64() {
                Value::from(integer)
            } else if let Some(integer) = number.as_u64() {
                Value::from(integer)
            } else if let Some(float) = number.as_f64().filter(|f| f.is_finite()) {
                Value::from(float)
            } else {
                Value::from(number.to_string())
            }
        }
        serde_json::Value::String(text) => Value::from(text.as_str()),
        serde_json::Value::Array(items) => {
            Value::from(items.iter().map(json_to_value).collect::<Vec<_>>())
        }
        serde_json::Value::Object(map) => Value::from(
            map.iter()
                .map(|(key, item)| (key.clone(), json_to_value(item)))
                .collect::<std::collections::BTreeMap<String, Value>>(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn sample() -> Value {
        context(
            "file.uploaded",
            "evt-1",
            "tests",
            "2026-01-01T00:00:00Z",
            &json!({"fileId": "f-9", "size_bytes": 10, "name": "a \"b\""}),
        )
    }

    #[test]
    fn filter_evaluates_over_data() {
        let templates = SinkTemplates::new(Some("data.size_bytes > 5"), None).expect("compiles");
        assert!(templates.passes(&sample()).expect("evaluates"));
        let templates = SinkTemplates::new(Some("data.size_bytes > 50"), None).expect("compiles");
        assert!(!templates.passes(&sample()).expect("evaluates"));
    }

    #[test]
    fn transform_renders_json_safely() {
        let templates = SinkTemplates::new(
            None,
            Some(r#"{"file": {{ data.fileId | tojson }}, "name": {{ data.name | tojson }}}"#),
        )
        .expect("compiles");
        let body = templates
            .render(&sample())
            .expect("renders")
            .expect("has a transform");
        let parsed: serde_json::Value = serde_json::from_str(&body).expect("valid JSON");
        assert_eq!(parsed["name"], json!("a \"b\""));
    }

    #[test]
    fn syntax_errors_are_reported() {
        assert!(SinkTemplates::new(Some("data.size_bytes >"), None).is_err());
        assert!(SinkTemplates::new(None, Some("{{ data.x ")).is_err());
    }

    #[test]
    fn runaway_transform_runs_out_of_fuel() {
        let nested = "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}\
                      {% endfor %}";
        let templates = SinkTemplates::new(None, Some(nested)).expect("compiles");
        let started = std::time::Instant::now();
        let err = templates.render(&sample()).expect_err("bounded by fuel");
        assert!(err.to_string().contains("fuel"), "{err}");
        assert!(started.elapsed() < std::time::Duration::from_secs(30));
    }

    #[test]
    fn fuel_covers_tojson_of_a_large_payload() {
        let text = "a".repeat(8 * 1024 * 1024);
        let context = context(
            "file.uploaded",
            "evt-1",
            "tests",
            "",
            &json!({"text": text}),
        );
        let templates =
            SinkTemplates::new(None, Some(r#"{"data": {{ data | tojson }}}"#)).expect("compiles");
        let body = templates
            .render(&context)
            .expect("renders within the fuel budget")
            .expect("has a transform");
        assert!(body.len() > text.len());
    }

    #[test]
    fn undefined_variable_fails_the_transform() {
        let templates = SinkTemplates::new(None, Some("{{ dta.fileId }}")).expect("compiles");
        assert!(templates.render(&sample()).is_err());
    }
}
