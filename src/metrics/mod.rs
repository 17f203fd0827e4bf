//! What the server measures. Each shard tallies on its own thread in plain cells
//! ([`LocalMetrics`]: nothing shared, nothing atomic on the delivery path) and moves the tallies
//! into its [`SharedMetrics`] on its timer; a scrape merges every shard's shared figures and
//! writes them in the Prometheus text format ([`prometheus`]). Latencies are hdrhistograms in
//! microseconds, exported as Prometheus histograms (fixed buckets) plus quantiles over the last
//! one to two minutes.

mod buckets;
mod histogram;
pub mod process;
pub mod prometheus;

use std::cell::{Cell, RefCell};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub use histogram::{Timing, TimingWindows};

use crate::core::ConnId;
use crate::core::{clock_us, Publication};
use crate::protocol::ErrorCode;
use buckets::Buckets;

/// Update types as label slots: 0 for none or unknown, then the protocol's numbers.
pub const UPDATE_TYPES: usize = 6;
pub const UPDATE_TYPE_LABELS: [&str; UPDATE_TYPES] = ["other", "route", "weather", "traffic", "incident", "poi"];

/// The label slot of an update type's wire number.
pub fn type_slot(update_type: i32) -> usize {
    usize::try_from(update_type).ok().filter(|&t| t < UPDATE_TYPES).unwrap_or(0)
}

/// The label slot of a channel by its name's prefix (`route:…`, `weather:…`): subscriptions
/// are to channels, and channels are named by what they carry. Anything else is `other`, so
/// names from the network cannot make new series.
pub fn channel_slot(channel: &str) -> usize {
    let prefix = channel.split_once(':').map_or(channel, |(prefix, _)| prefix);
    UPDATE_TYPE_LABELS.iter().skip(1).position(|label| prefix.eq_ignore_ascii_case(label)).map_or(0, |i| i + 1)
}

/// Client commands, as label slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommandKind {
    Connect,
    Subscribe,
    Unsubscribe,
    Publish,
    Ping,
    Ack,
    Refresh,
    History,
    /// A frame naming no command this server knows.
    Unknown,
}

impl CommandKind {
    pub const ALL: [CommandKind; 9] = [
        CommandKind::Connect,
        CommandKind::Subscribe,
        CommandKind::Unsubscribe,
        CommandKind::Publish,
        CommandKind::Ping,
        CommandKind::Ack,
        CommandKind::Refresh,
        CommandKind::History,
        CommandKind::Unknown,
    ];

    pub fn label(self) -> &'static str {
        match self {
            CommandKind::Connect => "connect",
            CommandKind::Subscribe => "subscribe",
            CommandKind::Unsubscribe => "unsubscribe",
            CommandKind::Publish => "publish",
            CommandKind::Ping => "ping",
            CommandKind::Ack => "ack",
            CommandKind::Refresh => "refresh",
            CommandKind::History => "history",
            CommandKind::Unknown => "unknown",
        }
    }
}

/// Redis round trips, as label slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RedisOp {
    Publish,
    Position,
    History,
    Ack,
    Subscribe,
}

impl RedisOp {
    pub const ALL: [RedisOp; 5] =
        [RedisOp::Publish, RedisOp::Position, RedisOp::History, RedisOp::Ack, RedisOp::Subscribe];

    pub fn label(self) -> &'static str {
        match self {
            RedisOp::Publish => "publish",
            RedisOp::Position => "position",
            RedisOp::History => "history",
            RedisOp::Ack => "ack",
            RedisOp::Subscribe => "subscribe",
        }
    }
}

/// Why a node told a channel's local subscribers to resync (4003), as label slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resync {
    /// Publications never reached the node (a fan-out skipped offsets, or Redis was further
    /// on after the node was away).
    Gap,
    /// The channel's epoch changed (Redis lost its history, or came back older).
    EpochChanged,
    /// Redis fanned out an offset again: it came back older than it was.
    RepeatedOffset,
}

impl Resync {
    pub const ALL: [Resync; 3] = [Resync::Gap, Resync::EpochChanged, Resync::RepeatedOffset];

    pub fn label(self) -> &'static str {
        match self {
            Resync::Gap => "gap",
            Resync::EpochChanged => "epoch_changed",
            Resync::RepeatedOffset => "repeated_offset",
        }
    }
}

/// Latencies are kept in microseconds up to a minute; longer ones count as a minute.
pub const LATENCY_MAX_US: u64 = 60_000_000;
/// Frames per WebSocket message are kept up to this many.
pub const FRAMES_MAX: u64 = 100_000;

fn micros(duration: Duration) -> u64 {
    u64::try_from(duration.as_micros()).unwrap_or(u64::MAX)
}

/// A shard's tallies since its last flush, touched only by its own thread (sessions reach it
/// through their limits).
pub struct LocalMetrics {
    delivered: [Cell<u64>; UPDATE_TYPES],
    published: [Cell<u64>; UPDATE_TYPES],
    commands: [Cell<u64>; CommandKind::ALL.len()],
    errors: [Cell<u64>; ErrorCode::ALL.len()],
    messages_sent: Cell<u64>,
    bytes_received: Cell<u64>,
    bytes_sent: Cell<u64>,
    closed_by_peer: Cell<u64>,
    /// Panics caught in a session's timeouts (each closed its connection with 1011).
    timeout_panics: Cell<u64>,
    /// Commands answered within the current read, timed when the read is handled.
    answered_in_read: RefCell<Vec<CommandKind>>,
    /// Publish→write latencies by type: counted in plain buckets on the delivery path.
    deliveries: RefCell<Buckets<UPDATE_TYPES>>,
    /// Publish→acknowledgement latencies by type, in the same plain buckets.
    acked: RefCell<Buckets<UPDATE_TYPES>>,
    /// Arrival→answer latencies by command.
    requests: RefCell<Buckets<{ CommandKind::ALL.len() }>>,
    /// Frames per written WebSocket message.
    frames: RefCell<Buckets<1>>,
    timings: RefCell<LocalTimings>,
}

/// The buckets as histograms, on their way to the shared ones (made when first needed).
#[derive(Default)]
struct LocalTimings {
    delivery: [Option<Box<Timing>>; UPDATE_TYPES],
    acked: [Option<Box<Timing>>; UPDATE_TYPES],
    requests: [Option<Box<Timing>>; CommandKind::ALL.len()],
    frames: [Option<Box<Timing>>; 1],
}

impl Default for LocalMetrics {
    fn default() -> Self {
        Self {
            delivered: Default::default(),
            published: Default::default(),
            commands: Default::default(),
            errors: Default::default(),
            messages_sent: Cell::new(0),
            bytes_received: Cell::new(0),
            bytes_sent: Cell::new(0),
            closed_by_peer: Cell::new(0),
            timeout_panics: Cell::new(0),
            answered_in_read: RefCell::new(Vec::new()),
            deliveries: RefCell::default(),
            acked: RefCell::default(),
            requests: RefCell::default(),
            frames: RefCell::default(),
            timings: RefCell::default(),
        }
    }
}

fn bump(cell: &Cell<u64>, by: u64) {
    cell.set(cell.get() + by);
}

impl LocalMetrics {
    /// Updates leaving in a write at `now`: counted by type, and timed from publish to write.
    /// Every delivery of a fan-out passes here, so this is a subtraction and an increment per
    /// update (an hdrhistogram record each cost about 30 ns, `benches/delivery.rs`).
    pub fn record_deliveries<'a>(&self, now: Instant, publications: impl Iterator<Item = &'a Publication>) {
        let mut publications = publications.peekable();
        // Most writes of a request's answer carry no update: no clock conversion for those.
        if publications.peek().is_none() {
            return;
        }
        let now_us = clock_us(now);
        let mut deliveries = self.deliveries.borrow_mut();
        let mut counts = deliveries.counts();
        for publication in publications {
            let slot = type_slot(publication.update_type);
            bump(&self.delivered[slot], 1);
            counts.record(slot, now_us.saturating_sub(publication.accepted_us));
        }
    }

    /// One WebSocket message of `frames` frames was written.
    pub fn record_message(&self, frames: usize) {
        bump(&self.messages_sent, 1);
        self.frames.borrow_mut().counts().record(0, frames as u64);
    }

    /// An acknowledgement settled `publication` at `now`: end-to-end delivery latency.
    pub fn record_acked(&self, now: Instant, publication: &Publication) {
        let slot = type_slot(publication.update_type);
        let latency = micros(now.saturating_duration_since(publication.accepted_at));
        self.acked.borrow_mut().counts().record(slot, latency);
    }

    /// A request took `elapsed` from its arrival to its answer.
    pub fn record_request(&self, command: CommandKind, elapsed: Duration) {
        self.requests.borrow_mut().counts().record(command as usize, micros(elapsed));
    }

    /// A command arrived. It is timed when the read is done, unless it goes on to a channel's
    /// owner (`forwarded`), which times it when the answer comes.
    pub fn count_command(&self, command: CommandKind) {
        bump(&self.commands[command as usize], 1);
        self.answered_in_read.borrow_mut().push(command);
    }

    /// A command of this read went to a channel's owner: it is timed when the answer comes.
    pub fn forwarded(&self, command: CommandKind) {
        let mut answered = self.answered_in_read.borrow_mut();
        if let Some(index) = answered.iter().position(|&c| c == command) {
            answered.swap_remove(index);
        }
    }

    /// The read that brought commands is handled, `elapsed` after it arrived.
    pub fn finish_read(&self, elapsed: Duration) {
        let mut answered = self.answered_in_read.borrow_mut();
        if answered.is_empty() {
            return;
        }
        let mut requests = self.requests.borrow_mut();
        let mut counts = requests.counts();
        let elapsed = micros(elapsed);
        for command in answered.drain(..) {
            counts.record(command as usize, elapsed);
        }
    }

    pub fn count_error(&self, code: ErrorCode) {
        if let Some(index) = ErrorCode::ALL.iter().position(|&c| c == code) {
            bump(&self.errors[index], 1);
        }
    }

    pub fn count_published(&self, update_type: i32) {
        bump(&self.published[type_slot(update_type)], 1);
    }

    pub fn count_received(&self, bytes: usize) {
        bump(&self.bytes_received, bytes as u64);
    }

    pub fn count_sent(&self, bytes: usize) {
        bump(&self.bytes_sent, bytes as u64);
    }

    pub fn count_closed_by_peer(&self) {
        bump(&self.closed_by_peer, 1);
    }

    pub fn count_timeout_panic(&self) {
        bump(&self.timeout_panics, 1);
    }

    /// Moves the counters into `shared`, and the histograms too when `with_timings` (they are
    /// larger, so the shard moves them less often).
    pub fn flush_into(&self, shared: &SharedMetrics, with_timings: bool, now: Instant) {
        let drain = |cells: &[Cell<u64>], atomics: &[AtomicU64]| {
            for (cell, atomic) in cells.iter().zip(atomics) {
                let value = cell.replace(0);
                if value != 0 {
                    atomic.fetch_add(value, Ordering::Relaxed);
                }
            }
        };
        drain(&self.delivered, &shared.delivered);
        drain(&self.published, &shared.published);
        drain(&self.commands, &shared.commands);
        drain(&self.errors, &shared.errors);
        for (cell, atomic) in [
            (&self.messages_sent, &shared.messages_sent),
            (&self.bytes_received, &shared.bytes_received),
            (&self.bytes_sent, &shared.bytes_sent),
            (&self.closed_by_peer, &shared.closed_by_peer),
            (&self.timeout_panics, &shared.timeout_panics),
        ] {
            drain(std::slice::from_ref(cell), std::slice::from_ref(atomic));
        }
        if !with_timings {
            return;
        }
        let mut local_guard = self.timings.borrow_mut();
        let mut shared_guard = shared.timings.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let (local, shared_timings) = (&mut *local_guard, &mut *shared_guard);
        self.deliveries.borrow_mut().drain_into(&mut local.delivery, LATENCY_MAX_US);
        self.acked.borrow_mut().drain_into(&mut local.acked, LATENCY_MAX_US);
        self.requests.borrow_mut().drain_into(&mut local.requests, LATENCY_MAX_US);
        self.frames.borrow_mut().drain_into(&mut local.frames, FRAMES_MAX);
        let families = [
            (&mut local.delivery[..], &mut shared_timings.delivery[..], LATENCY_MAX_US),
            (&mut local.acked[..], &mut shared_timings.acked[..], LATENCY_MAX_US),
            (&mut local.requests[..], &mut shared_timings.requests[..], LATENCY_MAX_US),
            (&mut local.frames[..], std::slice::from_mut(&mut shared_timings.frames), FRAMES_MAX),
        ];
        for (local, shared, max) in families {
            for (from, into) in local.iter_mut().zip(shared.iter_mut()) {
                if let Some(from) = from.as_deref_mut().filter(|t| !t.is_empty()) {
                    into.get_or_insert_with(|| Box::new(TimingWindows::new(max, now))).add(from, now);
                    from.reset();
                }
            }
        }
    }
}

impl std::fmt::Debug for LocalMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalMetrics").finish_non_exhaustive()
    }
}

/// One shard's figures as anyone may read them.
#[derive(Default)]
pub struct SharedMetrics {
    pub delivered: [AtomicU64; UPDATE_TYPES],
    pub published: [AtomicU64; UPDATE_TYPES],
    pub commands: [AtomicU64; CommandKind::ALL.len()],
    pub errors: [AtomicU64; ErrorCode::ALL.len()],
    pub messages_sent: AtomicU64,
    pub bytes_received: AtomicU64,
    pub bytes_sent: AtomicU64,
    pub closed_by_peer: AtomicU64,
    /// Panics caught in a session's timeouts.
    pub timeout_panics: AtomicU64,
    /// Current subscriptions on this shard's connections, by channel type.
    pub subscriptions: [AtomicU64; UPDATE_TYPES],
    /// Messages waiting for other shards' full inboxes.
    pub backlog: AtomicU64,
    pub timings: Mutex<SharedTimings>,
}

impl std::fmt::Debug for SharedMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedMetrics").finish_non_exhaustive()
    }
}

/// A shard's histograms, since start and over the last minutes.
#[derive(Default)]
pub struct SharedTimings {
    pub delivery: [Option<Box<TimingWindows>>; UPDATE_TYPES],
    pub acked: [Option<Box<TimingWindows>>; UPDATE_TYPES],
    pub requests: [Option<Box<TimingWindows>>; CommandKind::ALL.len()],
    pub frames: Option<Box<TimingWindows>>,
}

/// The Redis bridge's figures (one bridge per node).
#[derive(Default)]
pub struct RedisMetrics {
    pub published: [AtomicU64; UPDATE_TYPES],
    /// Items of the Redis publish queue published by this node, and moved to the dead list.
    pub queue_consumed: AtomicU64,
    pub queue_dead: AtomicU64,
    /// Lengths of the publish queue and its dead list when last read (every few seconds).
    pub queue_length: AtomicU64,
    pub dead_length: AtomicU64,
    pub failures: [AtomicU64; RedisOp::ALL.len()],
    /// Channels whose local subscribers were told to resync, by reason.
    pub resyncs: [AtomicU64; Resync::ALL.len()],
    pub round_trips: Mutex<[Option<Box<TimingWindows>>; RedisOp::ALL.len()]>,
}

impl RedisMetrics {
    pub fn count_resync(&self, reason: Resync) {
        self.resyncs[reason as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// A round trip of `op` took `elapsed`, and failed when `failed`.
    pub fn record(&self, op: RedisOp, elapsed: Duration, failed: bool) {
        if failed {
            self.failures[op as usize].fetch_add(1, Ordering::Relaxed);
        }
        let now = Instant::now();
        let mut round_trips = self.round_trips.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let windows = round_trips[op as usize].get_or_insert_with(|| Box::new(TimingWindows::new(LATENCY_MAX_US, now)));
        windows.record(micros(elapsed), now);
    }
}

impl std::fmt::Debug for RedisMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisMetrics").finish_non_exhaustive()
    }
}

/// Requests waiting for a channel's owner, to time them when the answer comes.
#[derive(Default)]
pub struct RequestClock {
    waiting: crate::core::FastMap<(ConnId, u32), (CommandKind, Instant)>,
}

/// Requests timed at once at most; more (a client flooding with requests while the owner is
/// slow) are answered but not timed, so the map cannot grow without bound.
const MAX_TIMED_REQUESTS: usize = 1 << 16;
/// A request unanswered this long is forgotten (its connection went away).
const FORGET_REQUEST_AFTER: Duration = Duration::from_secs(60);

impl RequestClock {
    pub fn start(&mut self, conn: ConnId, req_id: u32, command: CommandKind, at: Instant) {
        if req_id != 0 && self.waiting.len() < MAX_TIMED_REQUESTS {
            self.waiting.insert((conn, req_id), (command, at));
        }
    }

    /// The answer to `req_id` is queued at `now`: its command and how long it took.
    pub fn finish(&mut self, conn: ConnId, req_id: u32, now: Instant) -> Option<(CommandKind, Duration)> {
        if req_id == 0 || self.waiting.is_empty() {
            return None;
        }
        let (command, at) = self.waiting.remove(&(conn, req_id))?;
        Some((command, now.saturating_duration_since(at)))
    }

    pub fn sweep(&mut self, now: Instant) {
        self.waiting.retain(|_, (_, at)| now.saturating_duration_since(*at) < FORGET_REQUEST_AFTER);
    }

    pub fn len(&self) -> usize {
        self.waiting.len()
    }

    pub fn is_empty(&self) -> bool {
        self.waiting.is_empty()
    }
}

#[cfg(test)]
mod tests;
