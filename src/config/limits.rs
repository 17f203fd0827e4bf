//! Safety limits (`[limits]`): the sizes, counts and times a client may take.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{invalid, ConfigError};

/// Safety limits. Exceeding one gets an `Error` reply or a close code, never a panic.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Largest WebSocket message (after reassembly of fragments) accepted from a client, in
    /// bytes; also the largest decompressed `zstd` envelope. Over it: close 1009.
    pub max_message_size: usize,
    /// Largest number of frames in one `ClientMessage`. Over it: close 4502.
    pub max_frames_per_message: usize,
    /// Largest number of subscriptions one connection holds. Over it: `Error` 413.
    pub max_subscriptions_per_connection: usize,
    /// Connections one shard holds; further upgrades are answered 503.
    pub max_connections_per_shard: usize,
    /// Connections the whole server holds; further upgrades are answered 503.
    pub max_connections: usize,
    /// Connections from one IP address; further upgrades are answered 503.
    pub max_connections_per_ip: usize,
    /// Largest HTTP request head (request line and headers), in bytes. Over it: 431.
    pub max_request_header_bytes: usize,
    /// Largest number of HTTP request headers. Over it: 431.
    pub max_request_headers: usize,
    /// Bytes queued for one connection. When full, queued lower-priority updates are dropped
    /// to make room for high-priority ones; when even those do not fit the connection is a
    /// slow consumer, closed with 4001.
    pub max_outbox_bytes: usize,
    /// Time a new socket has to send a complete HTTP request head.
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// Time an upgraded connection has to send `Connect`; then it is closed with 4004.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Longest channel name, in bytes.
    pub max_channel_length: usize,
    /// Largest publication payload, in bytes. Over it: `Error` 413.
    pub max_payload_size: usize,
    /// Channels the server keeps at once (split evenly between shards); a subscribe or publish
    /// that would create one more is refused with `Error` 503.
    pub max_channels: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_message_size: 64 * 1024,
            max_frames_per_message: 100,
            max_subscriptions_per_connection: 512,
            max_connections_per_shard: 50_000,
            max_connections: 1_000_000,
            // Carrier NAT puts many phones behind one address.
            max_connections_per_ip: 5000,
            max_request_header_bytes: 8192,
            max_request_headers: 32,
            max_outbox_bytes: 1024 * 1024,
            handshake_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(10),
            max_channel_length: 128,
            max_payload_size: 32 * 1024,
            max_channels: 1_000_000,
        }
    }
}

impl Limits {
    /// Checks what types alone cannot; each refusal names its setting.
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if !(1024..=64 * 1024 * 1024).contains(&self.max_message_size) {
            return Err(invalid("limits.max_message_size", "must be between 1024 and 67108864 bytes"));
        }
        if self.max_frames_per_message == 0 {
            return Err(invalid("limits.max_frames_per_message", "must be at least 1"));
        }
        if self.max_subscriptions_per_connection == 0 {
            return Err(invalid("limits.max_subscriptions_per_connection", "must be at least 1"));
        }
        if self.max_connections_per_shard == 0 {
            return Err(invalid("limits.max_connections_per_shard", "must be at least 1"));
        }
        if !(256..=1024 * 1024).contains(&self.max_request_header_bytes) {
            return Err(invalid("limits.max_request_header_bytes", "must be between 256 and 1048576"));
        }
        if !(4..=256).contains(&self.max_request_headers) {
            return Err(invalid("limits.max_request_headers", "must be between 4 and 256"));
        }
        if self.max_outbox_bytes < self.max_payload_size {
            return Err(invalid("limits.max_outbox_bytes", "must hold at least one payload (limits.max_payload_size)"));
        }
        if self.connect_timeout.is_zero() {
            return Err(invalid("limits.connect_timeout", "must be longer than zero"));
        }
        if self.handshake_timeout.is_zero() {
            return Err(invalid("limits.handshake_timeout", "must be longer than zero"));
        }
        if !(1..=1024).contains(&self.max_channel_length) {
            return Err(invalid("limits.max_channel_length", "must be between 1 and 1024"));
        }
        if self.max_payload_size == 0 || self.max_payload_size >= self.max_message_size {
            return Err(invalid("limits.max_payload_size", "must be above 0 and below limits.max_message_size"));
        }
        if self.max_channels == 0 {
            return Err(invalid("limits.max_channels", "must be at least 1"));
        }
        Ok(())
    }
}
