//! The markdown report: results, targets, router memory, machine and parameters.

use std::fmt::Write as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::cpu::CpuUse;
use crate::stats::{Latency, millis, per_second, rate};

/// Targets shown next to the results; nothing fails when one is missed.
const INGRESS_TARGET: f64 = 0.8;
const DELIVERY_TARGET: f64 = 0.8;
const P99_TARGET: f64 = 2.0;

/// A closed-loop ingress run.
pub struct Ingress {
    pub ok: u64,
    pub failed: u64,
    pub first_error: Option<String>,
    pub elapsed: Duration,
    /// Request latency under that load.
    pub latency: Latency,
    pub cpu: CpuUse,
}

impl Ingress {
    fn rate(&self) -> f64 {
        rate(self.ok, self.elapsed)
    }
}

/// A drain of a preloaded backlog.
pub struct Delivery {
    pub expected: u64,
    pub received: u64,
    pub signed: u64,
    /// From the first to the last arrival at the receiver.
    pub span: Duration,
    pub peak_rss: Option<u64>,
    pub cpu: CpuUse,
}

impl Delivery {
    /// Arrivals per second between the first and the last one.
    fn rate(&self) -> f64 {
        rate(self.received.saturating_sub(1), self.span)
    }
}

/// A paced end-to-end run.
pub struct Latencies {
    pub sent: u64,
    pub failed: u64,
    pub first_error: Option<String>,
    pub received: u64,
    pub max_lag: Duration,
    pub latency: Latency,
    pub peak_rss: Option<u64>,
    pub cpu: CpuUse,
}

pub struct Machine {
    nproc: usize,
    cpu: String,
    memory: String,
    kernel: String,
    load: String,
    nats_server: String,
    switchyard: String,
}

impl Machine {
    pub fn read(nats_server: &Path, switchyard: &Path) -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find(|line| line.starts_with("model name"))
            .and_then(|line| line.split_once(':'))
            .map(|(_, model)| model.trim().to_owned())
            .unwrap_or_else(|| "unknown".to_owned());
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let memory = meminfo
            .lines()
            .find(|line| line.starts_with("MemTotal:"))
            .and_then(|line| line.split_whitespace().nth(1))
            .and_then(|kib| kib.parse::<u64>().ok())
            .map(|kib| format!("{:.1} GiB", kib as f64 / 1024.0 / 1024.0))
            .unwrap_or_else(|| "unknown".to_owned());
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|text| text.trim().to_owned())
            .unwrap_or_else(|_| "unknown".to_owned());
        let load = std::fs::read_to_string("/proc/loadavg")
            .map(|text| {
                text.split_whitespace()
                    .take(3)
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .unwrap_or_else(|_| "unknown".to_owned());
        Self {
            load,
            nproc: std::thread::available_parallelism().map_or(0, usize::from),
            cpu,
            memory,
            kernel,
            nats_server: version_of(nats_server),
            switchyard: version_of(switchyard),
        }
    }
}

fn version_of(bin: &Path) -> String {
    Command::new(bin)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .ok()
        .map(|output| String::from_utf8_lossy(&output.stdout).trim().to_owned())
        .filter(|text| !text.is_empty())
        .unwrap_or_else(|| "unknown".to_owned())
}

/// The throughput measurements of one round; index 0 is the raw baseline, 1 is Switchyard.
pub struct Round {
    pub ingress: [Ingress; 2],
    pub delivery: [Delivery; 2],
    pub signed: Option<Delivery>,
    /// Ingress and delivery with traces exported to a local OTLP endpoint.
    pub traced: Option<(Ingress, Delivery)>,
    pub rss_ingress: Option<u64>,
}

/// Everything one run measured.
pub struct Report {
    pub machine: Machine,
    pub events: u64,
    pub concurrency: usize,
    pub delivery_concurrency: usize,
    pub rate: u64,
    pub duration: f64,
    pub warmup: u64,
    pub rounds: Vec<Round>,
    /// Index 0 is the raw baseline, 1 is Switchyard.
    pub latency: [Latencies; 2],
}

/// Lowest throughput with traces exported, as a share of the same path with traces off.
const TRACING_TARGET: f64 = 0.9;

impl Report {
    /// Writes the rows that compare traces exported with traces off, in the same run.
    fn write_tracing_rows(&self, out: &mut String) {
        let rounds = &self.rounds;
        if rounds.iter().all(|r| r.traced.is_none()) {
            return;
        }
        let off_in = median(rounds.iter().map(|r| r.ingress[1].rate()).collect());
        let on_in = median(
            rounds
                .iter()
                .filter_map(|r| r.traced.as_ref().map(|(ingress, _)| ingress.rate()))
                .collect(),
        );
        let off_out = median(rounds.iter().map(|r| r.delivery[1].rate()).collect());
        let on_out = median(
            rounds
                .iter()
                .filter_map(|r| r.traced.as_ref().map(|(_, delivery)| delivery.rate()))
                .collect(),
        );
        for (name, off, on) in [
            (
                "ingress throughput, traces exported (baseline: traces off)",
                off_in,
                on_in,
            ),
            (
                "delivery throughput, traces exported (baseline: traces off)",
                off_out,
                on_out,
            ),
        ] {
            let value = ratio(on, off);
            row(
                out,
                [
                    name,
                    &per_second(off),
                    &per_second(on),
                    &ratio_text(value),
                    &format!(">= {TRACING_TARGET}"),
                    met(value, Some(TRACING_TARGET), None),
                ],
            );
        }
    }
}

/// Formats one table row.
fn row(out: &mut String, cells: [&str; 6]) {
    let _ = writeln!(out, "| {} |", cells.join(" | "));
}

fn ratio(switchyard: f64, raw: f64) -> Option<f64> {
    (raw > 0.0).then(|| switchyard / raw)
}

fn ratio_text(value: Option<f64>) -> String {
    value.map_or_else(|| "n/a".to_owned(), |value| format!("{value:.2}"))
}

fn met(value: Option<f64>, at_least: Option<f64>, at_most: Option<f64>) -> &'static str {
    let Some(value) = value else {
        return "n/a";
    };
    let low = at_least.is_none_or(|bound| value >= bound);
    let high = at_most.is_none_or(|bound| value <= bound);
    if low && high { "yes" } else { "no" }
}

fn mib(bytes: Option<u64>) -> String {
    bytes.map_or_else(
        || "n/a".to_owned(),
        |bytes| format!("{:.1} MiB", bytes as f64 / 1024.0 / 1024.0),
    )
}

/// Computes the median of `values`, the mean of the two middle ones for an even count.
fn median(mut values: Vec<f64>) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(f64::total_cmp);
    let middle = values.len() / 2;
    if values.len() % 2 == 1 {
        values[middle]
    } else {
        (values[middle - 1] + values[middle]) / 2.0
    }
}

fn median_duration(values: impl Iterator<Item = Duration>) -> Duration {
    Duration::from_secs_f64(median(values.map(|value| value.as_secs_f64()).collect()))
}

fn error_note(error: Option<&str>) -> String {
    error.map_or_else(String::new, |error| format!(" (first error: {error})"))
}

impl Report {
    pub fn render(&self) -> String {
        let mut out = String::new();
        self.render_results(&mut out);
        self.render_memory(&mut out);
        self.render_details(&mut out);
        self.render_cpu(&mut out);
        self.render_setup(&mut out);
        out
    }

    fn render_results(&self, out: &mut String) {
        let rounds = &self.rounds;
        let ingress_rate =
            |side: usize| median(rounds.iter().map(|r| r.ingress[side].rate()).collect());
        let delivery_rate =
            |side: usize| median(rounds.iter().map(|r| r.delivery[side].rate()).collect());

        let _ = writeln!(
            out,
            "## Results\n\nThroughput rows are the median of {} rounds, each side's median \
             taken on its own.\n",
            rounds.len()
        );
        row(
            out,
            [
                "measure",
                "raw baseline",
                "switchyard",
                "ratio",
                "target",
                "met",
            ],
        );
        row(out, ["---", "---:", "---:", "---:", "---", "---"]);

        let (raw, sy) = (ingress_rate(0), ingress_rate(1));
        let value = ratio(sy, raw);
        row(
            out,
            [
                &format!(
                    "ingress throughput ({} events, {} clients)",
                    self.events, self.concurrency
                ),
                &per_second(raw),
                &per_second(sy),
                &ratio_text(value),
                &format!(">= {INGRESS_TARGET}"),
                met(value, Some(INGRESS_TARGET), None),
            ],
        );
        type Pick = fn(&Latency) -> Duration;
        for (name, pick) in [
            ("p50", (|l: &Latency| l.p50) as Pick),
            ("p99", |l: &Latency| l.p99),
        ] {
            let side = |index: usize| {
                median_duration(rounds.iter().map(|r| pick(&r.ingress[index].latency)))
            };
            let (raw, sy) = (side(0), side(1));
            row(
                out,
                [
                    &format!("ingress request latency {name} under that load"),
                    &millis(raw),
                    &millis(sy),
                    &ratio_text(ratio(sy.as_secs_f64(), raw.as_secs_f64())),
                    "",
                    "",
                ],
            );
        }

        let (raw, sy) = (delivery_rate(0), delivery_rate(1));
        let value = ratio(sy, raw);
        row(
            out,
            [
                &format!(
                    "delivery throughput ({} events, {} in flight)",
                    self.events, self.delivery_concurrency
                ),
                &per_second(raw),
                &per_second(sy),
                &ratio_text(value),
                &format!(">= {DELIVERY_TARGET}"),
                met(value, Some(DELIVERY_TARGET), None),
            ],
        );
        let signed: Vec<f64> = rounds
            .iter()
            .filter_map(|r| r.signed.as_ref().map(Delivery::rate))
            .collect();
        if !signed.is_empty() {
            let sy = median(signed);
            let value = ratio(sy, raw);
            row(
                out,
                [
                    "delivery throughput, sink with a signing secret",
                    &per_second(raw),
                    &per_second(sy),
                    &ratio_text(value),
                    &format!(">= {DELIVERY_TARGET}"),
                    met(value, Some(DELIVERY_TARGET), None),
                ],
            );
        }

        self.write_tracing_rows(out);

        let [raw_lat, sy_lat] = &self.latency;
        for (name, pick, target) in [
            ("p50", (|l: &Latency| l.p50) as Pick, None),
            ("p99", |l: &Latency| l.p99, Some(P99_TARGET)),
            ("max", |l: &Latency| l.max, None),
        ] {
            let raw = pick(&raw_lat.latency);
            let sy = pick(&sy_lat.latency);
            let value = ratio(sy.as_secs_f64(), raw.as_secs_f64());
            let (target_text, met_text) = match target {
                Some(bound) => (format!("<= {bound}"), met(value, None, Some(bound))),
                None => (String::new(), ""),
            };
            row(
                out,
                [
                    &format!("end-to-end latency {name} at {} events/s", self.rate),
                    &millis(raw),
                    &millis(sy),
                    &ratio_text(value),
                    &target_text,
                    met_text,
                ],
            );
        }
    }

    fn render_memory(&self, out: &mut String) {
        let rounds = &self.rounds;
        let peak = |values: &mut dyn Iterator<Item = Option<u64>>| values.flatten().max();
        let _ = writeln!(
            out,
            "\nRouter peak RSS (VmHWM of the switchyard process, largest over the rounds):\n"
        );
        let _ = writeln!(out, "| run | peak RSS |\n| --- | ---: |");
        let ingress = peak(&mut rounds.iter().map(|r| r.rss_ingress));
        let _ = writeln!(out, "| ingress | {} |", mib(ingress));
        let delivery = peak(&mut rounds.iter().map(|r| r.delivery[1].peak_rss));
        let _ = writeln!(out, "| delivery | {} |", mib(delivery));
        if rounds.iter().any(|r| r.signed.is_some()) {
            let signed = peak(
                &mut rounds
                    .iter()
                    .map(|r| r.signed.as_ref().and_then(|d| d.peak_rss)),
            );
            let _ = writeln!(out, "| delivery, signed | {} |", mib(signed));
        }
        let _ = writeln!(
            out,
            "| end-to-end latency | {} |",
            mib(self.latency[1].peak_rss)
        );
    }

    fn render_details(&self, out: &mut String) {
        let _ = writeln!(out, "\nRounds (events/s, ratio):\n");
        for (index, round) in self.rounds.iter().enumerate() {
            let [raw_in, sy_in] = &round.ingress;
            let [raw_out, sy_out] = &round.delivery;
            let mut line = format!(
                "- round {}: ingress {:.0} / {:.0} ({}), delivery {:.0} / {:.0} ({})",
                index + 1,
                raw_in.rate(),
                sy_in.rate(),
                ratio_text(ratio(sy_in.rate(), raw_in.rate())),
                raw_out.rate(),
                sy_out.rate(),
                ratio_text(ratio(sy_out.rate(), raw_out.rate())),
            );
            if let Some(signed) = &round.signed {
                let _ = write!(
                    line,
                    ", signed delivery {:.0} ({})",
                    signed.rate(),
                    ratio_text(ratio(signed.rate(), raw_out.rate()))
                );
            }
            let _ = writeln!(out, "{line}");
        }

        let _ = writeln!(out, "\nChecks:\n");
        let mut ingress_failed = [0_u64; 2];
        let mut first_errors = Vec::new();
        let mut incomplete = Vec::new();
        let mut signed_missing = 0;
        for round in &self.rounds {
            for (side, ingress) in round.ingress.iter().enumerate() {
                ingress_failed[side] += ingress.failed;
                if let Some(error) = &ingress.first_error {
                    first_errors.push(error.clone());
                }
            }
            for delivery in round.delivery.iter().chain(round.signed.as_ref()) {
                if delivery.received != delivery.expected {
                    incomplete.push(format!("{} of {}", delivery.received, delivery.expected));
                }
            }
            if let Some(signed) = &round.signed {
                signed_missing += signed.received.saturating_sub(signed.signed);
            }
        }
        let _ = writeln!(
            out,
            "- ingress requests not answered 202: raw {}, switchyard {}{}",
            ingress_failed[0],
            ingress_failed[1],
            error_note(first_errors.first().map(String::as_str)),
        );
        let _ = writeln!(
            out,
            "- drains that did not deliver every event: {}",
            if incomplete.is_empty() {
                "none".to_owned()
            } else {
                incomplete.join(", ")
            }
        );
        if self.rounds.iter().any(|r| r.signed.is_some()) {
            let _ = writeln!(
                out,
                "- signed deliveries without a webhook-signature header: {signed_missing}"
            );
        }
        for (name, latency) in [("raw", &self.latency[0]), ("switchyard", &self.latency[1])] {
            let _ = writeln!(
                out,
                "- end-to-end {name}: {} sent, {} failed, {} received, largest pacing lag {}{}",
                latency.sent,
                latency.failed,
                latency.received,
                millis(latency.max_lag),
                error_note(latency.first_error.as_deref()),
            );
        }
    }

    fn render_cpu(&self, out: &mut String) {
        let _ = writeln!(
            out,
            "\nCPU time per 1000 events (user + system from /proc, summed over the rounds; the \
             load generator, the receiver and the raw path are threads of the benchmark \
             process, each part on a runtime of its own):\n"
        );
        let _ = writeln!(
            out,
            "| measurement | load generator | receiver | raw path | router | nats-server | \
             total |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: |"
        );
        let mut rows: Vec<(&str, Vec<(u64, CpuUse)>)> = vec![
            ("ingress raw", Vec::new()),
            ("ingress switchyard", Vec::new()),
            ("delivery raw", Vec::new()),
            ("delivery switchyard", Vec::new()),
            ("delivery switchyard signed", Vec::new()),
        ];
        for round in &self.rounds {
            rows[0].1.push((round.ingress[0].ok, round.ingress[0].cpu));
            rows[1].1.push((round.ingress[1].ok, round.ingress[1].cpu));
            rows[2]
                .1
                .push((round.delivery[0].received, round.delivery[0].cpu));
            rows[3]
                .1
                .push((round.delivery[1].received, round.delivery[1].cpu));
            if let Some(signed) = &round.signed {
                rows[4].1.push((signed.received, signed.cpu));
            }
        }
        let [raw_lat, sy_lat] = &self.latency;
        rows.push(("end-to-end raw", vec![(raw_lat.received, raw_lat.cpu)]));
        rows.push(("end-to-end switchyard", vec![(sy_lat.received, sy_lat.cpu)]));

        type Part = fn(&CpuUse) -> Option<Duration>;
        let parts: [Part; 5] = [
            |cpu| cpu.load,
            |cpu| cpu.receiver,
            |cpu| cpu.raw,
            |cpu| cpu.router,
            |cpu| cpu.nats,
        ];
        for (name, samples) in rows {
            let events: u64 = samples.iter().map(|(events, _)| events).sum();
            if events == 0 {
                continue;
            }
            let values = parts.map(|part| {
                let times: Option<Vec<Duration>> =
                    samples.iter().map(|(_, cpu)| part(cpu)).collect();
                times.map(|times| {
                    times.iter().sum::<Duration>().as_secs_f64() * 1_000_000.0 / events as f64
                })
            });
            let total: f64 = values.iter().flatten().sum();
            let cells: Vec<String> = values
                .iter()
                .map(|value| value.map_or_else(|| "-".to_owned(), |value| format!("{value:.0} ms")))
                .collect();
            let _ = writeln!(out, "| {name} | {} | {total:.0} ms |", cells.join(" | "));
        }
    }

    fn render_setup(&self, out: &mut String) {
        let machine = &self.machine;
        let _ = writeln!(out, "\nMachine:\n");
        let _ = writeln!(out, "- nproc: {}", machine.nproc);
        let _ = writeln!(out, "- CPU: {}", machine.cpu);
        let _ = writeln!(out, "- memory: {}", machine.memory);
        let _ = writeln!(out, "- kernel: {}", machine.kernel);
        let _ = writeln!(out, "- load average at the end: {}", machine.load);
        let _ = writeln!(out, "- {}", machine.nats_server);
        let _ = writeln!(out, "- {}", machine.switchyard);

        let _ = writeln!(out, "\nParameters:\n");
        let _ = writeln!(
            out,
            "- --events {} --concurrency {} --delivery-concurrency {} --rounds {} --rate {} \
             --duration {} --warmup {}",
            self.events,
            self.concurrency,
            self.delivery_concurrency,
            self.rounds.len(),
            self.rate,
            self.duration,
            self.warmup,
        );
    }
}
