//! `switchyard serve`: connect, prepare the streams, start the sinks, then the ingress.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use switchyard_core::config::Config;
use switchyard_core::nats;
use switchyard_core::schema::SchemaRegistry;
use switchyard_ingress::Ingress;
use tokio_util::sync::CancellationToken;

use crate::check;

/// How long deliveries in flight may take to finish after a stop signal.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

pub async fn run(path: &Path) -> anyhow::Result<()> {
    let (config, schemas) = check::load_checked(path)?;
    run_with(config, schemas, None).await
}

/// Runs the router; `extra_routes` lets `dev` add its inbox next to the ingress.
pub async fn run_with(
    config: Config,
    schemas: SchemaRegistry,
    extra_routes: Option<Router>,
) -> anyhow::Result<()> {
    let schemas = Arc::new(schemas);
    let client = nats::connect(&config.nats).await?;
    tracing::info!(url = %nats::redact_nats_url(&config.nats.url), server_version = %client.server_info().version, "connected to NATS");
    let jetstream = async_nats::jetstream::new(client);
    nats::ensure_streams(&jetstream, &config.streams).await?;

    // Bind first, so a port in use stops the start before any sink delivers.
    let listener = tokio::net::TcpListener::bind(config.server.listen)
        .await
        .with_context(|| {
            format!(
                "failed to listen on {} (key `server.listen`, or SWITCHYARD_LISTEN in the \
                 example config): stop the process using it or pick another address",
                config.server.listen
            )
        })?;

    // Consumers exist before the ingress accepts anything, so a new sink receives every event
    // accepted from now on.
    let shutdown = CancellationToken::new();
    let sinks =
        switchyard_sinks::start(&config, &jetstream, schemas.clone(), shutdown.clone()).await?;

    let ingress = Arc::new(Ingress::new(&config, jetstream, schemas));
    let mut app = switchyard_ingress::router(ingress.clone());
    if let Some(extra) = extra_routes {
        app = app.merge(extra);
    }
    tracing::info!(
        listen = %config.server.listen,
        sinks = config.sinks.len(),
        body_limit = ingress.body_limit(),
        "switchyard is serving"
    );

    let stop = shutdown.clone();
    // NOTE: axum::serve sets no header read or idle keep-alive timeout, so a client that
    // trickles its headers keeps a connection open; put a proxy in front on untrusted networks.
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            wait_for_signal().await;
            tracing::info!("stop signal received; draining");
            stop.cancel();
        })
        .await
        .context("HTTP server failed")?;

    shutdown.cancel();
    let drained = tokio::time::timeout(SHUTDOWN_GRACE, futures_join(sinks)).await;
    if drained.is_err() {
        tracing::warn!(
            grace_s = SHUTDOWN_GRACE.as_secs(),
            "deliveries still in flight at shutdown; JetStream will redeliver them"
        );
    }
    tracing::info!("switchyard stopped");
    Ok(())
}

async fn futures_join(handles: Vec<tokio::task::JoinHandle<()>>) {
    for handle in handles {
        let _ = handle.await;
    }
}

/// Waits for SIGINT or SIGTERM.
pub async fn wait_for_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut terminate = match tokio::signal::unix::signal(
            tokio::signal::unix::SignalKind::terminate(),
        ) {
            Ok(signal) => signal,
            Err(err) => {
                tracing::warn!(error = %err, "failed to listen for SIGTERM; only Ctrl-C stops the router");
                let _ = interrupt.await;
                return;
            }
        };
        tokio::select! {
            _ = interrupt => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = interrupt.await;
    }
}
