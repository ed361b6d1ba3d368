//! `switchyard publish TYPE JSON|@FILE`: the same checks as the ingress, straight to NATS.

use std::path::PathBuf;

use anyhow::{Context, bail};
use bytes::Bytes;
use switchyard_core::event::{self, Event, EventType};
use switchyard_core::{json, nats};

use crate::check;

#[derive(Debug, clap::Args)]
pub struct PublishArgs {
    /// Event type, such as chat.created.
    event_type: String,
    /// Event data as JSON, or @FILE to read it from a file.
    data: String,
    /// Event id; JetStream drops a repeat inside the duplicate window. Generated when absent.
    #[arg(long)]
    id: Option<String>,
    /// Configuration file, for the NATS connection and the schemas.
    #[arg(long, short, env = "SWITCHYARD_CONFIG", default_value = crate::DEFAULT_CONFIG)]
    config: PathBuf,
}

pub async fn run(args: PublishArgs) -> anyhow::Result<()> {
    let (config, schemas) = check::load_checked(&args.config)?;

    let raw = match args.data.strip_prefix('@') {
        Some(path) => {
            std::fs::read(path).with_context(|| format!("failed to read event data from {path}"))?
        }
        None => args.data.into_bytes(),
    };
    let payload = Bytes::copy_from_slice(json::strip_bom(&raw));
    let value = json::parse_strict(&payload).context("event data is not valid JSON")?;

    let event_type: EventType = args.event_type.parse()?;
    let Some(violations) = schemas.validate(&event_type, &value) else {
        bail!(
            "no schema for event type \"{event_type}\": add {}/{event_type}.json",
            config.schemas.dir.display()
        );
    };
    if !violations.is_empty() {
        let lines: Vec<String> = violations
            .iter()
            .map(|v| format!("  at \"{}\": {}", v.pointer, v.message))
            .collect();
        bail!(
            "event does not match the schema of \"{event_type}\":\n{}",
            lines.join("\n")
        );
    }

    let mut event = Event::new(event_type, payload);
    if let Some(id) = args.id {
        event::validate_event_id(&id)?;
        event.id = id;
    }
    event.source = "switchyard-cli".to_owned();

    let client = nats::connect(&config.nats).await?;
    let jetstream = async_nats::jetstream::new(client);
    let ack = nats::publish_event(&jetstream, &event, config.server.publish_timeout).await?;
    let answer = serde_json::json!({
        "id": event.id,
        "type": event.event_type.as_str(),
        "seq": ack.sequence,
        "duplicate": ack.duplicate,
    });
    println!("{answer}");
    Ok(())
}
