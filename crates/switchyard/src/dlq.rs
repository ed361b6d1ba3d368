//! `switchyard dlq list|show|replay`: inspect dead letters and send them again.

use std::path::PathBuf;

use anyhow::bail;
use switchyard_core::config;
use switchyard_core::nats;
use switchyard_sinks::dlq;

/// Dead letters listed when `--limit` is not given.
const DEFAULT_LIST_LIMIT: usize = 100;

#[derive(Debug, clap::Args)]
pub struct DlqArgs {
    /// Configuration file, for the NATS connection and the stream names.
    #[arg(long, short, global = true, env = "SWITCHYARD_CONFIG", default_value = crate::DEFAULT_CONFIG)]
    config: PathBuf,

    #[command(subcommand)]
    command: DlqCommand,
}

#[derive(Debug, clap::Subcommand)]
enum DlqCommand {
    /// List dead letters, oldest first, one JSON object per line.
    List {
        /// Only the dead letters of this sink.
        #[arg(long)]
        sink: Option<String>,
        /// Maximum number of dead letters to print.
        #[arg(long, default_value_t = DEFAULT_LIST_LIMIT)]
        limit: usize,
    },
    /// Print one dead letter: its headers, then its payload.
    Show {
        /// Sequence of the dead letter in the DLQ stream (from 1).
        #[arg(value_parser = clap::value_parser!(u64).range(1..))]
        seq: u64,
    },
    /// Send dead letters again to the sink that gave them up, and remove them from DLQ.
    Replay {
        /// Sequences of the dead letters in the DLQ stream (from 1).
        #[arg(value_parser = clap::value_parser!(u64).range(1..))]
        seqs: Vec<u64>,
        /// Replay every dead letter (of `--sink`, if given).
        #[arg(long, conflicts_with = "seqs")]
        all: bool,
        /// With --all: only the dead letters of this sink.
        #[arg(long, requires = "all")]
        sink: Option<String>,
    },
}

pub async fn run(args: DlqArgs) -> anyhow::Result<()> {
    let config = config::load_file(&args.config)?;
    let client = nats::connect(&config.nats).await?;
    let jetstream = async_nats::jetstream::new(client);
    let stream = config.streams.dlq.name.as_str();

    match args.command {
        DlqCommand::List { sink, limit } => {
            for letter in dlq::list(&jetstream, stream, sink.as_deref(), limit).await? {
                println!("{}", serde_json::to_string(&letter)?);
            }
        }
        DlqCommand::Show { seq } => {
            let letter = dlq::show(&jetstream, stream, seq).await?;
            println!("subject: {}", letter.subject);
            for (name, values) in letter.headers.iter() {
                for value in values {
                    println!("{name}: {value}");
                }
            }
            println!();
            println!("{}", String::from_utf8_lossy(&letter.payload));
        }
        DlqCommand::Replay { seqs, all, sink } => {
            let seqs = if all {
                dlq::list(&jetstream, stream, sink.as_deref(), usize::MAX)
                    .await?
                    .into_iter()
                    .map(|letter| letter.seq)
                    .collect()
            } else {
                seqs
            };
            if seqs.is_empty() && !all {
                bail!("name the dead letters to replay by sequence, or pass --all");
            }
            for seq in seqs {
                let replayed =
                    dlq::replay(&jetstream, stream, seq, config.server.publish_timeout).await?;
                println!(
                    "{}",
                    serde_json::json!({"dlq_seq": seq, "replayed_seq": replayed})
                );
            }
        }
    }
    Ok(())
}
