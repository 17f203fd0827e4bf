//! Connection admission, decided for every `/ws` upgrade before the server answers it:
//! connection attempts per client address (a token bucket; over it: 429 with `Retry-After`),
//! and live connections on the whole server, on the shard and per client address (over a
//! limit: 503). An admitted connection holds a [`Ticket`]; dropping it gives the place back, so
//! the counts stay exact however a connection ends.
//!
//! Addresses are counted as clients are: an IPv4 address (also when it arrives mapped into
//! IPv6), or the /64 prefix of an IPv6 address, since one device or home gets a whole /64 and
//! could otherwise step around every per-address limit.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::config::{Bucket, Config};
use crate::ratelimit::KeyedBuckets;

/// Stripes of the per-address connection counts: shards rarely wait on each other.
const STRIPES: usize = 64;

/// Who a connection is counted against: an IPv4 address or an IPv6 /64.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClientKey(IpAddr);

impl ClientKey {
    pub fn of(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(v4) => ClientKey(IpAddr::V4(v4)),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => ClientKey(IpAddr::V4(v4)),
                None => {
                    let prefix = u128::from(v6) & !((1u128 << 64) - 1);
                    ClientKey(IpAddr::V6(Ipv6Addr::from(prefix)))
                }
            },
        }
    }
}

/// Why a connection was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The address made too many connection attempts; it may try again after the wait.
    AttemptsPerIp { retry_after: Duration },
    /// `limits.max_connections`: the server holds all the connections it may.
    MaxConnections,
    /// `limits.max_connections_per_shard`: the shard that accepted the socket is full.
    PerShard,
    /// `limits.max_connections_per_ip`: the address holds all the connections it may.
    PerIp,
}

impl Refusal {
    /// The HTTP status of the refusal.
    pub fn status(self) -> u16 {
        match self {
            Refusal::AttemptsPerIp { .. } => 429,
            _ => 503,
        }
    }

    /// What the response body says; names the limit, so an operator knows what to raise.
    pub fn message(self) -> String {
        match self {
            Refusal::AttemptsPerIp { retry_after } => format!(
                "too many connection attempts from this address (rate_limits.connection_attempts_per_ip); retry after {} s",
                retry_after_secs(retry_after)
            ),
            Refusal::MaxConnections => {
                "the server holds all the connections it may (limits.max_connections)".to_owned()
            }
            Refusal::PerShard => {
                "this server thread holds all the connections it may (limits.max_connections_per_shard)".to_owned()
            }
            Refusal::PerIp => {
                "this address holds all the connections it may (limits.max_connections_per_ip)".to_owned()
            }
        }
    }
}

/// Whole seconds to wait, rounded up (a `Retry-After` of 0 would invite an instant retry).
pub fn retry_after_secs(wait: Duration) -> u64 {
    (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1)
}

/// Admission state shared by every shard. The limits can change while it is in use (a
/// reload): places already taken stay, later upgrades meet the new limits.
pub struct Admission {
    max_connections: AtomicUsize,
    max_per_shard: AtomicUsize,
    max_per_ip: AtomicUsize,
    connections: AtomicUsize,
    per_shard: Box<[AtomicUsize]>,
    per_ip: Box<[Mutex<HashMap<ClientKey, usize>>]>,
    hasher: std::collections::hash_map::RandomState,
    /// Off (0 requests) when rate limits are off or the attempts limit is 0.
    attempts: KeyedBuckets<ClientKey, 1>,
}

impl Admission {
    pub fn new(config: &Config, shards: usize) -> Self {
        let limits = &config.limits;
        Self {
            max_connections: AtomicUsize::new(limits.max_connections),
            max_per_shard: AtomicUsize::new(limits.max_connections_per_shard),
            max_per_ip: AtomicUsize::new(limits.max_connections_per_ip),
            connections: AtomicUsize::new(0),
            per_shard: (0..shards).map(|_| AtomicUsize::new(0)).collect(),
            per_ip: (0..STRIPES).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: Default::default(),
            attempts: KeyedBuckets::new([attempt_limit(config)]),
        }
    }

    /// Puts the limits of `config` in force for the upgrades that follow.
    pub fn set_limits(&self, config: &Config) {
        let limits = &config.limits;
        self.max_connections.store(limits.max_connections, Ordering::Relaxed);
        self.max_per_shard.store(limits.max_connections_per_shard, Ordering::Relaxed);
        self.max_per_ip.store(limits.max_connections_per_ip, Ordering::Relaxed);
        self.attempts.set_limits([attempt_limit(config)]);
    }

    /// Decides on one upgrade from `ip` arriving on `shard`: counts the attempt, then takes a
    /// place on the address, the shard and the server, or refuses and takes none.
    pub fn admit(self: &Arc<Self>, ip: IpAddr, shard: usize, now: Instant) -> Result<Ticket, Refusal> {
        let key = ClientKey::of(ip);
        self.attempts.take(&key, 0, now).map_err(|retry_after| Refusal::AttemptsPerIp { retry_after })?;
        self.take_ip(key)?;
        if !take_below(&self.per_shard[shard], self.max_per_shard.load(Ordering::Relaxed)) {
            self.release_ip(key);
            return Err(Refusal::PerShard);
        }
        if !take_below(&self.connections, self.max_connections.load(Ordering::Relaxed)) {
            self.per_shard[shard].fetch_sub(1, Ordering::Relaxed);
            self.release_ip(key);
            return Err(Refusal::MaxConnections);
        }
        Ok(Ticket { admission: self.clone(), key, shard })
    }

    /// Live connections on the whole server.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::Relaxed)
    }

    /// Addresses with at least one live connection.
    pub fn addresses(&self) -> usize {
        self.per_ip.iter().map(|s| lock(s).len()).sum()
    }

    /// Addresses whose attempt bucket is remembered (not yet refilled).
    pub fn attempt_buckets(&self) -> usize {
        self.attempts.len()
    }

    /// Forgets the attempt buckets of addresses that have been quiet long enough to refill.
    pub fn sweep(&self, now: Instant) {
        self.attempts.sweep(now);
    }

    fn stripe(&self, key: ClientKey) -> &Mutex<HashMap<ClientKey, usize>> {
        &self.per_ip[self.hasher.hash_one(key) as usize % STRIPES]
    }

    fn take_ip(&self, key: ClientKey) -> Result<(), Refusal> {
        let mut stripe = lock(self.stripe(key));
        let count = stripe.entry(key).or_insert(0);
        if *count >= self.max_per_ip.load(Ordering::Relaxed) {
            if *count == 0 {
                stripe.remove(&key);
            }
            return Err(Refusal::PerIp);
        }
        *count += 1;
        Ok(())
    }

    fn release_ip(&self, key: ClientKey) {
        let mut stripe = lock(self.stripe(key));
        if let Some(count) = stripe.get_mut(&key) {
            *count -= 1;
            if *count == 0 {
                stripe.remove(&key);
            }
        }
    }
}

/// A connection's place; dropping it frees the place on the server, shard and address.
pub struct Ticket {
    admission: Arc<Admission>,
    key: ClientKey,
    shard: usize,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.admission.connections.fetch_sub(1, Ordering::Relaxed);
        self.admission.per_shard[self.shard].fetch_sub(1, Ordering::Relaxed);
        self.admission.release_ip(self.key);
    }
}

/// The attempts limit per address in force under `config` (0 requests: off).
fn attempt_limit(config: &Config) -> Bucket {
    let limit = config.rate_limits.connection_attempts_per_ip;
    if config.rate_limits.enabled {
        limit
    } else {
        Bucket { requests: 0, ..limit }
    }
}

/// Adds one to `counter` unless it already holds `limit`.
fn take_below(counter: &AtomicUsize, limit: usize) -> bool {
    counter.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| (n < limit).then_some(n + 1)).is_ok()
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic elsewhere while holding a stripe leaves plain counts behind; keep using them.
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admission(per_ip: usize, per_shard: usize, total: usize, attempts: Bucket) -> Arc<Admission> {
        let mut config = Config::default();
        config.limits.max_connections_per_ip = per_ip;
        config.limits.max_connections_per_shard = per_shard;
        config.limits.max_connections = total;
        config.rate_limits.connection_attempts_per_ip = attempts;
        Arc::new(Admission::new(&config, 2))
    }

    const NO_ATTEMPT_LIMIT: Bucket = Bucket::new(0, 60, 0);

    #[test]
    fn limits_refuse_and_dropped_tickets_free_their_place() {
        let admission = admission(2, 3, 4, NO_ATTEMPT_LIMIT);
        let now = Instant::now();
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let first = admission.admit(a, 0, now).unwrap();
        let _second = admission.admit(a, 0, now).unwrap();
        assert_eq!(admission.admit(a, 1, now).err(), Some(Refusal::PerIp));
        let _third = admission.admit(b, 0, now).unwrap();
        assert_eq!(admission.admit(b, 0, now).err(), Some(Refusal::PerShard));
        let _fourth = admission.admit(b, 1, now).unwrap();
        let c: IpAddr = "10.0.0.3".parse().unwrap();
        assert_eq!(admission.admit(c, 1, now).err(), Some(Refusal::MaxConnections));
        assert_eq!(admission.connections(), 4);
        drop(first);
        assert_eq!(admission.connections(), 3);
        admission.admit(c, 1, now).unwrap();
        assert_eq!(admission.connections(), 3, "the new ticket was dropped at once");
    }

    #[test]
    fn per_address_entries_follow_live_connections() {
        let admission = admission(10, 10, 10, NO_ATTEMPT_LIMIT);
        let now = Instant::now();
        let tickets: Vec<Ticket> =
            (1..=3).map(|i| admission.admit(format!("10.0.0.{i}").parse().unwrap(), 0, now).unwrap()).collect();
        assert_eq!(admission.addresses(), 3);
        drop(tickets);
        assert_eq!(admission.addresses(), 0);
        assert_eq!(admission.connections(), 0);
    }

    #[test]
    fn attempts_are_limited_per_address_and_swept() {
        let admission = admission(10, 10, 10, Bucket::new(60, 60, 2));
        let now = Instant::now();
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        drop(admission.admit(ip, 0, now).unwrap());
        drop(admission.admit(ip, 0, now).unwrap());
        match admission.admit(ip, 0, now).err() {
            Some(Refusal::AttemptsPerIp { retry_after }) => assert_eq!(retry_after_secs(retry_after), 1),
            other => panic!("expected an attempts refusal, got {other:?}"),
        }
        admission.admit("10.0.0.2".parse().unwrap(), 0, now).unwrap();
        assert_eq!(admission.attempt_buckets(), 2);
        admission.sweep(now + Duration::from_secs(3));
        assert_eq!(admission.attempt_buckets(), 0);
    }

    #[test]
    fn new_limits_apply_to_later_upgrades_and_keep_taken_places() {
        let admission = admission(1, 10, 10, NO_ATTEMPT_LIMIT);
        let now = Instant::now();
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let first = admission.admit(ip, 0, now).unwrap();
        assert_eq!(admission.admit(ip, 0, now).err(), Some(Refusal::PerIp));
        let mut config = Config::default();
        config.limits.max_connections_per_ip = 2;
        config.limits.max_connections = 2;
        config.rate_limits.connection_attempts_per_ip = Bucket::new(60, 60, 1);
        admission.set_limits(&config);
        let second = admission.admit(ip, 1, now).unwrap();
        let other: IpAddr = "10.0.0.2".parse().unwrap();
        assert_eq!(admission.admit(other, 1, now).err(), Some(Refusal::MaxConnections));
        assert!(matches!(admission.admit(other, 1, now).err(), Some(Refusal::AttemptsPerIp { .. })));
        config.limits.max_connections = 1;
        admission.set_limits(&config);
        assert_eq!(admission.connections(), 2, "places taken before stay");
        drop((first, second));
        assert_eq!(admission.connections(), 0);
    }

    #[test]
    fn ipv6_counts_per_64_and_mapped_ipv4_as_ipv4() {
        let a = ClientKey::of("2001:db8:1:2:aaaa::1".parse().unwrap());
        let b = ClientKey::of("2001:db8:1:2:bbbb::2".parse().unwrap());
        let c = ClientKey::of("2001:db8:1:3::1".parse().unwrap());
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(ClientKey::of("::ffff:10.0.0.1".parse().unwrap()), ClientKey::of("10.0.0.1".parse().unwrap()));
    }

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        assert_eq!(retry_after_secs(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1000)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1001)), 2);
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
    }
}
