//! Acknowledged delivery (`[acks]`): resending what a subscriber has not acknowledged.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{invalid, ConfigError};

/// Subscriptions that ask for acknowledged delivery (`Subscribe.ack`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Acks {
    /// An update not acknowledged this long after it was sent is sent again.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Sends after the first before an update counts as failed.
    pub max_redeliveries: u32,
    /// Updates awaiting acknowledgement per subscription; beyond it the oldest fails.
    pub max_unacked: usize,
    /// Identities whose acknowledged position each channel remembers.
    pub max_positions_per_channel: usize,
}

impl Default for Acks {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(5),
            max_redeliveries: 3,
            max_unacked: 1000,
            max_positions_per_channel: 100_000,
        }
    }
}

impl Acks {
    /// Checks what types alone cannot; each refusal names its setting.
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if self.timeout < Duration::from_millis(10) {
            return Err(invalid("acks.timeout", "must be at least 10ms"));
        }
        if self.max_unacked == 0 {
            return Err(invalid("acks.max_unacked", "must be at least 1"));
        }
        Ok(())
    }
}
