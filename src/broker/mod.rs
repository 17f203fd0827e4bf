//! Channels, their offsets and epochs, and the publications that flow through them.
//!
//! Every channel has one owner shard per node (a hash of its name). The owner assigns each
//! publication the next offset in the channel's epoch, keeps history and acknowledged
//! positions, and tells every shard that has subscribers. Two brokers do this behind one
//! interface, [`Broker`]: the embedded one ([`embedded`], the default: the owner's
//! [`memory::ChannelTable`] is the truth) and Redis ([`redis`]: several nodes share one Redis,
//! which assigns offsets and holds history; the owner mirrors what Redis fans out).
//!
//! A broker never names the shard layer's types: what it has to say leaves through
//! [`Outbound`] (during a call from a shard) or [`Inboxes`] (from the broker's own threads),
//! both implemented by the shard layer.

pub mod embedded;
pub mod memory;
mod messages;
pub mod redis;
#[cfg(test)]
mod tests;

use std::hash::BuildHasher;
use std::sync::Arc;
use std::time::Instant;

pub use messages::{BrokerEvent, BrokerMsg, OwnerMsg, SubscribeRequest, Tally};

use crate::config::Config;
use crate::core::{validate_channel, ConnId};
use crate::metrics::prometheus::Exposition;
use crate::protocol::pb;
use memory::ChannelSummary;

/// A node's broker as one shard uses it. Each shard holds its own; none is shared between
/// threads.
///
/// Call order: requests of this shard's clients come in through [`publish`](Broker::publish),
/// [`subscribe`](Broker::subscribe), [`unsubscribe`](Broker::unsubscribe),
/// [`history`](Broker::history) and [`ack`](Broker::ack); messages for this shard as a
/// channel's owner through [`handle_owner`](Broker::handle_owner); [`sweep`](Broker::sweep)
/// now and then. Answers and deliveries leave through `out`. Sans I/O: `now` is passed in.
pub trait Broker {
    /// A client of this shard publishes on `channel`; the answer (`Published`) goes to `conn`
    /// on this shard. Returns whether it was answered during the call (this shard owns the
    /// channel, or the owner was too far behind to ask).
    fn publish(
        &mut self,
        out: &mut dyn Outbound,
        now: Instant,
        conn: ConnId,
        req_id: u32,
        channel: String,
        update: pb::Update,
    ) -> bool;

    /// A client of this shard subscribes; the answer (`Subscribed`) goes to the request's
    /// connection, with what it missed when it asks to recover.
    fn subscribe(&mut self, out: &mut dyn Outbound, now: Instant, request: SubscribeRequest);

    /// A subscriber of this shard left `channel` (or was never accepted).
    fn unsubscribe(&mut self, out: &mut dyn Outbound, now: Instant, channel: Arc<str>);

    /// A client of this shard reads history; the answer (`HistoryPage` or `Failed`) goes to
    /// `conn` on this shard.
    #[allow(clippy::too_many_arguments)]
    fn history(
        &mut self,
        out: &mut dyn Outbound,
        now: Instant,
        conn: ConnId,
        req_id: u32,
        channel: Arc<str>,
        since: u64,
        limit: usize,
    );

    /// `identity` processed `channel` up to `offset` of `epoch`.
    fn ack(
        &mut self,
        out: &mut dyn Outbound,
        now: Instant,
        channel: Arc<str>,
        identity: Arc<str>,
        epoch: Arc<str>,
        offset: u64,
    );

    /// A message for this shard as a channel's owner.
    fn handle_owner(&mut self, out: &mut dyn Outbound, now: Instant, msg: OwnerMsg);

    /// Expires history and forgets idle channels.
    fn sweep(&mut self, now: Instant);

    /// Channels this shard owns (with subscribers, history, or recently used).
    fn channel_count(&self) -> usize;

    /// Publications this shard holds in history.
    fn history_len(&self) -> usize;

    /// Up to `limit` channels this shard owns named `prefix…` and sorting after `after`.
    fn list_channels(&self, prefix: &str, after: &str, limit: usize) -> Vec<ChannelSummary>;
}

/// Where a broker call's messages go; the shard layer implements it for the shard that
/// called.
pub trait Outbound {
    /// Hands `msg` to the broker of shard `owner`, never the calling one (its broker handles
    /// its own).
    fn to_owner(&mut self, owner: usize, msg: OwnerMsg);

    /// Tells shard `shard` `event`; the calling shard's own are handled once the call
    /// returns, so a broker is never called back in the middle of a call.
    fn to_shard(&mut self, shard: usize, event: BrokerEvent);

    /// Whether shard `shard`'s inbox is so far behind that a publish to it is refused.
    fn far_behind(&self, shard: usize) -> bool;

    /// Counts `tally` on the calling shard.
    fn count(&mut self, tally: Tally);
}

/// This node's shards as a broker's own threads (the Redis bridge) reach them; the shard
/// layer implements it.
pub trait Inboxes: Send + Sync {
    fn shard_count(&self) -> usize;

    /// Puts `msg` in shard `to`'s inbox, waiting while it is full (a broker's thread may
    /// wait; a shard never calls this).
    fn deliver(&self, to: usize, msg: BrokerMsg);

    /// The configuration in force (a reload may change some limits).
    fn config(&self) -> Arc<Config>;

    /// The port clients connect to (names the node when no node id is configured).
    fn port(&self) -> u16;
}

/// The node's broker as a whole: makes each shard's [`Broker`], runs the broker's own
/// threads, and says how it is doing for `/health` and `/metrics`.
pub trait BrokerNode: Send + Sync {
    /// The broker shard `shard` of `shards` uses.
    fn for_shard(&self, shard: usize, shards: usize, config: &Config) -> Box<dyn Broker>;

    /// Starts the broker's own threads, once the shards' inboxes exist.
    fn start(&self, inboxes: Arc<dyn Inboxes>) -> std::io::Result<()>;

    /// `memory` or `redis`, as `/health` names it.
    fn kind(&self) -> &'static str;

    /// Whether it can serve requests now (an external broker may be away).
    fn is_up(&self) -> bool;

    /// Whether this node holds the channels' history, so that its size is worth showing.
    fn holds_history(&self) -> bool;

    /// Publications of update type slot `slot` counted by the broker itself rather than by
    /// the shards (Redis: by its bridge).
    fn published(&self, slot: usize) -> u64;

    /// Its part of `/health`'s `broker` object.
    fn health(&self) -> serde_json::Value;

    /// Its own metric families, if any.
    fn write_metrics(&self, page: &mut Exposition, now: Instant);
}

/// The broker `config` names: Redis when it is a `redis://` URL, else the embedded one.
pub fn node(config: &Config) -> Arc<dyn BrokerNode> {
    match config.redis_url() {
        Some(url) => Arc::new(redis::RedisNode::new(url)),
        None => Arc::new(embedded::EmbeddedNode),
    }
}

/// Where a shard's requests about a channel go: the channel's owner shard on this node.
#[derive(Debug, Clone, Copy)]
pub struct Placement {
    /// The shard this broker runs on.
    pub shard: usize,
    pub shards: usize,
}

impl Placement {
    pub fn owner(&self, channel: &str) -> usize {
        owner_shard(channel, self.shards)
    }
}

/// A publication refused before it reached a channel, with the `Error` code it earns.
#[derive(Debug, Clone, PartialEq)]
pub struct Refused {
    pub code: crate::protocol::ErrorCode,
    pub message: String,
}

/// Checks a `Publish` (however it arrived: WebSocket, backend queue) and turns it into the
/// update to publish, stamped with `unix_us`, the time the server accepted it.
pub fn accept_publish(
    publish: crate::protocol::pb::Publish,
    unix_us: u64,
    max_channel_length: usize,
    max_payload_size: usize,
) -> Result<(String, crate::protocol::pb::Update), Refused> {
    use crate::protocol::{pb, ErrorCode};
    let refuse = |code, message: String| Err(Refused { code, message });
    if let Err(err) = validate_channel(&publish.channel, max_channel_length) {
        return refuse(ErrorCode::BadRequest, err.to_string());
    }
    if publish.payload.len() > max_payload_size {
        return refuse(
            ErrorCode::TooLarge,
            format!("payload of {} bytes, the limit is {max_payload_size}", publish.payload.len()),
        );
    }
    if matches!(pb::UpdateType::try_from(publish.r#type), Ok(pb::UpdateType::Unspecified) | Err(_)) {
        return refuse(ErrorCode::BadRequest, "type must be ROUTE, WEATHER, TRAFFIC, INCIDENT or POI".into());
    }
    if !publish.confidence.is_finite() {
        return refuse(ErrorCode::BadRequest, "confidence must be a finite number".into());
    }
    let update = pb::Update {
        sub_id: 0,
        offset: 0,
        r#type: publish.r#type,
        key: publish.key,
        confidence: publish.confidence,
        timestamp_us: unix_us,
        payload: publish.payload,
        skipped: 0,
    };
    Ok((publish.channel, update))
}

/// The shard that owns `channel` among `shards`.
pub fn owner_shard(channel: &str, shards: usize) -> usize {
    if shards <= 1 {
        return 0;
    }
    // Fixed, so that every shard agrees; a collision only shares an owner, so the network
    // gains nothing by aiming for one.
    let hash = foldhash::fast::FixedState::with_seed(OWNER_SEED).hash_one(channel);
    (hash % shards as u64) as usize
}

const OWNER_SEED: u64 = 0x6f77_6e65_725f_7368;
