//! One shard's part of the Redis broker. Requests go to the bridge (Redis assigns offsets and
//! holds history); as a channel's owner on this node the shard counts the node's subscribers,
//! has the bridge listen while there are any, and mirrors what Redis fans out so that a gap
//! or a new epoch is caught and told (4003) instead of passed on silently.

use std::sync::Arc;
use std::time::Instant;

use super::{BridgeHandle, BridgeRequest};
use crate::broker::memory::{ChannelSummary, ChannelTable, FanoutOutcome, HistoryPolicy};
use crate::broker::{Broker, BrokerEvent, Outbound, OwnerMsg, Placement, SubscribeRequest, Tally};
use crate::config::Config;
use crate::core::{ConnId, Position, Recovery};
use crate::metrics::{RedisMetrics, Resync};
use crate::protocol::{pb, ErrorCode};

pub struct RedisBroker {
    placement: Placement,
    /// What this node fanned out of the channels this shard owns, and their subscribers.
    channels: ChannelTable,
    targets: Vec<usize>,
    bridge: BridgeHandle,
    metrics: Arc<RedisMetrics>,
}

impl RedisBroker {
    pub(super) fn new(placement: Placement, config: &Config, bridge: BridgeHandle, metrics: Arc<RedisMetrics>) -> Self {
        let max_channels = config.limits.max_channels.div_ceil(placement.shards);
        let channels = ChannelTable::new(placement.shards, max_channels, HistoryPolicy::from_config(config));
        Self { placement, channels, targets: Vec::new(), bridge, metrics }
    }

    /// Hands a request to the bridge, answering 503 at once when it cannot take it; returns
    /// whether it answered.
    fn send_to_bridge(&mut self, out: &mut dyn Outbound, now: Instant, request: BridgeRequest) -> bool {
        let Err(request) = self.bridge.send(request) else { return false };
        let unavailable = ErrorCode::Unavailable;
        match request {
            BridgeRequest::Publish { from, conn, req_id, .. } => {
                out.to_shard(from, BrokerEvent::Published { conn, req_id, position: Err(unavailable) })
            }
            BridgeRequest::Position(request) => self.positioned(out, now, request, Err(unavailable)),
            BridgeRequest::History { from, conn, req_id, .. } => {
                out.to_shard(from, BrokerEvent::Failed { conn, req_id, code: unavailable })
            }
            BridgeRequest::Acked { .. } | BridgeRequest::Listen { .. } | BridgeRequest::Unlisten { .. } => {}
        }
        true
    }

    /// As the channel's owner on this node: count the subscriber, listen to the channel when
    /// it is the node's first, and ask Redis where the channel stands.
    fn subscribe_owned(&mut self, out: &mut dyn Outbound, now: Instant, request: SubscribeRequest) {
        match self.channels.add_subscriber(&request.channel, request.from, now) {
            Ok(first) => {
                if first {
                    self.send_to_bridge(out, now, BridgeRequest::Listen { channel: request.channel.clone() });
                }
                self.send_to_bridge(out, now, BridgeRequest::Position(request));
            }
            Err(_) => {
                let SubscribeRequest { channel, from, conn, sub_id, req_id, .. } = request;
                let result = Err(ErrorCode::Unavailable);
                out.to_shard(
                    from,
                    BrokerEvent::Subscribed { conn, channel, sub_id, req_id, result, catch_up: Vec::new() },
                );
            }
        }
    }

    /// As the channel's owner on this node: Redis said where the channel stands; add what
    /// this node fanned out since, which the joining subscriber would otherwise miss.
    fn positioned(
        &mut self,
        out: &mut dyn Outbound,
        now: Instant,
        request: SubscribeRequest,
        result: Result<(Position, Option<Recovery>), ErrorCode>,
    ) {
        let SubscribeRequest { channel, from, conn, sub_id, req_id, .. } = request;
        let catch_up = match &result {
            Ok((position, _)) => {
                let mut targets = std::mem::take(&mut self.targets);
                if self.channels.learn(&channel, &position.epoch, position.offset, &mut targets) {
                    self.metrics.count_resync(Resync::EpochChanged);
                    let epoch = &position.epoch;
                    tracing::warn!(%channel, %epoch, "a position in another epoch than fanned out here; subscribers resync");
                    for &shard in &targets {
                        out.to_shard(shard, BrokerEvent::Resubscribe { channel: channel.clone() });
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
                self.unsubscribe_owned(out, now, channel.clone(), from);
                (Err(result.err().unwrap_or(ErrorCode::Unavailable)), Vec::new())
            }
        };
        if let Ok((_, Some(recovery))) = &result {
            out.count(Tally::recovery(recovery));
        }
        out.to_shard(from, BrokerEvent::Subscribed { conn, channel, sub_id, req_id, result, catch_up });
    }

    /// As the channel's owner on this node: one subscriber fewer on shard `from`; stop
    /// listening when the node has none left.
    fn unsubscribe_owned(&mut self, out: &mut dyn Outbound, now: Instant, channel: Arc<str>, from: usize) {
        if self.channels.unsubscribe(&channel, from, now) {
            self.send_to_bridge(out, now, BridgeRequest::Unlisten { channel });
        }
    }

    /// A publication Redis fanned out: deliver it, or have the subscribers resync when it
    /// shows that this node missed some.
    fn fanned_out(
        &mut self,
        out: &mut dyn Outbound,
        now: Instant,
        epoch: Arc<str>,
        publication: Arc<crate::core::Publication>,
    ) {
        let mut targets = std::mem::take(&mut self.targets);
        let outcome = self.channels.mirror(&epoch, &publication, now, &mut targets);
        let resync = matches!(outcome, FanoutOutcome::EpochChanged | FanoutOutcome::Gap);
        if resync {
            let reason = if outcome == FanoutOutcome::Gap { Resync::Gap } else { Resync::EpochChanged };
            self.metrics.count_resync(reason);
            let (channel, offset) = (&*publication.channel, publication.offset);
            tracing::warn!(channel, %epoch, offset, ?outcome, "publications did not reach this node; subscribers resync");
        }
        for &shard in &targets {
            let event = match resync {
                true => BrokerEvent::Resubscribe { channel: publication.channel.clone() },
                false => BrokerEvent::Deliver(publication.clone()),
            };
            out.to_shard(shard, event);
        }
        self.targets = targets;
    }

    /// Where Redis says the channel stands after a reconnect: subscribers resync when it
    /// moved without this node.
    fn resync(&mut self, out: &mut dyn Outbound, channel: Arc<str>, epoch: Arc<str>, offset: u64) {
        let mut targets = std::mem::take(&mut self.targets);
        let outcome = self.channels.observe(&channel, &epoch, offset, &mut targets);
        if outcome != FanoutOutcome::Seen {
            let reason = if outcome == FanoutOutcome::Gap { Resync::Gap } else { Resync::EpochChanged };
            self.metrics.count_resync(reason);
            tracing::warn!(%channel, %epoch, offset, "channel moved while Redis was away; subscribers resync");
            for &shard in &targets {
                out.to_shard(shard, BrokerEvent::Resubscribe { channel: channel.clone() });
            }
        }
        self.targets = targets;
    }
}

impl Broker for RedisBroker {
    fn publish(
        &mut self,
        out: &mut dyn Outbound,
        now: Instant,
        conn: ConnId,
        req_id: u32,
        channel: String,
        update: pb::Update,
    ) -> bool {
        let (channel, from) = (Arc::from(channel), self.placement.shard);
        self.send_to_bridge(out, now, BridgeRequest::Publish { channel, from, conn, req_id, update: Box::new(update) })
    }

    fn subscribe(&mut self, out: &mut dyn Outbound, now: Instant, request: SubscribeRequest) {
        match self.placement.owner(&request.channel) {
            owner if owner == self.placement.shard => self.subscribe_owned(out, now, request),
            owner => out.to_owner(owner, OwnerMsg::Subscribe(request)),
        }
    }

    fn unsubscribe(&mut self, out: &mut dyn Outbound, now: Instant, channel: Arc<str>) {
        let shard = self.placement.shard;
        match self.placement.owner(&channel) {
            owner if owner == shard => self.unsubscribe_owned(out, now, channel, shard),
            owner => out.to_owner(owner, OwnerMsg::Unsubscribe { channel, from: shard }),
        }
    }

    fn history(
        &mut self,
        out: &mut dyn Outbound,
        now: Instant,
        conn: ConnId,
        req_id: u32,
        channel: Arc<str>,
        since: u64,
        limit: usize,
    ) {
        let from = self.placement.shard;
        self.send_to_bridge(out, now, BridgeRequest::History { channel, from, conn, req_id, since, limit });
    }

    fn ack(
        &mut self,
        _out: &mut dyn Outbound,
        _now: Instant,
        channel: Arc<str>,
        identity: Arc<str>,
        epoch: Arc<str>,
        offset: u64,
    ) {
        // An acknowledgement that cannot reach Redis now is left: the next one carries it.
        let _ = self.bridge.send(BridgeRequest::Acked { channel, identity, epoch, offset });
    }

    fn handle_owner(&mut self, out: &mut dyn Outbound, now: Instant, msg: OwnerMsg) {
        match msg {
            OwnerMsg::Subscribe(request) => self.subscribe_owned(out, now, request),
            OwnerMsg::Unsubscribe { channel, from } => self.unsubscribe_owned(out, now, channel, from),
            OwnerMsg::Positioned { request, result } => self.positioned(out, now, request, result),
            OwnerMsg::Fanout { epoch, publication } => self.fanned_out(out, now, epoch, publication),
            OwnerMsg::Resync { channel, epoch, offset } => self.resync(out, channel, epoch, offset),
            // Requests go to Redis from the requester's shard; should one come here, it goes
            // the same way.
            OwnerMsg::Publish { channel, from, conn, req_id, update } => {
                self.send_to_bridge(out, now, BridgeRequest::Publish { channel, from, conn, req_id, update });
            }
            OwnerMsg::History { channel, from, conn, req_id, since, limit } => {
                self.send_to_bridge(out, now, BridgeRequest::History { channel, from, conn, req_id, since, limit });
            }
            OwnerMsg::Acked { channel, identity, epoch, offset } => {
                self.ack(out, now, channel, identity, epoch, offset)
            }
        }
    }

    fn sweep(&mut self, now: Instant) {
        self.channels.sweep(now);
    }

    fn channel_count(&self) -> usize {
        self.channels.len()
    }

    fn history_len(&self) -> usize {
        self.channels.history_len()
    }

    fn list_channels(&self, prefix: &str, after: &str, limit: usize) -> Vec<ChannelSummary> {
        self.channels.list(prefix, after, limit)
    }
}
