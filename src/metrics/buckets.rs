//! Distributions recorded on hot paths (publish→write for every delivery, arrival→answer for
//! every request, acknowledgement latencies, frames per written message), where an
//! hdrhistogram record each cost more than the rest of the bookkeeping: plain log-linear
//! buckets (128 per power of two, under 0.8 % wide, the same resolution as the histograms
//! they are moved into), with the exact sum, turned into `Timing`s when the shard publishes
//! its figures.

use super::{Timing, LATENCY_MAX_US};

/// Sub-buckets per power of two, as a shift.
const SUB_BITS: u32 = 7;
const SUB_BUCKETS: u64 = 1 << SUB_BITS;
/// Enough buckets for `LATENCY_MAX_US`, the largest value any family keeps.
const BUCKETS: usize = bucket(LATENCY_MAX_US) + 1;

/// The bucket of `value`: exact below 128, then 128 buckets per power of two.
const fn bucket(value: u64) -> usize {
    let top_bit = 63 - (value | 1).leading_zeros();
    let shift = top_bit.saturating_sub(SUB_BITS);
    ((shift as u64) * SUB_BUCKETS + (value >> shift)) as usize
}

/// The middle of bucket `index` (the value recorded for its counts).
fn bucket_value(index: usize) -> u64 {
    let index = index as u64;
    if index < 2 * SUB_BUCKETS {
        return index;
    }
    let shift = index / SUB_BUCKETS - 1;
    let lowest = (index - shift * SUB_BUCKETS) << shift;
    lowest + (1 << shift) / 2
}

/// Values recorded since the last drain, in `SLOTS` families (update types, commands).
pub struct Buckets<const SLOTS: usize> {
    /// By slot; allocated on the first record.
    counts: Option<Box<[[u32; BUCKETS]; SLOTS]>>,
    sums: [u64; SLOTS],
}

impl<const SLOTS: usize> Default for Buckets<SLOTS> {
    fn default() -> Self {
        Self { counts: None, sums: [0; SLOTS] }
    }
}

impl<const SLOTS: usize> Buckets<SLOTS> {
    /// The buckets to count into (made on first use, kept after).
    #[inline]
    pub fn counts(&mut self) -> BucketCounts<'_, SLOTS> {
        let counts = self.counts.get_or_insert_with(|| Box::new([[0; BUCKETS]; SLOTS]));
        BucketCounts { counts, sums: &mut self.sums }
    }

    /// Adds what was recorded to `into` (a histogram per slot up to `max`, made when needed)
    /// and starts again.
    pub fn drain_into(&mut self, into: &mut [Option<Box<Timing>>; SLOTS], max: u64) {
        let Some(all) = self.counts.as_deref_mut() else { return };
        for (slot, counts) in all.iter_mut().enumerate() {
            let sum = std::mem::take(&mut self.sums[slot]);
            if counts.iter().all(|&c| c == 0) {
                continue;
            }
            let timing = into[slot].get_or_insert_with(|| Box::new(Timing::new(max)));
            for (index, count) in counts.iter_mut().enumerate().filter(|(_, c)| **c != 0) {
                timing.record_n(bucket_value(index), u64::from(std::mem::take(count)));
            }
            timing.add_to_sum(sum);
        }
    }
}

/// Where a batch of values (one write's deliveries, one read's answers) is counted.
pub struct BucketCounts<'a, const SLOTS: usize> {
    counts: &'a mut [[u32; BUCKETS]; SLOTS],
    sums: &'a mut [u64; SLOTS],
}

impl<const SLOTS: usize> BucketCounts<'_, SLOTS> {
    /// `slot` is below `SLOTS`.
    #[inline]
    pub fn record(&mut self, slot: usize, value: u64) {
        let value = value.min(LATENCY_MAX_US);
        let count = &mut self.counts[slot][bucket(value)];
        *count = count.wrapping_add(1);
        self.sums[slot] += value;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::UPDATE_TYPES;

    #[test]
    fn buckets_are_exact_below_128_and_under_one_percent_wide_above() {
        for value in 0..256 {
            assert_eq!(bucket_value(bucket(value)), value);
        }
        for value in [300, 1_000, 4_321, 99_999, 1_234_567, LATENCY_MAX_US] {
            let middle = bucket_value(bucket(value));
            let error = middle.abs_diff(value) as f64 / value as f64;
            assert!(error < 0.008, "{value} → {middle}");
        }
        let mut last = 0;
        for value in (0..LATENCY_MAX_US).step_by(997) {
            let index = bucket(value);
            assert!(index >= last && index < BUCKETS, "{value}: {index}");
            last = index;
        }
    }

    #[test]
    fn drained_latencies_become_histograms_with_their_exact_sum() {
        let mut latencies = Buckets::<UPDATE_TYPES>::default();
        let mut counts = latencies.counts();
        for value in [40, 40, 2_000, 9_000_000] {
            counts.record(1, value);
        }
        counts.record(1, u64::MAX);
        let mut into = Default::default();
        latencies.drain_into(&mut into, LATENCY_MAX_US);
        let route: &[Option<Box<Timing>>; UPDATE_TYPES] = &into;
        let route = route[1].as_ref().unwrap();
        assert_eq!(route.count(), 5);
        assert_eq!(route.sum(), 40 + 40 + 2_000 + 9_000_000 + LATENCY_MAX_US);
        assert_eq!(route.count_at_most(40), 2);
        assert!(into[0].is_none() && into[2].is_none());
        let mut again = Default::default();
        latencies.drain_into(&mut again, LATENCY_MAX_US);
        assert!(again.iter().all(Option::is_none), "a drain empties the buckets");
    }
}
