//! One accepted publication, as every layer passes it on.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;

use super::clock::clock_us;

/// One accepted publication, encoded once, shared by every shard and subscriber.
#[derive(Debug, Clone)]
pub struct Publication {
    pub channel: Arc<str>,
    pub offset: u64,
    /// `UpdateType` as its wire number.
    pub update_type: i32,
    /// The `Update` without `sub_id` (see `protocol::push`).
    pub body: Bytes,
    /// When the server accepted the publication (history expiry, recovery windows).
    pub accepted_at: Instant,
    /// The same in microseconds on the metrics clock, for publish→write latency per delivery.
    pub accepted_us: u64,
    /// A hash of the update's `key` (0: none), for conflating a slow connection's queue.
    pub key_hash: u64,
}

impl Publication {
    /// A publication whose update's `key` hashes to `key_hash` (0: none). The protocol layer
    /// builds them from encoded updates (`protocol::push::publication`).
    pub fn with_key_hash(
        channel: Arc<str>,
        offset: u64,
        update_type: i32,
        body: Bytes,
        accepted_at: Instant,
        key_hash: u64,
    ) -> Self {
        let accepted_us = clock_us(accepted_at);
        Self { channel, offset, update_type, body, accepted_at, accepted_us, key_hash }
    }

    /// Whether its type is one of `priority_types` (bit `t`: update type `t`).
    pub fn is_priority(&self, priority_types: u32) -> bool {
        priority_types & (1 << (self.update_type as u32 & 31)) != 0
    }
}
