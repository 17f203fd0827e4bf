//! Everything one shard owns, touched only by its own thread: the connections and their
//! sessions, the router of local subscribers, its part of the broker, and messages waiting
//! for a full inbox of another shard. `ShardState` is split by what it does: reads and
//! writes (`io`), events and messages (`dispatch`), fan-out (`fanout`), time (`ticks`), and
//! the ways to the other shards (`links`).

mod dispatch;
mod fanout;
mod io;
mod links;
mod ticks;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::Waker;
use std::time::{Duration, Instant};

use slab::Slab;

use super::api::Waiters;
use super::pacing::Pacing;
use super::router::Router;
use super::Cluster;
use crate::broker::Broker;
use crate::compression::SharedBatches;
use crate::config::Config;
use crate::core::{ConnId, ConnLabel, WallClock};
use crate::metrics::{CommandKind, LocalMetrics, RequestClock, UPDATE_TYPES};
use crate::protocol::CloseCode;
use crate::session::{Session, SessionLimits, SpareQueues};
use links::Links;

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
    /// This shard's part of the node's broker (the channels it owns).
    broker: Box<dyn Broker>,
    /// The other shards' inboxes, and this shard's own broker events.
    links: Links,
    pub backlog_flusher_running: bool,
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
    spare_queues: SpareQueues,
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
        let broker = cluster.broker.for_shard(id, shards, &config);
        let metrics = Rc::new(LocalMetrics::default());
        let links = Links::new(id, cluster.clone(), metrics.clone());
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
            broker,
            links,
            backlog_flusher_running: false,
            metrics,
            requests: RequestClock::default(),
            wall_clock: WallClock::anchored_now(),
            read_step_at: None,
            spare_queues: SpareQueues::default(),
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

    pub fn remember_peer(&mut self, id: ConnId, peer: SocketAddr) {
        self.peers.insert(id.index, peer);
    }

    pub fn forget_peer(&mut self, id: ConnId) -> Option<SocketAddr> {
        self.peers.remove(&id.index)
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
        for (channel, sub_id, active) in conn.session.subscriptions() {
            if active {
                self.remove_subscriber(channel, id, sub_id);
                let channel = channel.clone();
                self.with_broker(|broker, out, now| broker.unsubscribe(out, now, channel));
            }
        }
        self.stats().connections.fetch_sub(1, Ordering::Relaxed);
        if self.draining {
            self.drained += 1;
        }
    }

    /// Moves messages waiting for full inboxes into those with room; returns whether any wait.
    pub fn flush_backlog(&mut self) -> bool {
        self.links.flush_backlog()
    }

    pub fn has_backlog(&self) -> bool {
        self.links.has_backlog()
    }

    /// This shard's part of the broker (the channels it owns), to read.
    pub(super) fn broker(&self) -> &dyn Broker {
        &*self.broker
    }

    /// Ids of every connection, for shutdown.
    pub fn conn_ids(&self) -> Vec<ConnId> {
        self.conns.iter().map(|(index, c)| ConnId { index: index as u32, generation: c.generation }).collect()
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
