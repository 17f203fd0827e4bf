//! The server's one configuration: embedded defaults, then a TOML file, then `ROUTOPIA_*`
//! environment variables, then command-line flags (each layer wins over the one before).
//!
//! Nested settings take a double underscore in the environment:
//! `ROUTOPIA_LIMITS__MAX_MESSAGE_SIZE=131072` sets `[limits] max_message_size`.
//! Unknown keys are refused, so a typo never silently falls back to a default.
//!
//! This file holds the top-level settings, loading, errors, and the checks between settings of
//! different sections. Each section (`[limits]`, `[delivery]`, ...) has a file of its own with
//! its struct, its `Default` right below it, and its own `validate`. A default is written once,
//! in that `Default`: doc comments say what a setting and its special values mean, never which
//! value is the default (the README's configuration table lists them for operators;
//! `check-config` prints them).

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};

mod acks;
mod api;
mod auth;
mod cleanup;
mod delivery;
mod heartbeat;
mod history;
mod limits;
mod rate_limits;
mod redis;
pub mod reload;
mod testing;
mod tls;

pub use self::redis::Redis;
pub use acks::Acks;
pub use api::Api;
pub use auth::{Auth, AuthMode};
pub use cleanup::Cleanup;
pub use delivery::{parse_update_type, Delivery, DictionaryFile};
pub use heartbeat::Heartbeat;
pub use history::History;
pub use limits::Limits;
pub use rate_limits::{Bucket, RateLimits};
pub use testing::Testing;
pub use tls::Tls;

/// Everything the server can be told: the top-level settings, then one field per section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address every shard listens on (HTTP and WebSocket share it).
    pub listen: SocketAddr,
    /// A second address serving only `/metrics` and `/health` (e.g. `127.0.0.1:9090`), for a
    /// scraper that should not reach the public port. None: `/metrics` is on `listen`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics_listen: Option<SocketAddr>,
    /// Number of shards (threads, each with its own runtime and listener); 0: one per core.
    pub shards: usize,
    /// I/O driver: `auto` (io_uring where the kernel allows it, else epoll), `io_uring` or `epoll`.
    pub driver: Driver,
    /// Pin each shard thread to one core (shard i on core i mod cores).
    pub pin_shards: bool,
    /// Log filter (`error`, `warn`, `info`, `debug`, `trace`, or a tracing directive list such
    /// as `warn,routopia_realtime=debug`). `RUST_LOG` sets it too, between the file and
    /// `ROUTOPIA_LOG_LEVEL` (see [`Config::load`]).
    pub log_level: String,
    /// Log format: `pretty` for a terminal, `json` for production.
    pub log_format: LogFormat,
    /// On SIGTERM, how long connections get to take what is queued for them and their
    /// `Disconnect` before the rest are cut and the process exits.
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    /// Safety limits.
    pub limits: Limits,
    /// Delivery tuning.
    pub delivery: Delivery,
    /// History and recovery.
    pub history: History,
    /// Acknowledged delivery.
    pub acks: Acks,
    /// Where channels live: `memory` (embedded, one process) or a Redis URL such as
    /// `redis://127.0.0.1:6379/0` (nodes sharing it behave as one server).
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
    /// Aids for testing the server itself; not for production.
    pub testing: Testing,
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

    /// Checks what types alone cannot; each refusal names its setting. Each section checks its
    /// own settings; settings that must fit one another across sections are checked here.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.metrics_listen.is_some_and(|addr| addr == self.listen && addr.port() != 0) {
            return Err(invalid("metrics_listen", "must differ from `listen` (/metrics is served there already)"));
        }
        if self.shards > 256 {
            return Err(invalid("shards", "at most 256 shards"));
        }
        self.limits.validate()?;
        self.delivery.validate()?;
        if self.delivery.conflate_above_bytes > self.limits.max_outbox_bytes {
            return Err(invalid("delivery.conflate_above_bytes", "must not exceed limits.max_outbox_bytes"));
        }
        self.auth.validate()?;
        self.rate_limits.validate()?;
        self.heartbeat.validate()?;
        self.cleanup.validate()?;
        self.tls.validate()?;
        self.api.validate()?;
        if let Some(addr) = self.api.listen.filter(|addr| addr.port() != 0) {
            if addr == self.listen || Some(addr) == self.metrics_listen {
                return Err(invalid("api.listen", "must differ from `listen` and `metrics_listen`"));
            }
        }
        self.history.validate()?;
        self.acks.validate()?;
        if let Some(url) = self.redis_url() {
            if let Err(err) = ::redis::IntoConnectionInfo::into_connection_info(url) {
                return Err(invalid("broker", format!("not a Redis URL: {err}")));
            }
        } else if self.broker != "memory" {
            return Err(invalid("broker", "must be `memory` or a `redis://` URL"));
        }
        self.redis.validate()?;
        if self.shutdown_timeout.is_zero() || self.shutdown_timeout > Duration::from_secs(3600) {
            return Err(invalid("shutdown_timeout", "must be longer than zero and at most 1h"));
        }
        if let Err(err) = tracing_subscriber::EnvFilter::try_new(&self.log_level) {
            return Err(invalid("log_level", format!("not a log filter: {err}")));
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

/// A refusal of `setting`, for the `validate` of every section.
fn invalid(setting: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { setting, reason: reason.into() }
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
