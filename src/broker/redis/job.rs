//! One command's round trip to Redis, run as its own task on the bridge's runtime, and the
//! conversions of what Redis returns.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use redis::aio::MultiplexedConnection;

use super::scripts;
use super::{new_epoch, BridgeRequest, Continuity, Keys, Link, META_TTL};
use crate::broker::memory::{recover, HistoryPolicy};
use crate::broker::{BrokerEvent, OwnerMsg};
use crate::core::ConnLabel;
use crate::core::{HistoryPage, Position, Publication, Recovery};
use crate::metrics::{type_slot, RedisOp};
use crate::protocol::pb;
use crate::protocol::push::{body_with_offset, encode_update_body};
use crate::protocol::ErrorCode;

/// One command's round trip.
pub(super) struct Job {
    pub(super) channel: Arc<str>,
    pub(super) connection: MultiplexedConnection,
    pub(super) link: Link,
    pub(super) policy: HistoryPolicy,
    pub(super) max_positions: usize,
    pub(super) keys: Keys,
    pub(super) continuity: Continuity,
}

impl Job {
    pub(super) async fn run(mut self, request: BridgeRequest) {
        match request {
            BridgeRequest::Publish { channel, from, conn, req_id, update } => {
                let rest = encode_update_body(&update);
                let started = Instant::now();
                let position = self.publish(&update, &rest).await;
                self.link.metrics.record(RedisOp::Publish, started.elapsed(), position.is_err());
                let publisher = ConnLabel { shard: from, conn };
                match &position {
                    Ok(position) => {
                        self.link.metrics.published[type_slot(update.r#type)].fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(conn = %publisher, req_id, channel = &*channel, offset = position.offset, "published")
                    }
                    Err(err) => {
                        tracing::warn!(conn = %publisher, req_id, channel = &*channel, error = %err, "Redis publish failed")
                    }
                }
                let position = position.map_err(|_| ErrorCode::Unavailable);
                self.link.to_shard(from, BrokerEvent::Published { conn, req_id, position });
            }
            BridgeRequest::Position(request) => {
                let started = Instant::now();
                let result = self.position(request.since.as_ref(), request.resume.as_deref()).await;
                self.link.metrics.record(RedisOp::Position, started.elapsed(), result.is_err());
                let result = result.map_err(|err| {
                    let conn = ConnLabel { shard: request.from, conn: request.conn };
                    let (req_id, channel) = (request.req_id, &*request.channel);
                    tracing::warn!(%conn, req_id, channel, error = %err, "Redis position failed");
                    ErrorCode::Unavailable
                });
                let channel = request.channel.clone();
                self.link.to_owner(&channel, OwnerMsg::Positioned { request, result });
            }
            BridgeRequest::History { channel, from, conn, req_id, since, limit } => {
                let started = Instant::now();
                let page = self.history(&channel, since, limit).await;
                self.link.metrics.record(RedisOp::History, started.elapsed(), page.is_err());
                let page = match page {
                    Ok(page) => page,
                    Err(err) => {
                        let requester = ConnLabel { shard: from, conn };
                        tracing::warn!(conn = %requester, req_id, channel = &*channel, error = %err, "Redis history failed");
                        let code = ErrorCode::Unavailable;
                        return self.link.to_shard(from, BrokerEvent::Failed { conn, req_id, code });
                    }
                };
                self.link.to_shard(from, BrokerEvent::HistoryPage { conn, req_id, page });
            }
            BridgeRequest::Acked { identity, epoch, offset, .. } => {
                let started = Instant::now();
                let script = &*scripts::ACK;
                let result: redis::RedisResult<()> = script
                    .key(&self.keys.meta)
                    .key(&self.keys.acked)
                    .arg(&*identity)
                    .arg(&*epoch)
                    .arg(offset)
                    .arg(self.max_positions)
                    .arg(self.policy.position_ttl.as_millis() as u64)
                    .invoke_async(&mut self.connection)
                    .await;
                self.link.metrics.record(RedisOp::Ack, started.elapsed(), result.is_err());
                if let Err(err) = result {
                    tracing::warn!(error = %err, "Redis ack failed");
                }
            }
            BridgeRequest::Listen { .. } | BridgeRequest::Unlisten { .. } => {}
        }
    }

    /// After a reconnect, or when Redis repeated an offset: tell the owner where the channel
    /// stands in Redis (the script starts a new epoch where Redis is behind this node).
    pub(super) async fn resync(mut self) {
        match self.position(None, None).await {
            Ok((position, _)) => {
                let msg =
                    OwnerMsg::Resync { channel: self.channel.clone(), epoch: position.epoch, offset: position.offset };
                self.link.to_owner(&self.channel, msg);
            }
            Err(err) => tracing::warn!(channel = %self.channel, error = %err, "Redis resync failed"),
        }
    }

    async fn publish(&mut self, update: &pb::Update, rest: &Bytes) -> redis::RedisResult<Position> {
        let continuity = &self.continuity;
        publish(&mut self.connection, &self.channel, &self.keys, update.r#type, rest, &self.policy, continuity).await
    }

    async fn position(
        &mut self,
        since: Option<&Position>,
        resume: Option<&str>,
    ) -> redis::RedisResult<(Position, Option<Recovery>)> {
        let script = &*scripts::POSITION;
        let (run_id, trust, known_epoch, known_offset) = self.continuity.args(&self.channel);
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
            .arg(&self.keys.pubsub)
            .arg(&*run_id)
            .arg(trust)
            .arg(&*known_epoch)
            .arg(known_offset)
            .invoke_async(&mut self.connection)
            .await?;
        let position = Position { epoch: Arc::from(epoch.as_str()), offset };
        self.continuity.saw(&self.channel, &position.epoch, offset);
        if since_epoch.is_empty() {
            return Ok((position, None));
        }
        let history = entries_to_history(&self.channel, entries);
        let since = Position { epoch: Arc::from(since_epoch), offset: since_offset };
        let recovery = recover(&epoch, offset, &history, &since, Instant::now(), &self.policy);
        Ok((position, Some(recovery)))
    }

    async fn history(&mut self, channel: &str, since: u64, limit: usize) -> redis::RedisResult<HistoryPage> {
        let script = &*scripts::HISTORY;
        let (epoch, offset, entries): (String, u64, StreamEntries) =
            script.key(&self.keys.meta).key(&self.keys.history).arg(since).invoke_async(&mut self.connection).await?;
        let history = entries_to_history(channel, entries);
        let publications: Vec<Arc<Publication>> =
            history.iter().filter(|p| p.offset > since).take(limit).cloned().collect();
        let truncated = since < offset && history.front().is_none_or(|p| p.offset > since + 1);
        Ok(HistoryPage { position: Position { epoch: Arc::from(epoch), offset }, publications, truncated })
    }
}

/// Assigns the next offset, appends to history and fans out, atomically (one script), in a
/// new epoch where Redis is behind what this node knows or restarted untrusted.
pub(super) async fn publish(
    connection: &mut MultiplexedConnection,
    channel: &Arc<str>,
    keys: &Keys,
    update_type: i32,
    rest: &Bytes,
    policy: &HistoryPolicy,
    continuity: &Continuity,
) -> redis::RedisResult<Position> {
    let script = &*scripts::PUBLISH;
    let (run_id, trust, known_epoch, known_offset) = continuity.args(channel);
    let (epoch, offset): (String, u64) = script
        .key(&keys.meta)
        .key(&keys.history)
        .key(&keys.acked)
        .arg(&keys.pubsub)
        .arg(rest.as_ref())
        .arg(policy.size)
        .arg(policy.ttl.as_millis() as u64)
        .arg(new_epoch())
        .arg(META_TTL.as_millis() as u64)
        .arg(update_type)
        .arg(&*run_id)
        .arg(trust)
        .arg(&*known_epoch)
        .arg(known_offset)
        .invoke_async(connection)
        .await?;
    let epoch: Arc<str> = Arc::from(epoch);
    continuity.saw(channel, &epoch, offset);
    Ok(Position { epoch, offset })
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
        let publication = crate::protocol::push::publication(
            channel.clone(),
            offset,
            update_type,
            body_with_offset(offset, &rest),
            instant_of(ms),
        );
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
pub(super) fn parse_id(id: &str) -> Option<(u64, u64)> {
    let (ms, offset) = id.split_once('-')?;
    Some((ms.parse().ok()?, offset.parse().ok()?))
}

/// The monotonic instant of a wall-clock time in milliseconds (for age checks).
pub(super) fn instant_of(ms: u64) -> Instant {
    let now_ms = crate::core::unix_us() / 1000;
    let age = Duration::from_millis(now_ms.saturating_sub(ms));
    Instant::now().checked_sub(age).unwrap_or_else(Instant::now)
}
