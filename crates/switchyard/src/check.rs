//! `switchyard check`: validate a configuration without connecting to anything.

use std::path::Path;

use anyhow::{Context, bail};
use switchyard_core::config::{self, Config};
use switchyard_core::schema::SchemaRegistry;

/// Loads the configuration and its schemas and runs every check; used by `serve` too.
pub fn load_checked(path: &Path) -> anyhow::Result<(Config, SchemaRegistry)> {
    let config = config::load_file(path)?;
    let schemas = SchemaRegistry::load_dir(&config.schemas.dir)
        .with_context(|| format!("config file {}, key `schemas.dir`", path.display()))?;

    let mut errors = match config.validate(Some(&schemas)) {
        Ok(warnings) => {
            for warning in warnings {
                tracing::warn!(file = %path.display(), "{warning}");
            }
            Vec::new()
        }
        Err(errors) => errors,
    };
    errors.extend(switchyard_sinks::check(&config));
    if !errors.is_empty() {
        let lines: Vec<String> = errors.iter().map(|err| format!("  {err}")).collect();
        bail!(
            "config file {} has {} error(s):\n{}",
            path.display(),
            errors.len(),
            lines.join("\n")
        );
    }
    Ok((config, schemas))
}

pub fn run(path: &Path) -> anyhow::Result<()> {
    let (config, schemas) = load_checked(path)?;
    println!(
        "{}: valid ({} event types, {} sinks)",
        path.display(),
        schemas.event_types().count(),
        config.sinks.len()
    );
    Ok(())
}
