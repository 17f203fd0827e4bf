//! The Redis broker (`[redis]`), used when `broker` is a Redis URL.

use serde::{Deserialize, Serialize};

use super::{invalid, ConfigError};

/// Settings of the Redis broker (used when `broker` is a Redis URL).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Redis {
    /// Prefix of every key and pub/sub channel the server uses.
    pub prefix: String,
    /// Consume backend publications from the list `<prefix>:queue` (encoded `Publish`
    /// messages). With several consuming nodes, items of one channel may be published out of
    /// list order; leave it on for one node only where that matters.
    pub queue_consumer: bool,
    /// This node's name for its in-flight list `<prefix>:queue:processing:<node_id>`, which it
    /// re-publishes at start after a crash; keep it stable across restarts. Empty: the host
    /// name and listen port.
    pub node_id: String,
    /// Trust that a restarted Redis lost nothing it acknowledged, so channels keep their
    /// epoch across its restarts. Only true when Redis writes every command to disk before
    /// answering (`appendonly yes`, `appendfsync always`) and no replica that may be behind can
    /// be promoted. False: a channel used after a Redis restart or failover starts a new
    /// epoch (subscribers are told `EPOCH_CHANGED`).
    pub trust_restarts: bool,
}

impl Default for Redis {
    fn default() -> Self {
        Self { prefix: "realtime".into(), queue_consumer: true, node_id: String::new(), trust_restarts: false }
    }
}

impl Redis {
    /// Checks what types alone cannot; each refusal names its setting. The URL itself
    /// (`broker`) is a top-level setting, checked in [`super::Config::validate`].
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if self.prefix.is_empty() || self.prefix.contains(['{', '}', ' ']) {
            return Err(invalid("redis.prefix", "must be non-empty, without braces or spaces"));
        }
        Ok(())
    }
}
