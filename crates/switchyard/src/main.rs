//! The `switchyard` command line: serve, run a local dev stack, check a configuration,
//! publish an event, and inspect or replay dead letters.

mod check;
mod dev;
mod dlq;
mod logging;
mod publish;
mod serve;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Configuration file read when `--config` is not given.
const DEFAULT_CONFIG: &str = "switchyard.toml";

#[derive(Debug, Parser)]
#[command(name = "switchyard", version, about = "Event router on NATS JetStream")]
struct Cli {
    /// Log format: `text` for people, `json` for log collectors.
    #[arg(
        long,
        global = true,
        env = "SWITCHYARD_LOG_FORMAT",
        default_value = "text"
    )]
    log_format: logging::LogFormat,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the ingress and every sink.
    Serve {
        /// Configuration file.
        #[arg(long, short, env = "SWITCHYARD_CONFIG", default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Start a local nats-server with JetStream and serve the example configuration.
    Dev(dev::DevArgs),
    /// Validate a configuration: schemas compile, templates parse, URLs and routes are valid.
    Check {
        /// Configuration file.
        #[arg(long, short, env = "SWITCHYARD_CONFIG", default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Check an event against its schema and publish it to JetStream.
    Publish(publish::PublishArgs),
    /// List, show or replay dead letters.
    Dlq(dlq::DlqArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config_path = match &cli.command {
        Command::Serve { config } => Some(config.as_path()),
        Command::Dev(args) => Some(args.config.as_path()),
        _ => None,
    };
    // Dropped at the end of main, after the runtime, so the last spans are flushed.
    let _telemetry = logging::init(cli.log_format, config_path);

    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: failed to start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Serve { config } => serve::run(&config).await,
            Command::Dev(args) => dev::run(args).await,
            Command::Check { config } => check::run(&config),
            Command::Publish(args) => publish::run(args).await,
            Command::Dlq(args) => dlq::run(args).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
