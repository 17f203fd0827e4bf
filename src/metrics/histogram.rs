//! hdrhistograms with their exact sum (Prometheus wants one; hdrhistogram keeps only a mean of
//! bucket midpoints), and windows of them: since start, and the last one to two minutes.

use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

/// Two significant figures: a recorded value is off by at most 1 %.
const SIGNIFICANT_FIGURES: u8 = 2;
/// How long a quantile window lasts; quantiles are read over the last one or two of them.
pub const WINDOW: Duration = Duration::from_secs(60);

/// Values from 0 to a maximum, counted in buckets 1 % wide, and their sum.
#[derive(Clone)]
pub struct Timing {
    histogram: Histogram<u64>,
    sum: u64,
}

impl Timing {
    /// Values above `max` count as `max`.
    pub fn new(max: u64) -> Self {
        let histogram = Histogram::new_with_bounds(1, max.max(2), SIGNIFICANT_FIGURES)
            .expect("bounds 1..max with 2 significant figures are valid");
        Self { histogram, sum: 0 }
    }

    pub fn record(&mut self, value: u64) {
        let value = value.min(self.histogram.high());
        self.histogram.saturating_record(value);
        self.sum = self.sum.saturating_add(value);
    }

    /// `count` values of `value` whose sum is accounted separately (`add_to_sum`).
    pub fn record_n(&mut self, value: u64, count: u64) {
        self.histogram.saturating_record_n(value.min(self.histogram.high()), count);
    }

    pub fn add_to_sum(&mut self, sum: u64) {
        self.sum = self.sum.saturating_add(sum);
    }

    pub fn add(&mut self, other: &Timing) {
        // Both come from the same bounds, which `add` cannot refuse.
        let _ = self.histogram.add(&other.histogram);
        self.sum = self.sum.saturating_add(other.sum);
    }

    pub fn reset(&mut self) {
        self.histogram.reset();
        self.sum = 0;
    }

    pub fn is_empty(&self) -> bool {
        self.histogram.is_empty()
    }

    pub fn count(&self) -> u64 {
        self.histogram.len()
    }

    pub fn sum(&self) -> u64 {
        self.sum
    }

    /// Values at or below `bound`. Where `bound` falls inside a 1 % bucket, that bucket is
    /// left out: a latency is never reported under a bound it may exceed.
    pub fn count_at_most(&self, bound: u64) -> u64 {
        if bound >= self.histogram.high() {
            return self.histogram.len();
        }
        if self.histogram.highest_equivalent(bound) == bound {
            return self.histogram.count_between(0, bound);
        }
        match self.histogram.lowest_equivalent(bound) {
            0 => 0,
            lowest => self.histogram.count_between(0, lowest - 1),
        }
    }

    /// The value at quantile `q` (0..=1); 0 when empty.
    pub fn quantile(&self, q: f64) -> u64 {
        self.histogram.value_at_quantile(q)
    }
}

/// A histogram since start, and the current and previous windows for recent quantiles.
#[derive(Clone)]
pub struct TimingWindows {
    pub total: Timing,
    current: Timing,
    previous: Timing,
    current_since: Instant,
}

impl TimingWindows {
    pub fn new(max: u64, now: Instant) -> Self {
        let empty = Timing::new(max);
        Self { total: empty.clone(), current: empty.clone(), previous: empty, current_since: now }
    }

    pub fn add(&mut self, timing: &Timing, now: Instant) {
        self.rotate(now);
        self.total.add(timing);
        self.current.add(timing);
    }

    pub fn record(&mut self, value: u64, now: Instant) {
        self.rotate(now);
        self.total.record(value);
        self.current.record(value);
    }

    /// What was recorded over the last one to two windows (empty when nothing was recently).
    pub fn recent(&self, now: Instant) -> Timing {
        let mut recent = Timing::new(self.total.histogram.high());
        let age = now.saturating_duration_since(self.current_since);
        if age < WINDOW * 2 {
            recent.add(&self.current);
        }
        if age < WINDOW {
            recent.add(&self.previous);
        }
        recent
    }

    fn rotate(&mut self, now: Instant) {
        let age = now.saturating_duration_since(self.current_since);
        if age < WINDOW {
            return;
        }
        if age < WINDOW * 2 {
            std::mem::swap(&mut self.previous, &mut self.current);
        } else {
            self.previous.reset();
        }
        self.current.reset();
        self.current_since = now;
    }
}
