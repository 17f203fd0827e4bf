//! Rate limits (`[rate_limits]`): token buckets per connection, user, IP address and API key.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{invalid, ConfigError};

/// Rate limits (`[rate_limits]`). Over a limit a command gets `Error` 429 with
/// `retry_after_ms` and the connection stays; `max_refusals` refusals in a row close it
/// with 4504.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RateLimits {
    /// Apply the limits below.
    pub enabled: bool,
    /// Commands (Subscribe, Unsubscribe, History, Refresh, Ping) per connection.
    pub connection_commands: Bucket,
    /// Publishes per connection.
    pub connection_publishes: Bucket,
    /// Commands per user (token subject) over all their connections on this node.
    pub user_commands: Bucket,
    /// Publishes per user over all their connections on this node.
    pub user_publishes: Bucket,
    /// Refusals in a row after which the connection is closed with 4504.
    pub max_refusals: u32,
    /// New connections per client IP address; over it the request is answered 429.
    pub connection_attempts_per_ip: Bucket,
    /// Requests to the server API (`/api/…`) per key; over it the request is answered 429
    /// with `Retry-After`. A batch is one request.
    pub api_requests: Bucket,
}

impl Default for RateLimits {
    fn default() -> Self {
        Self {
            enabled: true,
            connection_commands: Bucket::new(100, 60, 20),
            connection_publishes: Bucket::new(100, 60, 20),
            user_commands: Bucket::new(300, 60, 60),
            user_publishes: Bucket::new(300, 60, 60),
            max_refusals: 50,
            connection_attempts_per_ip: Bucket::new(60, 60, 30),
            api_requests: Bucket::new(6000, 60, 1000),
        }
    }
}

/// One token bucket: `requests` per `window` on average, up to `burst` at once.
/// `requests = 0` turns the limit off.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Bucket {
    pub requests: u32,
    #[serde(with = "humantime_serde")]
    pub window: Duration,
    pub burst: u32,
}

impl Bucket {
    pub const fn new(requests: u32, window_secs: u64, burst: u32) -> Self {
        Self { requests, window: Duration::from_secs(window_secs), burst }
    }
}

impl RateLimits {
    /// Checks what types alone cannot; each refusal names its setting.
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        let buckets = [
            ("rate_limits.connection_commands", self.connection_commands),
            ("rate_limits.connection_publishes", self.connection_publishes),
            ("rate_limits.user_commands", self.user_commands),
            ("rate_limits.user_publishes", self.user_publishes),
            ("rate_limits.connection_attempts_per_ip", self.connection_attempts_per_ip),
            ("rate_limits.api_requests", self.api_requests),
        ];
        for (setting, bucket) in buckets {
            if bucket.requests > 0 && (bucket.window.is_zero() || bucket.burst == 0) {
                return Err(invalid(setting, "a limit needs a window longer than zero and a burst of at least 1"));
            }
        }
        Ok(())
    }
}
