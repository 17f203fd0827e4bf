//! The Redis broker: several nodes sharing one Redis behave as one server.
//!
//! Redis holds each channel's epoch and latest offset (a hash), its history (a stream whose
//! entry ids are `<ms>-<offset>`), and the acknowledged positions (a hash). One Lua script
//! assigns the offset, appends to history and publishes to the channel's Redis pub/sub
//! channel atomically, so no two nodes hand out the same offset and nothing is fanned out that
//! is not in history. Every node subscribes (RESP3, one connection) to the channels it has
//! subscribers for and hands what arrives to the channel's owner shard, which fans it out as
//! the embedded broker does.
//!
//! All Redis I/O runs here, on its own thread with a small tokio runtime; shards reach it
//! through a bounded queue and hear back through their inboxes. While Redis is away, requests
//! are answered 503 at once, `/health` says `degraded`, and the bridge reconnects with backoff
//! and subscribes again.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, IntoConnectionInfo, ProtocolVersion, PushInfo, PushKind, Value};
use tokio::sync::mpsc;

use super::memory::HistoryPolicy;
use super::{owner_shard, Broker, BrokerEvent, BrokerMsg, BrokerNode, Inboxes, OwnerMsg, Placement, SubscribeRequest};
use crate::config::Config;
use crate::core::{ConnId, Publication};
use crate::metrics::prometheus::Exposition;
use crate::metrics::RedisMetrics;
use crate::protocol::pb;
use crate::protocol::push::body_with_offset;
use crate::protocol::ErrorCode;

mod job;
pub mod known;
mod metrics;
mod owner;
mod queue;
mod scripts;

pub use owner::RedisBroker;

use job::{instant_of, Job};
use known::{FanoutCheck, KnownPositions};

/// What shards ask of Redis.
#[derive(Debug)]
pub enum BridgeRequest {
    /// Publish; the answer (`Published`) goes to shard `from`.
    Publish {
        channel: Arc<str>,
        from: usize,
        conn: ConnId,
        req_id: u32,
        update: Box<pb::Update>,
    },
    /// Where a channel stands (and what a subscriber missed); the answer (`Positioned`) goes
    /// to the channel's owner shard on this node.
    Position(SubscribeRequest),
    /// This node has subscribers for the channel now / no longer.
    Listen {
        channel: Arc<str>,
    },
    Unlisten {
        channel: Arc<str>,
    },
    History {
        channel: Arc<str>,
        from: usize,
        conn: ConnId,
        req_id: u32,
        since: u64,
        limit: usize,
    },
    Acked {
        channel: Arc<str>,
        identity: Arc<str>,
        epoch: Arc<str>,
        offset: u64,
    },
}

/// The shards' end of the bridge.
#[derive(Clone)]
pub struct BridgeHandle {
    tx: mpsc::Sender<BridgeRequest>,
    up: Arc<AtomicBool>,
}

impl BridgeHandle {
    /// Queues a request; hands it back when the bridge is full or Redis is away.
    pub fn send(&self, request: BridgeRequest) -> Result<(), BridgeRequest> {
        if !self.is_up() && !matches!(request, BridgeRequest::Listen { .. } | BridgeRequest::Unlisten { .. }) {
            return Err(request);
        }
        self.tx.try_send(request).map_err(|err| match err {
            mpsc::error::TrySendError::Full(request) | mpsc::error::TrySendError::Closed(request) => request,
        })
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// Requests queued for the bridge and not yet taken.
    pub fn queued(&self) -> usize {
        self.tx.max_capacity() - self.tx.capacity()
    }

    /// Most requests the queue holds.
    pub fn capacity(&self) -> usize {
        self.tx.max_capacity()
    }
}

/// Requests waiting for the bridge at most; beyond it shards answer 503.
const QUEUE: usize = 65536;
/// An epoch key lives this long after the channel's last publish or subscribe.
const META_TTL: Duration = Duration::from_secs(24 * 3600);

/// The Redis broker of the whole node: the bridge's queue and figures, shared by every
/// shard's [`RedisBroker`]; the bridge starts once the shards' inboxes exist.
pub struct RedisNode {
    url: String,
    bridge: BridgeHandle,
    metrics: Arc<RedisMetrics>,
    /// The bridge's end of the queue, until it starts.
    requests: Mutex<Option<mpsc::Receiver<BridgeRequest>>>,
    /// Whether the node runs a consumer of the publish queue (`redis.queue_consumer`).
    queue_consumer: AtomicBool,
}

impl RedisNode {
    pub fn new(url: &str) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        let bridge = BridgeHandle { tx, up: Arc::new(AtomicBool::new(false)) };
        Self {
            url: url.to_owned(),
            bridge,
            metrics: Arc::default(),
            requests: Mutex::new(Some(rx)),
            queue_consumer: AtomicBool::new(false),
        }
    }
}

#[cfg(test)]
impl RedisNode {
    /// Takes requests as a connected bridge would (they wait in its queue, never answered).
    pub(crate) fn pretend_connected(&self) {
        self.bridge.up.store(true, Ordering::Relaxed);
    }
}

impl BrokerNode for RedisNode {
    fn for_shard(&self, shard: usize, shards: usize, config: &Config) -> Box<dyn Broker> {
        let placement = Placement { shard, shards };
        Box::new(RedisBroker::new(placement, config, self.bridge.clone(), self.metrics.clone()))
    }

    fn start(&self, inboxes: Arc<dyn Inboxes>) -> std::io::Result<()> {
        let requests = self.requests.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).take();
        let Some(requests) = requests else { return Ok(()) };
        self.queue_consumer.store(inboxes.config().redis.queue_consumer, Ordering::Relaxed);
        let link = Link { inboxes, metrics: self.metrics.clone() };
        let (url, up) = (self.url.clone(), self.bridge.up.clone());
        std::thread::Builder::new().name("redis-bridge".into()).spawn(move || run(url, link, requests, up))?;
        Ok(())
    }

    fn kind(&self) -> &'static str {
        "redis"
    }

    fn is_up(&self) -> bool {
        self.bridge.is_up()
    }

    fn holds_history(&self) -> bool {
        // History lives in Redis, shared by every node: no figure of this node's says how much.
        false
    }

    fn published(&self, slot: usize) -> u64 {
        self.metrics.published[slot].load(Ordering::Relaxed)
    }

    fn health(&self) -> serde_json::Value {
        serde_json::json!({"kind": "redis", "connected": self.bridge.is_up()})
    }

    fn write_metrics(&self, page: &mut Exposition, now: std::time::Instant) {
        let queue_consumer = self.queue_consumer.load(Ordering::Relaxed);
        metrics::write(page, &self.bridge, &self.metrics, queue_consumer, now);
    }
}

/// How the bridge's work reaches the shards, and where it counts.
#[derive(Clone)]
pub(super) struct Link {
    inboxes: Arc<dyn Inboxes>,
    metrics: Arc<RedisMetrics>,
}

impl Link {
    /// Puts `event` in shard `to`'s inbox.
    fn to_shard(&self, to: usize, event: BrokerEvent) {
        self.inboxes.deliver(to, BrokerMsg::ToShard(event));
    }

    /// Puts `msg` in the inbox of `channel`'s owner shard.
    fn to_owner(&self, channel: &str, msg: OwnerMsg) {
        let owner = owner_shard(channel, self.inboxes.shard_count());
        self.inboxes.deliver(owner, BrokerMsg::ToOwner(msg));
    }
}

/// Runs the bridge on the current thread until the request queue closes.
fn run(url: String, link: Link, requests: mpsc::Receiver<BridgeRequest>, up: Arc<AtomicBool>) {
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(err) => return tracing::error!(error = %err, "cannot start the Redis bridge"),
    };
    let config = link.inboxes.config();
    let known = Arc::new(Mutex::new(KnownPositions::new(config.limits.max_channels.max(1))));
    let bridge = Bridge {
        url,
        policy: HistoryPolicy::from_config(&config),
        max_positions: config.acks.max_positions_per_channel,
        prefix: config.redis.prefix.clone(),
        trust_restarts: config.redis.trust_restarts,
        known: known.clone(),
        run_id: Arc::from(""),
        link,
        up,
        listening: HashSet::new(),
    };
    if config.redis.queue_consumer {
        let consumer = queue::Consumer::new(&bridge.url, bridge.link.clone(), bridge.policy.clone(), known);
        runtime.spawn(supervised(consumer.run()));
    }
    let served = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| runtime.block_on(bridge.serve(requests))));
    if let Err(panic) = served {
        fail_stop(&*panic);
    }
}

/// `work`, stopping the process should it panic (see `fail_stop`).
async fn supervised(work: impl std::future::Future<Output = ()>) {
    use futures_util::FutureExt;
    if let Err(panic) = std::panic::AssertUnwindSafe(work).catch_unwind().await {
        fail_stop(&*panic);
    }
}

/// Runs `work` as its own task on the bridge's runtime, stopping the process should it panic.
fn spawn_supervised(work: impl std::future::Future<Output = ()> + Send + 'static) {
    tokio::spawn(supervised(work));
}

/// A panic in the bridge is a bug that would leave Redis silently gone (the requests it held
/// never answered, its state unknown): the process stops, as for a shard's panic that nothing
/// caught, so that its service manager starts it again and clients reconnect and recover.
fn fail_stop(panic: &(dyn std::any::Any + Send)) -> ! {
    let panic = crate::core::panic_message(panic);
    tracing::error!(panic, "the Redis bridge stopped with a panic; the server exits (status 70) to be restarted");
    std::process::exit(70);
}

struct Bridge {
    url: String,
    link: Link,
    policy: HistoryPolicy,
    max_positions: usize,
    prefix: String,
    up: Arc<AtomicBool>,
    /// Redis pub/sub channels this node subscribes to.
    listening: HashSet<Arc<str>>,
    /// The latest position this node saw of each channel (shared with the queue consumer).
    known: Arc<Mutex<KnownPositions>>,
    /// `redis.trust_restarts`.
    trust_restarts: bool,
    /// The `run_id` of the Redis process the current connection reached.
    run_id: Arc<str>,
}

/// What a script needs to tell whether a channel's history can still be trusted (see
/// `scripts::CURRENT_EPOCH`): the Redis process the connection reached, whether restarts
/// are trusted, and what this node knows of the channel.
#[derive(Clone)]
pub(super) struct Continuity {
    pub(super) run_id: Arc<str>,
    pub(super) trust_restarts: bool,
    pub(super) known: Arc<Mutex<KnownPositions>>,
}

impl Continuity {
    /// The script arguments: run id, trust flag, known epoch ('' = none), known offset.
    pub(super) fn args(&self, channel: &str) -> (Arc<str>, &'static str, Arc<str>, u64) {
        let known = lock(&self.known).get(channel);
        let (epoch, offset) = known.unwrap_or_else(|| (Arc::from(""), 0));
        (self.run_id.clone(), if self.trust_restarts { "1" } else { "0" }, epoch, offset)
    }

    /// Redis answered with `channel` at `position`.
    pub(super) fn saw(&self, channel: &Arc<str>, epoch: &Arc<str>, offset: u64) {
        lock(&self.known).saw(channel, epoch, offset);
    }
}

/// The known positions, whatever a panicking holder left (each update is a single step).
fn lock(known: &Mutex<KnownPositions>) -> std::sync::MutexGuard<'_, KnownPositions> {
    known.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The `run_id` of the Redis process `connection` reached: it changes at every restart, and
/// a replica promoted in a failover has its own.
pub(super) async fn run_id(connection: &mut MultiplexedConnection) -> redis::RedisResult<String> {
    let info: String = redis::cmd("INFO").arg("server").query_async(connection).await?;
    info.lines()
        .find_map(|line| line.strip_prefix("run_id:"))
        .map(|id| id.trim().to_owned())
        .ok_or_else(|| redis::RedisError::from((redis::ErrorKind::UnexpectedReturnType, "INFO without run_id")))
}

struct Keys {
    meta: String,
    history: String,
    acked: String,
    pubsub: String,
}

/// The keys of `channel` (hash-tagged by channel, so one Redis Cluster slot holds them all).
fn keys(prefix: &str, channel: &str) -> Keys {
    Keys {
        meta: format!("{prefix}:{{{channel}}}:meta"),
        history: format!("{prefix}:{{{channel}}}:history"),
        acked: format!("{prefix}:{{{channel}}}:acked"),
        pubsub: format!("{prefix}:pub:{channel}"),
    }
}

impl Bridge {
    fn keys(&self, channel: &str) -> Keys {
        keys(&self.prefix, channel)
    }

    async fn serve(mut self, mut requests: mpsc::Receiver<BridgeRequest>) {
        let mut attempt = 0u32;
        loop {
            let (push_tx, mut pushes) = mpsc::unbounded_channel();
            let connection = match self.connect(push_tx).await {
                Ok((connection, run_id)) => {
                    self.run_id = Arc::from(run_id);
                    connection
                }
                Err(err) => {
                    let delay = Duration::from_millis(100 * 2u64.pow(attempt.min(6))).min(Duration::from_secs(5));
                    tracing::warn!(error = %err, retry_in = ?delay, "Redis unavailable");
                    attempt += 1;
                    // Answer what waits meanwhile: Redis is away.
                    let deadline = tokio::time::sleep(delay);
                    tokio::pin!(deadline);
                    loop {
                        tokio::select! {
                            _ = &mut deadline => break,
                            request = requests.recv() => match request {
                                Some(request) => self.refuse(request),
                                None => return,
                            },
                        }
                    }
                    continue;
                }
            };
            attempt = 0;
            self.up.store(true, Ordering::Relaxed);
            tracing::info!(channels = self.listening.len(), "Redis connected");
            // Publications made while this node was away never reached it: compare every
            // channel it listens to with what Redis holds.
            for channel in &self.listening {
                let job = self.job(&connection, channel);
                spawn_supervised(job.resync());
            }
            loop {
                tokio::select! {
                    request = requests.recv() => match request {
                        Some(request) => self.handle(&connection, request).await,
                        None => return,
                    },
                    push = pushes.recv() => match push {
                        Some(push) if push.kind == PushKind::Disconnection => break,
                        Some(push) => self.on_push(&connection, push),
                        None => break,
                    },
                }
            }
            self.up.store(false, Ordering::Relaxed);
            tracing::warn!("Redis connection lost; reconnecting");
        }
    }

    async fn connect(
        &self,
        pushes: mpsc::UnboundedSender<PushInfo>,
    ) -> redis::RedisResult<(MultiplexedConnection, String)> {
        let info = self.url.as_str().into_connection_info()?;
        let settings = info.redis_settings().clone().set_protocol(ProtocolVersion::RESP3);
        let client = redis::Client::open(info.set_redis_settings(settings))?;
        let config = AsyncConnectionConfig::new()
            .set_push_sender(pushes)
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(Duration::from_secs(5)));
        let mut connection = client.get_multiplexed_async_connection_with_config(&config).await?;
        // Loaded up front: a script loaded on first use could let a later command of the
        // same publisher overtake an earlier one that is still being retried.
        for script in scripts::all() {
            script.prepare_invoke().load_async(&mut connection).await?;
        }
        let run_id = run_id(&mut connection).await?;
        for channel in &self.listening {
            connection.subscribe(self.keys(channel).pubsub).await?;
        }
        Ok((connection, run_id))
    }

    /// Answers a request 503 without asking Redis.
    fn refuse(&mut self, request: BridgeRequest) {
        match request {
            BridgeRequest::Listen { channel } => {
                self.listening.insert(channel);
            }
            BridgeRequest::Unlisten { channel } => {
                self.listening.remove(&channel);
                self.make_room_in_known();
            }
            other => refuse(&self.link, other),
        }
    }

    async fn handle(&mut self, connection: &MultiplexedConnection, request: BridgeRequest) {
        match request {
            BridgeRequest::Listen { channel } => {
                if self.listening.insert(channel.clone()) {
                    let mut connection = connection.clone();
                    let pubsub = self.keys(&channel).pubsub;
                    let started = std::time::Instant::now();
                    let result = connection.subscribe(pubsub).await;
                    let metrics = &self.link.metrics;
                    metrics.record(crate::metrics::RedisOp::Subscribe, started.elapsed(), result.is_err());
                    if let Err(err) = result {
                        tracing::warn!(%channel, error = %err, "Redis subscribe failed");
                    }
                }
            }
            BridgeRequest::Unlisten { channel } => {
                if self.listening.remove(&channel) {
                    self.make_room_in_known();
                    let mut connection = connection.clone();
                    let _ = connection.unsubscribe(self.keys(&channel).pubsub).await;
                }
            }
            other => {
                // Commands run concurrently on the multiplexed connection; tasks start in the
                // order spawned, so one publisher's commands reach Redis in its order.
                let job = self.job(connection, request_channel(&other));
                spawn_supervised(job.run(other));
            }
        }
    }

    /// When the known positions are full, keeps those of the channels this node listens to
    /// (a repeat of their offsets is caught) and forgets the rest; as channels stop being
    /// listened to, not on every request.
    fn make_room_in_known(&self) {
        let mut known = lock(&self.known);
        if known.is_full() {
            known.retain(|channel| self.listening.contains(channel));
        }
    }

    fn job(&self, connection: &MultiplexedConnection, channel: &str) -> Job {
        Job {
            continuity: Continuity {
                run_id: self.run_id.clone(),
                trust_restarts: self.trust_restarts,
                known: self.known.clone(),
            },
            channel: Arc::from(channel),
            connection: connection.clone(),
            link: self.link.clone(),
            policy: self.policy.clone(),
            max_positions: self.max_positions,
            keys: self.keys(channel),
        }
    }

    /// A publication arrived on a channel this node listens to (offset 0: a new epoch began).
    fn on_push(&self, connection: &MultiplexedConnection, push: PushInfo) {
        if push.kind != PushKind::Message {
            return;
        }
        let [Value::BulkString(name), Value::BulkString(payload)] = push.data.as_slice() else { return };
        let Some(channel) =
            std::str::from_utf8(name).ok().and_then(|n| n.strip_prefix(&format!("{}:pub:", self.prefix)))
        else {
            return;
        };
        let Some((epoch, publication)) = parse_fanout(channel, payload) else {
            tracing::warn!(%channel, "undecodable publication from Redis");
            return;
        };
        if lock(&self.known).fanned_out(&publication.channel, &epoch, publication.offset) == FanoutCheck::Repeated {
            // Redis came back older than it was and hands out offsets again: the channel's
            // position script, told what this node knows, starts a new epoch.
            tracing::warn!(%channel, %epoch, offset = publication.offset, "Redis repeated an offset; starting a new epoch");
            self.link.metrics.count_resync(crate::metrics::Resync::RepeatedOffset);
            spawn_supervised(self.job(connection, channel).resync());
            return;
        }
        if publication.offset == 0 {
            let msg = OwnerMsg::Resync { channel: publication.channel.clone(), epoch, offset: 0 };
            return self.link.to_owner(channel, msg);
        }
        self.link.to_owner(channel, OwnerMsg::Fanout { epoch, publication: Arc::new(publication) });
    }
}

fn request_channel(request: &BridgeRequest) -> &str {
    match request {
        BridgeRequest::Publish { channel, .. }
        | BridgeRequest::Position(SubscribeRequest { channel, .. })
        | BridgeRequest::Listen { channel }
        | BridgeRequest::Unlisten { channel }
        | BridgeRequest::History { channel, .. }
        | BridgeRequest::Acked { channel, .. } => channel,
    }
}

/// `epoch:offset:ms:type:rest` as the publish script sends it.
fn parse_fanout(channel: &str, payload: &[u8]) -> Option<(Arc<str>, Publication)> {
    let mut parts = payload.splitn(5, |&b| b == b':');
    let epoch = std::str::from_utf8(parts.next()?).ok()?;
    let number = |bytes: &[u8]| std::str::from_utf8(bytes).ok()?.parse::<u64>().ok();
    let offset = number(parts.next()?)?;
    let ms = number(parts.next()?)?;
    let update_type = number(parts.next()?)? as i32;
    let rest = parts.next()?;
    let publication = crate::protocol::push::publication(
        Arc::from(channel),
        offset,
        update_type,
        body_with_offset(offset, rest),
        instant_of(ms),
    );
    Some((Arc::from(epoch), publication))
}

/// Answers a request that cannot reach Redis with 503.
fn refuse(link: &Link, request: BridgeRequest) {
    let unavailable = ErrorCode::Unavailable;
    match request {
        BridgeRequest::Publish { from, conn, req_id, .. } => {
            link.to_shard(from, BrokerEvent::Published { conn, req_id, position: Err(unavailable) })
        }
        BridgeRequest::Position(request) => {
            let channel = request.channel.clone();
            link.to_owner(&channel, OwnerMsg::Positioned { request, result: Err(unavailable) })
        }
        BridgeRequest::History { from, conn, req_id, .. } => {
            link.to_shard(from, BrokerEvent::Failed { conn, req_id, code: unavailable })
        }
        BridgeRequest::Acked { .. } | BridgeRequest::Listen { .. } | BridgeRequest::Unlisten { .. } => {}
    }
}

fn new_epoch() -> String {
    format!("{:016x}", rand::random::<u64>())
}

#[cfg(test)]
mod tests {
    use super::job::parse_id;
    use super::*;
    use crate::protocol::push::encode_update_body;
    use bytes::Bytes;

    #[test]
    fn fanout_payload_round_trips_an_update() {
        use prost::Message;
        let update =
            pb::Update { r#type: 2, key: "k:1".into(), payload: Bytes::from_static(b"a:b:c"), ..Default::default() };
        let rest = encode_update_body(&update);
        let mut payload = b"00ab:42:1700000000000:2:".to_vec();
        payload.extend_from_slice(&rest);
        let (epoch, publication) = parse_fanout("route:1", &payload).unwrap();
        assert_eq!(&*epoch, "00ab");
        assert_eq!((publication.offset, publication.update_type), (42, 2));
        let decoded = pb::Update::decode(publication.body.clone()).unwrap();
        assert_eq!(decoded, pb::Update { offset: 42, ..update });
        assert!(parse_fanout("route:1", b"garbage").is_none());
    }

    #[test]
    fn stream_ids_carry_time_and_offset() {
        assert_eq!(parse_id("1700000000000-42"), Some((1_700_000_000_000, 42)));
        assert_eq!(parse_id("nonsense"), None);
    }
}
