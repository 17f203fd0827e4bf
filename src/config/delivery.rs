//! Delivery tuning (`[delivery]`): batching, priorities and conflation, compression.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{invalid, ConfigError};

/// How updates leave the server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Delivery {
    /// Most frames packed into one WebSocket message while a write is in flight.
    pub batch_size: usize,
    /// Capacity of each shard's inbox (messages from other shards).
    pub inbox_capacity: usize,
    /// Update types that are never conflated or dropped for a slow connection, and leave its
    /// queue ahead of the others.
    pub priority_types: Vec<String>,
    /// Past this many queued bytes, a lower-priority update replaces a queued one with the
    /// same subscription and `key` (conflation). At most `limits.max_outbox_bytes`.
    pub conflate_above_bytes: usize,
    /// Longest a busy connection's updates wait to leave together. A connection whose socket
    /// is idle sends at once; while its shard is loaded, its writes are spaced up to this far
    /// apart so that each carries more updates (see "Adaptive batching").
    #[serde(with = "humantime_serde")]
    pub batch_interval: Duration,
    /// Longest the linger may grow to while a shard stays overloaded at `batch_interval`
    /// (its writes are then already spaced by how long a round over its connections takes,
    /// and every write costs the kernel the same whatever it carries). At most
    /// `batch_interval`: never linger past it.
    #[serde(with = "humantime_serde")]
    pub overload_interval: Duration,
    /// A `ServerMessage` of at least this many bytes goes out zstd-compressed to a client that
    /// accepts zstd (0: never compress).
    pub compression_threshold: usize,
    /// zstd level (1 fastest .. 19; negative: faster still).
    pub compression_level: i32,
    /// Trained zstd dictionaries, at most one per update type:
    /// `[{ type = "ROUTE", file = "/etc/routopia-realtime/route.dict" }]`.
    pub zstd_dictionaries: Vec<DictionaryFile>,
}

impl Default for Delivery {
    fn default() -> Self {
        Self {
            batch_size: 100,
            inbox_capacity: 65536,
            priority_types: vec!["ROUTE".into(), "WEATHER".into()],
            // A quarter of the default outbox (`limits.max_outbox_bytes`).
            conflate_above_bytes: 256 * 1024,
            batch_interval: Duration::from_millis(50),
            overload_interval: Duration::from_millis(600),
            compression_threshold: 1024,
            compression_level: 1,
            zstd_dictionaries: Vec::new(),
        }
    }
}

/// A zstd dictionary for one update type (made by `routopia-realtime train-dict`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DictionaryFile {
    pub r#type: String,
    pub file: PathBuf,
}

/// The wire number of an update type named as in the protocol (`ROUTE`, ...).
pub fn parse_update_type(name: &str) -> Option<i32> {
    crate::protocol::pb::UpdateType::from_str_name(name).map(|t| t as i32).filter(|&t| t != 0)
}

impl Delivery {
    /// Checks what types alone cannot; each refusal names its setting. That
    /// `conflate_above_bytes` fits the outbox is checked with the limits, in [`super::Config::validate`].
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if self.batch_size == 0 {
            return Err(invalid("delivery.batch_size", "must be at least 1"));
        }
        if self.inbox_capacity < 1024 {
            return Err(invalid("delivery.inbox_capacity", "must be at least 1024"));
        }
        if self.batch_interval > Duration::from_secs(1) {
            return Err(invalid("delivery.batch_interval", "must be at most 1s"));
        }
        if self.overload_interval > Duration::from_secs(2) {
            return Err(invalid("delivery.overload_interval", "must be at most 2s"));
        }
        let levels = zstd::compression_level_range();
        if !levels.contains(&self.compression_level) {
            return Err(invalid(
                "delivery.compression_level",
                format!("must be between {} and {}", levels.start(), levels.end()),
            ));
        }
        for entry in &self.zstd_dictionaries {
            if parse_update_type(&entry.r#type).is_none() {
                return Err(invalid(
                    "delivery.zstd_dictionaries",
                    format!("`{}` is not an update type (ROUTE, WEATHER, TRAFFIC, INCIDENT, POI)", entry.r#type),
                ));
            }
        }
        for name in &self.priority_types {
            if parse_update_type(name).is_none() {
                return Err(invalid(
                    "delivery.priority_types",
                    format!("`{name}` is not an update type (ROUTE, WEATHER, TRAFFIC, INCIDENT, POI)"),
                ));
            }
        }
        Ok(())
    }
}
