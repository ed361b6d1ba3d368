//! Rate limit for repeated log lines.
//!
//! A sink whose endpoint is down fails every event the same way; logging each failure
//! would flood the log. [`LogThrottle::check`] lets the first occurrence of a key through
//! in each window and counts the rest, so the next line that passes can report how many
//! similar lines were suppressed.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Default window in which one line per key is logged.
pub const DEFAULT_WINDOW: Duration = Duration::from_secs(10);

/// Most keys tracked at once; the map is cleared when it grows past this.
const MAX_KEYS: usize = 4096;

pub struct LogThrottle {
    window: Duration,
    state: Mutex<HashMap<String, (Instant, u64)>>,
}

impl LogThrottle {
    pub fn new(window: Duration) -> Self {
        Self {
            window,
            state: Mutex::new(HashMap::new()),
        }
    }

    /// Returns `Some(suppressed)` when a line with `key` should be logged now, with the
    /// number of lines suppressed since the last one, or `None` to skip it.
    pub fn check(&self, key: &str) -> Option<u64> {
        let now = Instant::now();
        let mut state = self
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if state.len() > MAX_KEYS {
            state.clear();
        }
        match state.get_mut(key) {
            Some((last, suppressed)) if now.duration_since(*last) < self.window => {
                *suppressed += 1;
                None
            }
            Some((last, suppressed)) => {
                let count = *suppressed;
                *last = now;
                *suppressed = 0;
                Some(count)
            }
            None => {
                state.insert(key.to_owned(), (now, 0));
                Some(0)
            }
        }
    }
}

impl Default for LogThrottle {
    fn default() -> Self {
        Self::new(DEFAULT_WINDOW)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_passes_then_counts() {
        let throttle = LogThrottle::new(Duration::from_millis(50));
        assert_eq!(throttle.check("a"), Some(0));
        assert_eq!(throttle.check("a"), None);
        assert_eq!(throttle.check("a"), None);
        assert_eq!(throttle.check("b"), Some(0));
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(throttle.check("a"), Some(2));
    }
}
