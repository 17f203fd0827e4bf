//! Everything one shard owns, touched only by its own thread: the connections and their
//! sessions, the router of local subscribers, the channels it owns, and messages waiting for
//! a full inbox of another shard.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::Waker;
use std::time::{Duration, Instant};

use bytes::Bytes;
use slab::Slab;

use super::api::Waiters;
use super::pacing::Pacing;
use super::router::{Router, Subscriber};
use super::transport::{send_now, unsent_after};
use super::{Cluster, ShardMsg};
use crate::broker::memory::{ChannelTable, Mirrored};
use crate::broker::redis::BridgeRequest;
use crate::broker::{owner_shard, Joining};
use crate::compression::{CompressionCounters, SharedBatches};
use crate::config::Config;
use crate::core::{ConnId, ConnLabel, Position, Publication, Recovery, WallClock};
use crate::metrics::{channel_slot, CommandKind, LocalMetrics, RequestClock, Resync, UPDATE_TYPES};
use crate::protocol::{pb, CloseCode, ErrorCode};
use crate::session::{Session, SessionEvent, SessionLimits, SpareQueues};

/// Most messages kept for one full inbox before deliveries to it are dropped (and counted).
const MAX_BACKLOG: usize = 1 << 18;
/// How often the shard's histograms move to where a scrape reads them (counters move every tick).
const TIMINGS_FLUSH_INTERVAL: Duration = Duration::from_secs(1);

/// The path a WebSocket was upgraded on, which decides its session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Endpoint {
    /// `/ws`: the protobuf protocol.
    Protocol,
    /// `/echo` (`testing.echo_endpoint`): messages sent back as they came.
    Echo,
}

/// Least time between two warnings that the shard lingers past `batch_interval`.
const OVERLOAD_WARNING_EVERY: Duration = Duration::from_secs(60);

/// A write buffer that grew past this is released once sent, so idle connections stay small
/// (and the shard's direct-send buffer too).
pub(super) const KEEP_WRITE_BUFFER: usize = 64 * 1024;
/// An idle connection's outbox queue up to this many slots is released as soon as it drains.
const SMALL_QUEUE_SLOTS: usize = 8;

/// Connections a shard's table is sized for at start (more grow it).
const MAX_PRESIZED_CONNS: usize = 65_536;

pub(crate) struct Conn {
    generation: u32,
    pub session: Session,
    /// The connection's writer task, parked until there is something to send.
    pub writer: Option<Waker>,
    /// The reader task has ended (peer closed, error, or the session is closing).
    pub reader_done: bool,
    /// The pacing tick the connection's last write counts as (`Gate::stamp`).
    pub last_write_epoch: u64,
    /// The writer waits for its next pacing tick; new updates do not wake it.
    pub paced: bool,
}

impl Conn {
    /// Whether its next write may not wait for a pacing tick: it is closing, its reader has
    /// ended, or its queue is urgent.
    pub fn is_urgent(&self) -> bool {
        self.session.is_closing() || self.reader_done || self.session.has_urgent()
    }
}

pub(crate) struct ShardState {
    pub id: usize,
    pub cluster: Arc<Cluster>,
    /// The configuration as this shard last looked (see `config`), and its generation.
    config: Arc<Config>,
    config_generation: u64,
    /// What new sessions enforce, made from `config`.
    limits: Rc<SessionLimits>,
    /// Shutting down: every connection is told to go elsewhere, new ones too.
    draining: bool,
    /// Connections that ended while draining.
    drained: usize,
    conns: Slab<Conn>,
    next_generation: u32,
    router: Router,
    channels: ChannelTable,
    /// Per destination shard: messages its full inbox could not take yet, in order.
    backlog: Vec<VecDeque<ShardMsg>>,
    pub backlog_flusher_running: bool,
    targets: Vec<usize>,
    batches: SharedBatches,
    pub pacing: Pacing,
    /// When the shard last warned that it lingers past `batch_interval`.
    overload_warned_at: Option<Instant>,
    /// This shard's tallies, shared with its sessions; moved to `ShardStats::metrics` each tick.
    pub metrics: Rc<LocalMetrics>,
    /// Requests waiting for an owner's answer, to time them.
    requests: RequestClock,
    /// Unix time for sessions (see `WallClock`).
    wall_clock: WallClock,
    /// See `clock`.
    read_step_at: Option<Instant>,
    /// Lent to the session whose read is handled (see `on_bytes`); they come back at the
    /// read's end, or when the connection's outbox drains (`went_idle`).
    lent: SpareQueues,
    /// Subscriptions on this shard's connections, by channel type.
    subscriptions: [u64; UPDATE_TYPES],
    timings_flushed_at: Instant,
    /// Server API requests on this shard waiting for answers.
    pub api: Waiters,
    /// The buffer direct sends encode into (see `send_directly`).
    direct_buffer: Vec<u8>,
    /// By connection index: what a direct send left over, for the writer to send first.
    unsent: crate::core::FastMap<u32, Vec<u8>>,
    /// The connection whose input is being handled (see `wake_writer`).
    reading: Option<ConnId>,
    /// By connection index: peers' addresses for the debug line of a connection's end, kept
    /// only while debug lines are on.
    peers: HashMap<u32, SocketAddr>,
}

impl ShardState {
    pub fn new(id: usize, cluster: Arc<Cluster>) -> Self {
        let shards = cluster.inboxes.len();
        let config_generation = cluster.config.generation();
        let config = cluster.config.get();
        let conns_capacity = config.limits.max_connections_per_shard.min(MAX_PRESIZED_CONNS);
        let max_channels = config.limits.max_channels.div_ceil(shards);
        let channels =
            ChannelTable::new(shards, max_channels, crate::broker::memory::HistoryPolicy::from_config(&config));
        let metrics = Rc::new(LocalMetrics::default());
        Self {
            id,
            limits: session_limits(&cluster, &config, &metrics),
            batches: SharedBatches::new(cluster.zstd.clone()),
            pacing: if config.testing.always_linger {
                Pacing::always_lingering(config.delivery.batch_interval)
            } else {
                Pacing::new(config.delivery.batch_interval, config.delivery.overload_interval)
            },
            overload_warned_at: None,
            config,
            config_generation,
            draining: false,
            drained: 0,
            cluster,
            // Sized for the shard's limit up front: growing copies every connection (a pause)
            // and leaves the old block resident; untouched capacity costs no memory.
            conns: Slab::with_capacity(conns_capacity),
            next_generation: 0,
            router: Router::default(),
            channels,
            backlog: (0..shards).map(|_| VecDeque::new()).collect(),
            backlog_flusher_running: false,
            targets: Vec::new(),
            metrics,
            requests: RequestClock::default(),
            wall_clock: WallClock::anchored_now(),
            read_step_at: None,
            lent: SpareQueues::default(),
            subscriptions: [0; UPDATE_TYPES],
            timings_flushed_at: Instant::now(),
            api: Waiters::default(),
            direct_buffer: Vec::new(),
            unsent: crate::core::FastMap::default(),
            peers: HashMap::new(),
            reading: None,
        }
    }

    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// The configuration in force, taken again when a reload replaced it.
    pub fn config(&mut self) -> Arc<Config> {
        let generation = self.cluster.config.generation();
        if generation != self.config_generation {
            self.config_generation = generation;
            self.config = self.cluster.config.get();
            self.limits = session_limits(&self.cluster, &self.config, &self.metrics);
        }
        self.config.clone()
    }

    /// Registers an upgraded connection and returns its id. Its session enforces the
    /// configuration in force now, and keeps it for its whole life (its `ConnectResult` told
    /// the client those limits).
    pub fn add_conn(&mut self, endpoint: Endpoint) -> ConnId {
        self.config();
        self.next_generation = self.next_generation.wrapping_add(1);
        let generation = self.next_generation;
        let entry = self.conns.vacant_entry();
        let id = ConnId { index: entry.key() as u32, generation };
        let client_id = ConnLabel { shard: self.id, conn: id };
        let mut session = match endpoint {
            Endpoint::Protocol => Session::new(client_id, self.limits.clone(), Instant::now()),
            Endpoint::Echo => Session::new_echo(client_id, self.limits.clone(), Instant::now()),
        };
        if self.draining {
            // Upgraded while the shard drains: told at once to go elsewhere, like the others.
            session.close(CloseCode::Shutdown, "server shutting down".into());
        }
        entry.insert(Conn { generation, session, writer: None, reader_done: false, last_write_epoch: 0, paced: false });
        self.stats().connections.fetch_add(1, Ordering::Relaxed);
        self.stats().accepted.fetch_add(1, Ordering::Relaxed);
        id
    }

    /// Shutdown: closes every session with `code`, after what is already queued for it (see
    /// `Session::close`), and every session opened from now on too.
    pub fn close_all(&mut self, code: CloseCode, detail: &str) {
        self.draining = true;
        for id in self.conn_ids() {
            if let Some(conn) = self.conn(id) {
                conn.session.close(code, detail.into());
            }
            self.drive(id);
        }
    }

    /// Whether the shard is shutting down.
    pub fn is_draining(&self) -> bool {
        self.draining
    }

    /// Connections that ended since the shard began draining.
    pub fn drained(&self) -> usize {
        self.drained
    }

    pub fn conn(&mut self, id: ConnId) -> Option<&mut Conn> {
        live_conn(&mut self.conns, id)
    }

    /// Bytes arrived on `id`: let the session handle them, then act on what it asks. The
    /// answers go out on `direct` (the socket) at once when the writer is idle, else through
    /// the writer.
    pub fn on_bytes(&mut self, id: ConnId, bytes: &[u8], direct: Option<RawFd>) {
        self.metrics.count_received(bytes.len());
        let now = self.wall_clock.at(Instant::now());
        // The table alone (not `conn`), as the shard's queues are borrowed beside it.
        let Some(conn) = live_conn(&mut self.conns, id) else { return };
        conn.session.borrow_queues(&mut self.lent);
        conn.session.handle_bytes(now, bytes);
        // Answers this shard gives at once (it owns the channel) join the direct send.
        self.reading = Some(id);
        self.read_step_at = Some(now.instant);
        self.handle_events(id);
        self.reading = None;
        let handled_at = Instant::now();
        self.metrics.finish_read(handled_at.saturating_duration_since(now.instant));
        self.read_step_at = Some(handled_at);
        self.send_or_wake(id, direct);
        self.read_step_at = None;
        if let Some(conn) = live_conn(&mut self.conns, id) {
            conn.session.give_back_queues(&mut self.lent, SMALL_QUEUE_SLOTS);
        }
    }

    /// What `id` has queued leaves on `direct` (its socket) at once when its writer is idle
    /// (`send_directly`), else its writer is woken for it.
    fn send_or_wake(&mut self, id: ConnId, direct: Option<RawFd>) {
        if direct.is_none_or(|fd| !self.send_directly(id, fd)) {
            self.wake_writer(id);
        }
    }

    /// Takes the session's events and wakes its writer when it has something to send (input
    /// from the socket, see `on_bytes`, and a shutdown's close). Answers from owners (which may
    /// be this shard, answering synchronously) only wake the writer, so handling a large batch
    /// of commands never recurses.
    pub fn drive(&mut self, id: ConnId) {
        self.handle_events(id);
        if let Some(conn) = self.conn(id) {
            conn.session.release_event_queue();
        }
        self.wake_writer(id);
    }

    fn handle_events(&mut self, id: ConnId) {
        while let Some(event) = self.conn(id).and_then(|c| c.session.poll_event()) {
            self.handle_event(id, event);
        }
    }

    /// Sends what `id` has queued as its writer would, from the reader that just handled its
    /// input or from a pacing tick, so an answer or a batch leaves without waking the writer
    /// task or a submission of its own (like an epoll server's `send` from the handler). Only
    /// when the writer is parked with nothing left over (so no write is in flight) and pacing
    /// lets the connection write now; what the socket does not take goes to the writer,
    /// first. Returns whether the writer has nothing to do.
    fn send_directly(&mut self, id: ConnId, fd: RawFd) -> bool {
        let gate = self.pacing.gate();
        let left_over = !self.unsent.is_empty() && self.unsent.contains_key(&id.index);
        let Some(conn) = self.conn(id) else { return true };
        if left_over || conn.writer.is_none() || conn.session.is_closing() || !conn.session.wants_write() {
            return false;
        }
        if gate.holds(conn.last_write_epoch, conn.is_urgent()) {
            return false;
        }
        conn.last_write_epoch = gate.stamp(id.index);
        let mut out = std::mem::take(&mut self.direct_buffer);
        let parts = self.transmit(id, &mut out).unwrap_or_default();
        let total = out.len() + parts.iter().map(Bytes::len).sum::<usize>();
        // A failed send leaves it all to the writer, whose write then fails and ends the
        // connection as any failed write does.
        let sent = send_now(fd, &out, &parts).unwrap_or(0);
        self.metrics.count_sent(sent);
        if sent < total {
            self.unsent.insert(id.index, unsent_after(sent, &out, &parts));
        }
        out.clear();
        if out.capacity() <= KEEP_WRITE_BUFFER {
            self.direct_buffer = out;
        }
        if sent == total && self.went_idle(id) {
            return true;
        }
        let Some(conn) = self.conn(id) else { return true };
        if let Some(waker) = conn.writer.take() {
            waker.wake();
        }
        true
    }

    /// After a write: whether `id` has nothing more to send (or is gone). A connection going
    /// idle gives its small queues back at once (a connect's replies: the next connection
    /// reuses them); a busy one's large queues go on the shard's next tick if still idle, as
    /// it often is only between two writes.
    pub fn went_idle(&mut self, id: ConnId) -> bool {
        match live_conn(&mut self.conns, id) {
            Some(conn) if conn.session.wants_write() => false,
            Some(conn) => {
                conn.session.give_back_queues(&mut self.lent, SMALL_QUEUE_SLOTS);
                conn.session.release_idle_buffers(SMALL_QUEUE_SLOTS);
                true
            }
            None => true,
        }
    }

    pub fn remember_peer(&mut self, id: ConnId, peer: SocketAddr) {
        self.peers.insert(id.index, peer);
    }

    pub fn forget_peer(&mut self, id: ConnId) -> Option<SocketAddr> {
        self.peers.remove(&id.index)
    }

    /// What a direct send left for the writer, which sends it before anything else.
    pub fn take_unsent(&mut self, id: ConnId) -> Option<Vec<u8>> {
        if self.unsent.is_empty() {
            return None;
        }
        self.unsent.remove(&id.index)
    }

    /// Wakes the connection's writer if there is something to send or it is closing; not
    /// the one whose input is being handled, which `on_bytes` sees to when done.
    fn wake_writer(&mut self, id: ConnId) {
        if self.reading == Some(id) {
            return;
        }
        if let Some(conn) = self.conn(id) {
            if conn.session.wants_write() || conn.session.is_closing() {
                if let Some(waker) = conn.writer.take() {
                    waker.wake();
                }
            }
        }
    }

    fn handle_event(&mut self, id: ConnId, event: SessionEvent) {
        let shards = self.backlog.len();
        match event {
            SessionEvent::AuthFailed(failure) => {
                self.stats().auth_failures[failure.index()].fetch_add(1, Ordering::Relaxed);
            }
            SessionEvent::RateLimited => {
                self.stats().rate_limited.fetch_add(1, Ordering::Relaxed);
            }
            SessionEvent::Subscribe { channel, sub_id, req_id, since, resume } => {
                self.forwarded(id, req_id, CommandKind::Subscribe);
                let owner = owner_shard(&channel, shards);
                let msg =
                    ShardMsg::Subscribe(Joining { channel, from: self.id, conn: id, sub_id, req_id, since, resume });
                self.route(owner, msg);
            }
            SessionEvent::Unsubscribe { channel, sub_id, was_active } => {
                // A pending subscription is taken back when its answer finds it gone.
                if was_active {
                    self.remove_subscriber(&channel, id, sub_id);
                    let owner = owner_shard(&channel, shards);
                    self.route(owner, ShardMsg::Unsubscribe { channel, from: self.id });
                }
            }
            SessionEvent::Acked { channel, identity, epoch, offset } => {
                if let Some(bridge) = &self.cluster.redis {
                    let _ = bridge.send(BridgeRequest::Acked { channel, identity, epoch, offset });
                    return;
                }
                let owner = owner_shard(&channel, shards);
                self.route(owner, ShardMsg::Acked { channel, identity, epoch, offset });
            }
            SessionEvent::History { channel, req_id, since, limit } => {
                self.forwarded(id, req_id, CommandKind::History);
                self.submit_history(id, req_id, channel, since, limit);
            }
            SessionEvent::Publish { channel, req_id, update } => {
                // An answer given at once is timed with its read (`LocalMetrics::finish_read`);
                // one from another shard or Redis when it comes.
                if !self.submit_publish(id, req_id, channel, update) {
                    self.forwarded(id, req_id, CommandKind::Publish);
                }
            }
        }
    }

    /// Sends a publication to its channel's owner (or Redis); the answer, `Published`, comes
    /// back to `conn` (a connection or a server API request) on this shard. Returns whether
    /// it came already: this shard owns the channel, or the owner was too far behind to ask.
    pub fn submit_publish(&mut self, conn: ConnId, req_id: u32, channel: String, update: pb::Update) -> bool {
        if self.cluster.redis.is_some() {
            let channel = Arc::from(channel);
            let request = BridgeRequest::Publish { channel, from: self.id, conn, req_id, update: Box::new(update) };
            self.send_to_bridge(request);
            return false;
        }
        let owner = owner_shard(&channel, self.backlog.len());
        if self.backlog[owner].len() >= MAX_BACKLOG {
            // The owner is far behind: refuse rather than queue without bound.
            let label = ConnLabel { shard: self.id, conn };
            tracing::debug!(conn = %label, req_id, channel, owner, "publish refused: the owner shard is far behind");
            self.handle_msg(ShardMsg::Published { conn, req_id, position: Err(ErrorCode::Unavailable) });
            return true;
        }
        if owner == self.id {
            // The table's name for the channel goes into the publication: no copy of it.
            self.publish(&channel, owner, conn, req_id, update);
            return true;
        }
        let channel = Arc::from(channel);
        self.send(owner, ShardMsg::Publish { channel, from: self.id, conn, req_id, update: Box::new(update) });
        false
    }

    /// Asks the channel's owner (or Redis) for history; the answer, `HistoryPage` or
    /// `Failed`, comes back to `conn` on this shard.
    pub fn submit_history(&mut self, conn: ConnId, req_id: u32, channel: Arc<str>, since: u64, limit: usize) {
        if self.cluster.redis.is_some() {
            let request = BridgeRequest::History { channel, from: self.id, conn, req_id, since, limit };
            return self.send_to_bridge(request);
        }
        let owner = owner_shard(&channel, self.backlog.len());
        self.route(owner, ShardMsg::History { channel, from: self.id, conn, req_id, since, limit });
    }

    /// The channels this shard owns.
    pub(super) fn owned_channels(&self) -> &ChannelTable {
        &self.channels
    }

    /// Handles `msg` here when this shard is `to`, else sends it there.
    pub fn route(&mut self, to: usize, msg: ShardMsg) {
        if to == self.id {
            self.handle_msg(msg);
        } else {
            self.send(to, msg);
        }
    }

    /// Acts on one message from another shard (or from this one).
    pub fn handle_msg(&mut self, msg: ShardMsg) {
        match msg {
            ShardMsg::Subscribe(joining) if self.cluster.redis.is_some() => self.subscribe_via_redis(joining),
            ShardMsg::Subscribe(Joining { channel, from, conn, sub_id, req_id, since, resume }) => {
                let result = self
                    .channels
                    .subscribe(&channel, from, Instant::now(), since.as_ref(), resume.as_deref())
                    .map_err(|_| ErrorCode::Unavailable);
                if let Ok((_, Some(recovery))) = &result {
                    let counter = match recovery {
                        Recovery::Recovered(_) => &self.stats().recoveries_served,
                        Recovery::Refused(_) => &self.stats().recoveries_refused,
                    };
                    counter.fetch_add(1, Ordering::Relaxed);
                }
                let catch_up = Vec::new();
                self.route(from, ShardMsg::Subscribed { conn, channel, sub_id, req_id, result, catch_up });
            }
            ShardMsg::Unsubscribe { channel, from } => self.unsubscribe_owned(channel, from),
            ShardMsg::Positioned { joining, result } => self.on_positioned(joining, result),
            ShardMsg::Fanout { epoch, publication } => {
                let mut targets = std::mem::take(&mut self.targets);
                let outcome = self.channels.mirror(&epoch, &publication, Instant::now(), &mut targets);
                if matches!(outcome, Mirrored::EpochChanged | Mirrored::Gap) {
                    let reason = if outcome == Mirrored::Gap { Resync::Gap } else { Resync::EpochChanged };
                    self.cluster.redis_metrics.count_resync(reason);
                    let (channel, offset) = (&*publication.channel, publication.offset);
                    tracing::warn!(channel, %epoch, offset, ?outcome, "publications did not reach this node; subscribers resync");
                }
                for &shard in &targets {
                    let msg = match outcome {
                        Mirrored::EpochChanged | Mirrored::Gap => {
                            ShardMsg::Resubscribe { channel: publication.channel.clone() }
                        }
                        Mirrored::Fresh | Mirrored::Seen => ShardMsg::Deliver(publication.clone()),
                    };
                    self.route(shard, msg);
                }
                self.targets = targets;
            }
            ShardMsg::Resync { channel, epoch, offset } => {
                let mut targets = std::mem::take(&mut self.targets);
                let outcome = self.channels.observe(&channel, &epoch, offset, &mut targets);
                if outcome != Mirrored::Seen {
                    let reason = if outcome == Mirrored::Gap { Resync::Gap } else { Resync::EpochChanged };
                    self.cluster.redis_metrics.count_resync(reason);
                    tracing::warn!(%channel, %epoch, offset, "channel moved while Redis was away; subscribers resync");
                    for &shard in &targets {
                        self.route(shard, ShardMsg::Resubscribe { channel: channel.clone() });
                    }
                }
                self.targets = targets;
            }
            ShardMsg::Resubscribe { channel } => {
                let subscribers: Vec<ConnId> = self.router.subscribers(&channel).iter().map(|s| s.conn).collect();
                for conn in subscribers {
                    if let Some(c) = self.conn(conn) {
                        let detail = format!("the history of {channel} changed; reconnect and recover");
                        c.session.close(CloseCode::Resubscribe, detail);
                        self.wake_writer(conn);
                    }
                }
            }
            ShardMsg::Failed { conn, req_id, code } if conn.api_token().is_some() => {
                self.api.answer(conn, req_id, super::api::Answer::Failed(code))
            }
            ShardMsg::HistoryPage { conn, req_id, page } if conn.api_token().is_some() => {
                self.api.answer(conn, req_id, super::api::Answer::History(page))
            }
            ShardMsg::Published { conn, req_id, position } if conn.api_token().is_some() => {
                self.api.answer(conn, req_id, super::api::Answer::Published(position))
            }
            ShardMsg::Api(msg) => super::api::handle_msg(self, msg),
            ShardMsg::Failed { conn, req_id, code } => {
                self.answered(conn, req_id);
                if let Some(c) = self.conn(conn) {
                    c.session.handle_failed(req_id, code);
                    self.wake_writer(conn);
                }
            }
            ShardMsg::Acked { channel, identity, epoch, offset } => {
                self.channels.ack(&channel, &identity, &epoch, offset, Instant::now())
            }
            ShardMsg::Subscribed { conn, channel, sub_id, req_id, result: Err(code), .. } => {
                self.answered(conn, req_id);
                if let Some(c) = self.conn(conn) {
                    c.session.handle_subscribe_failed(
                        sub_id,
                        req_id,
                        code,
                        format!("cannot subscribe to {channel} now"),
                    );
                    self.wake_writer(conn);
                }
            }
            ShardMsg::Subscribed { conn, channel, sub_id, req_id, result: Ok((position, recovery)), catch_up } => {
                self.answered(conn, req_id);
                let now = Instant::now();
                let recovered_to = match &recovery {
                    Some(Recovery::Recovered(missed)) => missed.last().map_or(0, |p| p.offset),
                    _ => 0,
                };
                let after = position.offset.max(recovered_to).max(catch_up.last().map_or(0, |p| p.offset));
                let accepted = self.conn(conn).is_some_and(|c| {
                    let accepted = c.session.handle_subscribed(sub_id, req_id, &position, recovery, now);
                    for publication in catch_up.iter().filter(|p| p.offset > position.offset.max(recovered_to)) {
                        c.session.push_update(sub_id, &Rc::new(Publication::clone(publication)), now);
                    }
                    accepted
                });
                if accepted {
                    self.subscriptions[channel_slot(&channel)] += 1;
                    self.router.add(channel, Subscriber { conn, sub_id, after });
                    self.wake_writer(conn);
                } else {
                    let owner = owner_shard(&channel, self.backlog.len());
                    self.route(owner, ShardMsg::Unsubscribe { channel, from: self.id });
                }
            }
            ShardMsg::History { channel, from, conn, req_id, since, limit } => {
                let page = self.channels.history(&channel, since, limit, Instant::now());
                self.route(from, ShardMsg::HistoryPage { conn, req_id, page });
            }
            ShardMsg::HistoryPage { conn, req_id, page } => {
                self.answered(conn, req_id);
                if let Some(c) = self.conn(conn) {
                    c.session.handle_history(req_id, &page);
                    self.wake_writer(conn);
                }
            }
            ShardMsg::Publish { channel, from, conn, req_id, update } => {
                self.publish(&channel, from, conn, req_id, *update)
            }
            ShardMsg::Published { conn, req_id, position } => {
                self.answered(conn, req_id);
                if let Some(c) = self.conn(conn) {
                    c.session.handle_published(req_id, position);
                    self.wake_writer(conn);
                }
            }
            ShardMsg::Deliver(publication) => self.deliver(&publication),
            ShardMsg::Shutdown { .. } => {}
        }
    }

    /// As the channel's owner: assign the offset, keep it in history, fan out, answer.
    fn publish(&mut self, channel: &str, from: usize, conn: ConnId, req_id: u32, mut update: pb::Update) {
        let accepted_at = self.clock();
        let mut targets = std::mem::take(&mut self.targets);
        let update_type = update.r#type;
        let make = |name: &Arc<str>, offset| {
            update.offset = offset;
            crate::protocol::push::publication_of(name.clone(), &update, accepted_at)
        };
        let result = self.channels.publish(channel, accepted_at, &mut targets, make);
        // The publisher's connection and request, and the channel and offset that identify
        // the publication on every node from here on.
        let publisher = ConnLabel { shard: from, conn };
        let position = match result {
            Ok((position, publication)) => {
                tracing::debug!(conn = %publisher, req_id, channel, offset = position.offset, "published");
                for &shard in &targets {
                    self.route(shard, ShardMsg::Deliver(publication.clone()));
                }
                self.stats().published.fetch_add(1, Ordering::Relaxed);
                self.metrics.count_published(update_type);
                Ok(position)
            }
            Err(_) => {
                tracing::debug!(conn = %publisher, req_id, channel, "publish refused: the shard holds all the channels it may");
                Err(ErrorCode::Unavailable)
            }
        };
        self.targets = targets;
        self.route(from, ShardMsg::Published { conn, req_id, position });
    }

    /// Hands a publication to every local subscriber of its channel, sharing its bytes.
    fn deliver(&mut self, publication: &Arc<Publication>) {
        let local = Rc::new(Publication::clone(publication));
        let now = Instant::now();
        let mut delivered = 0u64;
        let mut ack_failures = 0u64;
        let Some((subscribers, delivered_run, index)) = self.router.deliver(&publication.channel, &local) else {
            return;
        };
        // Parked subscribers (waiting for their next tick with an open run of this channel, see
        // `outbox::FanoutLog`) are passed by without touching their connections, until a
        // lower-priority update or the horizon where one of them could turn urgent.
        let pass_parked = publication.is_priority(self.limits.priority_types) && delivered_run.within_horizon();
        if !pass_parked {
            delivered_run.reset_horizon();
        }
        delivered_run.track(subscribers.len());
        for (slot, subscriber) in subscribers.iter().enumerate() {
            if pass_parked && delivered_run.is_parked(slot) {
                delivered += 1;
                continue;
            }
            if publication.offset <= subscriber.after {
                // It reached the subscriber with its position, recovery or catch-up (a
                // fan-out from Redis may arrive after the position that already counts it).
                continue;
            }
            let Some(conn) = self.conns.get_mut(subscriber.conn.index as usize) else {
                continue;
            };
            if conn.generation != subscriber.conn.generation {
                continue;
            }
            ack_failures +=
                u64::from(conn.session.push_delivered(subscriber.sub_id, &local, delivered_run, index, now));
            delivered += 1;
            // A paced writer goes at its next tick with whatever has come by then, or when
            // its batch fills.
            if !conn.paced || conn.session.has_urgent() {
                conn.session.unpark(subscriber.sub_id);
                if let Some(waker) = conn.writer.take() {
                    waker.wake();
                }
            } else {
                conn.session.park(subscriber.sub_id, delivered_run, slot);
            }
        }
        tracing::debug!(
            channel = &*publication.channel,
            offset = publication.offset,
            subscribers = delivered,
            "delivering"
        );
        self.stats().delivered.fetch_add(delivered, Ordering::Relaxed);
        if ack_failures > 0 {
            self.stats().ack_failures.fetch_add(ack_failures, Ordering::Relaxed);
        }
    }

    /// Moves what connection `id` has queued into `out` as wire bytes (batches shared between
    /// subscribers, compressed where the client accepts it). When it is all one subscription's
    /// shared batches, `out` gets only the first one's head and the rest is returned (shared
    /// frames and later heads), to be sent after `out` without a copy.
    pub fn transmit(&mut self, id: ConnId, out: &mut Vec<u8>) -> Option<Vec<Bytes>> {
        let now = self.clock();
        let conn = live_conn(&mut self.conns, id)?;
        // One line per write, not per update: fan-out stays readable at debug.
        let log_write = tracing::enabled!(tracing::Level::DEBUG);
        let queued = if log_write { conn.session.outbox().len() } else { 0 };
        if let Some(parts) = conn.session.poll_transmit_vectored(out, &mut self.batches, now) {
            if log_write {
                let bytes = out.len() + parts.iter().map(Bytes::len).sum::<usize>();
                tracing::debug!(conn = %conn.session.client_id(), frames = queued, bytes, "write");
            }
            return Some(parts);
        }
        let written = conn.session.poll_transmit_shared(out, &mut self.batches, now);
        if log_write {
            tracing::debug!(conn = %conn.session.client_id(), frames = written, bytes = out.len(), "write");
        }
        let counters = self.batches.take_counters();
        if counters != CompressionCounters::default() {
            let stats = &self.cluster.stats[self.id];
            stats.compressed_messages.fetch_add(counters.messages, Ordering::Relaxed);
            stats.compressed_plain_bytes.fetch_add(counters.plain_bytes, Ordering::Relaxed);
            stats.compressed_bytes.fetch_add(counters.compressed_bytes, Ordering::Relaxed);
            stats.compressions.fetch_add(counters.compressions, Ordering::Relaxed);
            stats.compressed_with_dictionary.fetch_add(counters.with_dictionary, Ordering::Relaxed);
        }
        None
    }

    /// A pacing tick: writers that waited for it may write now.
    pub fn on_pacing_tick(&mut self, now: Instant, thread_cpu: Duration) {
        let was_overloaded = self.pacing.overloaded();
        let waiting = self.pacing.tick(now, thread_cpu);
        let overloaded = self.pacing.overloaded();
        // At most one warning a minute: a load at the edge can cross the mark every few ticks.
        if overloaded && !was_overloaded && self.overload_warned_at.is_none_or(|at| now - at >= OVERLOAD_WARNING_EVERY)
        {
            self.overload_warned_at = Some(now);
            tracing::warn!(
                shard = self.id,
                "shard overloaded at delivery.batch_interval; its writes linger longer, up to delivery.overload_interval (see realtime_linger_seconds)"
            );
        }
        // A plain socket's batch leaves from here, as an answer leaves from its reader: no
        // wake-up, submission and completion of the writer task per write, which at 10,000
        // lingering connections is most of what a write costs the shard outside the kernel.
        for (id, direct) in waiting {
            let Some(conn) = self.conn(id) else { continue };
            conn.paced = false;
            self.send_or_wake(id, direct);
        }
        let linger = self.pacing.linger().as_micros() as u64;
        self.stats().linger_us.store(linger, Ordering::Relaxed);
    }

    /// Time passed: sessions resend overdue acknowledged updates.
    pub fn on_tick(&mut self, now: Instant) {
        self.wall_clock = WallClock::anchored_now();
        self.batches.forget_shared();
        let mut failures = 0u64;
        let (mut conflated, mut dropped) = (0, 0);
        for (_, conn) in self.conns.iter_mut() {
            failures += u64::from(conn.session.handle_timeout(now));
            let gave_way = conn.session.poll_shed_counts();
            conflated += gave_way.conflated;
            dropped += gave_way.dropped;
            if conn.session.wants_write() {
                // A paced writer goes at its pacing tick, unless time made its queue urgent
                // (a resend, a ping, a close).
                if !conn.paced || conn.is_urgent() {
                    if let Some(waker) = conn.writer.take() {
                        waker.wake();
                    }
                }
            } else {
                conn.session.release_idle_buffers(usize::MAX);
            }
        }
        if failures > 0 {
            self.stats().ack_failures.fetch_add(failures, Ordering::Relaxed);
        }
        self.stats().conflated.fetch_add(conflated, Ordering::Relaxed);
        self.stats().dropped.fetch_add(dropped, Ordering::Relaxed);
        self.publish_metrics(now);
    }

    /// Moves this shard's tallies where a scrape reads them, and sets its gauges.
    fn publish_metrics(&mut self, now: Instant) {
        let with_timings = now.saturating_duration_since(self.timings_flushed_at) >= TIMINGS_FLUSH_INTERVAL;
        if with_timings {
            self.timings_flushed_at = now;
            self.requests.sweep(now);
        }
        let shared = &self.cluster.stats[self.id].metrics;
        self.metrics.flush_into(shared, with_timings, now);
        for (gauge, &count) in shared.subscriptions.iter().zip(&self.subscriptions) {
            gauge.store(count, Ordering::Relaxed);
        }
        let backlog: usize = self.backlog.iter().map(VecDeque::len).sum();
        shared.backlog.store(backlog as u64, Ordering::Relaxed);
        self.stats().channels.store(self.channels.len() as u64, Ordering::Relaxed);
    }

    /// The time now: while a read is handled, the clock reading of its step (it arrived, it
    /// was handled), as a read takes two readings in all, not one per use.
    fn clock(&self) -> Instant {
        self.read_step_at.unwrap_or_else(Instant::now)
    }

    /// Request `req_id` of `conn` went to a channel's owner: time it until the answer.
    fn forwarded(&mut self, conn: ConnId, req_id: u32, command: CommandKind) {
        self.metrics.forwarded(command);
        self.requests.start(conn, req_id, command, self.clock());
    }

    /// The answer to request `req_id` of `conn` is here: time it.
    fn answered(&mut self, conn: ConnId, req_id: u32) {
        if let Some((command, elapsed)) = self.requests.finish(conn, req_id, self.clock()) {
            self.metrics.record_request(command, elapsed);
        }
    }

    fn remove_subscriber(&mut self, channel: &Arc<str>, conn: ConnId, sub_id: u32) {
        if let Some(c) = self.conn(conn) {
            c.session.unpark(sub_id);
        }
        if self.router.remove(channel, conn, sub_id) {
            let slot = &mut self.subscriptions[channel_slot(channel)];
            *slot = slot.saturating_sub(1);
        }
    }

    /// Forgets a finished connection and takes back its subscriptions.
    pub fn remove_conn(&mut self, id: ConnId) {
        if self.conn(id).is_none() {
            return;
        }
        let conn = self.conns.remove(id.index as usize);
        self.unsent.remove(&id.index);
        self.peers.remove(&id.index);
        match conn.session.close_reason() {
            Some((code, _)) => {
                if let Some(index) = CloseCode::ALL.iter().position(|&c| c == code) {
                    self.stats().closed[index].fetch_add(1, Ordering::Relaxed);
                }
            }
            None => self.metrics.count_closed_by_peer(),
        }
        let shards = self.backlog.len();
        for (channel, sub_id, active) in conn.session.subscriptions() {
            if active {
                self.remove_subscriber(channel, id, sub_id);
                let owner = owner_shard(channel, shards);
                self.route(owner, ShardMsg::Unsubscribe { channel: channel.clone(), from: self.id });
            }
        }
        self.stats().connections.fetch_sub(1, Ordering::Relaxed);
        if self.draining {
            self.drained += 1;
        }
    }

    /// Ids of every connection, for shutdown.
    pub fn conn_ids(&self) -> Vec<ConnId> {
        self.conns.iter().map(|(index, c)| ConnId { index: index as u32, generation: c.generation }).collect()
    }

    /// Expires history and forgets idle owned channels.
    pub fn sweep(&mut self) {
        self.channels.sweep(Instant::now());
        self.stats().channels.store(self.channels.len() as u64, Ordering::Relaxed);
        self.stats().history_size.store(self.channels.history_len() as u64, Ordering::Relaxed);
    }

    fn send(&mut self, to: usize, msg: ShardMsg) {
        if self.backlog[to].is_empty() {
            if let Err(msg) = self.cluster.inboxes[to].push(msg) {
                self.backlog[to].push_back(msg);
            }
        } else if self.backlog[to].len() >= MAX_BACKLOG && matches!(msg, ShardMsg::Deliver(_)) {
            self.stats().inbox_dropped.fetch_add(1, Ordering::Relaxed);
        } else {
            self.backlog[to].push_back(msg);
        }
    }

    /// Moves waiting messages into inboxes that have room again; returns whether any wait still.
    pub fn flush_backlog(&mut self) -> bool {
        let mut waiting = false;
        for (to, queue) in self.backlog.iter_mut().enumerate() {
            while let Some(msg) = queue.pop_front() {
                if let Err(msg) = self.cluster.inboxes[to].push(msg) {
                    queue.push_front(msg);
                    break;
                }
            }
            waiting |= !queue.is_empty();
        }
        waiting
    }

    pub fn has_backlog(&self) -> bool {
        self.backlog.iter().any(|q| !q.is_empty())
    }

    fn stats(&self) -> &super::ShardStats {
        &self.cluster.stats[self.id]
    }
}

/// What sessions opened under `config` enforce.
fn session_limits(cluster: &Cluster, config: &Config, metrics: &Rc<LocalMetrics>) -> Rc<SessionLimits> {
    Rc::new(SessionLimits {
        // Dictionaries are files: the server loaded them once, at start.
        zstd: cluster.zstd.clone(),
        // One tally per shard, whichever configuration its sessions were opened under.
        metrics: metrics.clone(),
        ..SessionLimits::from_config(config, cluster.verifier.clone(), cluster.users.clone())
    })
}

/// Connection `id` if it is still the one in its slot.
fn live_conn(conns: &mut Slab<Conn>, id: ConnId) -> Option<&mut Conn> {
    conns.get_mut(id.index as usize).filter(|c| c.generation == id.generation)
}

impl ShardState {
    /// Hands a request to the Redis bridge, answering 503 at once when it cannot take it.
    fn send_to_bridge(&mut self, request: BridgeRequest) {
        let Some(bridge) = &self.cluster.redis else { return };
        if let Err(request) = bridge.send(request) {
            crate::broker::redis::refuse(&self.cluster, request);
        }
    }

    /// As the channel's owner on this node, Redis mode: count the subscriber, listen to the
    /// channel when it is the node's first, and ask Redis where the channel stands.
    fn subscribe_via_redis(&mut self, joining: Joining) {
        match self.channels.add_subscriber(&joining.channel, joining.from, Instant::now()) {
            Ok(first) => {
                if first {
                    self.send_to_bridge(BridgeRequest::Listen { channel: joining.channel.clone() });
                }
                self.send_to_bridge(BridgeRequest::Position(joining));
            }
            Err(_) => {
                let Joining { channel, from, conn, sub_id, req_id, .. } = joining;
                let result = Err(ErrorCode::Unavailable);
                self.route(from, ShardMsg::Subscribed { conn, channel, sub_id, req_id, result, catch_up: Vec::new() });
            }
        }
    }

    /// As the channel's owner on this node, Redis mode: Redis said where the channel stands;
    /// add what this node fanned out since, which the joining subscriber would otherwise miss.
    fn on_positioned(&mut self, joining: Joining, result: Result<(Position, Option<Recovery>), ErrorCode>) {
        let Joining { channel, from, conn, sub_id, req_id, .. } = joining;
        let catch_up = match &result {
            Ok((position, _)) => {
                let mut targets = std::mem::take(&mut self.targets);
                if self.channels.learn(&channel, &position.epoch, position.offset, &mut targets) {
                    self.cluster.redis_metrics.count_resync(Resync::EpochChanged);
                    let epoch = &position.epoch;
                    tracing::warn!(%channel, %epoch, "a position in another epoch than fanned out here; subscribers resync");
                    for &shard in &targets {
                        self.route(shard, ShardMsg::Resubscribe { channel: channel.clone() });
                    }
                }
                self.targets = targets;
                self.channels.fanned_out_after(&channel, &position.epoch, position.offset)
            }
            Err(_) => None,
        };
        let (result, catch_up) = match (result, catch_up) {
            (Ok(answer), Some(catch_up)) => (Ok(answer), catch_up),
            // Refused (Redis away), or this node did not hear everything after the position:
            // the client asks again (503) rather than start with a gap.
            (result, _) => {
                self.unsubscribe_owned(channel.clone(), from);
                (Err(result.err().unwrap_or(ErrorCode::Unavailable)), Vec::new())
            }
        };
        if let Ok((_, Some(recovery))) = &result {
            let counter = match recovery {
                Recovery::Recovered(_) => &self.stats().recoveries_served,
                Recovery::Refused(_) => &self.stats().recoveries_refused,
            };
            counter.fetch_add(1, Ordering::Relaxed);
        }
        self.route(from, ShardMsg::Subscribed { conn, channel, sub_id, req_id, result, catch_up });
    }

    /// As the channel's owner: one subscriber fewer on shard `from`; in Redis mode, stop
    /// listening when the node has none left.
    fn unsubscribe_owned(&mut self, channel: Arc<str>, from: usize) {
        let last = self.channels.unsubscribe(&channel, from, Instant::now());
        if last && self.cluster.redis.is_some() {
            self.send_to_bridge(BridgeRequest::Unlisten { channel });
        }
    }
}
