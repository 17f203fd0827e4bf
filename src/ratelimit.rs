//! Token buckets, sans I/O (the caller passes `now`), and a map of them per key (user, IP
//! address) shared by every shard.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::config::Bucket;

/// One bucket's state: `tokens` left as of `at`.
#[derive(Debug, Clone, Copy)]
pub struct TokenBucket {
    tokens: f64,
    at: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(limit: &Bucket, now: Instant) -> Self {
        Self { tokens: f64::from(limit.burst), at: now }
    }

    /// Takes one token, or says how long until one is there. A limit of 0 requests is off.
    pub fn take(&mut self, limit: &Bucket, now: Instant) -> Result<(), Duration> {
        if limit.requests == 0 {
            return Ok(());
        }
        let rate = f64::from(limit.requests) / limit.window.as_secs_f64();
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate).min(f64::from(limit.burst));
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - self.tokens) / rate))
        }
    }

    /// Whether the bucket has refilled completely by `now` (it then equals a new one).
    pub fn is_full(&self, limit: &Bucket, now: Instant) -> bool {
        if limit.requests == 0 {
            return true;
        }
        let rate = f64::from(limit.requests) / limit.window.as_secs_f64();
        self.tokens + now.saturating_duration_since(self.at).as_secs_f64() * rate >= f64::from(limit.burst)
    }
}

/// Buckets per key, behind striped locks so shards rarely contend. Keys whose buckets have
/// refilled are forgotten by [`KeyedBuckets::sweep`], so memory follows active keys only.
/// The limits can change while the buckets are in use ([`KeyedBuckets::set_limits`]); each
/// stripe keeps its own copy, so a take locks nothing more than its stripe.
pub struct KeyedBuckets<K, const N: usize> {
    stripes: Box<[Mutex<Stripe<K, N>>]>,
    hasher: std::collections::hash_map::RandomState,
}

const STRIPES: usize = 64;

struct Stripe<K, const N: usize> {
    limits: [Bucket; N],
    buckets: HashMap<K, [TokenBucket; N]>,
}

impl<K: Hash + Eq + Clone, const N: usize> KeyedBuckets<K, N> {
    /// One bucket per limit for each key.
    pub fn new(limits: [Bucket; N]) -> Self {
        Self {
            stripes: (0..STRIPES).map(|_| Mutex::new(Stripe { limits, buckets: HashMap::new() })).collect(),
            hasher: Default::default(),
        }
    }

    /// Takes a token from bucket `which` of `key`.
    pub fn take(&self, key: &K, which: usize, now: Instant) -> Result<(), Duration> {
        let mut stripe = lock(self.stripe(key));
        let Stripe { limits, buckets } = &mut *stripe;
        let limit = limits[which];
        if limit.requests == 0 {
            return Ok(());
        }
        let entry = match buckets.get_mut(key) {
            Some(entry) => entry,
            None => buckets.entry(key.clone()).or_insert_with(|| limits.map(|l| TokenBucket::new(&l, now))),
        };
        entry[which].take(&limit, now)
    }

    /// Replaces the limits. Remembered buckets keep their tokens, refill at the new rate and
    /// hold at most the new burst.
    pub fn set_limits(&self, limits: [Bucket; N]) {
        for stripe in self.stripes.iter() {
            lock(stripe).limits = limits;
        }
    }

    /// Forgets keys whose buckets are all full again.
    pub fn sweep(&self, now: Instant) {
        for stripe in self.stripes.iter() {
            let mut stripe = lock(stripe);
            let Stripe { limits, buckets } = &mut *stripe;
            buckets.retain(|_, entry| !entry.iter().zip(limits.iter()).all(|(b, l)| b.is_full(l, now)));
        }
    }

    /// Keys currently remembered.
    pub fn len(&self) -> usize {
        self.stripes.iter().map(|s| lock(s).buckets.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn stripe(&self, key: &K) -> &Mutex<Stripe<K, N>> {
        &self.stripes[self.hasher.hash_one(key) as usize % STRIPES]
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic elsewhere while holding a stripe leaves plain token counts behind; keep using them.
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT: Bucket = Bucket::new(60, 60, 5);

    #[test]
    fn burst_then_refill_at_the_rate() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(&LIMIT, start);
        for _ in 0..5 {
            bucket.take(&LIMIT, start).unwrap();
        }
        let wait = bucket.take(&LIMIT, start).unwrap_err();
        assert!((999..=1000).contains(&wait.as_millis()), "{wait:?}");
        assert!(bucket.take(&LIMIT, start + Duration::from_millis(500)).is_err());
        bucket.take(&LIMIT, start + Duration::from_millis(1001)).unwrap();
        assert!(!bucket.is_full(&LIMIT, start + Duration::from_secs(2)));
        assert!(bucket.is_full(&LIMIT, start + Duration::from_secs(6)));
    }

    #[test]
    fn zero_requests_is_no_limit() {
        let off = Bucket::new(0, 60, 0);
        let now = Instant::now();
        let mut bucket = TokenBucket::new(&off, now);
        for _ in 0..1000 {
            bucket.take(&off, now).unwrap();
        }
    }

    #[test]
    fn keys_are_limited_apart_and_swept_when_refilled() {
        let buckets = KeyedBuckets::new([LIMIT, Bucket::new(60, 60, 1)]);
        let now = Instant::now();
        for _ in 0..5 {
            buckets.take(&"alice", 0, now).unwrap();
        }
        assert!(buckets.take(&"alice", 0, now).is_err());
        buckets.take(&"bob", 0, now).unwrap();
        buckets.take(&"alice", 1, now).unwrap();
        assert!(buckets.take(&"alice", 1, now).is_err());
        assert_eq!(buckets.len(), 2);
        buckets.sweep(now + Duration::from_secs(2));
        assert_eq!(buckets.len(), 1, "bob refilled; alice has not");
        buckets.sweep(now + Duration::from_secs(10));
        assert!(buckets.is_empty());
    }

    #[test]
    fn new_limits_apply_to_remembered_keys() {
        let buckets = KeyedBuckets::new([LIMIT]);
        let now = Instant::now();
        buckets.take(&"alice", 0, now).unwrap();
        buckets.set_limits([Bucket::new(60, 60, 1)]);
        buckets.take(&"alice", 0, now).unwrap();
        assert!(buckets.take(&"alice", 0, now).is_err(), "four tokens were left, but the burst is now 1");
        buckets.take(&"bob", 0, now).unwrap();
        assert!(buckets.take(&"bob", 0, now).is_err(), "a new key starts with the new burst");
        buckets.set_limits([Bucket::new(0, 60, 0)]);
        for _ in 0..100 {
            buckets.take(&"alice", 0, now).unwrap();
        }
    }
}
