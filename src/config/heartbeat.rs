//! WebSocket heartbeats (`[heartbeat]`): pinging idle connections, closing silent ones.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{invalid, ConfigError};

/// WebSocket heartbeats (`[heartbeat]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Heartbeat {
    /// The server pings every connection this often.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// A connection nothing was heard from for this long is closed with 4005. Longer than
    /// `interval`.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

impl Default for Heartbeat {
    fn default() -> Self {
        // The timeout is three missed pings.
        Self { interval: Duration::from_secs(15), timeout: Duration::from_secs(45) }
    }
}

impl Heartbeat {
    /// Checks what types alone cannot; each refusal names its setting.
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if self.interval < Duration::from_millis(100) {
            return Err(invalid("heartbeat.interval", "must be at least 100ms"));
        }
        if self.timeout <= self.interval {
            return Err(invalid("heartbeat.timeout", "must be longer than heartbeat.interval"));
        }
        Ok(())
    }
}
