//! API keys and what every shard shares of the API: the key a request presents, its rate
//! limit (one bucket per key), and the request and publication counters `/metrics` shows.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::{Bucket, Config};
use crate::ratelimit::KeyedBuckets;
use crate::shard::routes::ApiRoute;

/// HTTP statuses the API answers, as metric labels (anything else counts as `other`).
const STATUSES: [u16; 13] = [200, 400, 401, 403, 404, 405, 411, 413, 415, 429, 500, 503, 504];

/// What every shard shares of the API: the rate limit per key, and the counters.
pub struct ApiShared {
    /// One bucket per key, keyed by the first bytes of the key's digest.
    buckets: KeyedBuckets<u64, 1>,
    /// Requests answered, by route and status (`STATUSES` and `other`).
    requests: [[AtomicU64; STATUSES.len() + 1]; ApiRoute::ALL.len()],
    /// Publications (single or batched) that got an offset, and that were refused.
    published: AtomicU64,
    refused: AtomicU64,
}

impl ApiShared {
    pub fn new(limit: [Bucket; 1]) -> Self {
        Self {
            buckets: KeyedBuckets::new(limit),
            requests: Default::default(),
            published: AtomicU64::new(0),
            refused: AtomicU64::new(0),
        }
    }

    pub fn set_limit(&self, limit: [Bucket; 1]) {
        self.buckets.set_limits(limit);
    }

    /// Takes a request from the bucket of `key` (as [`authenticate`] names it); `Err`: how long
    /// until the bucket has one.
    pub(super) fn take(&self, key: u64) -> Result<(), Duration> {
        self.buckets.take(&key, 0, Instant::now())
    }

    pub(super) fn count(&self, route: ApiRoute, status: u16) {
        let column = STATUSES.iter().position(|&s| s == status).unwrap_or(STATUSES.len());
        self.requests[route as usize][column].fetch_add(1, Ordering::Relaxed);
    }

    /// `(route, status, count)` of every pair counted at least once.
    pub fn request_counts(&self) -> Vec<(&'static str, String, u64)> {
        let mut counts = Vec::new();
        for route in ApiRoute::ALL {
            for (column, counter) in self.requests[route as usize].iter().enumerate() {
                let count = counter.load(Ordering::Relaxed);
                if count > 0 {
                    let status = STATUSES.get(column).map_or_else(|| "other".to_owned(), u16::to_string);
                    counts.push((route.label(), status, count));
                }
            }
        }
        counts
    }

    pub(super) fn count_published(&self, publications: u64) {
        self.published.fetch_add(publications, Ordering::Relaxed);
    }

    pub(super) fn count_refused(&self, publications: u64) {
        self.refused.fetch_add(publications, Ordering::Relaxed);
    }

    /// Publications that got an offset, and that were refused.
    pub fn publication_counts(&self) -> (u64, u64) {
        (self.published.load(Ordering::Relaxed), self.refused.load(Ordering::Relaxed))
    }
}

/// The per-key bucket in force under `config` (off with `rate_limits.enabled = false`).
pub fn request_limit(config: &Config) -> [Bucket; 1] {
    if config.rate_limits.enabled {
        [config.rate_limits.api_requests]
    } else {
        [Bucket::new(0, 60, 0)]
    }
}

/// Which key the request presents: its bucket id, or the status and why not.
pub(super) fn authenticate(keys: &[String], authorization: Option<&str>) -> Result<u64, (u16, &'static str)> {
    let Some(authorization) = authorization else {
        return Err((401, "send the API key as `Authorization: Bearer KEY`"));
    };
    let presented = match authorization.split_once(' ') {
        Some((scheme, key)) if scheme.eq_ignore_ascii_case("bearer") => key.trim(),
        _ => return Err((401, "send the API key as `Authorization: Bearer KEY`")),
    };
    if keys.is_empty() {
        return Err((403, "no API key is configured (api.keys): the API is off"));
    }
    // Digests have one length whatever the keys', and every key is compared, so the time taken
    // says nothing about how much of a key was right, nor which key matched.
    let presented = Sha256::digest(presented.as_bytes());
    let mut matched = None;
    for key in keys {
        let digest = Sha256::digest(key.as_bytes());
        let equal = bool::from(digest[..].ct_eq(&presented[..]));
        if equal && matched.is_none() {
            matched = Some(u64::from_le_bytes(digest[..8].try_into().unwrap_or_default()));
        }
    }
    matched.ok_or((403, "the API key is not one of api.keys"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_told_apart_missing_from_wrong() {
        let keys = vec!["old-key-0123456789".to_owned(), "new-key-0123456789".to_owned()];
        assert_eq!(authenticate(&keys, None).unwrap_err().0, 401);
        assert_eq!(authenticate(&keys, Some("Basic abc")).unwrap_err().0, 401);
        assert_eq!(authenticate(&keys, Some("Bearer nope")).unwrap_err().0, 403);
        assert_eq!(authenticate(&[], Some("Bearer old-key-0123456789")).unwrap_err().0, 403);
        let old = authenticate(&keys, Some("Bearer old-key-0123456789")).unwrap();
        let new = authenticate(&keys, Some("bearer new-key-0123456789")).unwrap();
        assert_ne!(old, new, "each key has its own bucket");
    }
}
