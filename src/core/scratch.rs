//! Buffers a shard thread reuses instead of allocating one per message or connection.

use std::cell::Cell;
use std::collections::VecDeque;
use std::thread::LocalKey;

/// Runs `f` with this thread's scratch vector in `cell`, and keeps the vector (emptied) for
/// the next call unless it grew past `keep` items: one buffer per shard thread, not one per
/// message. A nested call gets an empty vector of its own, never a panic.
pub(crate) fn with_scratch<T, R>(
    cell: &'static LocalKey<Cell<Vec<T>>>,
    keep: usize,
    f: impl FnOnce(&mut Vec<T>) -> R,
) -> R {
    let mut scratch = cell.take();
    let result = f(&mut scratch);
    scratch.clear();
    if scratch.capacity() > keep {
        scratch = Vec::new();
    }
    cell.set(scratch);
    result
}

/// Lends `spare` to `queue` when `queue` has no room of its own and neither holds anything:
/// a shard's one queue serves the connection whose read it handles (see `give_back_queue`).
pub(crate) fn borrow_queue<T>(queue: &mut VecDeque<T>, spare: &mut VecDeque<T>) {
    if queue.capacity() == 0 && queue.is_empty() && spare.is_empty() {
        std::mem::swap(queue, spare);
    }
}

/// Hands an empty `queue` of at most `up_to` slots to `spare` when `spare` has none, so the
/// next connection reuses the memory instead of allocating its own.
pub(crate) fn give_back_queue<T>(queue: &mut VecDeque<T>, spare: &mut VecDeque<T>, up_to: usize) {
    if queue.is_empty() && queue.capacity() <= up_to && spare.capacity() == 0 {
        std::mem::swap(queue, spare);
    }
}
