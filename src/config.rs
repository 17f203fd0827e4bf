//! The server's one configuration: embedded defaults, then a TOML file, then `ROUTOPIA_*`
//! environment variables, then command-line flags (each layer wins over the one before).
//!
//! Nested settings take a double underscore in the environment:
//! `ROUTOPIA_LIMITS__MAX_MESSAGE_SIZE=131072` sets `[limits] max_message_size`.
//! Unknown keys are refused, so a typo never silently falls back to a default.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};

mod api;
pub mod reload;
mod security;
pub use api::Api;
pub use security::{Auth, AuthMode, Bucket, Cleanup, Heartbeat, RateLimits, Tls};

/// Everything the server can be told. Every field documents its default.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address every shard listens on (HTTP and WebSocket share it). Default `0.0.0.0:3000`.
    pub listen: SocketAddr,
    /// A second address serving only `/metrics` and `/health` (e.g. `127.0.0.1:9090`), for a
    /// scraper that should not reach the public port. Default none (`/metrics` is on `listen`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics_listen: Option<SocketAddr>,
    /// Number of shards (threads, each with its own runtime and listener). Default 0 = one per core.
    pub shards: usize,
    /// I/O driver: `auto` (io_uring where the kernel allows it, else epoll), `io_uring` or `epoll`.
    /// Default `auto`.
    pub driver: Driver,
    /// Pin each shard thread to one core (shard i on core i mod cores). Default true.
    pub pin_shards: bool,
    /// Log filter (`error`, `warn`, `info`, `debug`, `trace`, or a tracing directive list such
    /// as `warn,routopia_realtime=debug`). Default `info`. `RUST_LOG` sets it too, between the
    /// file and `ROUTOPIA_LOG_LEVEL` (see [`Config::load`]).
    pub log_level: String,
    /// Log format: `pretty` for a terminal, `json` for production. Default `pretty`.
    pub log_format: LogFormat,
    /// On SIGTERM, how long connections get to take what is queued for them and their
    /// `Disconnect` before the rest are cut and the process exits. Default `10s`.
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    /// Safety limits, all on by default.
    pub limits: Limits,
    /// Delivery tuning.
    pub delivery: Delivery,
    /// History and recovery.
    pub history: History,
    /// Acknowledged delivery.
    pub acks: Acks,
    /// Where channels live: `memory` (embedded, one process) or a Redis URL such as
    /// `redis://127.0.0.1:6379/0` (nodes sharing it behave as one server). Default `memory`.
    pub broker: String,
    /// The Redis broker.
    pub redis: Redis,
    /// Who may connect, and to what.
    pub auth: Auth,
    /// Requests per connection, user and IP address.
    pub rate_limits: RateLimits,
    /// Liveness checks of idle connections.
    pub heartbeat: Heartbeat,
    /// Forgetting departed clients.
    pub cleanup: Cleanup,
    /// `wss://`.
    pub tls: Tls,
    /// The HTTP API for backends (`/api/…`).
    pub api: Api,
    /// Aids for testing the server itself, all off by default; not for production.
    pub testing: Testing,
}

/// Aids for testing the server itself (`[testing]`). A restart applies a change.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Testing {
    /// Serve `/echo`: a WebSocket endpoint that sends every text and binary message back as
    /// it came, for WebSocket conformance suites (Autobahn). It takes the same path as `/ws`
    /// (admission, handshake, framing, limits, close handshake) with no protocol session
    /// behind it. Default false: `/echo` answers 404 like any unknown path.
    pub echo_endpoint: bool,
    /// Every shard paces its writes as a busy one does, whatever its load: the linger stays
    /// at `delivery.batch_interval`, so a connection writes at most once per linger and its
    /// updates leave in batches at its pacing ticks. Lets tests exercise the paced path on an
    /// idle machine. Default false: the linger follows the load.
    pub always_linger: bool,
}

/// Settings of the Redis broker (used when `broker` is a Redis URL).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Redis {
    /// Prefix of every key and pub/sub channel the server uses. Default `realtime`.
    pub prefix: String,
    /// Consume backend publications from the list `<prefix>:queue` (encoded `Publish`
    /// messages). With several consuming nodes, items of one channel may be published out of
    /// list order; leave it on for one node only where that matters. Default true.
    pub queue_consumer: bool,
    /// This node's name for its in-flight list `<prefix>:queue:processing:<node_id>`, which it
    /// re-publishes at start after a crash; keep it stable across restarts. Default: the host
    /// name and listen port.
    pub node_id: String,
    /// Trust that a restarted Redis lost nothing it acknowledged, so channels keep their
    /// epoch across its restarts. Only true when Redis writes every command to disk before
    /// answering (`appendonly yes`, `appendfsync always`) and no replica that may be behind can
    /// be promoted. False: a channel used after a Redis restart or failover starts a new
    /// epoch (subscribers are told `EPOCH_CHANGED`). Default false.
    pub trust_restarts: bool,
}

impl Default for Redis {
    fn default() -> Self {
        Self { prefix: "realtime".into(), queue_consumer: true, node_id: String::new(), trust_restarts: false }
    }
}

/// Safety limits. Exceeding one gets an `Error` reply or a close code, never a panic.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Largest WebSocket message (after reassembly of fragments) accepted from a client, in
    /// bytes; also the largest decompressed `zstd` envelope. Over it: close 1009. Default 65536.
    pub max_message_size: usize,
    /// Largest number of frames in one `ClientMessage`. Over it: close 4502. Default 100.
    pub max_frames_per_message: usize,
    /// Largest number of subscriptions one connection holds. Over it: `Error` 413. Default 512.
    pub max_subscriptions_per_connection: usize,
    /// Connections one shard holds; further upgrades are answered 503. Default 50000.
    pub max_connections_per_shard: usize,
    /// Connections the whole server holds; further upgrades are answered 503. Default 1000000.
    pub max_connections: usize,
    /// Connections from one IP address; further upgrades are answered 503. Default 5000
    /// (carrier NAT puts many phones behind one address).
    pub max_connections_per_ip: usize,
    /// Largest HTTP request head (request line and headers), in bytes. Over it: 431. Default 8192.
    pub max_request_header_bytes: usize,
    /// Largest number of HTTP request headers. Over it: 431. Default 32.
    pub max_request_headers: usize,
    /// Bytes queued for one connection. When full, queued lower-priority updates are dropped
    /// to make room for high-priority ones; when even those do not fit the connection is a
    /// slow consumer, closed with 4001. Default 1048576 (1 MiB).
    pub max_outbox_bytes: usize,
    /// Time a new socket has to send a complete HTTP request head. Default `10s`.
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// Time an upgraded connection has to send `Connect`; then it is closed with 4004.
    /// Default `10s`.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Longest channel name, in bytes. Default 128.
    pub max_channel_length: usize,
    /// Largest publication payload, in bytes. Over it: `Error` 413. Default 32768.
    pub max_payload_size: usize,
    /// Channels the server keeps at once (split evenly between shards); a subscribe or publish
    /// that would create one more is refused with `Error` 503. Default 1000000.
    pub max_channels: usize,
}

/// How updates leave the server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Delivery {
    /// Most frames packed into one WebSocket message while a write is in flight. Default 100.
    pub batch_size: usize,
    /// Capacity of each shard's inbox (messages from other shards). Default 65536.
    pub inbox_capacity: usize,
    /// Update types that are never conflated or dropped for a slow connection, and leave its
    /// queue ahead of the others. Default `["ROUTE", "WEATHER"]`.
    pub priority_types: Vec<String>,
    /// Past this many queued bytes, a lower-priority update replaces a queued one with the
    /// same subscription and `key` (conflation). Default 262144 (a quarter of the outbox).
    pub conflate_above_bytes: usize,
    /// Longest a busy connection's updates wait to leave together. A connection whose socket
    /// is idle sends at once; while its shard is loaded, its writes are spaced up to this far
    /// apart so that each carries more updates (see "Adaptive batching"). Default `50ms`.
    #[serde(with = "humantime_serde")]
    pub batch_interval: Duration,
    /// Longest the linger may grow to while a shard stays overloaded at `batch_interval`
    /// (its writes are then already spaced by how long a round over its connections takes,
    /// and every write costs the kernel the same whatever it carries). At most
    /// `batch_interval`: never linger past it. Default `600ms`.
    #[serde(with = "humantime_serde")]
    pub overload_interval: Duration,
    /// A `ServerMessage` of at least this many bytes goes out zstd-compressed to a client that
    /// accepts zstd (0: never compress). Default 1024.
    pub compression_threshold: usize,
    /// zstd level (1 fastest .. 19; negative: faster still). Default 1.
    pub compression_level: i32,
    /// Trained zstd dictionaries, at most one per update type:
    /// `[{ type = "ROUTE", file = "/etc/routopia-realtime/route.dict" }]`. Default none.
    pub zstd_dictionaries: Vec<DictionaryFile>,
}

/// A zstd dictionary for one update type (made by `routopia-realtime train-dict`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DictionaryFile {
    pub r#type: String,
    pub file: std::path::PathBuf,
}

/// The wire number of an update type named as in the protocol (`ROUTE`, ...).
pub fn parse_update_type(name: &str) -> Option<i32> {
    crate::protocol::pb::UpdateType::from_str_name(name).map(|t| t as i32).filter(|&t| t != 0)
}

/// What each channel remembers, and what a reconnecting client may recover.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct History {
    /// Publications kept per channel (0 = none: recovery always refused). Default 1000.
    pub size: usize,
    /// How long a publication stays in history. Default `1h`.
    #[serde(with = "humantime_serde")]
    pub ttl: Duration,
    /// A recovery whose first missed publication is older than this is refused. Default `5m`.
    #[serde(with = "humantime_serde")]
    pub recovery_window: Duration,
    /// Most publications one recovery carries; more missed: refused. Default 1000.
    pub max_recovery_messages: usize,
    /// A channel without subscribers or history is forgotten after this long unused (its
    /// next use starts a new epoch). Default `5m`.
    #[serde(with = "humantime_serde")]
    pub channel_idle_ttl: Duration,
}

/// Subscriptions that ask for acknowledged delivery (`Subscribe.ack`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Acks {
    /// An update not acknowledged this long after it was sent is sent again. Default `5s`.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Sends after the first before an update counts as failed. Default 3.
    pub max_redeliveries: u32,
    /// Updates awaiting acknowledgement per subscription; beyond it the oldest fails. Default 1000.
    pub max_unacked: usize,
    /// Identities whose acknowledged position each channel remembers. Default 100000.
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

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Driver {
    Auto,
    IoUring,
    Epoll,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    Pretty,
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;

    fn from_str(name: &str) -> Result<Self, String> {
        match name {
            "pretty" => Ok(LogFormat::Pretty),
            "json" => Ok(LogFormat::Json),
            _ => Err(format!("`{name}` is not a log format (pretty, json)")),
        }
    }
}

/// The directive `--debug` adds to the log filter: this server's own events at `debug`
/// (each frame in and out), other crates at the level the filter gives them.
pub const DEBUG_DIRECTIVE: &str = "routopia_realtime=debug";

/// `filter` with [`DEBUG_DIRECTIVE`] added.
pub fn with_debug(filter: &str) -> String {
    match filter.trim() {
        "" => DEBUG_DIRECTIVE.to_owned(),
        filter => format!("{filter},{DEBUG_DIRECTIVE}"),
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 3000)),
            metrics_listen: None,
            shards: 0,
            driver: Driver::Auto,
            pin_shards: true,
            log_level: "info".into(),
            log_format: LogFormat::Pretty,
            shutdown_timeout: Duration::from_secs(10),
            limits: Limits::default(),
            delivery: Delivery::default(),
            history: History::default(),
            acks: Acks::default(),
            broker: "memory".into(),
            redis: Redis::default(),
            auth: Auth::default(),
            rate_limits: RateLimits::default(),
            heartbeat: Heartbeat::default(),
            cleanup: Cleanup::default(),
            tls: Tls::default(),
            api: Api::default(),
            testing: Testing::default(),
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_message_size: 64 * 1024,
            max_frames_per_message: 100,
            max_subscriptions_per_connection: 512,
            max_connections_per_shard: 50_000,
            max_connections: 1_000_000,
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

impl Default for Delivery {
    fn default() -> Self {
        Self {
            batch_size: 100,
            inbox_capacity: 65536,
            priority_types: vec!["ROUTE".into(), "WEATHER".into()],
            conflate_above_bytes: 256 * 1024,
            batch_interval: Duration::from_millis(50),
            overload_interval: Duration::from_millis(600),
            compression_threshold: 1024,
            compression_level: 1,
            zstd_dictionaries: Vec::new(),
        }
    }
}

/// Why a configuration was refused. The message always names the setting.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{0}")]
    Load(#[from] Box<figment::Error>),
    #[error("invalid setting `{setting}`: {reason}")]
    Invalid { setting: &'static str, reason: String },
    #[error("config file {0} does not exist")]
    MissingFile(String),
    /// A reload's settings do not fit the running values of the settings that need a restart.
    #[error("{0} (with the running values of the settings that need a restart)")]
    WithRunning(Box<ConfigError>),
}

/// Values given on the command line; `None` leaves the lower layers in charge.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Overrides {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<SocketAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics_listen: Option<SocketAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shards: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_level: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_format: Option<LogFormat>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub broker: Option<String>,
    /// `--debug`: add [`DEBUG_DIRECTIVE`] to whichever log filter the layers give.
    #[serde(skip)]
    pub debug: bool,
}

impl Config {
    /// Builds the effective configuration from every layer and validates it.
    ///
    /// The log filter takes `RUST_LOG` as well, the usual place for a Rust program's: it wins
    /// over the file and loses to `ROUTOPIA_LOG_LEVEL`, which names this server's setting, and
    /// to `--log-level`. `--debug` then adds [`DEBUG_DIRECTIVE`] to whichever filter won.
    pub fn load(file: Option<&Path>, overrides: &Overrides) -> Result<Self, ConfigError> {
        let rust_log = std::env::var("RUST_LOG").ok();
        Self::load_with_rust_log(file, overrides, rust_log.as_deref())
    }

    /// [`Config::load`] with `RUST_LOG` given rather than read.
    fn load_with_rust_log(
        file: Option<&Path>,
        overrides: &Overrides,
        rust_log: Option<&str>,
    ) -> Result<Self, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(path) = file {
            if !path.exists() {
                return Err(ConfigError::MissingFile(path.display().to_string()));
            }
            figment = figment.merge(Toml::file_exact(path));
        }
        if let Some(filter) = rust_log.filter(|filter| !filter.trim().is_empty()) {
            if let Err(err) = tracing_subscriber::EnvFilter::try_new(filter) {
                let reason = format!("not a log filter: {err}");
                return Err(ConfigError::Invalid { setting: "RUST_LOG", reason });
            }
            figment = figment.merge(Serialized::default("log_level", filter));
        }
        figment = figment.merge(Env::prefixed("ROUTOPIA_").split("__")).merge(Serialized::defaults(overrides));
        let mut config: Config = figment.extract().map_err(Box::new)?;
        if overrides.debug {
            config.log_level = with_debug(&config.log_level);
        }
        config.validate()?;
        Ok(config)
    }

    /// Checks what types alone cannot; each refusal names its setting.
    pub fn validate(&self) -> Result<(), ConfigError> {
        fn invalid(setting: &'static str, reason: impl Into<String>) -> ConfigError {
            ConfigError::Invalid { setting, reason: reason.into() }
        }
        let l = &self.limits;
        if self.metrics_listen.is_some_and(|addr| addr == self.listen && addr.port() != 0) {
            return Err(invalid("metrics_listen", "must differ from `listen` (/metrics is served there already)"));
        }
        if self.shards > 256 {
            return Err(invalid("shards", "at most 256 shards"));
        }
        if !(1024..=64 * 1024 * 1024).contains(&l.max_message_size) {
            return Err(invalid("limits.max_message_size", "must be between 1024 and 67108864 bytes"));
        }
        if l.max_frames_per_message == 0 {
            return Err(invalid("limits.max_frames_per_message", "must be at least 1"));
        }
        if l.max_subscriptions_per_connection == 0 {
            return Err(invalid("limits.max_subscriptions_per_connection", "must be at least 1"));
        }
        if l.max_connections_per_shard == 0 {
            return Err(invalid("limits.max_connections_per_shard", "must be at least 1"));
        }
        if !(256..=1024 * 1024).contains(&l.max_request_header_bytes) {
            return Err(invalid("limits.max_request_header_bytes", "must be between 256 and 1048576"));
        }
        if !(4..=256).contains(&l.max_request_headers) {
            return Err(invalid("limits.max_request_headers", "must be between 4 and 256"));
        }
        if l.max_outbox_bytes < l.max_payload_size {
            return Err(invalid("limits.max_outbox_bytes", "must hold at least one payload (limits.max_payload_size)"));
        }
        if l.connect_timeout.is_zero() {
            return Err(invalid("limits.connect_timeout", "must be longer than zero"));
        }
        if l.handshake_timeout.is_zero() {
            return Err(invalid("limits.handshake_timeout", "must be longer than zero"));
        }
        if !(1..=1024).contains(&l.max_channel_length) {
            return Err(invalid("limits.max_channel_length", "must be between 1 and 1024"));
        }
        if l.max_payload_size == 0 || l.max_payload_size >= l.max_message_size {
            return Err(invalid("limits.max_payload_size", "must be above 0 and below limits.max_message_size"));
        }
        if l.max_channels == 0 {
            return Err(invalid("limits.max_channels", "must be at least 1"));
        }
        if self.delivery.batch_size == 0 {
            return Err(invalid("delivery.batch_size", "must be at least 1"));
        }
        if self.delivery.inbox_capacity < 1024 {
            return Err(invalid("delivery.inbox_capacity", "must be at least 1024"));
        }
        if self.delivery.batch_interval > Duration::from_secs(1) {
            return Err(invalid("delivery.batch_interval", "must be at most 1s"));
        }
        if self.delivery.overload_interval > Duration::from_secs(2) {
            return Err(invalid("delivery.overload_interval", "must be at most 2s"));
        }
        let levels = zstd::compression_level_range();
        if !levels.contains(&self.delivery.compression_level) {
            return Err(invalid(
                "delivery.compression_level",
                format!("must be between {} and {}", levels.start(), levels.end()),
            ));
        }
        for entry in &self.delivery.zstd_dictionaries {
            if parse_update_type(&entry.r#type).is_none() {
                return Err(invalid(
                    "delivery.zstd_dictionaries",
                    format!("`{}` is not an update type (ROUTE, WEATHER, TRAFFIC, INCIDENT, POI)", entry.r#type),
                ));
            }
        }
        for name in &self.delivery.priority_types {
            if parse_update_type(name).is_none() {
                return Err(invalid(
                    "delivery.priority_types",
                    format!("`{name}` is not an update type (ROUTE, WEATHER, TRAFFIC, INCIDENT, POI)"),
                ));
            }
        }
        if self.delivery.conflate_above_bytes > l.max_outbox_bytes {
            return Err(invalid("delivery.conflate_above_bytes", "must not exceed limits.max_outbox_bytes"));
        }
        self.validate_security()?;
        self.validate_api()?;
        let h = &self.history;
        if h.size > 1_000_000 {
            return Err(invalid("history.size", "at most 1000000 publications per channel"));
        }
        if h.ttl.is_zero() {
            return Err(invalid("history.ttl", "must be longer than zero"));
        }
        if h.recovery_window.is_zero() {
            return Err(invalid("history.recovery_window", "must be longer than zero"));
        }
        if h.channel_idle_ttl.is_zero() {
            return Err(invalid("history.channel_idle_ttl", "must be longer than zero"));
        }
        if self.acks.timeout < Duration::from_millis(10) {
            return Err(invalid("acks.timeout", "must be at least 10ms"));
        }
        if self.acks.max_unacked == 0 {
            return Err(invalid("acks.max_unacked", "must be at least 1"));
        }
        if let Some(url) = self.redis_url() {
            if let Err(err) = redis::IntoConnectionInfo::into_connection_info(url) {
                return Err(invalid("broker", format!("not a Redis URL: {err}")));
            }
        } else if self.broker != "memory" {
            return Err(invalid("broker", "must be `memory` or a `redis://` URL"));
        }
        if self.redis.prefix.is_empty() || self.redis.prefix.contains(['{', '}', ' ']) {
            return Err(invalid("redis.prefix", "must be non-empty, without braces or spaces"));
        }
        if self.shutdown_timeout.is_zero() || self.shutdown_timeout > Duration::from_secs(3600) {
            return Err(invalid("shutdown_timeout", "must be longer than zero and at most 1h"));
        }
        if let Err(err) = tracing_subscriber::EnvFilter::try_new(&self.log_level) {
            return Err(invalid("log_level", format!("not a log filter: {err}")));
        }
        Ok(())
    }

    fn validate_security(&self) -> Result<(), ConfigError> {
        fn invalid(setting: &'static str, reason: impl Into<String>) -> ConfigError {
            ConfigError::Invalid { setting, reason: reason.into() }
        }
        let a = &self.auth;
        for file in &a.public_key_files {
            if !file.is_file() {
                return Err(invalid("auth.public_key_files", format!("{} is not a readable file", file.display())));
            }
        }
        if !a.hmac_secret.is_empty() && a.hmac_secret.len() < 32 {
            return Err(invalid("auth.hmac_secret", "must be at least 32 bytes (256 bits) long"));
        }
        if a.expiry_grace > Duration::from_secs(3600) {
            return Err(invalid("auth.expiry_grace", "at most 1h"));
        }
        if !(Duration::from_secs(60)..=security::MAX_TOKEN_LIFETIME_LIMIT).contains(&a.max_token_lifetime) {
            return Err(invalid("auth.max_token_lifetime", "between 1m and 100years"));
        }
        for pattern in a.default_subscribe.iter().chain(&a.default_publish) {
            if let Err(err) = crate::core::ChannelPattern::parse(pattern) {
                return Err(invalid("auth.default_subscribe/default_publish", format!("`{pattern}`: {err}")));
            }
        }
        let r = &self.rate_limits;
        let buckets = [
            ("rate_limits.connection_commands", r.connection_commands),
            ("rate_limits.connection_publishes", r.connection_publishes),
            ("rate_limits.user_commands", r.user_commands),
            ("rate_limits.user_publishes", r.user_publishes),
            ("rate_limits.connection_attempts_per_ip", r.connection_attempts_per_ip),
            ("rate_limits.api_requests", r.api_requests),
        ];
        for (setting, bucket) in buckets {
            if bucket.requests > 0 && (bucket.window.is_zero() || bucket.burst == 0) {
                return Err(invalid(setting, "a limit needs a window longer than zero and a burst of at least 1"));
            }
        }
        let h = &self.heartbeat;
        if h.interval < Duration::from_millis(100) {
            return Err(invalid("heartbeat.interval", "must be at least 100ms"));
        }
        if h.timeout <= h.interval {
            return Err(invalid("heartbeat.timeout", "must be longer than heartbeat.interval"));
        }
        if self.cleanup.interval.is_zero() {
            return Err(invalid("cleanup.interval", "must be longer than zero"));
        }
        if self.tls.cert_file.as_os_str().is_empty() != self.tls.key_file.as_os_str().is_empty() {
            return Err(invalid("tls", "set both tls.cert_file and tls.key_file, or neither"));
        }
        Ok(())
    }

    fn validate_api(&self) -> Result<(), ConfigError> {
        fn invalid(setting: &'static str, reason: impl Into<String>) -> ConfigError {
            ConfigError::Invalid { setting, reason: reason.into() }
        }
        let a = &self.api;
        if a.keys.iter().any(|key| key.len() < api::MIN_KEY_BYTES) {
            return Err(invalid("api.keys", format!("each key must be at least {} bytes", api::MIN_KEY_BYTES)));
        }
        if a.keys.iter().any(|key| key.bytes().any(|b| !b.is_ascii_graphic())) {
            return Err(invalid("api.keys", "keys are printable ASCII without spaces (they travel in a header)"));
        }
        if let Some(addr) = a.listen.filter(|addr| addr.port() != 0) {
            if addr == self.listen || Some(addr) == self.metrics_listen {
                return Err(invalid("api.listen", "must differ from `listen` and `metrics_listen`"));
            }
        }
        if !(1024..=64 * 1024 * 1024).contains(&a.max_body_bytes) {
            return Err(invalid("api.max_body_bytes", "must be between 1024 and 67108864 bytes"));
        }
        if !(1..=100_000).contains(&a.max_batch_publications) {
            return Err(invalid("api.max_batch_publications", "must be between 1 and 100000"));
        }
        Ok(())
    }

    /// The Redis URL when the broker is Redis.
    pub fn redis_url(&self) -> Option<&str> {
        (self.broker.starts_with("redis://") || self.broker.starts_with("rediss://")).then_some(self.broker.as_str())
    }

    /// Shards to start: the configured number, or one per core.
    pub fn shard_count(&self) -> usize {
        if self.shards > 0 {
            self.shards
        } else {
            std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
        }
    }

    /// The effective configuration as TOML, as `check-config` prints it. A secret is shown
    /// as set, never its value: `ExecStartPre` prints this into the journal.
    pub fn to_toml(&self) -> String {
        let mut shown = self.clone();
        if !shown.auth.hmac_secret.is_empty() {
            shown.auth.hmac_secret = "(set, hidden)".into();
        }
        for key in &mut shown.api.keys {
            *key = "(set, hidden)".into();
        }
        toml::to_string_pretty(&shown).unwrap_or_else(|err| format!("# cannot render config: {err}\n"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        Config::default().validate().unwrap();
    }

    #[test]
    fn invalid_value_names_its_setting() {
        let mut config = Config::default();
        config.delivery.batch_size = 0;
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("delivery.batch_size"), "{err}");
        let mut config = Config::default();
        config.delivery.overload_interval = Duration::from_secs(3);
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("delivery.overload_interval"), "{err}");
    }

    #[test]
    fn log_filter_layers_flag_over_rust_log_over_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("config.toml");
        std::fs::write(&file, "log_level = \"error\"\nlog_format = \"json\"\n").unwrap();
        let none = Overrides::default();
        let from_file = Config::load_with_rust_log(Some(&file), &none, None).unwrap();
        assert_eq!((from_file.log_level.as_str(), from_file.log_format), ("error", LogFormat::Json));
        let rust_log = Config::load_with_rust_log(Some(&file), &none, Some("warn")).unwrap();
        assert_eq!(rust_log.log_level, "warn", "RUST_LOG wins over the file");
        let blank = Config::load_with_rust_log(Some(&file), &none, Some(" ")).unwrap();
        assert_eq!(blank.log_level, "error", "an empty RUST_LOG is no filter");
        let flags = Overrides { log_level: Some("info".into()), log_format: Some(LogFormat::Pretty), ..none };
        let flagged = Config::load_with_rust_log(Some(&file), &flags, Some("warn")).unwrap();
        assert_eq!((flagged.log_level.as_str(), flagged.log_format), ("info", LogFormat::Pretty), "flags win");
    }

    #[test]
    fn debug_flag_adds_this_servers_debug_to_the_winning_filter() {
        let debug = Overrides { debug: true, ..Overrides::default() };
        let config = Config::load_with_rust_log(None, &debug, Some("warn")).unwrap();
        assert_eq!(config.log_level, "warn,routopia_realtime=debug");
        let both = Overrides { log_level: Some("error".into()), ..debug };
        assert_eq!(Config::load_with_rust_log(None, &both, None).unwrap().log_level, "error,routopia_realtime=debug");
        assert_eq!(with_debug(""), "routopia_realtime=debug");
    }

    #[test]
    fn a_bad_rust_log_is_refused_by_name() {
        let err = Config::load_with_rust_log(None, &Overrides::default(), Some("routopia_realtime=loud"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("RUST_LOG"), "{err}");
    }

    #[test]
    fn log_format_names_parse() {
        assert_eq!("json".parse::<LogFormat>(), Ok(LogFormat::Json));
        assert_eq!("pretty".parse::<LogFormat>(), Ok(LogFormat::Pretty));
        assert!("yaml".parse::<LogFormat>().unwrap_err().contains("pretty, json"));
    }

    #[test]
    fn rendered_config_parses_back() {
        let config = Config::default();
        let parsed: Config = toml::from_str(&config.to_toml()).unwrap();
        assert_eq!(parsed, config);
    }
}
