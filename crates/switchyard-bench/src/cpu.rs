//! CPU time of the parts of a measurement, read from /proc: the load generator, the
//! receiver and the raw paths, which are threads of this process with distinct thread
//! names, then nats-server and the router.

use std::time::Duration;

use crate::threads::{RAW_THREADS, RECEIVER_THREADS};

/// Clock ticks per second of the utime and stime fields (USER_HZ, 100 on Linux).
const TICKS_PER_SECOND: u64 = 100;

/// Parses the command name and the user plus system CPU time out of a `stat` file.
fn parse_stat(stat: &str) -> Option<(&str, Duration)> {
    // The name is in parentheses and may hold spaces; the fields follow the last ')'.
    let (head, tail) = stat.rsplit_once(')')?;
    let name = head.split_once('(')?.1;
    let fields: Vec<&str> = tail.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 11 and 12 after the name.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((
        name,
        Duration::from_millis((utime + stime) * 1000 / TICKS_PER_SECOND),
    ))
}

/// Returns the CPU time of all threads of `pid`, including the threads that ended.
fn process_time(pid: &str) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    Some(parse_stat(&stat)?.1)
}

/// CPU time of this process: (whole process, receiver threads, raw path threads).
fn own_times() -> Option<(Duration, Duration, Duration)> {
    let total = process_time("self")?;
    let mut receiver = Duration::ZERO;
    let mut raw = Duration::ZERO;
    for entry in std::fs::read_dir("/proc/self/task").ok()?.flatten() {
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let Some((name, time)) = parse_stat(&stat) else {
            continue;
        };
        if name.starts_with(RECEIVER_THREADS) {
            receiver += time;
        } else if name.starts_with(RAW_THREADS) {
            raw += time;
        }
    }
    Some((total, receiver, raw))
}

/// CPU time of each part during one measurement.
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuUse {
    /// The rest of this process: the load generator and the orchestration.
    pub load: Option<Duration>,
    pub receiver: Option<Duration>,
    pub raw: Option<Duration>,
    pub nats: Option<Duration>,
    pub router: Option<Duration>,
}

/// The CPU times at the start of one measurement.
pub struct CpuMeter {
    nats_pid: Option<u32>,
    own: Option<(Duration, Duration, Duration)>,
    nats: Option<Duration>,
    router: Option<Duration>,
}

fn pid_time(pid: Option<u32>) -> Option<Duration> {
    process_time(&pid?.to_string())
}

impl CpuMeter {
    /// Starts measuring this process, nats-server and a running router, if any.
    pub fn start(nats_pid: Option<u32>, router_pid: Option<u32>) -> Self {
        Self {
            nats_pid,
            own: own_times(),
            nats: pid_time(nats_pid),
            router: pid_time(router_pid),
        }
    }

    /// Starts measuring before the router of the measurement starts, so all of its CPU
    /// time counts.
    pub fn start_before_router(nats_pid: Option<u32>) -> Self {
        Self {
            router: Some(Duration::ZERO),
            ..Self::start(nats_pid, None)
        }
    }

    pub fn stop(&self, router_pid: Option<u32>) -> CpuUse {
        let since =
            |start: Option<Duration>, now: Option<Duration>| Some(now?.saturating_sub(start?));
        let own = match (self.own, own_times()) {
            (Some(start), Some(now)) => Some((
                now.0.saturating_sub(start.0),
                now.1.saturating_sub(start.1),
                now.2.saturating_sub(start.2),
            )),
            _ => None,
        };
        CpuUse {
            load: own.map(|(total, receiver, raw)| total.saturating_sub(receiver + raw)),
            receiver: own.map(|(_, receiver, _)| receiver),
            raw: own.map(|(_, _, raw)| raw),
            nats: since(self.nats, pid_time(self.nats_pid)),
            router: since(self.router, pid_time(router_pid)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_name_with_spaces() {
        let line = "42 (tokio rt) S 1 42 42 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 4 0";
        let (name, time) = parse_stat(line).expect("a valid line");
        assert_eq!(name, "tokio rt");
        assert_eq!(time, Duration::from_secs(3));
    }

    #[test]
    fn reads_own_cpu_time() {
        assert!(own_times().is_some());
    }
}
