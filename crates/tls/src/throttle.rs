//! Per-source throttling of failed attempts (ticket redemptions, enrollments,
//! session admissions, console sign-ins): a token bucket per source that
//! only failures drain. Kept in memory (per replica); when the table is full,
//! refilled sources are forgotten first.
//!
//! An attempt is admitted by [`Throttle::begin`], which checks the source's
//! bucket and registers the attempt in one step, and it counts as a failure
//! unless it says it succeeded ([`Attempt::succeeded`]): an attempt whose
//! caller goes away mid-way still counts. Successes cost nothing, so many
//! honest attempts at once from one address (a NAT) are not refused;
//! attempts in flight per source are capped at four times the burst, which
//! also bounds how far concurrent failures can overshoot it.

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

/// Sources remembered at most, so a flood from ever-new addresses cannot
/// grow the table without bound.
const MAX_SOURCES: usize = 100_000;

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
    in_flight: u32,
}

#[derive(Debug)]
pub struct Throttle {
    burst: f64,
    refill_per_sec: f64,
    max_sources: usize,
    buckets: Mutex<HashMap<String, Bucket>>,
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
            max_sources: MAX_SOURCES,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Remember at most `max` sources (default 100,000).
    pub fn with_capacity(mut self, max: usize) -> Self {
        self.max_sources = max.max(2);
        self
    }

    /// Sources remembered now.
    pub fn sources(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Bucket>> {
        self.buckets.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn level(&self, b: &Bucket, now: Instant) -> f64 {
        (b.tokens + now.duration_since(b.at).as_secs_f64() * self.refill_per_sec).min(self.burst)
    }

    fn fresh(&self, now: Instant) -> Bucket {
        Bucket {
            tokens: self.burst,
            at: now,
            in_flight: 0,
        }
    }

    /// The most attempts one source may have in flight.
    fn max_in_flight(&self) -> u32 {
        // burst is at most u32::MAX by construction.
        (self.burst as u32).saturating_mul(4)
    }

    /// Admit an attempt from `source`, or `None` when it is throttled (its
    /// failures used up the bucket, or too many of its attempts are in
    /// flight). Checking and registering are one step.
    pub fn begin(&self, source: &str) -> Option<Attempt<'_>> {
        let now = Instant::now();
        let mut buckets = self.lock();
        if !buckets.contains_key(source) {
            self.make_room(&mut buckets, now);
        }
        let bucket = buckets
            .entry(source.to_owned())
            .or_insert_with(|| self.fresh(now));
        if self.level(bucket, now) < 1.0 || bucket.in_flight >= self.max_in_flight() {
            return None;
        }
        bucket.in_flight += 1;
        Some(Attempt {
            throttle: self,
            source: source.to_owned(),
            succeeded: false,
        })
    }

    /// Admit and charge in one step: for limits where every attempt counts,
    /// good or bad (the console's sign-in).
    pub fn try_charge(&self, source: &str) -> bool {
        self.begin(source).is_some()
    }

    /// Whether `source` may make an attempt now (nothing is registered).
    pub fn allows(&self, source: &str) -> bool {
        let now = Instant::now();
        self.lock()
            .get(source)
            .is_none_or(|b| self.level(b, now) >= 1.0 && b.in_flight < self.max_in_flight())
    }

    fn finish(&self, source: &str, failed: bool) {
        let now = Instant::now();
        let mut buckets = self.lock();
        if let Some(b) = buckets.get_mut(source) {
            b.in_flight = b.in_flight.saturating_sub(1);
            if failed {
                b.tokens = (self.level(b, now) - 1.0).max(0.0);
                b.at = now;
            }
        }
    }

    fn make_room(&self, buckets: &mut HashMap<String, Bucket>, now: Instant) {
        if buckets.len() >= self.max_sources {
            // Forget sources that have refilled and are idle; if that is not
            // enough (a flood from ever-new sources), forget everything
            // rather than grow or lock every new source (an operator's) out.
            buckets.retain(|_, b| b.in_flight > 0 || self.level(b, now) < self.burst);
            if buckets.len() >= self.max_sources / 2 {
                tracing::warn!(sources = buckets.len(), "throttle table full; starting over");
                buckets.clear();
            }
        }
    }
}

/// One admitted attempt: a failure unless [`Attempt::succeeded`] says
/// otherwise before it is dropped.
#[derive(Debug)]
pub struct Attempt<'a> {
    throttle: &'a Throttle,
    source: String,
    succeeded: bool,
}

impl Attempt<'_> {
    /// The attempt succeeded: it costs nothing.
    pub fn succeeded(mut self) {
        self.succeeded = true;
    }
}

impl Drop for Attempt<'_> {
    fn drop(&mut self) {
        self.throttle.finish(&self.source, !self.succeeded);
    }
}

#[cfg(test)]
#[allow(clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn failures_drain_one_source_only() {
        let t = Throttle::new(3, Duration::from_secs(3600));
        for _ in 0..3 {
            assert!(t.allows("a"));
            drop(t.begin("a"));
        }
        assert!(!t.allows("a"));
        assert!(t.begin("a").is_none());
        assert!(t.allows("b"));
    }

    #[test]
    fn successes_cost_nothing_and_many_may_be_in_flight() {
        let t = Throttle::new(2, Duration::from_secs(3600));
        // Eight honest attempts at once from one address: all admitted.
        let many: Vec<_> = (0..8).map(|_| t.begin("nat").expect("admitted")).collect();
        assert!(t.begin("nat").is_none(), "at most four times the burst in flight");
        for a in many {
            a.succeeded();
        }
        // Nothing was charged: the whole burst of failures is still there.
        drop(t.begin("nat"));
        drop(t.begin("nat"));
        assert!(t.begin("nat").is_none());
        assert!(t.try_charge("other"));
    }

    #[test]
    fn a_full_table_still_admits_a_new_source() {
        let t = Throttle::new(1, Duration::from_secs(3600)).with_capacity(10);
        for i in 0..10 {
            drop(t.begin(&format!("s{i}")));
        }
        assert!(t.begin("operator").is_some());
        assert!(t.sources() <= 10);
    }
}
