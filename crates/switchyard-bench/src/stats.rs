//! Percentiles and number formatting for the report.

use std::time::Duration;

/// Summary of a set of latencies.
#[derive(Debug, Clone, Copy, Default)]
pub struct Latency {
    pub p50: Duration,
    pub p99: Duration,
    pub max: Duration,
}

impl Latency {
    /// Summarises latencies given in nanoseconds, with nearest-rank percentiles.
    pub fn from_nanos(mut samples: Vec<u64>) -> Self {
        if samples.is_empty() {
            return Self::default();
        }
        samples.sort_unstable();
        let rank = |percent: usize| {
            let index = (samples.len() * percent).div_ceil(100).max(1) - 1;
            Duration::from_nanos(samples[index.min(samples.len() - 1)])
        };
        Self {
            p50: rank(50),
            p99: rank(99),
            max: Duration::from_nanos(samples[samples.len() - 1]),
        }
    }
}

/// Events per second for `count` events in `elapsed`.
pub fn rate(count: u64, elapsed: Duration) -> f64 {
    let seconds = elapsed.as_secs_f64();
    if seconds <= 0.0 {
        return 0.0;
    }
    count as f64 / seconds
}

pub fn millis(duration: Duration) -> String {
    format!("{:.2} ms", duration.as_secs_f64() * 1000.0)
}

pub fn per_second(value: f64) -> String {
    format!("{value:.0} /s")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank() {
        let latency = Latency::from_nanos((1..=100).collect());
        assert_eq!(latency.p50, Duration::from_nanos(50));
        assert_eq!(latency.p99, Duration::from_nanos(99));
        assert_eq!(latency.max, Duration::from_nanos(100));
        assert_eq!(Latency::from_nanos(vec![5]).p99, Duration::from_nanos(5));
    }
}
