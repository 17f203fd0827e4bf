//! Forgetting departed clients (`[cleanup]`): sweeping their buckets and their acknowledged
//! positions.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{invalid, ConfigError};

/// Forgetting the state of clients that left (`[cleanup]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Cleanup {
    /// How often per-user and per-IP state of departed clients is swept.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// An identity's acknowledged position on a channel that it has not acknowledged for this
    /// long is forgotten (its next acknowledged subscription starts from the channel's
    /// latest). With Redis, a channel's positions expire together, this long after its last
    /// acknowledgement.
    #[serde(with = "humantime_serde")]
    pub max_inactive: Duration,
}

impl Default for Cleanup {
    fn default() -> Self {
        Self { interval: Duration::from_secs(30), max_inactive: Duration::from_secs(24 * 3600) }
    }
}

impl Cleanup {
    /// Checks what types alone cannot; each refusal names its setting.
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if self.interval.is_zero() {
            return Err(invalid("cleanup.interval", "must be longer than zero"));
        }
        Ok(())
    }
}
