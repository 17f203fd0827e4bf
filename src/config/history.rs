//! History and recovery (`[history]`): what each channel remembers, and for how long.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{invalid, ConfigError};

/// What each channel remembers, and what a reconnecting client may recover.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct History {
    /// Publications kept per channel (0 = none: recovery always refused).
    pub size: usize,
    /// How long a publication stays in history.
    #[serde(with = "humantime_serde")]
    pub ttl: Duration,
    /// A recovery whose first missed publication is older than this is refused.
    #[serde(with = "humantime_serde")]
    pub recovery_window: Duration,
    /// Most publications one recovery carries; more missed: refused.
    pub max_recovery_messages: usize,
    /// A channel without subscribers or history is forgotten after this long unused (its
    /// next use starts a new epoch).
    #[serde(with = "humantime_serde")]
    pub channel_idle_ttl: Duration,
}

impl Default for History {
    fn default() -> Self {
        Self {
            size: 1000,
            ttl: Duration::from_secs(3600),
            recovery_window: Duration::from_secs(300),
            max_recovery_messages: 1000,
            channel_idle_ttl: Duration::from_secs(300),
        }
    }
}

impl History {
    /// Checks what types alone cannot; each refusal names its setting.
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if self.size > 1_000_000 {
            return Err(invalid("history.size", "at most 1000000 publications per channel"));
        }
        if self.ttl.is_zero() {
            return Err(invalid("history.ttl", "must be longer than zero"));
        }
        if self.recovery_window.is_zero() {
            return Err(invalid("history.recovery_window", "must be longer than zero"));
        }
        if self.channel_idle_ttl.is_zero() {
            return Err(invalid("history.channel_idle_ttl", "must be longer than zero"));
        }
        Ok(())
    }
}
