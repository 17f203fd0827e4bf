//! What travels between a node's shards about channels: requests to a channel's owner, and
//! what the broker tells the shards of the requests' clients and of the subscribers.

use std::sync::Arc;

use crate::core::{ConnId, HistoryPage, Position, Publication, Recovery};
use crate::protocol::pb;
use crate::protocol::ErrorCode;

/// A subscription on its way to its channel's owner: who asks, and where to recover from.
#[derive(Debug, Clone)]
pub struct SubscribeRequest {
    pub channel: Arc<str>,
    /// The subscriber's shard.
    pub from: usize,
    pub conn: ConnId,
    pub sub_id: u32,
    pub req_id: u32,
    /// Recover every publication after this position.
    pub since: Option<Position>,
    /// Or after the position this identity last acknowledged.
    pub resume: Option<Arc<str>>,
}

/// What a channel's owner shard (on this node) is asked to do.
#[derive(Debug)]
pub enum OwnerMsg {
    /// One more subscriber; answered with `Subscribed`, including what it missed when it
    /// asks to recover.
    Subscribe(SubscribeRequest),
    /// One subscriber fewer on shard `from`.
    Unsubscribe { channel: Arc<str>, from: usize },
    /// Publish; answered with `Published`.
    Publish { channel: Arc<str>, from: usize, conn: ConnId, req_id: u32, update: Box<pb::Update> },
    /// Read history; answered with `HistoryPage`.
    History { channel: Arc<str>, from: usize, conn: ConnId, req_id: u32, since: u64, limit: usize },
    /// `identity` processed the channel up to `offset` of `epoch`.
    Acked { channel: Arc<str>, identity: Arc<str>, epoch: Arc<str>, offset: u64 },
    /// Redis: a publication Redis fanned out to this node.
    Fanout { epoch: Arc<str>, publication: Arc<Publication> },
    /// Redis: where the channel stands for a joining subscriber; the owner adds what it
    /// fanned out meanwhile and answers `Subscribed`.
    Positioned { request: SubscribeRequest, result: Result<(Position, Option<Recovery>), ErrorCode> },
    /// Redis: where the channel stands after a reconnect (offset 0: a new epoch began);
    /// subscribers resync when it moved without this node.
    Resync { channel: Arc<str>, epoch: Arc<str>, offset: u64 },
}

/// What the broker tells a shard: answers to its clients' requests, and publications and
/// news for its subscribers.
#[derive(Debug)]
pub enum BrokerEvent {
    /// Where the channel stood when the subscriber was counted.
    Subscribed {
        conn: ConnId,
        channel: Arc<str>,
        sub_id: u32,
        req_id: u32,
        result: Result<(Position, Option<Recovery>), ErrorCode>,
        /// Publications already fanned out past the position, to deliver after any recovered.
        catch_up: Vec<Arc<Publication>>,
    },
    /// The history asked for.
    HistoryPage { conn: ConnId, req_id: u32, page: HistoryPage },
    /// The offset a publication got.
    Published { conn: ConnId, req_id: u32, position: Result<Position, ErrorCode> },
    /// A request failed with `code`.
    Failed { conn: ConnId, req_id: u32, code: ErrorCode },
    /// A publication for the shard's subscribers of its channel.
    Deliver(Arc<Publication>),
    /// The channel's history changed under its subscribers on the shard: they must
    /// reconnect and recover (close code 4003).
    Resubscribe { channel: Arc<str> },
}

/// Either kind, as it travels through a shard's inbox.
#[derive(Debug)]
pub enum BrokerMsg {
    ToOwner(OwnerMsg),
    ToShard(BrokerEvent),
}

/// What a broker counts on the shard it runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tally {
    /// A publication got its offset here, of this update type.
    Published { update_type: i32 },
    /// A subscriber's recovery was served, or refused.
    Recovery { served: bool },
}

impl Tally {
    /// The tally of a recovery's outcome.
    pub fn recovery(recovery: &Recovery) -> Self {
        Tally::Recovery { served: matches!(recovery, Recovery::Recovered(_)) }
    }
}
