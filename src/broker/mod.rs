//! Channels, their offsets and epochs, and the publications that flow through them.
//!
//! Every channel has one owner shard (a hash of its name). The owner assigns each publication
//! the next offset in the channel's epoch and tells every shard that has subscribers; the
//! embedded in-memory broker ([`memory::ChannelTable`]) is what an owner keeps.

pub mod memory;
pub mod redis;

use std::hash::{Hash, Hasher};
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
    /// When the server accepted the publication, for publish→write latency.
    pub accepted_at: Instant,
}

impl Publication {
    pub fn new(channel: Arc<str>, offset: u64, update_type: i32, body: Bytes, accepted_at: Instant) -> Self {
        Self { channel, offset, update_type, body, accepted_at }
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
    if !name.bytes().all(|b| b.is_ascii_alphanumeric() || b":_-.@/".contains(&b)) {
        return Err(ChannelNameError::BadCharacter);
    }
    Ok(())
}

/// The shard that owns `channel` among `shards`.
pub fn owner_shard(channel: &str, shards: usize) -> usize {
    let mut hasher = std::hash::DefaultHasher::new();
    channel.hash(&mut hasher);
    (hasher.finish() % shards as u64) as usize
}

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
