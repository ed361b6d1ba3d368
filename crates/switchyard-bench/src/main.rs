//! `switchyard-bench`: measures Switchyard's ingress throughput, delivery throughput and
//! end-to-end latency against bare JetStream baselines on this machine, and prints a
//! markdown table.
//!
//! Everything runs on 127.0.0.1: a nats-server of its own, the release `switchyard`
//! binary, an in-process raw ingress and raw consumer, and an in-process receiver. The
//! numbers are a report, not a test: nothing fails when a target is missed.

mod cpu;
mod load;
mod payload;
mod process;
mod raw;
mod receiver;
mod report;
mod stats;
mod threads;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, bail};
use async_nats::jetstream::{self, consumer::DeliverPolicy, stream::Stream};
use clap::Parser;
use reqwest::StatusCode;
use switchyard_core::event::{Event, EventType};
use switchyard_core::schema::SchemaRegistry;

use crate::cpu::CpuMeter;
use crate::process::{NatsServer, RouterProcess, free_port};
use crate::raw::{RawConsumer, RawIngress};
use crate::receiver::Receiver;
use crate::report::{Delivery, Ingress, Latencies, Report, Round};
use crate::stats::Latency;
use crate::threads::{LOAD_THREADS, RAW_THREADS, Threads};

/// The event type every measurement sends.
const EVENT_TYPE: &str = "chat.created";

/// Signing secret of the signed sink variant (the public development secret of
/// switchyard.toml).
const BENCH_SECRET: &str = "whsec_c3dpdGNoeWFyZC1kZXYtc2VjcmV0LWtleS0xMjM0NTY=";

/// Maximum wait for a drain or for the last deliveries of a latency run.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Debug, Parser)]
#[command(
    name = "switchyard-bench",
    about = "Benchmark Switchyard against bare JetStream baselines on 127.0.0.1"
)]
pub struct Args {
    /// Events per throughput measurement (ingress and delivery).
    #[arg(long, default_value_t = 20_000)]
    pub events: u64,
    /// Concurrent keep-alive HTTP/1.1 clients of the ingress load.
    #[arg(long, default_value_t = 32)]
    pub concurrency: usize,
    /// Deliveries in flight, for the raw consumer and the Switchyard sink.
    #[arg(long, default_value_t = 32)]
    pub delivery_concurrency: usize,
    /// Events per second of the latency measurement.
    #[arg(long, default_value_t = 1000)]
    pub rate: u64,
    /// Seconds of the latency measurement.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Rounds of the throughput measurements; the table shows the median of each side.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Warm-up requests before each ingress and latency measurement.
    #[arg(long, default_value_t = 1000)]
    pub warmup: u64,
    /// Skip the delivery run of a sink with a signing secret.
    #[arg(long)]
    pub no_signed: bool,
    /// Skips the runs with traces exported to a local OTLP endpoint.
    #[arg(long)]
    pub no_traced: bool,
    /// The `switchyard` binary to run, built with --release.
    #[arg(
        long,
        env = "SWITCHYARD_BIN",
        default_value = "target/release/switchyard"
    )]
    pub switchyard_bin: PathBuf,
    /// The nats-server binary (2.10 or newer).
    #[arg(long, env = "NATS_SERVER_BIN", default_value = "nats-server")]
    pub nats_server: PathBuf,
    /// Folder of JSON Schemas given to the router.
    #[arg(long, default_value = "schemas")]
    pub schemas: PathBuf,
    /// Keep the router configs and logs in this folder instead of a temporary one.
    #[arg(long)]
    pub keep_logs: Option<PathBuf>,
}

/// State shared by every measurement.
struct Bench {
    args: Args,
    schemas: PathBuf,
    nats_url: String,
    nats_pid: Option<u32>,
    jetstream: jetstream::Context,
    stream: Stream,
    /// The raw paths' runtime and its own NATS connection.
    raw_threads: Threads,
    raw_stream: Stream,
    raw_jetstream: jetstream::Context,
    receiver: Receiver,
    load: reqwest::Client,
    delivery: reqwest::Client,
    configs: PathBuf,
    /// The temporary folder behind `configs`, removed on drop, unless logs are kept.
    _configs_dir: Option<tempfile::TempDir>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.events < 2 || args.concurrency == 0 || args.delivery_concurrency == 0 {
        bail!("--events must be at least 2, the concurrencies at least 1");
    }
    if args.rounds == 0 || args.rounds > 20 {
        bail!("--rounds must be between 1 and 20");
    }
    if args.rate == 0 || !(args.duration > 0.0 && args.duration <= 600.0) {
        bail!("--rate must be at least 1 and --duration between 0 and 600 seconds");
    }
    // reqwest is built without a default TLS provider.
    let _ = rustls::crypto::ring::default_provider().install_default();
    payload::now_ns();
    tokio::runtime::Builder::new_multi_thread()
        .thread_name(LOAD_THREADS)
        .enable_all()
        .build()?
        .block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let schemas = std::fs::canonicalize(&args.schemas)
        .with_context(|| format!("schemas folder {}", args.schemas.display()))?;
    check_payload(&schemas)?;
    if !args.switchyard_bin.is_file() {
        bail!(
            "{} not found: build it with `cargo build --release --bin switchyard` or pass \
             --switchyard-bin",
            args.switchyard_bin.display()
        );
    }

    let nats = NatsServer::start(&args.nats_server).await?;
    let outcome = async {
        let client = async_nats::connect(nats.url()).await?;
        let jetstream = jetstream::new(client);
        let config = switchyard_core::config::parse_str(
            &format!("[nats]\nurl = \"{}\"\n", nats.url()),
            Path::new("bench.toml"),
            &|_| None,
        )?;
        // The same streams the router creates, so the raw paths use them too.
        switchyard_core::nats::ensure_streams(&jetstream, &config.streams).await?;
        let stream = jetstream.get_stream(&config.streams.events.name).await?;
        // The raw paths connect from their own runtime, whose threads then do their NATS
        // work, as a router's threads do its own.
        let raw_threads = Threads::new(RAW_THREADS, 2)?;
        let raw_client = raw_threads
            .handle()
            .spawn(async_nats::connect(nats.url()))
            .await??;
        let raw_jetstream = jetstream::new(raw_client);
        let raw_stream = raw_jetstream
            .get_stream(&config.streams.events.name)
            .await?;
        let (configs, configs_dir) = match &args.keep_logs {
            Some(dir) => {
                std::fs::create_dir_all(dir)?;
                (std::fs::canonicalize(dir)?, None)
            }
            None => {
                let dir = tempfile::Builder::new()
                    .prefix("switchyard-bench-")
                    .tempdir()?;
                (dir.path().to_owned(), Some(dir))
            }
        };
        let bench = Bench {
            schemas,
            nats_url: nats.url(),
            nats_pid: nats.pid(),
            stream,
            jetstream,
            raw_threads,
            raw_stream,
            raw_jetstream,
            receiver: Receiver::start().await?,
            load: load::client(args.concurrency)?,
            delivery: delivery_client()?,
            configs,
            _configs_dir: configs_dir,
            args,
        };
        bench.run_all().await
    }
    .await;
    let stopped = nats.stop().await;
    let report = outcome?;
    stopped?;
    println!("{}", report.render());
    Ok(())
}

/// Checks that the benchmark payload passes the repository schema.
fn check_payload(schemas: &Path) -> anyhow::Result<()> {
    let registry = SchemaRegistry::load_dir(schemas)?;
    let event_type: EventType = EVENT_TYPE.parse()?;
    let value: serde_json::Value = serde_json::from_slice(&payload::chat_created(0, 1))?;
    match registry.validate(&event_type, &value) {
        Some(violations) if violations.is_empty() => Ok(()),
        Some(violations) => bail!("the benchmark payload violates its schema: {violations:?}"),
        None => bail!("no schema for {EVENT_TYPE} in {}", schemas.display()),
    }
}

/// Builds the raw consumer's client like the sinks' client: no redirects, pooled
/// connections.
fn delivery_client() -> anyhow::Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .pool_idle_timeout(Duration::from_secs(60))
        .build()?)
}

fn progress(message: &str) {
    eprintln!("[switchyard-bench] {message}");
}

impl Bench {
    async fn run_all(&self) -> anyhow::Result<Report> {
        let args = &self.args;
        let raw_ingress =
            RawIngress::start(&self.raw_threads.handle(), self.raw_jetstream.clone()).await?;
        let raw_url = raw_ingress.url(EVENT_TYPE);

        let mut rounds = Vec::new();
        for round in 1..=args.rounds {
            let step = |name: &str| progress(&format!("round {round} of {}: {name}", args.rounds));
            step("raw ingress");
            let raw_in = self.ingress(&raw_url, None).await?;
            step("switchyard ingress");
            let (sy_in, rss_ingress) = self.switchyard_ingress(false).await?;
            step("raw delivery");
            let raw_out = self.raw_delivery().await?;
            step("switchyard delivery");
            let sy_out = self.switchyard_delivery("bench", None, false).await?;
            let signed = if args.no_signed {
                None
            } else {
                step("switchyard delivery, signed sink");
                Some(
                    self.switchyard_delivery("bench-signed", Some(BENCH_SECRET), false)
                        .await?,
                )
            };
            let traced = if args.no_traced {
                None
            } else {
                step("switchyard ingress, traces exported");
                let (traced_in, _) = self.switchyard_ingress(true).await?;
                step("switchyard delivery, traces exported");
                let traced_out = self.switchyard_delivery("bench-traced", None, true).await?;
                Some((traced_in, traced_out))
            };
            rounds.push(Round {
                ingress: [raw_in, sy_in],
                delivery: [raw_out, sy_out],
                signed,
                traced,
                rss_ingress,
            });
        }

        progress("raw end-to-end latency");
        let raw_latency = self.raw_latency(&raw_url).await?;
        drop(raw_ingress);
        progress("switchyard end-to-end latency");
        let sy_latency = self.switchyard_latency().await?;

        Ok(Report {
            machine: report::Machine::read(&args.nats_server, &args.switchyard_bin),
            events: args.events,
            concurrency: args.concurrency,
            delivery_concurrency: args.delivery_concurrency,
            rate: args.rate,
            duration: args.duration,
            warmup: args.warmup,
            rounds,
            latency: [raw_latency, sy_latency],
        })
    }

    /// Warms up, then posts `events` payloads from `concurrency` clients.
    async fn ingress(&self, url: &str, router_pid: Option<u32>) -> anyhow::Result<Ingress> {
        let args = &self.args;
        let warmup = load::closed_loop(
            &self.load,
            url,
            args.warmup,
            args.concurrency,
            StatusCode::ACCEPTED,
        )
        .await;
        if let Some(err) = warmup.first_error {
            bail!("warm-up against {url} failed: {err}");
        }
        let meter = CpuMeter::start(self.nats_pid, router_pid);
        let run = load::closed_loop(
            &self.load,
            url,
            args.events,
            args.concurrency,
            StatusCode::ACCEPTED,
        )
        .await;
        let cpu = meter.stop(router_pid);
        self.purge().await?;
        Ok(Ingress {
            ok: run.ok,
            failed: run.failed,
            first_error: run.first_error,
            elapsed: run.elapsed,
            latency: Latency::from_nanos(run.latencies_ns),
            cpu,
        })
    }

    /// Stores `events` events, then times their drain by a raw consumer.
    async fn raw_delivery(&self) -> anyhow::Result<Delivery> {
        self.purge().await?;
        self.preload(self.args.events).await?;

        self.receiver.reset(false);
        let meter = CpuMeter::start(self.nats_pid, None);
        let consumer = RawConsumer::start(
            &self.raw_threads.handle(),
            &self.raw_stream,
            "raw-delivery",
            DeliverPolicy::All,
            self.delivery.clone(),
            self.receiver.url(),
            self.args.delivery_concurrency,
        )
        .await?;
        self.receiver
            .wait_for(self.args.events, DRAIN_TIMEOUT)
            .await;
        let cpu = meter.stop(None);
        consumer.stop().await;
        let received = self.receiver.take();

        self.stream.delete_consumer("raw-delivery").await?;
        self.purge().await?;
        Ok(Delivery {
            expected: self.args.events,
            received: received.count,
            signed: received.signed,
            span: received.span,
            peak_rss: None,
            cpu,
        })
    }

    async fn raw_latency(&self, url: &str) -> anyhow::Result<Latencies> {
        self.purge().await?;
        let consumer = RawConsumer::start(
            &self.raw_threads.handle(),
            &self.raw_stream,
            "raw-latency",
            DeliverPolicy::New,
            self.delivery.clone(),
            self.receiver.url(),
            self.args.delivery_concurrency,
        )
        .await?;
        let latency = self.paced(url, None).await;
        consumer.stop().await;
        self.stream.delete_consumer("raw-latency").await?;
        self.purge().await?;
        latency
    }

    async fn switchyard_ingress(&self, traces: bool) -> anyhow::Result<(Ingress, Option<u64>)> {
        let name = if traces { "ingress-traced" } else { "ingress" };
        let (config, addr) = self.write_config(name, "", traces)?;
        let router = self.start_router(&config, addr).await?;
        let result = self
            .ingress(&router.url("/v1/events/chat.created"), router.pid())
            .await;
        let rss = router.peak_rss();
        router.stop().await?;
        Ok((result?, rss))
    }

    /// Creates the sink's consumer with a first start, stores `events` while the router is
    /// stopped, then times the drain after the restart.
    async fn switchyard_delivery(
        &self,
        sink: &str,
        secret: Option<&str>,
        traces: bool,
    ) -> anyhow::Result<Delivery> {
        self.purge().await?;
        let (config, addr) = self.write_config(sink, &self.sink_toml(sink, secret), traces)?;
        self.start_router(&config, addr).await?.stop().await?;
        self.preload(self.args.events).await?;

        self.receiver.reset(false);
        let meter = CpuMeter::start_before_router(self.nats_pid);
        let router = self.start_router(&config, addr).await?;
        let drained = self
            .receiver
            .wait_for(self.args.events, DRAIN_TIMEOUT)
            .await;
        let cpu = meter.stop(router.pid());
        let rss = router.peak_rss();
        if !drained {
            progress(&format!(
                "the drain did not finish; router log:\n{}",
                router.log_tail()
            ));
        }
        router.stop().await?;
        let received = self.receiver.take();

        self.stream.delete_consumer(&format!("sink_{sink}")).await?;
        self.purge().await?;
        Ok(Delivery {
            expected: self.args.events,
            received: received.count,
            signed: received.signed,
            span: received.span,
            peak_rss: rss,
            cpu,
        })
    }

    async fn switchyard_latency(&self) -> anyhow::Result<Latencies> {
        self.purge().await?;
        let sink = "latency";
        let (config, addr) = self.write_config(sink, &self.sink_toml(sink, None), false)?;
        let router = self.start_router(&config, addr).await?;
        let latency = self
            .paced(&router.url("/v1/events/chat.created"), router.pid())
            .await;
        let rss = router.peak_rss();
        router.stop().await?;
        self.stream.delete_consumer(&format!("sink_{sink}")).await?;
        self.purge().await?;
        let mut latency = latency?;
        latency.peak_rss = rss;
        Ok(latency)
    }

    /// Warms the path up, then sends at the paced rate and collects the latencies.
    async fn paced(&self, url: &str, router_pid: Option<u32>) -> anyhow::Result<Latencies> {
        let args = &self.args;
        let warmup = args.warmup.min(500);
        self.receiver.reset(false);
        let run = load::closed_loop(
            &self.load,
            url,
            warmup,
            args.concurrency,
            StatusCode::ACCEPTED,
        )
        .await;
        if let Some(err) = run.first_error {
            bail!("warm-up against {url} failed: {err}");
        }
        if !self.receiver.wait_for(warmup, DRAIN_TIMEOUT).await {
            bail!("the warm-up events of {url} were not all delivered");
        }

        self.receiver.reset(true);
        let meter = CpuMeter::start(self.nats_pid, router_pid);
        let duration = Duration::from_secs_f64(args.duration);
        let paced = load::paced(&self.load, url, args.rate, duration, StatusCode::ACCEPTED).await;
        let accepted = paced.sent - paced.failed;
        self.receiver.wait_for(accepted, DRAIN_TIMEOUT).await;
        let cpu = meter.stop(router_pid);
        let received = self.receiver.take();
        Ok(Latencies {
            sent: paced.sent,
            failed: paced.failed,
            first_error: paced.first_error,
            received: received.count,
            max_lag: paced.max_lag,
            latency: Latency::from_nanos(received.latencies_ns),
            peak_rss: None,
            cpu,
        })
    }

    /// Publishes `count` events straight to `events.chat.created`, with the headers the
    /// ingress writes.
    async fn preload(&self, count: u64) -> anyhow::Result<()> {
        let event_type: EventType = EVENT_TYPE.parse()?;
        let subject = event_type.subject();
        let mut acks = Vec::with_capacity(1024);
        for seq in 0..count {
            let event = Event::new(event_type.clone(), payload::chat_created(seq, 0));
            let ack = self
                .jetstream
                .publish_with_headers(subject.clone(), event.headers(), event.data.clone())
                .await?;
            acks.push(ack);
            if acks.len() == acks.capacity() {
                for ack in acks.drain(..) {
                    ack.await?;
                }
            }
        }
        for ack in acks {
            ack.await?;
        }
        Ok(())
    }

    async fn purge(&self) -> anyhow::Result<()> {
        self.stream.purge().await?;
        Ok(())
    }

    async fn start_router(&self, config: &Path, addr: SocketAddr) -> anyhow::Result<RouterProcess> {
        let router =
            RouterProcess::start(&self.args.switchyard_bin, config, addr, &self.load).await?;
        if let Some(pid) = router.pid() {
            progress(&format!(
                "router ready, pid {pid}, config {}",
                config.display()
            ));
        }
        Ok(router)
    }

    fn sink_toml(&self, name: &str, secret: Option<&str>) -> String {
        let secrets = secret
            .map(|secret| format!("secrets = [\"{secret}\"]\n"))
            .unwrap_or_default();
        format!(
            "\n[[sinks]]\nname = \"{name}\"\nkind = \"webhook\"\nurl = \"{url}\"\n\
             events = [\"{EVENT_TYPE}\"]\n{secrets}\n[sinks.delivery]\nconcurrency = {concurrency}\n",
            url = self.receiver.url(),
            concurrency = self.args.delivery_concurrency,
        )
    }

    /// Writes a router config on a free port of 127.0.0.1 with this run's NATS server;
    /// with `traces`, spans are exported to the receiver's OTLP endpoint.
    fn write_config(
        &self,
        name: &str,
        sinks: &str,
        traces: bool,
    ) -> anyhow::Result<(PathBuf, SocketAddr)> {
        let schemas = self.schemas.display().to_string();
        if schemas.contains(['\'', '\n', '$']) {
            bail!(
                "the schemas path {schemas} contains a quote, a newline or '$', which the \
                 router config cannot hold: pass --schemas with a path without them"
            );
        }
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let text = format!(
            "[server]\nlisten = \"{addr}\"\n\n[nats]\nurl = \"{nats}\"\n\n\
             [schemas]\ndir = '{schemas}'\n{telemetry}{sinks}",
            nats = self.nats_url,
            telemetry = if traces {
                format!(
                    "\n[telemetry]\notlp_endpoint = \"{}\"\n",
                    self.receiver.otlp_endpoint()
                )
            } else {
                String::new()
            },
        );
        let path = self.configs.join(format!("{name}.toml"));
        std::fs::write(&path, text)?;
        Ok((path, addr))
    }
}
