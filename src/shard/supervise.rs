//! A panic is a bug, but it must never leave a shard half alive. The work a shard has to keep
//! doing (its periodic pieces, its inbox, each connection's reads and writes, HTTP requests)
//! runs under [`catch`] or [`spawn`]: a panic is logged at error with the shard and the task,
//! counted (`/health` `panics` and status `degraded`, `realtime_shard_panics_total`), and the
//! caller cleans up and carries on (a connection is closed with 1011, a periodic piece runs
//! again at its next time). A panic nothing catches stops the process (see `run_shard`).

use std::any::Any;
use std::cell::RefCell;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};

use futures_util::FutureExt;

use super::state::ShardState;

/// The work of a shard a panic is counted under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Task {
    /// Adaptive batching's ticks.
    Pacing,
    /// Sessions acting on the passing of time: timeouts, heartbeats, token expiry, resends.
    Timeouts,
    /// History expiry and idle channels.
    Sweep,
    /// Forgetting departed users' and addresses' buckets (shard 0).
    Cleanup,
    /// Messages from other shards and the broker.
    Inbox,
    /// Retrying messages for full inboxes.
    Backlog,
    /// A WebSocket connection's reads and writes.
    Connection,
    /// A plain HTTP request: the head, `/health`, `/metrics`, the server API.
    Http,
}

impl Task {
    pub const ALL: [Task; 8] = [
        Task::Pacing,
        Task::Timeouts,
        Task::Sweep,
        Task::Cleanup,
        Task::Inbox,
        Task::Backlog,
        Task::Connection,
        Task::Http,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Task::Pacing => "pacing",
            Task::Timeouts => "timeouts",
            Task::Sweep => "sweep",
            Task::Cleanup => "cleanup",
            Task::Inbox => "inbox",
            Task::Backlog => "backlog",
            Task::Connection => "connection",
            Task::Http => "http",
        }
    }
}

/// Panics caught on one shard, by task (`Task::ALL` order).
#[derive(Debug, Default)]
pub struct Panics {
    by_task: [AtomicU64; Task::ALL.len()],
}

impl Panics {
    pub fn get(&self, task: Task) -> u64 {
        self.by_task[task as usize].load(Ordering::Relaxed)
    }

    pub fn total(&self) -> u64 {
        self.by_task.iter().map(|count| count.load(Ordering::Relaxed)).sum()
    }

    /// Counts and logs a panic caught out of `task` on shard `shard`. The panic hook has
    /// already logged where it happened (and, the first time, the backtrace).
    pub fn record(&self, shard: usize, task: Task, payload: &(dyn Any + Send)) {
        self.by_task[task as usize].fetch_add(1, Ordering::Relaxed);
        tracing::error!(
            shard,
            task = task.label(),
            panic = crate::core::panic_message(payload),
            "a panic was caught; the shard carries on (see /health `panics`)"
        );
    }
}

/// Runs `work`; a panic out of it is recorded in `panics` and gives `None`.
pub fn catch<R>(panics: &Panics, shard: usize, task: Task, work: impl FnOnce() -> R) -> Option<R> {
    match std::panic::catch_unwind(AssertUnwindSafe(work)) {
        Ok(result) => Some(result),
        Err(payload) => {
            panics.record(shard, task, &*payload);
            None
        }
    }
}

/// [`catch`] for work on the shard's state, which is borrowed only inside (a panic gives the
/// borrow back as it unwinds).
pub(super) fn on_shard<R>(
    state: &RefCell<ShardState>,
    task: Task,
    work: impl FnOnce(&mut ShardState) -> R,
) -> Option<R> {
    match std::panic::catch_unwind(AssertUnwindSafe(|| work(&mut state.borrow_mut()))) {
        Ok(result) => Some(result),
        Err(payload) => {
            let shard = state.borrow();
            shard.cluster.stats[shard.id].panics.record(shard.id, task, &*payload);
            None
        }
    }
}

/// Spawns a short-lived task (an HTTP request, a connection until its upgrade); a panic out
/// of it is recorded under `task`. What it held goes with the unwind.
pub(super) fn spawn<F>(state: &Rc<RefCell<ShardState>>, task: Task, future: F)
where
    F: Future<Output = ()> + 'static,
{
    let state = state.clone();
    compio::runtime::spawn(async move {
        if let Err(payload) = AssertUnwindSafe(future).catch_unwind().await {
            let shard = state.borrow();
            shard.cluster.stats[shard.id].panics.record(shard.id, task, &*payload);
        }
    })
    .detach();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_is_caught_counted_by_task_and_the_next_run_goes_on() {
        let panics = Panics::default();
        let caught = catch(&panics, 3, Task::Timeouts, || -> u32 { panic!("an expiry overflowed") });
        assert_eq!(caught, None);
        assert_eq!((panics.get(Task::Timeouts), panics.total()), (1, 1));
        assert_eq!(catch(&panics, 3, Task::Timeouts, || 7), Some(7));
        assert_eq!(panics.total(), 1, "a run that does not panic is not counted");
    }

    #[test]
    fn the_message_of_a_panic_is_read_from_either_string_type() {
        assert_eq!(crate::core::panic_message(&"static"), "static");
        assert_eq!(crate::core::panic_message(&String::from("formatted 7")), "formatted 7");
        assert_eq!(crate::core::panic_message(&7u32), "a panic without a message");
    }
}
