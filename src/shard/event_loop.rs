//! The loop a shard thread runs: compio's tasks and completions, with the shard's periodic
//! work (pacing ticks, timeouts, sweeps) in one task that sleeps on an io_uring timeout.
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

use std::cell::RefCell;
use std::future::Future;
use std::io;
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
        if self.cleanup.is_some_and(|due| now >= due) {
            let cluster = shard.cluster.clone();
            cluster.users.sweep(now);
            cluster.admission.sweep(now);
            self.cleanup = Some(now + cluster.config.get().cleanup.interval);
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
