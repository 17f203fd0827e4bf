//! Channels, their offsets and epochs, and the publications that flow through them.
//!
//! Every channel has one owner shard (a hash of its name). The owner assigns each publication
//! the next offset in the channel's epoch and tells every shard that has subscribers; the
//! embedded in-memory broker ([`memory::ChannelTable`]) is what an owner keeps.

pub mod memory;
pub mod redis;

use std::hash::BuildHasher;
use std::sync::Arc;

use crate::core::{validate_channel, ConnId, Position};

/// A subscription on its way to its channel's owner: who asks, and where to recover from.
#[derive(Debug, Clone)]
pub struct Joining {
    pub channel: Arc<str>,
    /// The subscriber's shard.
    pub from: usize,
    pub conn: ConnId,
    pub sub_id: u32,
    pub req_id: u32,
    /// Recover every publication after this position.
    pub since: Option<Position>,
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
    fn owners_are_stable_and_spread() {
        let owners: Vec<usize> = (0..1000).map(|i| owner_shard(&format!("route:{i}"), 4)).collect();
        assert_eq!(owners, (0..1000).map(|i| owner_shard(&format!("route:{i}"), 4)).collect::<Vec<_>>());
        for shard in 0..4 {
            assert!(owners.iter().filter(|&&o| o == shard).count() > 150);
        }
    }
}
