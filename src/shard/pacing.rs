//! Adaptive batching: how long a busy connection's updates wait to leave together.
//!
//! A connection whose socket is idle writes at once. Under load every write costs the shard a
//! syscall's worth of work and the client a read, so writing each update alone wastes most of
//! the core. The shard measures how busy its thread is; while it is more than half busy it
//! *lingers*: a connection that already wrote in the current tick waits for the next one, so
//! what arrives meanwhile leaves in one write (and subscribers of one channel drain together,
//! so their compressed batches are shared). The linger doubles while the shard stays busy, up
//! to `delivery.batch_interval`, and halves back to zero when it calms down. A shard still
//! overloaded at that cap (a round over its connections takes longer than the interval, so
//! its writes are already spaced by the round, and each write costs the kernel about the same
//! whatever it carries) lingers on, up to `delivery.overload_interval`, until it has headroom
//! again: fewer, larger writes instead of a core spent on them. Replies and control frames
//! never wait. Sans I/O: the caller passes the time and the thread's CPU time.

use std::os::fd::RawFd;
use std::time::{Duration, Instant};

use crate::router::ConnId;

/// How often the load is sampled while nothing lingers.
pub const SAMPLE_PERIOD: Duration = Duration::from_millis(10);
/// The shortest linger worth a timer.
const MIN_LINGER: Duration = Duration::from_millis(1);
/// Busy fractions of the shard's thread above which the linger grows, below which it shrinks.
const BUSY_HIGH: f64 = 0.5;
const BUSY_LOW: f64 = 0.25;
/// Busy fraction that, with the linger already at `batch_interval`, marks the shard as
/// overloaded: the linger then keeps growing (up to `delivery.overload_interval`) until the
/// shard falls below it again, and shrinks back once it is under `BUSY_HIGH`.
const BUSY_OVERLOADED: f64 = 0.7;

/// The pacing as one writer sees it.
#[derive(Debug, Clone, Copy)]
pub struct Gate {
    /// The current tick; a write now belongs to it.
    pub epoch: u64,
    lingering: bool,
}

impl Gate {
    /// Whether a connection that last wrote in `last_epoch` should wait for the next tick
    /// instead of writing now (`urgent`: replies, control frames or a full batch are queued,
    /// or the connection is ending).
    pub fn holds(self, last_epoch: u64, urgent: bool) -> bool {
        self.lingering && last_epoch == self.epoch && !urgent
    }
}

#[derive(Debug)]
pub struct Pacing {
    max: Duration,
    /// How far past `max` the linger may grow while the shard is overloaded.
    overload_max: Duration,
    linger: Duration,
    /// The linger stays at `max` whatever the load (`testing.always_linger`).
    fixed: bool,
    /// Ticks so far; a connection that wrote in the current one waits for the next.
    epoch: u64,
    /// The last load sample: when, and the thread's CPU time then.
    sampled: Option<(Instant, Duration)>,
    /// Connections waiting for the next tick, with the socket the tick may send on directly.
    waiting: Vec<(ConnId, Option<RawFd>)>,
}

impl Pacing {
    /// `max` is `delivery.batch_interval` (zero: never linger), `overload_max` is
    /// `delivery.overload_interval` (at or below `max`: never linger past `max`).
    pub fn new(max: Duration, overload_max: Duration) -> Self {
        let overload_max = overload_max.max(max);
        let (fixed, linger) = (false, Duration::ZERO);
        Self { max, overload_max, linger, fixed, epoch: 1, sampled: None, waiting: Vec::new() }
    }

    /// Lingering at `max` from the start, whatever the load (`testing.always_linger`).
    pub fn always_lingering(max: Duration) -> Self {
        Self { linger: max, fixed: true, ..Self::new(max, max) }
    }

    pub fn enabled(&self) -> bool {
        !self.max.is_zero()
    }

    pub fn linger(&self) -> Duration {
        self.linger
    }

    /// Lingering past `delivery.batch_interval`: the shard could not keep up at it.
    pub fn overloaded(&self) -> bool {
        self.linger > self.max
    }

    /// What a writer decides by, copied out so that its connection can be borrowed meanwhile.
    pub fn gate(&self) -> Gate {
        Gate { epoch: self.epoch, lingering: !self.linger.is_zero() }
    }

    /// Remembers a connection to write at the next tick: on `direct`, its socket, when its
    /// bytes need not pass through its writer task (see `ShardState::on_pacing_tick`).
    pub fn wait(&mut self, conn: ConnId, direct: Option<RawFd>) {
        self.waiting.push((conn, direct));
    }

    /// Time until the next tick.
    pub fn period(&self) -> Duration {
        if self.linger.is_zero() {
            SAMPLE_PERIOD
        } else {
            self.linger
        }
    }

    /// A tick: a new epoch begins and the waiting connections (returned) may write. With the
    /// CPU time the shard's thread has used so far, the linger is adjusted to the load.
    pub fn tick(&mut self, now: Instant, thread_cpu: Duration) -> Vec<(ConnId, Option<RawFd>)> {
        self.epoch += 1;
        match self.sampled {
            Some((at, cpu)) if now.duration_since(at) >= SAMPLE_PERIOD => {
                let busy = thread_cpu.saturating_sub(cpu).as_secs_f64() / now.duration_since(at).as_secs_f64();
                self.adjust(busy);
                self.sampled = Some((now, thread_cpu));
            }
            Some(_) => {}
            None => self.sampled = Some((now, thread_cpu)),
        }
        std::mem::take(&mut self.waiting)
    }

    fn adjust(&mut self, busy: f64) {
        if self.fixed {
            return;
        }
        if self.linger >= self.max && busy > BUSY_OVERLOADED {
            self.linger = (self.linger * 3 / 2).min(self.overload_max);
        } else if self.linger > self.max {
            if busy < BUSY_HIGH {
                self.linger = (self.linger * 2 / 3).max(self.max);
            }
        } else if busy > BUSY_HIGH {
            self.linger = (self.linger * 2).max(MIN_LINGER).min(self.max);
        } else if busy < BUSY_LOW {
            self.linger /= 2;
            if self.linger < MIN_LINGER {
                self.linger = Duration::ZERO;
            }
        }
    }
}

/// CPU time the calling thread has used.
pub fn thread_cpu_time() -> Duration {
    let mut spec = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec we own.
    let ok = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut spec) } == 0;
    if ok {
        Duration::new(spec.tv_sec as u64, spec.tv_nsec as u32)
    } else {
        Duration::ZERO
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    /// A pacing with its first tick behind it, the time and the thread's CPU time then.
    fn started(max: Duration, overload_max: Duration) -> (Pacing, Instant, Duration) {
        let mut pacing = Pacing::new(max, overload_max);
        let (now, cpu) = (Instant::now(), Duration::ZERO);
        pacing.tick(now, cpu);
        (pacing, now, cpu)
    }

    /// Ticks `n` times at its own period with the thread `busy` that fraction of the time.
    fn run(pacing: &mut Pacing, start: &mut Instant, cpu: &mut Duration, busy: f64, n: usize) {
        for _ in 0..n {
            let period = pacing.period();
            *start += period;
            *cpu += period.mul_f64(busy);
            pacing.tick(*start, *cpu);
        }
    }

    #[test]
    fn linger_grows_under_load_up_to_the_interval_and_falls_back_when_calm() {
        let (mut pacing, mut now, mut cpu) = started(50 * MS, 50 * MS);
        run(&mut pacing, &mut now, &mut cpu, 0.1, 5);
        assert_eq!(pacing.linger(), Duration::ZERO, "a calm shard writes at once");
        run(&mut pacing, &mut now, &mut cpu, 0.9, 3);
        assert!(pacing.linger() >= MS, "{:?}", pacing.linger());
        run(&mut pacing, &mut now, &mut cpu, 0.9, 40);
        assert_eq!(pacing.linger(), 50 * MS, "capped at batch_interval");
        run(&mut pacing, &mut now, &mut cpu, 0.4, 10);
        assert_eq!(pacing.linger(), 50 * MS, "between the marks it holds");
        run(&mut pacing, &mut now, &mut cpu, 0.05, 30);
        assert_eq!(pacing.linger(), Duration::ZERO);
    }

    #[test]
    fn an_always_lingering_pacing_holds_its_linger_whatever_the_load() {
        let mut pacing = Pacing::always_lingering(20 * MS);
        let (mut now, mut cpu) = (Instant::now(), Duration::ZERO);
        pacing.tick(now, cpu);
        assert_eq!(pacing.linger(), 20 * MS);
        run(&mut pacing, &mut now, &mut cpu, 0.0, 20);
        assert_eq!(pacing.linger(), 20 * MS, "idle");
        run(&mut pacing, &mut now, &mut cpu, 1.0, 20);
        assert_eq!(pacing.linger(), 20 * MS, "busy, not overloaded past it");
        assert!(pacing.gate().holds(pacing.gate().epoch, false));
    }

    #[test]
    fn only_a_connection_that_wrote_this_tick_waits_and_never_for_replies() {
        let (mut pacing, mut now, mut cpu) = started(50 * MS, 50 * MS);
        assert!(!pacing.gate().holds(pacing.gate().epoch, false), "no linger yet");
        run(&mut pacing, &mut now, &mut cpu, 1.0, 2);
        let epoch = pacing.gate().epoch;
        assert!(!pacing.gate().holds(epoch - 1, false), "first write of a tick goes at once");
        assert!(pacing.gate().holds(epoch, false));
        assert!(!pacing.gate().holds(epoch, true), "replies do not wait");
        let conn = ConnId { index: 3, generation: 1 };
        pacing.wait(conn, Some(7));
        assert_eq!(pacing.tick(now + pacing.period(), cpu), vec![(conn, Some(7))]);
        assert!(!pacing.gate().holds(epoch, false), "a new tick lets it write");
    }

    #[test]
    fn an_overloaded_shard_lingers_past_the_interval_up_to_the_overload_cap_and_back() {
        let (mut pacing, mut now, mut cpu) = started(50 * MS, 400 * MS);
        run(&mut pacing, &mut now, &mut cpu, 0.6, 40);
        assert_eq!(pacing.linger(), 50 * MS, "busy but not overloaded: capped at batch_interval");
        assert!(!pacing.overloaded());
        run(&mut pacing, &mut now, &mut cpu, 0.95, 3);
        assert!(pacing.linger() > 50 * MS && pacing.linger() < 400 * MS, "{:?}", pacing.linger());
        assert!(pacing.overloaded());
        run(&mut pacing, &mut now, &mut cpu, 0.95, 20);
        assert_eq!(pacing.linger(), 400 * MS, "capped at overload_interval");
        run(&mut pacing, &mut now, &mut cpu, 0.6, 10);
        assert_eq!(pacing.linger(), 400 * MS, "between the marks it holds");
        run(&mut pacing, &mut now, &mut cpu, 0.4, 20);
        assert_eq!(pacing.linger(), 50 * MS, "calmer: back to batch_interval, no lower while busy");
        run(&mut pacing, &mut now, &mut cpu, 0.05, 30);
        assert_eq!(pacing.linger(), Duration::ZERO);
    }

    #[test]
    fn without_an_overload_cap_the_linger_stays_within_the_interval() {
        let (mut pacing, mut now, mut cpu) = started(50 * MS, Duration::ZERO);
        run(&mut pacing, &mut now, &mut cpu, 1.0, 40);
        assert_eq!(pacing.linger(), 50 * MS);
        assert!(!pacing.overloaded());
    }

    #[test]
    fn a_zero_interval_never_lingers() {
        let (mut pacing, mut now, mut cpu) = started(Duration::ZERO, 400 * MS);
        assert!(!pacing.enabled());
        run(&mut pacing, &mut now, &mut cpu, 1.0, 10);
        assert_eq!(pacing.linger(), Duration::ZERO);
    }
}
