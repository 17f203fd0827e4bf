//! Fan-out: a publication handed to every local subscriber of its channel, its bytes shared.

use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use super::ShardState;
use crate::core::Publication;

impl ShardState {
    /// Hands a publication to every local subscriber of its channel, sharing its bytes.
    pub(super) fn deliver(&mut self, publication: &Arc<Publication>) {
        let local = Rc::new(Publication::clone(publication));
        let now = Instant::now();
        let mut delivered = 0u64;
        let mut ack_failures = 0u64;
        let Some((subscribers, fanout_log, index)) = self.router.deliver(&publication.channel, &local) else {
            return;
        };
        // Parked subscribers (waiting for their next tick with an open run of this channel, see
        // `outbox::FanoutLog`) are passed by without touching their connections, until a
        // lower-priority update or the horizon where one of them could turn urgent.
        let pass_parked = publication.is_priority(self.limits.priority_types) && fanout_log.within_horizon();
        if !pass_parked {
            fanout_log.reset_horizon();
        }
        fanout_log.track(subscribers.len());
        for (slot, subscriber) in subscribers.iter().enumerate() {
            if pass_parked && fanout_log.is_parked(slot) {
                delivered += 1;
                continue;
            }
            if publication.offset <= subscriber.after {
                // It reached the subscriber with its position, recovery or catch-up (a
                // fan-out from Redis may arrive after the position that already counts it).
                continue;
            }
            let Some(conn) = self.conns.get_mut(subscriber.conn.index as usize) else {
                continue;
            };
            if conn.generation != subscriber.conn.generation {
                continue;
            }
            ack_failures += u64::from(conn.session.push_delivered(subscriber.sub_id, &local, fanout_log, index, now));
            delivered += 1;
            // A paced writer goes at its next tick with whatever has come by then, or when
            // its batch fills.
            if !conn.paced || conn.session.has_urgent() {
                conn.session.unpark(subscriber.sub_id);
                if let Some(waker) = conn.writer.take() {
                    waker.wake();
                }
            } else {
                conn.session.park(subscriber.sub_id, fanout_log, slot);
            }
        }
        tracing::debug!(
            channel = &*publication.channel,
            offset = publication.offset,
            subscribers = delivered,
            "delivering"
        );
        self.stats().delivered.fetch_add(delivered, Ordering::Relaxed);
        if ack_failures > 0 {
            self.stats().ack_failures.fetch_add(ack_failures, Ordering::Relaxed);
        }
    }
}
