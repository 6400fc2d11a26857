//! Per-source throttling of failed ticket attempts: a token bucket per
//! source that only failures drain. Kept in memory (per ticket-service
//! replica); entries of idle sources are pruned.

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

/// Sources remembered at most, so a flood from ever-new addresses cannot
/// grow the table without bound.
const MAX_SOURCES: usize = 100_000;

#[derive(Debug)]
pub struct Throttle {
    burst: f64,
    refill_per_sec: f64,
    buckets: Mutex<HashMap<String, (f64, Instant)>>,
}

impl Default for Throttle {
    /// 10 failures at once, then one every 6 seconds.
    fn default() -> Self {
        Self::new(10, Duration::from_secs(6))
    }
}

impl Throttle {
    pub fn new(burst: u32, refill_every: Duration) -> Self {
        Self {
            burst: f64::from(burst.max(1)),
            refill_per_sec: 1.0 / refill_every.as_secs_f64().max(0.001),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    fn level(&self, (tokens, at): (f64, Instant), now: Instant) -> f64 {
        (tokens + now.duration_since(at).as_secs_f64() * self.refill_per_sec).min(self.burst)
    }

    /// Whether `source` may still make an attempt.
    pub fn allows(&self, source: &str) -> bool {
        let buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        buckets
            .get(source)
            .is_none_or(|b| self.level(*b, Instant::now()) >= 1.0)
    }

    /// Give back what [`Throttle::record_failure`] took (an attempt that succeeded).
    pub fn refund(&self, source: &str) {
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(b) = buckets.get_mut(source) {
            *b = ((self.level(*b, now) + 1.0).min(self.burst), now);
        }
    }

    pub fn record_failure(&self, source: &str) {
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if buckets.len() >= MAX_SOURCES {
            // Forget sources that have refilled; if that is not enough (a
            // flood from ever-new sources), forget everything rather than grow.
            buckets.retain(|_, b| self.level(*b, now) < self.burst);
            if buckets.len() >= MAX_SOURCES / 2 {
                tracing::warn!(sources = buckets.len(), "throttle table full; starting over");
                buckets.clear();
            }
        }
        let level = buckets.get(source).map_or(self.burst, |b| self.level(*b, now));
        buckets.insert(source.to_owned(), ((level - 1.0).max(0.0), now));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_drain_one_source_only() {
        let t = Throttle::new(3, Duration::from_secs(3600));
        for _ in 0..3 {
            assert!(t.allows("a"));
            t.record_failure("a");
        }
        assert!(!t.allows("a"));
        assert!(t.allows("b"));
    }
}
