//! Channels, their offsets and epochs, and the publications that flow through them.
//!
//! Every channel has one owner shard (a hash of its name). The owner assigns each publication
//! the next offset in the channel's epoch and tells every shard that has subscribers; the
//! embedded in-memory broker ([`memory::ChannelTable`]) is what an owner keeps.

pub mod memory;
pub mod redis;

use std::hash::BuildHasher;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;

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
    /// From an encoded body (another node's, through Redis): its key is found in the body.
    pub fn new(channel: Arc<str>, offset: u64, update_type: i32, body: Bytes, accepted_at: Instant) -> Self {
        let key_hash = crate::protocol::push::key_hash(&body);
        Self::with_key_hash(channel, offset, update_type, body, accepted_at, key_hash)
    }

    /// From an update this server accepted: encodes it, and hashes the key it already has
    /// instead of walking the body for it.
    pub fn from_update(channel: Arc<str>, update: &crate::protocol::pb::Update, accepted_at: Instant) -> Self {
        let body = crate::protocol::push::encode_update_body(update);
        let key_hash = crate::protocol::push::key_hash_of(update.key.as_bytes());
        Self::with_key_hash(channel, update.offset, update.r#type, body, accepted_at, key_hash)
    }

    fn with_key_hash(
        channel: Arc<str>,
        offset: u64,
        update_type: i32,
        body: Bytes,
        accepted_at: Instant,
        key_hash: u64,
    ) -> Self {
        let accepted_us = crate::metrics::clock_us(accepted_at);
        Self { channel, offset, update_type, body, accepted_at, accepted_us, key_hash }
    }

    /// Whether its type is one of `priority_types` (bit `t`: update type `t`).
    pub fn is_priority(&self, priority_types: u32) -> bool {
        priority_types & (1 << (self.update_type as u32 & 31)) != 0
    }
}

/// Why a channel name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChannelNameError {
    #[error("channel name is empty")]
    Empty,
    #[error("channel name longer than {0} bytes")]
    TooLong(usize),
    #[error("channel name has a character outside A-Z a-z 0-9 : _ - . @ /")]
    BadCharacter,
}

/// Checks a channel name: 1..=`max_len` bytes of `A-Z a-z 0-9 : _ - . @ /`
/// (`route:42`, `weather:paris`, `poi:u09tv`).
pub fn validate_channel(name: &str, max_len: usize) -> Result<(), ChannelNameError> {
    if name.is_empty() {
        return Err(ChannelNameError::Empty);
    }
    if name.len() > max_len {
        return Err(ChannelNameError::TooLong(max_len));
    }
    if !name.bytes().all(|b| CHANNEL_BYTES[b as usize]) {
        return Err(ChannelNameError::BadCharacter);
    }
    Ok(())
}

/// The bytes a channel name may hold, as a table: every publish checks its channel's name.
const CHANNEL_BYTES: [bool; 256] = {
    let mut allowed = [false; 256];
    let mut b = 0;
    while b < 256 {
        allowed[b] = (b as u8).is_ascii_alphanumeric() || matches!(b as u8, b':' | b'_' | b'-' | b'.' | b'@' | b'/');
        b += 1;
    }
    allowed
};

/// A subscription on its way to its channel's owner: who asks, and where to recover from.
#[derive(Debug, Clone)]
pub struct Joining {
    pub channel: Arc<str>,
    /// The subscriber's shard.
    pub from: usize,
    pub conn: crate::router::ConnId,
    pub sub_id: u32,
    pub req_id: u32,
    /// Recover every publication after this position.
    pub since: Option<memory::Position>,
    /// Or after the position this identity last acknowledged.
    pub resume: Option<Arc<str>>,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typical_names_pass_and_bad_ones_say_why() {
        for name in ["route:42", "weather:paris", "poi:u09tv", "user@x/route-1.2_b"] {
            validate_channel(name, 128).unwrap();
        }
        assert_eq!(validate_channel("", 128), Err(ChannelNameError::Empty));
        assert_eq!(validate_channel("route 42", 128), Err(ChannelNameError::BadCharacter));
        assert_eq!(validate_channel("ruta:é", 128), Err(ChannelNameError::BadCharacter));
        assert_eq!(validate_channel(&"a".repeat(129), 128), Err(ChannelNameError::TooLong(128)));
        // Every ASCII character: exactly letters, digits and : _ - . @ / pass.
        for c in (0..128u8).map(char::from) {
            let allowed = c.is_ascii_alphanumeric() || ":_-.@/".contains(c);
            assert_eq!(validate_channel(&format!("route{c}1"), 128).is_ok(), allowed, "{c:?}");
        }
    }

    #[test]
    fn owners_are_stable_and_spread() {
        let owners: Vec<usize> = (0..1000).map(|i| owner_shard(&format!("route:{i}"), 4)).collect();
        assert_eq!(owners, (0..1000).map(|i| owner_shard(&format!("route:{i}"), 4)).collect::<Vec<_>>());
        for shard in 0..4 {
            assert!(owners.iter().filter(|&&o| o == shard).count() > 150);
        }
    }
}
