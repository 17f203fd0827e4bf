//! The limits a session enforces and the rate limits it draws from, copied from the config.

use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use crate::acks::AckPolicy;
use crate::auth::Verifier;
use crate::compression::ZstdSettings;
use crate::config::{Bucket, Config};
use crate::metrics::LocalMetrics;
use crate::protocol::pb;
use crate::ratelimit::KeyedBuckets;

/// The limits a session enforces, copied from the config.
#[derive(Debug, Clone)]
pub struct SessionLimits {
    pub max_message_size: usize,
    pub max_frames_per_message: usize,
    pub max_subscriptions: usize,
    pub max_outbox_bytes: usize,
    pub max_channel_length: usize,
    pub max_payload_size: usize,
    pub batch_size: usize,
    pub acks: Rc<AckPolicy>,
    pub connect_timeout: Duration,
    /// `None`: auth is disabled and every client may do everything.
    pub verifier: Option<Arc<Verifier>>,
    pub refresh_reminder: Duration,
    pub expiry_grace: Duration,
    /// Clock skew allowed around `exp` (`auth.leeway`): a token counts as expired from
    /// `exp + leeway`, as at `Connect`.
    pub leeway: Duration,
    pub ping_interval: Duration,
    pub heartbeat_timeout: Duration,
    /// `None`: rate limits are off.
    pub rate_limits: Option<RatePolicy>,
    /// Bit `t` set: update type `t` is high priority.
    pub priority_types: u32,
    pub conflate_above_bytes: usize,
    /// Compression of large messages for clients that accept zstd.
    pub zstd: Arc<ZstdSettings>,
    /// The shard's tallies (shared by its sessions, read by nothing else).
    pub metrics: Rc<LocalMetrics>,
}

/// Which buckets a session takes tokens from.
#[derive(Clone)]
pub struct RatePolicy {
    pub commands: Bucket,
    pub publishes: Bucket,
    /// Per-user buckets shared by every shard: `[commands, publishes]`.
    pub users: Arc<KeyedBuckets<Arc<str>, 2>>,
    pub max_refusals: u32,
}

impl std::fmt::Debug for RatePolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RatePolicy").field("commands", &self.commands).field("publishes", &self.publishes).finish()
    }
}

/// Which bucket a command draws from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RateClass {
    Command = 0,
    Publish = 1,
}

impl SessionLimits {
    /// The limits of `config`; `verifier` and `users` are shared by every shard.
    pub fn from_config(
        config: &Config,
        verifier: Option<Arc<Verifier>>,
        users: Arc<KeyedBuckets<Arc<str>, 2>>,
    ) -> Self {
        let l = &config.limits;
        let r = &config.rate_limits;
        let priority_types = config
            .delivery
            .priority_types
            .iter()
            .filter_map(|name| pb::UpdateType::from_str_name(name))
            .fold(0u32, |bits, t| bits | 1 << (t as u32 & 31));
        Self {
            max_message_size: l.max_message_size,
            max_frames_per_message: l.max_frames_per_message,
            max_subscriptions: l.max_subscriptions_per_connection,
            max_outbox_bytes: l.max_outbox_bytes,
            max_channel_length: l.max_channel_length,
            max_payload_size: l.max_payload_size,
            batch_size: config.delivery.batch_size,
            acks: Rc::new(crate::acks::AckPolicy::from_config(config)),
            connect_timeout: l.connect_timeout,
            verifier,
            refresh_reminder: config.auth.refresh_reminder,
            expiry_grace: config.auth.expiry_grace,
            leeway: config.auth.leeway,
            ping_interval: config.heartbeat.interval,
            heartbeat_timeout: config.heartbeat.timeout,
            rate_limits: r.enabled.then_some(RatePolicy {
                commands: r.connection_commands,
                publishes: r.connection_publishes,
                users,
                max_refusals: r.max_refusals,
            }),
            priority_types,
            conflate_above_bytes: config.delivery.conflate_above_bytes,
            // Dictionaries are files: the server loads them once and sets them here.
            zstd: Arc::new(ZstdSettings {
                threshold: config.delivery.compression_threshold,
                level: config.delivery.compression_level,
                dictionaries: Vec::new(),
            }),
            // The shard sets its own, shared by its sessions.
            metrics: Rc::default(),
        }
    }
}
