//! Adaptive batching: how long a busy connection's updates wait to leave together.
//!
//! A connection whose socket is idle writes at once. Under load every write costs the shard a
//! syscall's worth of work and the client a read, so writing each update alone wastes most of
//! the core. The shard measures how busy its thread is; while it is more than half busy it
//! *lingers*: a connection writes at most once per linger, so what arrives meanwhile leaves
//! in one write. The linger doubles while the shard stays busy, up to
//! `delivery.batch_interval`, and halves back to zero when it calms down. A shard still
//! overloaded at that cap (a round over its connections takes longer than the interval, so
//! its writes are already spaced by the round, and each write costs the kernel about the same
//! whatever it carries) lingers on, up to `delivery.overload_interval`, until it has headroom
//! again: fewer, larger writes instead of a core spent on them. Writes are spread over the
//! linger in `PHASES` ticks, each connection at the ticks of its phase. Replies and control
//! frames never wait. Sans I/O: the caller passes the time and the thread's CPU time.

use std::os::fd::RawFd;
use std::time::{Duration, Instant};

use crate::core::ConnId;

/// How often the load is sampled while nothing lingers.
pub const SAMPLE_PERIOD: Duration = Duration::from_millis(10);
/// The shortest linger worth a timer.
const MIN_LINGER: Duration = Duration::from_millis(1);
/// Busy fractions of the shard's thread above which the linger grows, below which it shrinks.
const BUSY_HIGH: f64 = 0.5;
const BUSY_LOW: f64 = 0.25;
/// Busy fraction that, with the linger already at `batch_interval`, marks the shard as
/// overloaded: the linger then keeps growing (up to `delivery.overload_interval`) until the
/// shard falls below it again, and shrinks back once it is under `BUSY_CALMED` (the two a
/// growth step apart, so one step does not cross both). 40 % of the core stays free for
/// replies, new connections and bursts.
const BUSY_OVERLOADED: f64 = 0.6;
const BUSY_CALMED: f64 = 0.4;

/// Ticks per linger. Each connection writes at most once per linger, at the ticks of its
/// phase (its index modulo `PHASES`), so a quarter of the waiting connections write at each
/// tick instead of all at once: at 10,000 connections one tick's sends take a few hundred
/// milliseconds, which all in one burst would add to the wait of the last ones served.
const PHASES: u64 = 4;
/// The shortest time between two ticks.
const MIN_TICK: Duration = Duration::from_micros(250);

/// The pacing as one writer sees it.
#[derive(Debug, Clone, Copy)]
pub struct Gate {
    /// The current tick.
    epoch: u64,
    lingering: bool,
}

impl Gate {
    /// Whether a connection that last wrote in tick `last_epoch` (as `stamp` gave it) should
    /// wait for its next tick instead of writing now (`urgent`: replies, control frames or a
    /// full batch are queued, or the connection is ending).
    pub fn holds(self, last_epoch: u64, urgent: bool) -> bool {
        self.lingering && self.epoch < last_epoch + PHASES && !urgent
    }

    /// The tick a write of connection `index` now counts as: the latest of its phase, so
    /// its next write waits at most a linger and falls on its phase's tick.
    pub fn stamp(self, index: u32) -> u64 {
        self.epoch - (self.epoch + PHASES - u64::from(index) % PHASES) % PHASES
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
    /// Ticks so far (from `PHASES`, so that every phase has a tick at or before it).
    epoch: u64,
    /// The last load sample: when, and the thread's CPU time then.
    sampled: Option<(Instant, Duration)>,
    /// Per phase, connections waiting for its next tick, with the socket the tick may send
    /// on directly.
    waiting: [Vec<(ConnId, Option<RawFd>)>; PHASES as usize],
}

impl Pacing {
    /// `max` is `delivery.batch_interval` (zero: never linger), `overload_max` is
    /// `delivery.overload_interval` (at or below `max`: never linger past `max`).
    pub fn new(max: Duration, overload_max: Duration) -> Self {
        let overload_max = overload_max.max(max);
        let (fixed, linger) = (false, Duration::ZERO);
        Self { max, overload_max, linger, fixed, epoch: PHASES, sampled: None, waiting: Default::default() }
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

    /// Remembers a connection the gate held to write at the next tick of its phase: on
    /// `direct`, its socket, when its bytes need not pass through its writer task (see
    /// `ShardState::on_pacing_tick`).
    pub fn wait(&mut self, conn: ConnId, direct: Option<RawFd>) {
        self.waiting[(u64::from(conn.index) % PHASES) as usize].push((conn, direct));
    }

    /// Time until the next tick.
    pub fn period(&self) -> Duration {
        if self.linger.is_zero() {
            SAMPLE_PERIOD
        } else {
            (self.linger / PHASES as u32).max(MIN_TICK)
        }
    }

    /// A tick: a new epoch begins and the connections of its phase that waited (returned)
    /// may write; all of them once the linger is gone. With the CPU time the shard's thread
    /// has used so far, the linger is adjusted to the load.
    pub fn tick(&mut self, now: Instant, thread_cpu: Duration) -> Vec<(ConnId, Option<RawFd>)> {
        self.epoch += 1;
        match self.sampled {
            // Once per linger at most: what a change of it does shows only after a whole one.
            Some((at, cpu)) if now.duration_since(at) >= SAMPLE_PERIOD.max(self.linger) => {
                let busy = thread_cpu.saturating_sub(cpu).as_secs_f64() / now.duration_since(at).as_secs_f64();
                self.adjust(busy);
                self.sampled = Some((now, thread_cpu));
            }
            Some(_) => {}
            None => self.sampled = Some((now, thread_cpu)),
        }
        if self.linger.is_zero() {
            return self.waiting.iter_mut().flat_map(std::mem::take).collect();
        }
        std::mem::take(&mut self.waiting[(self.epoch % PHASES) as usize])
    }

    fn adjust(&mut self, busy: f64) {
        if self.fixed {
            return;
        }
        if self.linger >= self.max && busy > BUSY_OVERLOADED {
            self.linger = (self.linger * 3 / 2).min(self.overload_max);
        } else if self.linger > self.max {
            if busy < BUSY_CALMED {
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

    /// Ticks at its own period for `span` with the thread `busy` that fraction of the time;
    /// returns the connections the ticks released.
    fn run(pacing: &mut Pacing, now: &mut Instant, cpu: &mut Duration, busy: f64, span: Duration) -> Vec<ConnId> {
        let (end, mut released) = (*now + span, Vec::new());
        while *now < end {
            let period = pacing.period();
            *now += period;
            *cpu += period.mul_f64(busy);
            released.extend(pacing.tick(*now, *cpu).into_iter().map(|(conn, _)| conn));
        }
        released
    }

    fn conn(index: u32) -> ConnId {
        ConnId { index, generation: 1 }
    }

    #[test]
    fn linger_grows_under_load_up_to_the_interval_and_falls_back_when_calm() {
        let (mut pacing, mut now, mut cpu) = started(50 * MS, 50 * MS);
        run(&mut pacing, &mut now, &mut cpu, 0.1, 50 * MS);
        assert_eq!(pacing.linger(), Duration::ZERO, "a calm shard writes at once");
        run(&mut pacing, &mut now, &mut cpu, 0.9, 30 * MS);
        assert!(pacing.linger() >= MS, "{:?}", pacing.linger());
        run(&mut pacing, &mut now, &mut cpu, 0.9, 2000 * MS);
        assert_eq!(pacing.linger(), 50 * MS, "capped at batch_interval");
        run(&mut pacing, &mut now, &mut cpu, 0.4, 1000 * MS);
        assert_eq!(pacing.linger(), 50 * MS, "between the marks it holds");
        run(&mut pacing, &mut now, &mut cpu, 0.05, 2000 * MS);
        assert_eq!(pacing.linger(), Duration::ZERO);
    }

    #[test]
    fn an_always_lingering_pacing_holds_its_linger_whatever_the_load() {
        let mut pacing = Pacing::always_lingering(20 * MS);
        let (mut now, mut cpu) = (Instant::now(), Duration::ZERO);
        pacing.tick(now, cpu);
        assert_eq!(pacing.linger(), 20 * MS);
        run(&mut pacing, &mut now, &mut cpu, 0.0, 1000 * MS);
        assert_eq!(pacing.linger(), 20 * MS, "idle");
        run(&mut pacing, &mut now, &mut cpu, 1.0, 1000 * MS);
        assert_eq!(pacing.linger(), 20 * MS, "busy, not overloaded past it");
        let gate = pacing.gate();
        assert!(gate.holds(gate.stamp(0), false));
    }

    #[test]
    fn a_connection_writes_once_a_linger_at_its_phase_and_never_waits_for_replies() {
        let (mut pacing, mut now, mut cpu) = started(50 * MS, 50 * MS);
        let gate = pacing.gate();
        assert!(!gate.holds(gate.stamp(3), false), "no linger yet");
        run(&mut pacing, &mut now, &mut cpu, 1.0, 2000 * MS);
        assert_eq!(pacing.linger(), 50 * MS);
        assert_eq!(pacing.period(), 50 * MS / PHASES as u32, "{PHASES} ticks a linger");
        // Eight connections write now; each then waits for the next tick of its phase.
        let gate = pacing.gate();
        let stamps: Vec<u64> = (0..8).map(|index| gate.stamp(index)).collect();
        for (index, &stamp) in stamps.iter().enumerate() {
            assert!(gate.holds(stamp, false), "connection {index} wrote within the linger");
            assert!(!gate.holds(stamp, true), "replies do not wait");
            pacing.wait(conn(index as u32), Some(index as i32));
        }
        let mut released = Vec::new();
        for _ in 0..PHASES {
            now += pacing.period();
            cpu += pacing.period();
            let tick: Vec<ConnId> = pacing.tick(now, cpu).into_iter().map(|(conn, _)| conn).collect();
            let phase = pacing.gate().epoch % PHASES;
            assert_eq!(tick.len(), 2, "a quarter of them per tick: {tick:?}");
            assert!(tick.iter().all(|c| u64::from(c.index) % PHASES == phase), "{tick:?} at phase {phase}");
            for c in &tick {
                assert!(!pacing.gate().holds(stamps[c.index as usize], false), "released: may write");
            }
            released.extend(tick);
        }
        released.sort_by_key(|c| c.index);
        assert_eq!(released, (0..8).map(conn).collect::<Vec<_>>(), "each once, within one linger");
        // Writing at its tick, a connection's next write is one linger later.
        let gate = pacing.gate();
        let index = (gate.epoch % PHASES) as u32;
        assert_eq!(gate.stamp(index), gate.epoch);
        assert_eq!(gate.stamp(index + 1), gate.epoch + 1 - PHASES, "its phase's tick came a linger ago");
    }

    #[test]
    fn connections_waiting_when_the_linger_ends_all_write_at_once() {
        let (mut pacing, mut now, mut cpu) = started(50 * MS, 50 * MS);
        run(&mut pacing, &mut now, &mut cpu, 1.0, 2000 * MS);
        for index in 0..3 {
            pacing.wait(conn(index), None);
        }
        let released = run(&mut pacing, &mut now, &mut cpu, 0.0, 2000 * MS);
        assert_eq!(pacing.linger(), Duration::ZERO);
        assert_eq!(released.len(), 3, "{released:?}");
    }

    #[test]
    fn an_overloaded_shard_lingers_past_the_interval_up_to_the_overload_cap_and_back() {
        let (mut pacing, mut now, mut cpu) = started(50 * MS, 400 * MS);
        run(&mut pacing, &mut now, &mut cpu, 0.55, 2000 * MS);
        assert_eq!(pacing.linger(), 50 * MS, "busy but not overloaded: capped at batch_interval");
        assert!(!pacing.overloaded());
        run(&mut pacing, &mut now, &mut cpu, 0.95, 100 * MS);
        assert!(pacing.linger() > 50 * MS && pacing.linger() < 400 * MS, "{:?}", pacing.linger());
        assert!(pacing.overloaded());
        run(&mut pacing, &mut now, &mut cpu, 0.95, 3000 * MS);
        assert_eq!(pacing.linger(), 400 * MS, "capped at overload_interval");
        run(&mut pacing, &mut now, &mut cpu, 0.5, 2000 * MS);
        assert_eq!(pacing.linger(), 400 * MS, "between the marks it holds");
        run(&mut pacing, &mut now, &mut cpu, 0.3, 3000 * MS);
        assert_eq!(pacing.linger(), 50 * MS, "calmer: back to batch_interval, no lower while busy");
        run(&mut pacing, &mut now, &mut cpu, 0.05, 3000 * MS);
        assert_eq!(pacing.linger(), Duration::ZERO);
    }

    #[test]
    fn without_an_overload_cap_the_linger_stays_within_the_interval() {
        let (mut pacing, mut now, mut cpu) = started(50 * MS, Duration::ZERO);
        run(&mut pacing, &mut now, &mut cpu, 1.0, 3000 * MS);
        assert_eq!(pacing.linger(), 50 * MS);
        assert!(!pacing.overloaded());
    }

    #[test]
    fn a_zero_interval_never_lingers() {
        let (mut pacing, mut now, mut cpu) = started(Duration::ZERO, 400 * MS);
        assert!(!pacing.enabled());
        run(&mut pacing, &mut now, &mut cpu, 1.0, 1000 * MS);
        assert_eq!(pacing.linger(), Duration::ZERO);
    }
}
