//! The one clock: monotonic instants for timeouts, microseconds on a process clock for
//! latencies, and the Unix time clients see, all read here.

use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Microseconds since the Unix epoch now (0 should the system clock be set before 1970).
pub fn unix_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, micros)
}

/// Microseconds on the metrics clock, so a latency on the delivery path is one subtraction.
/// The clock starts a while before the first time anyone asks (publications replayed from
/// Redis may be older than the process); instants before it read 0.
pub fn clock_us(at: Instant) -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    let start = *START.get_or_init(|| {
        let now = Instant::now();
        // The monotonic clock may have started less than a day ago (it counts from boot).
        [86_400, 3_600, 60].iter().find_map(|&secs| now.checked_sub(Duration::from_secs(secs))).unwrap_or(now)
    });
    at.checked_duration_since(start).map_or(0, micros)
}

fn micros(duration: Duration) -> u64 {
    u64::try_from(duration.as_micros()).unwrap_or(u64::MAX)
}

/// The time as a shard read it, passed into sans-I/O code.
#[derive(Debug, Clone, Copy)]
pub struct Now {
    /// Monotonic time, for timeouts.
    pub instant: Instant,
    /// Microseconds since the Unix epoch, for timestamps clients see.
    pub unix_us: u64,
}

/// The wall clock for sessions, read off the monotonic clock so that a read takes one clock
/// reading, not two. Anchored again at every timeout tick, which is how soon a step of the
/// system clock shows.
#[derive(Debug, Clone, Copy)]
pub struct WallClock {
    anchor: Instant,
    anchor_unix_us: u64,
}

impl WallClock {
    pub fn anchored_now() -> Self {
        Self { anchor: Instant::now(), anchor_unix_us: unix_us() }
    }

    pub fn at(&self, instant: Instant) -> Now {
        let since = instant.saturating_duration_since(self.anchor).as_micros() as u64;
        Now { instant, unix_us: self.anchor_unix_us.saturating_add(since) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wall_clock_follows_the_monotonic_clock_from_its_anchor() {
        let clock = WallClock::anchored_now();
        let later = clock.at(clock.anchor + Duration::from_millis(1500));
        assert_eq!(later.unix_us, clock.anchor_unix_us + 1_500_000);
        assert_eq!(later.instant, clock.anchor + Duration::from_millis(1500));
        let before = clock.at(clock.anchor.checked_sub(Duration::from_millis(1)).unwrap());
        assert_eq!(before.unix_us, clock.anchor_unix_us, "never before its anchor");
        let system_us = || SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_micros() as u64;
        let before = system_us();
        let anchored = WallClock::anchored_now().anchor_unix_us;
        let after = system_us();
        assert!((before..=after).contains(&anchored), "anchored at the system's time");
    }
}
