//! How a shard reaches the others: their inboxes, and what waits for a full one; and the
//! broker's events for this shard itself, handled once the broker call that made them
//! returns (see `ShardState::with_broker`).

use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::super::{Cluster, ShardMsg};
use crate::broker::{BrokerEvent, BrokerMsg, Outbound, OwnerMsg, Tally};
use crate::metrics::LocalMetrics;

/// Most messages kept for one full inbox before deliveries to it are dropped (and counted).
const MAX_BACKLOG: usize = 1 << 18;

pub(in crate::shard) struct Links {
    id: usize,
    cluster: Arc<Cluster>,
    /// Per destination shard: messages its full inbox could not take yet, in order.
    backlog: Vec<VecDeque<ShardMsg>>,
    /// Broker events for this shard, in the order they were made.
    pub(super) local: VecDeque<BrokerEvent>,
    metrics: Rc<LocalMetrics>,
}

impl Links {
    pub(super) fn new(id: usize, cluster: Arc<Cluster>, metrics: Rc<LocalMetrics>) -> Self {
        let shards = cluster.inboxes.len();
        Self { id, cluster, backlog: (0..shards).map(|_| VecDeque::new()).collect(), local: VecDeque::new(), metrics }
    }

    /// Puts `msg` in shard `to`'s inbox, or behind what waits for it.
    pub(super) fn send(&mut self, to: usize, msg: ShardMsg) {
        let delivery = matches!(msg, ShardMsg::Broker(BrokerMsg::ToShard(BrokerEvent::Deliver(_))));
        if self.backlog[to].is_empty() {
            if let Err(msg) = self.cluster.inboxes[to].push(msg) {
                self.backlog[to].push_back(msg);
            }
        } else if self.backlog[to].len() >= MAX_BACKLOG && delivery {
            self.cluster.stats[self.id].inbox_dropped.fetch_add(1, Ordering::Relaxed);
        } else {
            self.backlog[to].push_back(msg);
        }
    }

    /// Moves waiting messages into inboxes that have room again; returns whether any wait still.
    pub(super) fn flush_backlog(&mut self) -> bool {
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

    pub(super) fn has_backlog(&self) -> bool {
        self.backlog.iter().any(|q| !q.is_empty())
    }

    /// Messages waiting for full inboxes.
    pub(super) fn backlog_len(&self) -> usize {
        self.backlog.iter().map(VecDeque::len).sum()
    }
}

impl Outbound for Links {
    fn to_owner(&mut self, owner: usize, msg: OwnerMsg) {
        self.send(owner, ShardMsg::Broker(BrokerMsg::ToOwner(msg)));
    }

    fn to_shard(&mut self, shard: usize, event: BrokerEvent) {
        if shard == self.id {
            self.local.push_back(event);
        } else {
            self.send(shard, ShardMsg::Broker(BrokerMsg::ToShard(event)));
        }
    }

    fn far_behind(&self, shard: usize) -> bool {
        self.backlog[shard].len() >= MAX_BACKLOG
    }

    fn count(&mut self, tally: Tally) {
        let stats = &self.cluster.stats[self.id];
        match tally {
            Tally::Published { update_type } => {
                stats.published.fetch_add(1, Ordering::Relaxed);
                self.metrics.count_published(update_type);
            }
            Tally::Recovery { served: true } => {
                stats.recoveries_served.fetch_add(1, Ordering::Relaxed);
            }
            Tally::Recovery { served: false } => {
                stats.recoveries_refused.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}
