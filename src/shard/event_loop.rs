//! The loop a shard thread runs: compio's tasks and completions, with the shard's periodic
//! work (pacing ticks, timeouts, sweeps) in one task that sleeps on an io_uring timeout. Each
//! piece of that work runs under `catch_unwind`: a panic in one is counted, and the task goes
//! on (a task gone for good would leave the shard without timeouts, heartbeats and expiry).
//!
//! compio's `block_on` would do, but two of its habits cost a shard on every turn of the loop,
//! which a request often has to itself:
//! - While any compio timer is set (a shard always had its periodic ones), each turn read the
//!   clock twice and split its timer tree (a node allocated and freed), and each wait for
//!   completions carried a timeout: the kernel armed and cancelled a timer around every sleep,
//!   which in a virtual machine traps to the hypervisor. The periodic work now waits on one
//!   io_uring timeout operation, armed once per tick, so waits carry no timeout while no
//!   compio timer is set (handshake and close timeouts and the drain still use them).
//! - It polled the top-level future every turn; here the inbox future is polled when woken.

use std::any::Any;
use std::cell::RefCell;
use std::future::Future;
use std::io;
use std::panic::AssertUnwindSafe;
use std::pin::pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use compio::driver::{Decision, IourOpCode, OpEntry, OpType, PollOpCode};
use compio::runtime::Runtime;
use io_uring::{opcode, types::Timespec};

use super::pacing;
use super::state::ShardState;
use super::supervise::Task;

/// How often a shard expires history and forgets idle channels.
const SWEEP_INTERVAL: Duration = Duration::from_secs(10);

/// Runs `main` on `runtime` to its end, with the shard's periodic work beside it.
pub(super) fn run<F: Future>(runtime: &Runtime, state: &Rc<RefCell<ShardState>>, main: F) -> F::Output {
    let on_io_uring = runtime.driver_type().is_iouring();
    compio::runtime::spawn(periodic_work(state.clone(), on_io_uring)).detach();
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
        let timeout = if runtime.run() { Some(Duration::ZERO) } else { runtime.current_timeout() };
        runtime.poll_with(timeout);
    }
}

/// The shard's periodic work, each piece when it is due.
async fn periodic_work(state: Rc<RefCell<ShardState>>, mut on_io_uring: bool) {
    let mut ticks = Ticks::new(&state, Instant::now());
    loop {
        let due = ticks.next_due();
        if on_io_uring {
            let wait = due.saturating_duration_since(Instant::now());
            // The timeout's own completion is ETIME; anything else means the kernel would not
            // time it, and compio's timers take over.
            match compio::runtime::submit(Alarm::after(wait)).await.0 {
                Ok(_) => {}
                Err(err) if err.raw_os_error() == Some(libc::ETIME) => {}
                Err(err) => {
                    tracing::warn!(error = %err, "io_uring timeouts unavailable; the shard's ticks use compio timers");
                    on_io_uring = false;
                }
            }
        } else {
            compio::time::sleep_until(due).await;
        }
        ticks.run_due(&state, Instant::now());
    }
}

/// An io_uring timeout: completes (with ETIME) once its time has passed.
struct Alarm {
    /// Read by the kernel when the operation is submitted; the operation is not moved until
    /// it completes.
    after: Timespec,
}

impl Alarm {
    fn after(wait: Duration) -> Self {
        Self { after: Timespec::from(wait) }
    }
}

// SAFETY: the entry points at `after`, which lives in the operation until it completes.
unsafe impl IourOpCode for Alarm {
    type Control = ();

    fn create_entry(&mut self, _: &mut ()) -> OpEntry {
        opcode::Timeout::new(&self.after).build().into()
    }
}

// SAFETY: never submitted to the epoll driver (`periodic_work` uses compio's timers there).
unsafe impl PollOpCode for Alarm {
    type Control = ();

    fn pre_submit(&mut self, _: &mut ()) -> io::Result<Decision> {
        Err(io::Error::new(io::ErrorKind::Unsupported, "io_uring timeouts need the io_uring driver"))
    }

    fn op_type(&mut self, _: &mut ()) -> Option<OpType> {
        None
    }

    fn operate(&mut self, _: &mut ()) -> Poll<io::Result<usize>> {
        Poll::Ready(Err(io::Error::new(io::ErrorKind::Unsupported, "io_uring timeouts need the io_uring driver")))
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

/// What the periodic work drives: the shard's state (a stand-in in tests).
trait PeriodicWork {
    /// The pacing tick's period, when adaptive batching is on.
    fn pacing_period(&self) -> Option<Duration>;
    fn on_pacing_tick(&mut self, now: Instant);
    /// Lets every session act on the passing of time.
    fn on_tick(&mut self, now: Instant);
    /// The shortest of the timeouts sessions keep (see `timeout_period`).
    fn shortest_timeout(&mut self) -> Duration;
    fn sweep(&mut self);
    /// How often departed clients' buckets are swept, on the shard that does it.
    fn cleanup_interval(&self) -> Option<Duration>;
    fn cleanup(&mut self, now: Instant);
    /// A piece panicked: log and count it.
    fn panicked(&self, task: Task, payload: &(dyn Any + Send));
}

impl PeriodicWork for ShardState {
    fn pacing_period(&self) -> Option<Duration> {
        self.pacing.enabled().then(|| self.pacing.period())
    }

    fn on_pacing_tick(&mut self, now: Instant) {
        ShardState::on_pacing_tick(self, now, pacing::thread_cpu_time());
    }

    fn on_tick(&mut self, now: Instant) {
        ShardState::on_tick(self, now);
    }

    fn shortest_timeout(&mut self) -> Duration {
        let config = self.config();
        config.acks.timeout.min(config.heartbeat.interval).min(config.auth.expiry_grace.max(Duration::from_millis(20)))
    }

    fn sweep(&mut self) {
        ShardState::sweep(self);
    }

    fn cleanup_interval(&self) -> Option<Duration> {
        (self.id == 0).then(|| self.cluster.config.get().cleanup.interval)
    }

    fn cleanup(&mut self, now: Instant) {
        self.cluster.users.sweep(now);
        self.cluster.admission.sweep(now);
    }

    fn panicked(&self, task: Task, payload: &(dyn Any + Send)) {
        self.cluster.stats[self.id].panics.record(self.id, task, payload);
    }
}

/// When each periodic piece of work is next due. Each piece runs under `catch_unwind`, and
/// its next time is set whether it panicked or not: a panic is counted, and the piece runs
/// again at its next time, as do the others.
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
    fn new<S: PeriodicWork>(state: &RefCell<S>, now: Instant) -> Self {
        let mut shard = state.borrow_mut();
        let timeout_period = timeout_period(shard.shortest_timeout(), Duration::MAX);
        Self {
            pacing: shard.pacing_period().map(|period| later(now, period)),
            timeouts: later(now, timeout_period),
            timeout_period,
            sweep: later(now, SWEEP_INTERVAL),
            cleanup: shard.cleanup_interval().map(|interval| later(now, interval)),
        }
    }

    fn next_due(&self) -> Instant {
        let mut next = self.timeouts.min(self.sweep);
        for due in [self.pacing, self.cleanup].into_iter().flatten() {
            next = next.min(due);
        }
        next
    }

    fn run_due<S: PeriodicWork>(&mut self, state: &RefCell<S>, now: Instant) {
        if now < self.next_due() {
            return;
        }
        if let Some(due) = self.pacing.filter(|&due| now >= due) {
            run_piece(state, Task::Pacing, |shard| shard.on_pacing_tick(now));
            // Ticks keep their cadence however long a tick's sends take (10,000 batches take
            // a few hundred milliseconds): the linger, not the linger plus the sends, spaces
            // a connection's writes. A tick that ran past the next one's time is followed at
            // once, and the load it measures then says the shard is busy.
            let period = state.borrow().pacing_period();
            self.pacing = period.map(|period| later(due, period).max(Instant::now()));
        }
        if now >= self.timeouts {
            run_piece(state, Task::Timeouts, |shard| shard.on_tick(now));
            self.timeout_period = timeout_period(state.borrow_mut().shortest_timeout(), self.timeout_period);
            self.timeouts = later(now, self.timeout_period);
        }
        if now >= self.sweep {
            run_piece(state, Task::Sweep, S::sweep);
            self.sweep = later(now, SWEEP_INTERVAL);
        }
        if self.cleanup.is_some_and(|due| now >= due) {
            run_piece(state, Task::Cleanup, |shard| shard.cleanup(now));
            self.cleanup = state.borrow().cleanup_interval().map(|interval| later(now, interval));
        }
    }
}

/// Runs one piece of periodic work; a panic out of it is counted and logged, and leaves the
/// state borrowable (the borrow is given back as the panic unwinds).
fn run_piece<S: PeriodicWork>(state: &RefCell<S>, task: Task, piece: impl FnOnce(&mut S)) {
    if let Err(payload) = std::panic::catch_unwind(AssertUnwindSafe(|| piece(&mut state.borrow_mut()))) {
        state.borrow().panicked(task, &*payload);
    }
}

/// `now + period`, or a year on when a setting asks for more than the clock holds.
fn later(now: Instant, period: Duration) -> Instant {
    now.checked_add(period).unwrap_or_else(|| now + Duration::from_secs(365 * 24 * 3600))
}

/// A quarter of the shortest timeout keeps resends and pings within 25 % of their deadline.
fn timeout_period(shortest: Duration, before: Duration) -> Duration {
    before.min((shortest / 4).clamp(Duration::from_millis(5), Duration::from_secs(1)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A shard whose timeouts piece panics its first `panicking` times.
    #[derive(Default)]
    struct Shard {
        panicking: u32,
        ticks: u32,
        sweeps: u32,
        panics: RefCell<Vec<(Task, String)>>,
    }

    impl PeriodicWork for Shard {
        fn pacing_period(&self) -> Option<Duration> {
            None
        }
        fn on_pacing_tick(&mut self, _: Instant) {}
        fn on_tick(&mut self, _: Instant) {
            self.ticks += 1;
            if self.panicking > 0 {
                self.panicking -= 1;
                panic!("overflow when adding a duration to an instant");
            }
        }
        fn shortest_timeout(&mut self) -> Duration {
            Duration::from_secs(1)
        }
        fn sweep(&mut self) {
            self.sweeps += 1;
        }
        fn cleanup_interval(&self) -> Option<Duration> {
            None
        }
        fn cleanup(&mut self, _: Instant) {}
        fn panicked(&self, task: Task, payload: &(dyn Any + Send)) {
            self.panics.borrow_mut().push((task, crate::core::panic_message(payload).to_owned()));
        }
    }

    #[test]
    fn a_panicking_piece_is_counted_and_runs_again_at_its_next_time_as_do_the_others() {
        let start = Instant::now();
        let state = RefCell::new(Shard { panicking: 2, ..Shard::default() });
        let mut ticks = Ticks::new(&state, start);
        // Past the sweep's time too: the timeouts piece panics first, the sweep still runs.
        let now = start + SWEEP_INTERVAL;
        ticks.run_due(&state, now);
        assert_eq!((state.borrow().ticks, state.borrow().sweeps), (1, 1));
        assert!(ticks.next_due() > now, "every piece has its next time, the panicking one too");
        let next = ticks.next_due();
        ticks.run_due(&state, next);
        ticks.run_due(&state, ticks.next_due());
        let shard = state.borrow();
        assert_eq!(shard.ticks, 3, "the piece ran at each of its times, panicking or not");
        let panics = shard.panics.borrow();
        assert_eq!(panics.len(), 2);
        assert!(panics.iter().all(|(task, message)| *task == Task::Timeouts && message.contains("overflow")));
    }

    #[test]
    fn a_period_past_what_the_clock_holds_is_put_off_instead_of_panicking() {
        let now = Instant::now();
        assert_eq!(later(now, Duration::from_secs(3)), now + Duration::from_secs(3));
        assert!(later(now, Duration::MAX) > now);
    }
}
