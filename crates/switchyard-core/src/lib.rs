//! Building blocks shared by the Switchyard ingress, the sinks and the command line.
//!
//! - [`config`] loads and validates the TOML configuration.
//! - [`event`] defines event types, ids, subjects and the headers an event carries on NATS.
//! - [`json`] checks request bodies as strict JSON without rewriting their bytes.
//! - [`schema`] compiles one JSON Schema per event type and validates payloads against it.
//! - [`nats`] connects to NATS, creates the streams and publishes events with acknowledgement.

pub mod config;
pub mod event;
pub mod json;
pub mod nats;
pub mod schema;
