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

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, IntoConnectionInfo, ProtocolVersion, PushInfo, PushKind, Script, Value};
use tokio::sync::mpsc;

use super::memory::{recover, HistoryPage, HistoryPolicy, Position, Recovery};
use super::{owner_shard, Publication};
use crate::protocol::pb;
use crate::protocol::push::{body_with_offset, encode_update_body};
use crate::protocol::ErrorCode;
use crate::router::ConnId;
use crate::shard::{Cluster, ShardMsg};

mod queue;

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
    Position {
        channel: Arc<str>,
        from: usize,
        conn: ConnId,
        sub_id: u32,
        req_id: u32,
        since: Option<Position>,
        resume: Option<Arc<str>>,
    },
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
        offset: u64,
    },
}

/// The shards' end of the bridge.
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
}

/// Requests waiting for the bridge at most; beyond it shards answer 503.
const QUEUE: usize = 65536;
/// An epoch key lives this long after the channel's last publish or subscribe.
const META_TTL: Duration = Duration::from_secs(24 * 3600);

/// Creates the bridge's queue; `run` is started once the cluster exists.
pub fn channel() -> (BridgeHandle, mpsc::Receiver<BridgeRequest>, Arc<AtomicBool>) {
    let (tx, rx) = mpsc::channel(QUEUE);
    let up = Arc::new(AtomicBool::new(false));
    (BridgeHandle { tx, up: up.clone() }, rx, up)
}

/// Checks a broker URL without connecting.
pub fn validate_url(url: &str) -> Result<(), String> {
    url.into_connection_info().map(|_| ()).map_err(|err| err.to_string())
}

/// Runs the bridge on the current thread until the request queue closes.
pub fn run(url: String, cluster: Arc<Cluster>, requests: mpsc::Receiver<BridgeRequest>, up: Arc<AtomicBool>) {
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(err) => return tracing::error!(error = %err, "cannot start the Redis bridge"),
    };
    let bridge = Bridge {
        url,
        policy: cluster.config.history_policy(),
        max_positions: cluster.config.acks.max_positions_per_channel,
        prefix: cluster.config.redis.prefix.clone(),
        cluster,
        up,
        listening: HashSet::new(),
    };
    if cluster_queue_consumer(&bridge.cluster) {
        let consumer = queue::Consumer::new(&bridge.url, &bridge.cluster, bridge.policy.clone());
        runtime.spawn(consumer.run());
    }
    runtime.block_on(bridge.serve(requests));
}

fn cluster_queue_consumer(cluster: &Cluster) -> bool {
    cluster.config.redis.queue_consumer
}

struct Bridge {
    url: String,
    cluster: Arc<Cluster>,
    policy: HistoryPolicy,
    max_positions: usize,
    prefix: String,
    up: Arc<AtomicBool>,
    /// Redis pub/sub channels this node subscribes to.
    listening: HashSet<Arc<str>>,
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
                Ok(connection) => connection,
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
                tokio::spawn(job.resync());
            }
            loop {
                tokio::select! {
                    request = requests.recv() => match request {
                        Some(request) => self.handle(&connection, request).await,
                        None => return,
                    },
                    push = pushes.recv() => match push {
                        Some(push) if push.kind == PushKind::Disconnection => break,
                        Some(push) => self.on_push(push),
                        None => break,
                    },
                }
            }
            self.up.store(false, Ordering::Relaxed);
            tracing::warn!("Redis connection lost; reconnecting");
        }
    }

    async fn connect(&self, pushes: mpsc::UnboundedSender<PushInfo>) -> redis::RedisResult<MultiplexedConnection> {
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
        for script in [PUBLISH_SCRIPT, POSITION_SCRIPT, HISTORY_SCRIPT, ACK_SCRIPT] {
            Script::new(script).prepare_invoke().load_async(&mut connection).await?;
        }
        for channel in &self.listening {
            connection.subscribe(self.keys(channel).pubsub).await?;
        }
        Ok(connection)
    }

    /// Answers a request 503 without asking Redis.
    fn refuse(&mut self, request: BridgeRequest) {
        match request {
            BridgeRequest::Listen { channel } => {
                self.listening.insert(channel);
            }
            BridgeRequest::Unlisten { channel } => {
                self.listening.remove(&channel);
            }
            other => refuse(&self.cluster, other),
        }
    }

    async fn handle(&mut self, connection: &MultiplexedConnection, request: BridgeRequest) {
        match request {
            BridgeRequest::Listen { channel } => {
                if self.listening.insert(channel.clone()) {
                    let mut connection = connection.clone();
                    let pubsub = self.keys(&channel).pubsub;
                    if let Err(err) = connection.subscribe(pubsub).await {
                        tracing::warn!(%channel, error = %err, "Redis subscribe failed");
                    }
                }
            }
            BridgeRequest::Unlisten { channel } => {
                if self.listening.remove(&channel) {
                    let mut connection = connection.clone();
                    let _ = connection.unsubscribe(self.keys(&channel).pubsub).await;
                }
            }
            other => {
                // Commands run concurrently on the multiplexed connection; tasks start in the
                // order spawned, so one publisher's commands reach Redis in its order.
                let job = self.job(connection, request_channel(&other));
                tokio::spawn(job.run(other));
            }
        }
    }

    fn job(&self, connection: &MultiplexedConnection, channel: &str) -> Job {
        Job {
            channel: Arc::from(channel),
            connection: connection.clone(),
            cluster: self.cluster.clone(),
            policy: self.policy.clone(),
            max_positions: self.max_positions,
            keys: self.keys(channel),
        }
    }

    /// A publication arrived on a channel this node listens to.
    fn on_push(&self, push: PushInfo) {
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
        let owner = owner_shard(channel, self.cluster.inboxes.len());
        deliver(&self.cluster, owner, ShardMsg::Fanout { epoch, publication: Arc::new(publication) });
    }
}

fn request_channel(request: &BridgeRequest) -> &str {
    match request {
        BridgeRequest::Publish { channel, .. }
        | BridgeRequest::Position { channel, .. }
        | BridgeRequest::Listen { channel }
        | BridgeRequest::Unlisten { channel }
        | BridgeRequest::History { channel, .. }
        | BridgeRequest::Acked { channel, .. } => channel,
    }
}

/// One command's round trip.
struct Job {
    channel: Arc<str>,
    connection: MultiplexedConnection,
    cluster: Arc<Cluster>,
    policy: HistoryPolicy,
    max_positions: usize,
    keys: Keys,
}

impl Job {
    async fn run(mut self, request: BridgeRequest) {
        match request {
            BridgeRequest::Publish { channel, from, conn, req_id, update } => {
                let rest = encode_update_body(&update);
                let position = self.publish(&update, &rest).await;
                if let Err(err) = &position {
                    tracing::warn!(%channel, error = %err, "Redis publish failed");
                }
                let position = position.map_err(|_| ErrorCode::Unavailable);
                deliver(&self.cluster, from, ShardMsg::Published { conn, req_id, position });
            }
            BridgeRequest::Position { channel, from, conn, sub_id, req_id, since, resume } => {
                let result = self.position(since.as_ref(), resume.as_deref()).await.map_err(|err| {
                    tracing::warn!(%channel, error = %err, "Redis position failed");
                    ErrorCode::Unavailable
                });
                let owner = owner_shard(&channel, self.cluster.inboxes.len());
                let msg = ShardMsg::Positioned { channel, from, conn, sub_id, req_id, result };
                deliver(&self.cluster, owner, msg);
            }
            BridgeRequest::History { channel, from, conn, req_id, since, limit } => {
                let page = match self.history(&channel, since, limit).await {
                    Ok(page) => page,
                    Err(err) => {
                        tracing::warn!(%channel, error = %err, "Redis history failed");
                        return deliver(
                            &self.cluster,
                            from,
                            ShardMsg::Failed { conn, req_id, code: ErrorCode::Unavailable },
                        );
                    }
                };
                deliver(&self.cluster, from, ShardMsg::HistoryPage { conn, req_id, page });
            }
            BridgeRequest::Acked { identity, offset, .. } => {
                let script = Script::new(ACK_SCRIPT);
                let result: redis::RedisResult<()> = script
                    .key(&self.keys.acked)
                    .arg(&*identity)
                    .arg(offset)
                    .arg(self.max_positions)
                    .arg(META_TTL.as_millis() as u64)
                    .invoke_async(&mut self.connection)
                    .await;
                if let Err(err) = result {
                    tracing::warn!(error = %err, "Redis ack failed");
                }
            }
            BridgeRequest::Listen { .. } | BridgeRequest::Unlisten { .. } => {}
        }
    }

    /// After a reconnect: tell the owner where the channel stands in Redis.
    async fn resync(mut self) {
        match self.position(None, None).await {
            Ok((position, _)) => {
                let owner = owner_shard(&self.channel, self.cluster.inboxes.len());
                let msg =
                    ShardMsg::Resync { channel: self.channel.clone(), epoch: position.epoch, offset: position.offset };
                deliver(&self.cluster, owner, msg);
            }
            Err(err) => tracing::warn!(channel = %self.channel, error = %err, "Redis resync failed"),
        }
    }

    async fn publish(&mut self, update: &pb::Update, rest: &Bytes) -> redis::RedisResult<Position> {
        publish(&mut self.connection, &self.keys, update.r#type, rest, &self.policy).await
    }

    async fn position(
        &mut self,
        since: Option<&Position>,
        resume: Option<&str>,
    ) -> redis::RedisResult<(Position, Option<Recovery>)> {
        let script = Script::new(POSITION_SCRIPT);
        let (epoch, offset, since_epoch, since_offset, entries): (String, u64, String, u64, StreamEntries) = script
            .key(&self.keys.meta)
            .key(&self.keys.history)
            .key(&self.keys.acked)
            .arg(new_epoch())
            .arg(since.map_or("", |s| &*s.epoch))
            .arg(since.map_or(0, |s| s.offset))
            .arg(self.policy.max_recovery_messages)
            .arg(resume.unwrap_or(""))
            .arg(META_TTL.as_millis() as u64)
            .invoke_async(&mut self.connection)
            .await?;
        let position = Position { epoch: Arc::from(epoch.as_str()), offset };
        if since_epoch.is_empty() {
            return Ok((position, None));
        }
        let history = entries_to_history(&self.channel, entries);
        let since = Position { epoch: Arc::from(since_epoch), offset: since_offset };
        let recovery = recover(&epoch, offset, &history, &since, Instant::now(), &self.policy);
        Ok((position, Some(recovery)))
    }

    async fn history(&mut self, channel: &str, since: u64, limit: usize) -> redis::RedisResult<HistoryPage> {
        let script = Script::new(HISTORY_SCRIPT);
        let (epoch, offset, entries): (String, u64, StreamEntries) =
            script.key(&self.keys.meta).key(&self.keys.history).arg(since).invoke_async(&mut self.connection).await?;
        let history = entries_to_history(channel, entries);
        let publications: Vec<Arc<Publication>> =
            history.iter().filter(|p| p.offset > since).take(limit).cloned().collect();
        let truncated = since < offset && history.front().is_none_or(|p| p.offset > since + 1);
        Ok(HistoryPage { position: Position { epoch: Arc::from(epoch), offset }, publications, truncated })
    }
}

/// Assigns the next offset, appends to history and fans out, atomically (one script).
async fn publish(
    connection: &mut MultiplexedConnection,
    keys: &Keys,
    update_type: i32,
    rest: &Bytes,
    policy: &HistoryPolicy,
) -> redis::RedisResult<Position> {
    let script = Script::new(PUBLISH_SCRIPT);
    let (epoch, offset): (String, u64) = script
        .key(&keys.meta)
        .key(&keys.history)
        .arg(&keys.pubsub)
        .arg(rest.as_ref())
        .arg(policy.size)
        .arg(policy.ttl.as_millis() as u64)
        .arg(new_epoch())
        .arg(META_TTL.as_millis() as u64)
        .arg(update_type)
        .invoke_async(connection)
        .await?;
    Ok(Position { epoch: Arc::from(epoch), offset })
}

/// Stream entries as XREVRANGE returns them: id and field/value pairs, newest first.
type StreamEntries = Vec<(String, Vec<(String, Vec<u8>)>)>;

/// Stream entries (newest first, as XREVRANGE gives them) as publications, oldest first.
fn entries_to_history(channel: &str, entries: StreamEntries) -> VecDeque<Arc<Publication>> {
    let channel: Arc<str> = Arc::from(channel);
    let mut history = VecDeque::with_capacity(entries.len());
    for (id, fields) in entries.into_iter().rev() {
        let Some((ms, offset)) = parse_id(&id) else { continue };
        let Some((_, rest)) = fields.into_iter().find(|(name, _)| name == "b") else { continue };
        let update_type = fields_type(&rest);
        let publication =
            Publication::new(channel.clone(), offset, update_type, body_with_offset(offset, &rest), instant_of(ms));
        history.push_back(Arc::new(publication));
    }
    history
}

/// The update type inside an encoded update (0 when absent).
fn fields_type(rest: &[u8]) -> i32 {
    use prost::Message;
    pb::Update::decode(rest).map(|u| u.r#type).unwrap_or(0)
}

/// `<ms>-<offset>`.
fn parse_id(id: &str) -> Option<(u64, u64)> {
    let (ms, offset) = id.split_once('-')?;
    Some((ms.parse().ok()?, offset.parse().ok()?))
}

/// The monotonic instant of a wall-clock time in milliseconds (for age checks).
fn instant_of(ms: u64) -> Instant {
    let now_ms = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
    let age = Duration::from_millis(now_ms.saturating_sub(ms));
    Instant::now().checked_sub(age).unwrap_or_else(Instant::now)
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
    let publication =
        Publication::new(Arc::from(channel), offset, update_type, body_with_offset(offset, rest), instant_of(ms));
    Some((Arc::from(epoch), publication))
}

/// Pushes `msg` into shard `to`'s inbox, waiting while it is full (the bridge may wait).
fn deliver(cluster: &Cluster, to: usize, mut msg: ShardMsg) {
    loop {
        match cluster.inboxes[to].push(msg) {
            Ok(()) => return,
            Err(back) => {
                msg = back;
                std::thread::sleep(Duration::from_micros(200));
            }
        }
    }
}

/// Answers a request that cannot reach Redis with 503.
pub fn refuse(cluster: &Cluster, request: BridgeRequest) {
    let shards = cluster.inboxes.len();
    match request {
        BridgeRequest::Publish { from, conn, req_id, .. } => {
            deliver(cluster, from, ShardMsg::Published { conn, req_id, position: Err(ErrorCode::Unavailable) })
        }
        BridgeRequest::Position { channel, from, conn, sub_id, req_id, .. } => {
            let owner = owner_shard(&channel, shards);
            let msg = ShardMsg::Positioned { channel, from, conn, sub_id, req_id, result: Err(ErrorCode::Unavailable) };
            deliver(cluster, owner, msg)
        }
        BridgeRequest::History { from, conn, req_id, .. } => {
            deliver(cluster, from, ShardMsg::Failed { conn, req_id, code: ErrorCode::Unavailable })
        }
        BridgeRequest::Acked { .. } | BridgeRequest::Listen { .. } | BridgeRequest::Unlisten { .. } => {}
    }
}

fn new_epoch() -> String {
    format!("{:016x}", rand::random::<u64>())
}

/// KEYS: meta, history. ARGV: pubsub channel, update without offset, history size, history
/// ttl ms, epoch for a new channel, meta ttl ms, update type. Returns {epoch, offset}.
const PUBLISH_SCRIPT: &str = r#"
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if not epoch then
  epoch = ARGV[5]
  redis.call('HSET', KEYS[1], 'epoch', epoch, 'offset', 0, 'ms', 0)
end
local offset = redis.call('HINCRBY', KEYS[1], 'offset', 1)
local t = redis.call('TIME')
local ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local last = tonumber(redis.call('HGET', KEYS[1], 'ms') or '0')
if ms < last then ms = last end
redis.call('HSET', KEYS[1], 'ms', ms)
local size = tonumber(ARGV[3])
if size > 0 then
  local id = string.format('%d-%d', ms, offset)
  local ok = redis.pcall('XADD', KEYS[2], 'MAXLEN', size, id, 'b', ARGV[2])
  if type(ok) == 'table' and ok.err then
    -- History from an older epoch with higher ids: it no longer belongs to this channel.
    redis.call('DEL', KEYS[2])
    redis.call('XADD', KEYS[2], 'MAXLEN', size, id, 'b', ARGV[2])
  end
  redis.call('XTRIM', KEYS[2], 'MINID', string.format('%d-0', ms - tonumber(ARGV[4])))
  redis.call('PEXPIRE', KEYS[2], ARGV[4])
end
redis.call('PEXPIRE', KEYS[1], ARGV[6])
redis.call('PUBLISH', ARGV[1], epoch .. ':' .. offset .. ':' .. string.format('%d', ms) .. ':' .. ARGV[7] .. ':' .. ARGV[2])
return {epoch, offset}
"#;

/// KEYS: meta, history, acked. ARGV: epoch for a new channel, since epoch ('' = none), since
/// offset, most entries to return, identity to resume ('' = none), meta ttl ms.
/// Returns {epoch, offset, since epoch, since offset, entries newest first}.
const POSITION_SCRIPT: &str = r#"
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if not epoch then
  epoch = ARGV[1]
  redis.call('HSET', KEYS[1], 'epoch', epoch, 'offset', 0, 'ms', 0)
end
redis.call('PEXPIRE', KEYS[1], ARGV[6])
local offset = tonumber(redis.call('HGET', KEYS[1], 'offset'))
local since_epoch = ARGV[2]
local since = tonumber(ARGV[3])
if since_epoch == '' and ARGV[5] ~= '' then
  local acked = redis.call('HGET', KEYS[3], ARGV[5])
  if acked then
    since_epoch = epoch
    since = tonumber(acked)
  end
end
local entries = {}
local missed = offset - since
if since_epoch == epoch and missed > 0 and missed <= tonumber(ARGV[4]) then
  entries = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', missed)
end
return {epoch, offset, since_epoch, since, entries}
"#;

/// KEYS: meta, history. ARGV: since. Returns {epoch, offset, entries newest first}.
const HISTORY_SCRIPT: &str = r#"
local epoch = redis.call('HGET', KEYS[1], 'epoch') or ''
local offset = tonumber(redis.call('HGET', KEYS[1], 'offset') or '0')
local entries = {}
local wanted = offset - tonumber(ARGV[1])
if wanted > 0 then
  entries = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', wanted)
end
return {epoch, offset, entries}
"#;

/// KEYS: acked. ARGV: identity, offset, most identities, ttl ms. The highest offset wins.
const ACK_SCRIPT: &str = r#"
local current = redis.call('HGET', KEYS[1], ARGV[1])
if current then
  if tonumber(ARGV[2]) > tonumber(current) then redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) end
elseif redis.call('HLEN', KEYS[1]) < tonumber(ARGV[3]) then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
end
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return 0
"#;

#[cfg(test)]
mod tests {
    use super::*;

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
