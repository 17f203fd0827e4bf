//! The embedded broker (the default): each channel's owner shard keeps its epoch, offsets,
//! history and acknowledged positions in memory ([`ChannelTable`]); the other shards ask it
//! through their inboxes.

use std::sync::Arc;
use std::time::Instant;

use super::memory::{ChannelSummary, ChannelTable, HistoryPolicy};
use super::{Broker, BrokerEvent, BrokerNode, Inboxes, Outbound, OwnerMsg, Placement, SubscribeRequest, Tally};
use crate::config::Config;
use crate::core::{ConnId, ConnLabel};
use crate::metrics::prometheus::Exposition;
use crate::protocol::{pb, ErrorCode};

/// The embedded broker of the whole node: nothing runs beside the shards.
#[derive(Debug, Clone, Copy, Default)]
pub struct EmbeddedNode;

impl BrokerNode for EmbeddedNode {
    fn for_shard(&self, shard: usize, shards: usize, config: &Config) -> Box<dyn Broker> {
        Box::new(EmbeddedBroker::new(Placement { shard, shards }, config))
    }

    fn start(&self, _inboxes: Arc<dyn Inboxes>) -> std::io::Result<()> {
        Ok(())
    }

    fn kind(&self) -> &'static str {
        "memory"
    }

    fn is_up(&self) -> bool {
        true
    }

    fn holds_history(&self) -> bool {
        true
    }

    fn published(&self, _slot: usize) -> u64 {
        // The owner shards count every publication themselves.
        0
    }

    fn health(&self) -> serde_json::Value {
        serde_json::json!({"kind": "memory"})
    }

    fn write_metrics(&self, _page: &mut Exposition, _now: Instant) {}
}

/// One shard's part of the embedded broker: the channels it owns.
#[derive(Debug)]
pub struct EmbeddedBroker {
    placement: Placement,
    channels: ChannelTable,
    /// The shards to deliver a publication to (reused).
    targets: Vec<usize>,
}

impl EmbeddedBroker {
    pub fn new(placement: Placement, config: &Config) -> Self {
        let max_channels = config.limits.max_channels.div_ceil(placement.shards);
        let channels = ChannelTable::new(placement.shards, max_channels, HistoryPolicy::from_config(config));
        Self { placement, channels, targets: Vec::new() }
    }

    /// As the channel's owner: counts the subscriber and answers where the channel stands,
    /// with what it missed when it asks to recover.
    fn subscribe_owned(&mut self, out: &mut dyn Outbound, now: Instant, request: SubscribeRequest) {
        let SubscribeRequest { channel, from, conn, sub_id, req_id, since, resume } = request;
        let result = self
            .channels
            .subscribe(&channel, from, now, since.as_ref(), resume.as_deref())
            .map_err(|_| ErrorCode::Unavailable);
        if let Ok((_, Some(recovery))) = &result {
            out.count(Tally::recovery(recovery));
        }
        out.to_shard(from, BrokerEvent::Subscribed { conn, channel, sub_id, req_id, result, catch_up: Vec::new() });
    }

    /// As the channel's owner: assign the offset, keep it in history, fan out, answer.
    #[allow(clippy::too_many_arguments)]
    fn publish_owned(
        &mut self,
        out: &mut dyn Outbound,
        now: Instant,
        channel: &str,
        from: usize,
        conn: ConnId,
        req_id: u32,
        mut update: pb::Update,
    ) {
        let mut targets = std::mem::take(&mut self.targets);
        let update_type = update.r#type;
        let make = |name: &Arc<str>, offset| {
            update.offset = offset;
            crate::protocol::push::publication_of(name.clone(), &update, now)
        };
        let result = self.channels.publish(channel, now, &mut targets, make);
        // The publisher's connection and request, and the channel and offset that identify
        // the publication on every node from here on.
        let publisher = ConnLabel { shard: from, conn };
        let position = match result {
            Ok((position, publication)) => {
                tracing::debug!(conn = %publisher, req_id, channel, offset = position.offset, "published");
                for &shard in &targets {
                    out.to_shard(shard, BrokerEvent::Deliver(publication.clone()));
                }
                out.count(Tally::Published { update_type });
                Ok(position)
            }
            Err(_) => {
                tracing::debug!(conn = %publisher, req_id, channel, "publish refused: the shard holds all the channels it may");
                Err(ErrorCode::Unavailable)
            }
        };
        self.targets = targets;
        out.to_shard(from, BrokerEvent::Published { conn, req_id, position });
    }

    fn history_owned(&mut self, out: &mut dyn Outbound, now: Instant, request: HistoryRequest) {
        let HistoryRequest { channel, from, conn, req_id, since, limit } = request;
        let page = self.channels.history(&channel, since, limit, now);
        out.to_shard(from, BrokerEvent::HistoryPage { conn, req_id, page });
    }
}

/// A history read on its way to the channel's owner.
struct HistoryRequest {
    channel: Arc<str>,
    from: usize,
    conn: ConnId,
    req_id: u32,
    since: u64,
    limit: usize,
}

impl Broker for EmbeddedBroker {
    fn publish(
        &mut self,
        out: &mut dyn Outbound,
        now: Instant,
        conn: ConnId,
        req_id: u32,
        channel: String,
        update: pb::Update,
    ) -> bool {
        let (shard, owner) = (self.placement.shard, self.placement.owner(&channel));
        if out.far_behind(owner) {
            // The owner is far behind: refuse rather than queue without bound.
            let label = ConnLabel { shard, conn };
            tracing::debug!(conn = %label, req_id, channel, owner, "publish refused: the owner shard is far behind");
            out.to_shard(shard, BrokerEvent::Published { conn, req_id, position: Err(ErrorCode::Unavailable) });
            return true;
        }
        if owner == shard {
            // The table's name for the channel goes into the publication: no copy of it.
            self.publish_owned(out, now, &channel, shard, conn, req_id, update);
            return true;
        }
        let channel = Arc::from(channel);
        out.to_owner(owner, OwnerMsg::Publish { channel, from: shard, conn, req_id, update: Box::new(update) });
        false
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
            owner if owner == shard => {
                self.channels.unsubscribe(&channel, shard, now);
            }
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
        match self.placement.owner(&channel) {
            owner if owner == from => {
                self.history_owned(out, now, HistoryRequest { channel, from, conn, req_id, since, limit })
            }
            owner => out.to_owner(owner, OwnerMsg::History { channel, from, conn, req_id, since, limit }),
        }
    }

    fn ack(
        &mut self,
        out: &mut dyn Outbound,
        now: Instant,
        channel: Arc<str>,
        identity: Arc<str>,
        epoch: Arc<str>,
        offset: u64,
    ) {
        match self.placement.owner(&channel) {
            owner if owner == self.placement.shard => self.channels.ack(&channel, &identity, &epoch, offset, now),
            owner => out.to_owner(owner, OwnerMsg::Acked { channel, identity, epoch, offset }),
        }
    }

    fn handle_owner(&mut self, out: &mut dyn Outbound, now: Instant, msg: OwnerMsg) {
        match msg {
            OwnerMsg::Subscribe(request) => self.subscribe_owned(out, now, request),
            OwnerMsg::Unsubscribe { channel, from } => {
                self.channels.unsubscribe(&channel, from, now);
            }
            OwnerMsg::Publish { channel, from, conn, req_id, update } => {
                self.publish_owned(out, now, &channel, from, conn, req_id, *update)
            }
            OwnerMsg::History { channel, from, conn, req_id, since, limit } => {
                self.history_owned(out, now, HistoryRequest { channel, from, conn, req_id, since, limit })
            }
            OwnerMsg::Acked { channel, identity, epoch, offset } => {
                self.channels.ack(&channel, &identity, &epoch, offset, now)
            }
            // Only an external broker's bridge sends these; nothing here follows one.
            OwnerMsg::Fanout { .. } | OwnerMsg::Positioned { .. } | OwnerMsg::Resync { .. } => {}
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
