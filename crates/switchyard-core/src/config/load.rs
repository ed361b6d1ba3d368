//! Reading the configuration file: TOML, environment expansion, then strict deserialising.
//!
//! Expansion runs on parsed string values, never on the raw text, so a variable that contains
//! quotes or newlines cannot change the structure of the file.

use std::path::{Path, PathBuf};

use super::Config;

/// Failure to load the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("failed to read config file {}: {error}", path.display())]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("config file {} is not valid TOML: {message}", path.display())]
    Toml { path: PathBuf, message: String },
    #[error(
        "config file {}, key `{key}`: environment variable {variable} is not set; set it or \
         write ${{{variable}:-default}}",
        path.display()
    )]
    MissingVariable {
        path: PathBuf,
        key: String,
        variable: String,
    },
    // The value is left out of the message because it may contain a secret.
    #[error(
        "config file {}, key `{key}`: the value has a ${{ without a closing }}; close it or \
         write $${{ for a literal",
        path.display()
    )]
    Unterminated { path: PathBuf, key: String },
    #[error("config file {}, key `{key}`: {message}", path.display())]
    Invalid {
        path: PathBuf,
        key: String,
        message: String,
    },
}

/// Reads, expands and deserialises the configuration at `path`.
///
/// Relative paths inside the file (the schema folder, credentials) are resolved against the
/// folder that contains the file.
pub fn load_file(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
        path: path.to_owned(),
        error,
    })?;
    let mut config = parse_str(&text, path, &|name| std::env::var(name).ok())?;

    let base = path.parent().unwrap_or_else(|| Path::new("."));
    if config.schemas.dir.is_relative() {
        config.schemas.dir = base.join(&config.schemas.dir);
    }
    if let Some(creds) = &config.nats.credentials_file
        && creds.is_relative()
    {
        config.nats.credentials_file = Some(base.join(creds));
    }
    Ok(config)
}

/// Parses configuration text; `path` only names the file in errors, `env` looks variables up.
pub fn parse_str(
    text: &str,
    path: &Path,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Config, ConfigError> {
    let mut value: toml::Value = toml::from_str::<toml::Table>(text)
        .map(toml::Value::Table)
        .map_err(|err| ConfigError::Toml {
            path: path.to_owned(),
            message: err.to_string().trim_end().to_owned(),
        })?;
    expand_value(&mut value, &mut String::new(), path, env)?;

    serde_path_to_error::deserialize(value).map_err(|err| ConfigError::Invalid {
        path: path.to_owned(),
        key: err.path().to_string(),
        message: err.inner().to_string().trim_end().to_owned(),
    })
}

fn expand_value(
    value: &mut toml::Value,
    key: &mut String,
    path: &Path,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<(), ConfigError> {
    match value {
        toml::Value::String(text) => {
            *text = expand_env(text, env).map_err(|err| match err {
                ExpandError::Missing(variable) => ConfigError::MissingVariable {
                    path: path.to_owned(),
                    key: key.clone(),
                    variable,
                },
                ExpandError::Unterminated => ConfigError::Unterminated {
                    path: path.to_owned(),
                    key: key.clone(),
                },
            })?;
        }
        toml::Value::Array(items) => {
            for (index, item) in items.iter_mut().enumerate() {
                let saved = key.len();
                key.push_str(&format!("[{index}]"));
                expand_value(item, key, path, env)?;
                key.truncate(saved);
            }
        }
        toml::Value::Table(table) => {
            for (name, item) in table.iter_mut() {
                let saved = key.len();
                if !key.is_empty() {
                    key.push('.');
                }
                key.push_str(name);
                expand_value(item, key, path, env)?;
                key.truncate(saved);
            }
        }
        _ => {}
    }
    Ok(())
}

/// Failure to expand a string.
#[derive(Debug, PartialEq, Eq)]
pub enum ExpandError {
    /// `${NAME}` names an unset variable and gives no default.
    Missing(String),
    /// A `${` has no closing `}`.
    Unterminated,
}

/// Expands `${VAR}` and `${VAR:-default}` in `text`; `$${` stays a literal `${`.
///
/// As in POSIX shells, the default applies when the variable is unset or empty.
pub fn expand_env(text: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<String, ExpandError> {
    let mut output = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find('$') {
        output.push_str(&rest[..start]);
        let after = &rest[start..];
        if let Some(literal) = after.strip_prefix("$${") {
            output.push_str("${");
            rest = literal;
            continue;
        }
        let Some(body) = after.strip_prefix("${") else {
            output.push('$');
            rest = &after[1..];
            continue;
        };
        let end = body.find('}').ok_or(ExpandError::Unterminated)?;
        let expression = &body[..end];
        let (name, default) = match expression.split_once(":-") {
            Some((name, default)) => (name, Some(default)),
            None => (expression, None),
        };
        match (env(name).filter(|value| !value.is_empty()), default) {
            (Some(value), _) => output.push_str(&value),
            (None, Some(default)) => output.push_str(default),
            (None, None) => return Err(ExpandError::Missing(name.to_owned())),
        }
        rest = &body[end + 1..];
    }
    output.push_str(rest);
    Ok(output)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "HOST" => Some("example.test".to_owned()),
            "EMPTY" => Some(String::new()),
            _ => None,
        }
    }

    #[test]
    fn expands_variables_and_defaults() {
        assert_eq!(
            expand_env("http://${HOST}/x", &env),
            Ok("http://example.test/x".into())
        );
        assert_eq!(expand_env("${NOPE:-fallback}", &env), Ok("fallback".into()));
        assert_eq!(
            expand_env("${EMPTY:-fallback}", &env),
            Ok("fallback".into())
        );
        assert_eq!(
            expand_env("cost $5 and $${HOST}", &env),
            Ok("cost $5 and ${HOST}".into())
        );
    }

    #[test]
    fn reports_missing_and_unterminated() {
        assert_eq!(
            expand_env("${NOPE}", &env),
            Err(ExpandError::Missing("NOPE".into()))
        );
        assert_eq!(expand_env("${HOST", &env), Err(ExpandError::Unterminated));
    }

    #[test]
    fn unknown_key_is_rejected_with_path() {
        let text = r#"
            [[sinks]]
            name = "a"
            kind = "webhook"
            url = "http://127.0.0.1:9/"
            events = ["chat.created"]
            [sinks.delivery]
            concurency = 3
        "#;
        let err = parse_str(text, Path::new("switchyard.toml"), &env).expect_err("typo");
        let message = err.to_string();
        assert!(message.contains("sinks[0].delivery"), "{message}");
        assert!(message.contains("concurency"), "{message}");
    }

    #[test]
    fn bad_duration_names_key_and_value() {
        let text = "[server]\npublish_timeout = \"5 parsecs\"\n";
        let err = parse_str(text, Path::new("switchyard.toml"), &env).expect_err("bad unit");
        let message = err.to_string();
        assert!(message.contains("server.publish_timeout"), "{message}");
    }

    #[test]
    fn missing_variable_names_key() {
        let text = "[nats]\nurl = \"${NATS_URL_UNSET}\"\n";
        let err = parse_str(text, Path::new("switchyard.toml"), &env).expect_err("unset");
        let message = err.to_string();
        assert!(message.contains("nats.url"), "{message}");
        assert!(message.contains("NATS_URL_UNSET"), "{message}");
    }

    #[test]
    fn unterminated_error_hides_the_value() {
        let text = "[nats]\npassword = \"hunter2${oops\"\n";
        let err = parse_str(text, Path::new("switchyard.toml"), &env).expect_err("unterminated");
        let message = err.to_string();
        assert!(message.contains("nats.password"), "{message}");
        assert!(!message.contains("hunter2"), "{message}");
    }

    #[test]
    fn defaults_fill_an_empty_file() {
        let config = parse_str("", Path::new("switchyard.toml"), &env).expect("empty is valid");
        assert_eq!(
            config.server.max_body_bytes,
            crate::config::DEFAULT_MAX_BODY_BYTES
        );
        assert_eq!(config.streams.events.name, "EVENTS");
        assert!(config.sinks.is_empty());
    }
}
