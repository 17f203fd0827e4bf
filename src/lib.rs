//! routopia-realtime: a WebSocket pub/sub server that pushes typed navigation updates (ROUTE,
//! WEATHER, TRAFFIC, INCIDENT, POI) to many connections per machine, thread-per-core on
//! io_uring, speaking protobuf frames.
//!
//! # Layout
//! Dependencies point down; nothing below `shard` knows about sockets, runtimes or clocks.
//! - [`config`]: the one `Config` (TOML file, `ROUTOPIA_*` environment, flags), validated.
//! - [`shard`]: a compio runtime per core with its own listener, connections and inbox.
//! - [`session`]: one connection's protocol state machine, sans I/O.
//! - [`outbox`]: a connection's bounded outbound queue, packing frames into batches.
//! - [`compression`]: zstd for outgoing batches, shared by subscribers; trained dictionaries.
//! - [`auth`]: JWT verification and channel permissions from claims.
//! - [`acks`]: acknowledged delivery of one subscription: resend when overdue, then fail.
//! - [`ratelimit`]: token buckets per connection, user and IP address.
//! - [`router`]: a shard's index of local subscribers per channel.
//! - [`broker`]: channels, offsets and epochs; the embedded in-memory broker.
//! - [`protocol`]: protobuf types, zstd envelope, shared pushes, WebSocket and HTTP framing.
//! - [`metrics`]: per-shard tallies and histograms, merged and written for Prometheus.
//! - [`tls`]: the server's certificate and key for `wss://`, reloadable.
//! - [`client`]: a client library (used by the tests and the loadtest).

pub mod acks;
pub mod auth;
pub mod broker;
pub mod client;
pub mod compression;
pub mod config;
pub mod metrics;
pub mod outbox;
pub mod protocol;
pub mod ratelimit;
pub mod router;
pub mod session;
pub mod shard;
pub mod tls;

/// The hash map of the hot paths (channel tables, subscriber indexes, request timers): a
/// per-process random seed keeps keys the network chooses from colliding on purpose, at a
/// fraction of SipHash's cost for short keys such as channel names.
pub type FastMap<K, V> = hashbrown::HashMap<K, V>;

/// What a panic said, when it said it with a string (for the lines that log a caught panic).
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> &str {
    if let Some(text) = payload.downcast_ref::<&'static str>() {
        text
    } else if let Some(text) = payload.downcast_ref::<String>() {
        text
    } else {
        "a panic without a message"
    }
}

/// Runs `f` with this thread's scratch vector in `cell`, and keeps the vector (emptied) for
/// the next call unless it grew past `keep` items: one buffer per shard thread, not one per
/// message. A nested call gets an empty vector of its own, never a panic.
pub(crate) fn with_scratch<T, R>(
    cell: &'static std::thread::LocalKey<std::cell::Cell<Vec<T>>>,
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
pub(crate) fn borrow_queue<T>(queue: &mut std::collections::VecDeque<T>, spare: &mut std::collections::VecDeque<T>) {
    if queue.capacity() == 0 && queue.is_empty() && spare.is_empty() {
        std::mem::swap(queue, spare);
    }
}

/// Hands an empty `queue` of at most `up_to` slots to `spare` when `spare` has none, so the
/// next connection reuses the memory instead of allocating its own.
pub(crate) fn give_back_queue<T>(
    queue: &mut std::collections::VecDeque<T>,
    spare: &mut std::collections::VecDeque<T>,
    up_to: usize,
) {
    if queue.is_empty() && queue.capacity() <= up_to && spare.capacity() == 0 {
        std::mem::swap(queue, spare);
    }
}
