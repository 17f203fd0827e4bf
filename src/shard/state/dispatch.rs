//! What a shard does with its sessions' events, with messages from other shards, and with
//! what the broker tells it.

use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use super::super::api::{self, Answer};
use super::super::router::Subscriber;
use super::super::ShardMsg;
use super::links::Links;
use super::ShardState;
use crate::broker::{Broker, BrokerEvent, BrokerMsg, SubscribeRequest};
use crate::core::{ConnId, Publication, Recovery};
use crate::metrics::{channel_slot, CommandKind};
use crate::protocol::{pb, CloseCode};
use crate::session::SessionEvent;

impl ShardState {
    pub(super) fn handle_event(&mut self, id: ConnId, event: SessionEvent) {
        match event {
            SessionEvent::AuthFailed(failure) => {
                self.stats().auth_failures[failure.index()].fetch_add(1, Ordering::Relaxed);
            }
            SessionEvent::RateLimited => {
                self.stats().rate_limited.fetch_add(1, Ordering::Relaxed);
            }
            SessionEvent::Subscribe { channel, sub_id, req_id, since, resume } => {
                self.forwarded(id, req_id, CommandKind::Subscribe);
                let request = SubscribeRequest { channel, from: self.id, conn: id, sub_id, req_id, since, resume };
                self.with_broker(|broker, out, now| broker.subscribe(out, now, request));
            }
            SessionEvent::Unsubscribe { channel, sub_id, was_active } => {
                // A pending subscription is taken back when its answer finds it gone.
                if was_active {
                    self.remove_subscriber(&channel, id, sub_id);
                    self.with_broker(|broker, out, now| broker.unsubscribe(out, now, channel));
                }
            }
            SessionEvent::Acked { channel, identity, epoch, offset } => {
                self.with_broker(|broker, out, now| broker.ack(out, now, channel, identity, epoch, offset));
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

    /// Hands a publication to the broker; the answer, `Published`, comes back to `conn` (a
    /// connection or a server API request) on this shard. Returns whether it came already.
    pub fn submit_publish(&mut self, conn: ConnId, req_id: u32, channel: String, update: pb::Update) -> bool {
        self.with_broker(|broker, out, now| broker.publish(out, now, conn, req_id, channel, update))
    }

    /// Asks the broker for history; the answer, `HistoryPage` or `Failed`, comes back to
    /// `conn` on this shard.
    pub fn submit_history(&mut self, conn: ConnId, req_id: u32, channel: Arc<str>, since: u64, limit: usize) {
        self.with_broker(|broker, out, now| broker.history(out, now, conn, req_id, channel, since, limit));
    }

    /// Calls the broker, then handles what it told this shard: its events for this shard wait
    /// until the call returns, so the broker is never called back in the middle of a call.
    pub(super) fn with_broker<R>(&mut self, call: impl FnOnce(&mut dyn Broker, &mut Links, Instant) -> R) -> R {
        let now = self.clock();
        let result = call(&mut *self.broker, &mut self.links, now);
        self.handle_local_events();
        result
    }

    /// Handles the broker's events for this shard, in order (handling one may make more).
    pub(super) fn handle_local_events(&mut self) {
        while let Some(event) = self.links.local.pop_front() {
            self.handle_broker_event(event);
        }
    }

    /// Handles `msg` here when this shard is `to`, else sends it there.
    pub fn route(&mut self, to: usize, msg: ShardMsg) {
        if to == self.id {
            self.handle_msg(msg);
        } else {
            self.links.send(to, msg);
        }
    }

    /// Acts on one message from another shard (or from this one).
    pub fn handle_msg(&mut self, msg: ShardMsg) {
        match msg {
            ShardMsg::Broker(BrokerMsg::ToOwner(msg)) => {
                self.with_broker(|broker, out, now| broker.handle_owner(out, now, msg))
            }
            ShardMsg::Broker(BrokerMsg::ToShard(event)) => {
                self.handle_broker_event(event);
                self.handle_local_events();
            }
            ShardMsg::Api(msg) => api::handle_msg(self, msg),
            ShardMsg::Shutdown { .. } => {}
        }
    }

    /// Acts on what the broker tells this shard.
    pub(super) fn handle_broker_event(&mut self, event: BrokerEvent) {
        match event {
            BrokerEvent::Failed { conn, req_id, code } if conn.api_token().is_some() => {
                self.api.answer(conn, req_id, Answer::Failed(code))
            }
            BrokerEvent::HistoryPage { conn, req_id, page } if conn.api_token().is_some() => {
                self.api.answer(conn, req_id, Answer::History(page))
            }
            BrokerEvent::Published { conn, req_id, position } if conn.api_token().is_some() => {
                self.api.answer(conn, req_id, Answer::Published(position))
            }
            BrokerEvent::Failed { conn, req_id, code } => {
                self.answered(conn, req_id);
                if let Some(c) = self.conn(conn) {
                    c.session.handle_failed(req_id, code);
                    self.wake_writer(conn);
                }
            }
            BrokerEvent::Subscribed { conn, channel, sub_id, req_id, result: Err(code), .. } => {
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
            BrokerEvent::Subscribed { conn, channel, sub_id, req_id, result: Ok((position, recovery)), catch_up } => {
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
                    self.with_broker(|broker, out, now| broker.unsubscribe(out, now, channel));
                }
            }
            BrokerEvent::HistoryPage { conn, req_id, page } => {
                self.answered(conn, req_id);
                if let Some(c) = self.conn(conn) {
                    c.session.handle_history(req_id, &page);
                    self.wake_writer(conn);
                }
            }
            BrokerEvent::Published { conn, req_id, position } => {
                self.answered(conn, req_id);
                if let Some(c) = self.conn(conn) {
                    c.session.handle_published(req_id, position);
                    self.wake_writer(conn);
                }
            }
            BrokerEvent::Deliver(publication) => self.deliver(&publication),
            BrokerEvent::Resubscribe { channel } => {
                let subscribers: Vec<ConnId> = self.router.subscribers(&channel).iter().map(|s| s.conn).collect();
                for conn in subscribers {
                    if let Some(c) = self.conn(conn) {
                        let detail = format!("the history of {channel} changed; reconnect and recover");
                        c.session.close(CloseCode::Resubscribe, detail);
                        self.wake_writer(conn);
                    }
                }
            }
        }
    }

    pub(super) fn remove_subscriber(&mut self, channel: &Arc<str>, conn: ConnId, sub_id: u32) {
        if let Some(c) = self.conn(conn) {
            c.session.unpark(sub_id);
        }
        if self.router.remove(channel, conn, sub_id) {
            let slot = &mut self.subscriptions[channel_slot(channel)];
            *slot = slot.saturating_sub(1);
        }
    }
}
