//! A shard's index of its local subscribers: channel → (connection, sub_id).

use std::rc::Rc;
use std::sync::Arc;

use crate::broker::Publication;
use crate::outbox::Delivered;
use crate::FastMap;

/// A connection on this shard: slab index and the generation that tells reused slots apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnId {
    pub index: u32,
    pub generation: u32,
}

impl ConnId {
    /// The slot no connection ever has: owners' answers addressed to it go to a request of the
    /// server API waiting on the shard, `generation` being its token.
    const API_SLOT: u32 = u32::MAX;

    /// The requester of a server API request waiting under `token`.
    pub fn api_request(token: u32) -> ConnId {
        ConnId { index: Self::API_SLOT, generation: token }
    }

    /// The token of the server API request this id stands for, if it is one.
    pub fn api_token(self) -> Option<u32> {
        (self.index == Self::API_SLOT).then_some(self.generation)
    }
}

/// How logs and clients name a connection, `<shard>-<slot>-<generation>`: unique in the
/// process, the same on every log line about the connection, and the `client_id` the client
/// is told in `ConnectResult`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnLabel {
    pub shard: usize,
    pub conn: ConnId,
}

impl std::fmt::Display for ConnLabel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.conn.api_token() {
            Some(token) => write!(f, "api-{}-{}", self.shard, token),
            None => write!(f, "{}-{}-{}", self.shard, self.conn.index, self.conn.generation),
        }
    }
}

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
    delivered: Rc<Delivered>,
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
    /// the channel's `Delivered` (see `Outbox::push_delivered`).
    pub fn deliver(
        &mut self,
        channel: &str,
        publication: &Rc<Publication>,
    ) -> Option<(&[Subscriber], &Rc<Delivered>, u32)> {
        let local = self.channels.get_mut(channel)?;
        let index = Delivered::append(&mut local.delivered, publication);
        Some((&local.subscribers, &local.delivered, index))
    }

    /// Channels with at least one local subscriber.
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
    fn a_connection_label_names_shard_slot_and_generation() {
        let label = ConnLabel { shard: 3, conn: ConnId { index: 17, generation: 42 } };
        assert_eq!(label.to_string(), "3-17-42");
        let api = ConnLabel { shard: 1, conn: ConnId::api_request(7) };
        assert_eq!(api.to_string(), "api-1-7");
        assert_eq!(api.conn.api_token(), Some(7));
        assert_eq!(label.conn.api_token(), None);
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
