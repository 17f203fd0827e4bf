//! The loop a shard thread runs: compio's tasks and completions, and the shard's periodic
//! work (pacing ticks, timeouts, sweeps) on deadlines of its own.
//!
//! compio's `block_on` would do, but while any compio timer is set its every turn reads the
//! clock twice and splits its timer tree (a node allocated and freed), and it polls the
//! top-level future every turn. A shard always has its periodic timers set, and a request
//! often has a turn of its own, so that was about a twentieth of a request's instructions.
//! Here the periodic work needs one clock reading a turn, and the top-level future (the
//! inbox) is polled only when woken. compio timers still work (handshake and close
//! timeouts, the drain): the loop sleeps no longer than the earliest of them.

use std::cell::RefCell;
use std::future::Future;
use std::pin::pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use compio::runtime::Runtime;

use super::pacing;
use super::state::ShardState;

/// How often a shard expires history and forgets idle channels.
const SWEEP_INTERVAL: Duration = Duration::from_secs(10);

/// Runs `main` on `runtime` to its end, with the shard's periodic work between polls.
pub(super) fn run<F: Future>(runtime: &Runtime, state: &Rc<RefCell<ShardState>>, main: F) -> F::Output {
    let mut ticks = Ticks::new(state, Instant::now());
    let woken = Arc::new(MainWaker { woken: AtomicBool::new(true), driver: runtime.waker() });
    let waker = Waker::from(woken.clone());
    let mut cx = Context::from_waker(&waker);
    let mut main = pin!(main);
    loop {
        if woken.woken.swap(false, Ordering::AcqRel) {
            if let Poll::Ready(output) = main.as_mut().poll(&mut cx) {
                runtime.run();
                return output;
            }
        }
        let more_tasks = runtime.run();
        let now = Instant::now();
        ticks.run_due(state, now);
        let timeout = if more_tasks {
            Duration::ZERO
        } else {
            let until_tick = ticks.next_due().saturating_duration_since(now);
            runtime.current_timeout().map_or(until_tick, |timer| timer.min(until_tick))
        };
        runtime.poll_with(Some(timeout));
    }
}

/// Wakes the loop for its top-level future: notes that it should be polled, then wakes the
/// driver (which may be asleep in the kernel, and may be woken from another thread).
struct MainWaker {
    woken: AtomicBool,
    driver: Waker,
}

impl Wake for MainWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.driver.wake_by_ref();
    }
}

/// When each periodic piece of work is next due.
struct Ticks {
    /// Adaptive batching's ticks: samples the load, releases waiting writers (when on).
    pacing: Option<Instant>,
    /// Lets every session act on the passing of time (overdue acknowledgements, heartbeats,
    /// token expiry).
    timeouts: Instant,
    /// Only ever shortens: connections opened before a reload keep the timeouts they
    /// started with.
    timeout_period: Duration,
    /// History expiry and idle channels.
    sweep: Instant,
    /// The rate-limit buckets of users and addresses that left, shared by all shards and
    /// swept by shard 0.
    cleanup: Option<Instant>,
}

impl Ticks {
    fn new(state: &Rc<RefCell<ShardState>>, now: Instant) -> Self {
        let mut shard = state.borrow_mut();
        let timeout_period = timeout_period(&mut shard, Duration::MAX);
        let cleanup = (shard.id == 0).then(|| now + shard.cluster.config.get().cleanup.interval);
        Self {
            pacing: shard.pacing.enabled().then(|| now + shard.pacing.period()),
            timeouts: now + timeout_period,
            timeout_period,
            sweep: now + SWEEP_INTERVAL,
            cleanup,
        }
    }

    fn next_due(&self) -> Instant {
        let mut next = self.timeouts.min(self.sweep);
        for due in [self.pacing, self.cleanup].into_iter().flatten() {
            next = next.min(due);
        }
        next
    }

    fn run_due(&mut self, state: &Rc<RefCell<ShardState>>, now: Instant) {
        if now < self.next_due() {
            return;
        }
        let mut shard = state.borrow_mut();
        if let Some(due) = self.pacing.filter(|&due| now >= due) {
            shard.on_pacing_tick(now, pacing::thread_cpu_time());
            // Ticks keep their cadence however long a tick's sends take (10,000 batches take
            // a few hundred milliseconds): the linger, not the linger plus the sends, spaces
            // a connection's writes. A tick that ran past the next one's time is followed at
            // once, and the load it measures then says the shard is busy.
            self.pacing = Some((due + shard.pacing.period()).max(Instant::now()));
        }
        if now >= self.timeouts {
            shard.on_tick(now);
            self.timeout_period = timeout_period(&mut shard, self.timeout_period);
            self.timeouts = now + self.timeout_period;
        }
        if now >= self.sweep {
            shard.sweep();
            self.sweep = now + SWEEP_INTERVAL;
        }
        if let Some(due) = self.cleanup.filter(|&due| now >= due) {
            let cluster = shard.cluster.clone();
            cluster.users.sweep(now);
            cluster.admission.sweep(now);
            self.cleanup = Some(due.max(now) + cluster.config.get().cleanup.interval);
        }
    }
}

/// A quarter of the shortest timeout keeps resends and pings within 25 % of their deadline.
fn timeout_period(shard: &mut ShardState, before: Duration) -> Duration {
    let config = shard.config();
    let shortest =
        config.acks.timeout.min(config.heartbeat.interval).min(config.auth.expiry_grace.max(Duration::from_millis(20)));
    before.min((shortest / 4).clamp(Duration::from_millis(5), Duration::from_secs(1)))
}
