//! A shard's index of its local subscribers: channel → (connection, sub_id).

use std::rc::Rc;
use std::sync::Arc;

use crate::core::{ConnId, FastMap, Publication};
use crate::outbox::FanoutLog;

/// One local subscriber of a channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Subscriber {
    pub conn: ConnId,
    pub sub_id: u32,
    /// Publications up to this offset reached the subscriber another way (its position,
    /// recovery, catch-up) and are skipped.
    pub after: u64,
}

#[derive(Debug, Default)]
pub struct Router {
    channels: FastMap<Arc<str>, Local>,
}

/// A channel's local subscribers and what the shard delivered of it.
#[derive(Debug, Default)]
struct Local {
    subscribers: Vec<Subscriber>,
    delivered: Rc<FanoutLog>,
}

impl Router {
    pub fn add(&mut self, channel: Arc<str>, subscriber: Subscriber) {
        self.channels.entry(channel).or_default().subscribers.push(subscriber);
    }

    /// Removes subscription `sub_id` of `conn`; returns whether it was there.
    pub fn remove(&mut self, channel: &str, conn: ConnId, sub_id: u32) -> bool {
        let Some(local) = self.channels.get_mut(channel) else {
            return false;
        };
        let list = &mut local.subscribers;
        let Some(pos) = list.iter().position(|s| s.conn == conn && s.sub_id == sub_id) else {
            return false;
        };
        // The last subscriber takes the removed one's place: neither mark holds any more.
        local.delivered.unmark(pos);
        local.delivered.unmark(list.len() - 1);
        list.swap_remove(pos);
        if list.is_empty() {
            self.channels.remove(channel);
        }
        true
    }

    /// The local subscribers of `channel`.
    pub fn subscribers(&self, channel: &str) -> &[Subscriber] {
        self.channels.get(channel).map_or(&[], |local| local.subscribers.as_slice())
    }

    /// A publication to deliver on `channel`: its local subscribers, and where it stands in
    /// the channel's `FanoutLog` (see `Outbox::push_delivered`).
    pub fn deliver(
        &mut self,
        channel: &str,
        publication: &Rc<Publication>,
    ) -> Option<(&[Subscriber], &Rc<FanoutLog>, u32)> {
        let local = self.channels.get_mut(channel)?;
        let index = FanoutLog::append(&mut local.delivered, publication);
        Some((&local.subscribers, &local.delivered, index))
    }

    /// Channels with at least one local subscriber.
    #[cfg(test)]
    pub fn channel_count(&self) -> usize {
        self.channels.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sub(index: u32, sub_id: u32) -> Subscriber {
        Subscriber { conn: ConnId { index, generation: 0 }, sub_id, after: 0 }
    }

    #[test]
    fn add_remove_and_lookup() {
        let mut router = Router::default();
        let channel: Arc<str> = Arc::from("weather:paris");
        router.add(channel.clone(), sub(1, 1));
        router.add(channel.clone(), sub(2, 7));
        assert_eq!(router.subscribers("weather:paris"), &[sub(1, 1), sub(2, 7)]);
        assert!(router.remove("weather:paris", sub(1, 1).conn, 1));
        assert!(!router.remove("weather:paris", sub(1, 1).conn, 1));
        assert_eq!(router.subscribers("weather:paris"), &[sub(2, 7)]);
        assert!(router.remove("weather:paris", sub(2, 7).conn, 7));
        assert_eq!(router.channel_count(), 0);
    }
}
