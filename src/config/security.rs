//! Settings that protect the server from its clients: authentication, rate limits,
//! heartbeats, cleanup of departed clients' state, and TLS.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Whether clients must prove who they are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuthMode {
    /// Every `Connect` carries a JWT, verified with the configured keys.
    Jwt,
    /// No tokens: every client may subscribe and publish anywhere. Local development only;
    /// logged as a warning at every start.
    Disabled,
}

/// A humantime year (365.25 days), as `10years` in a config file means.
const YEAR: Duration = Duration::from_secs(31_557_600);
/// `auth.max_token_lifetime` by default.
const MAX_TOKEN_LIFETIME_DEFAULT: Duration = Duration::from_secs(10 * YEAR.as_secs());
/// The longest `auth.max_token_lifetime` allowed: every expiry the server computes stays far
/// inside what its clocks can represent.
pub const MAX_TOKEN_LIFETIME_LIMIT: Duration = Duration::from_secs(100 * YEAR.as_secs());

/// JWT authentication (`[auth]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Auth {
    /// `jwt` or `disabled`. Default `jwt`. With `jwt` and no key configured, the server makes a
    /// random HS256 secret for this run only and, started from a terminal, logs a development
    /// token; nothing is ever open by accident.
    pub mode: AuthMode,
    /// Shared secret for HS256 tokens. Default empty (none).
    pub hmac_secret: String,
    /// PEM files holding RSA (RS256) or EC P-256 (ES256) public keys; a token verified by any
    /// of them is accepted. Default none.
    pub public_key_files: Vec<PathBuf>,
    /// Required `aud` claim (empty: not checked). Default empty.
    pub audience: String,
    /// Required `iss` claim (empty: not checked). Default empty.
    pub issuer: String,
    /// Clock skew allowed when checking `exp` and `nbf`. Default `5s`.
    #[serde(with = "humantime_serde")]
    pub leeway: Duration,
    /// A token whose `exp` lies further ahead than this is refused (`bad_claim`): no issuer
    /// means a token to outlive the deployment, and a far-future `exp` is a forgery or a bug.
    /// Between `1m` and `100years`. Default `10years`.
    #[serde(with = "humantime_serde")]
    pub max_token_lifetime: Duration,
    /// The server sends `TokenExpiring` this long before a connection's token expires.
    /// Default `1m`.
    #[serde(with = "humantime_serde")]
    pub refresh_reminder: Duration,
    /// A connection whose token expired may still send `Refresh` this long; then it is closed
    /// with 4006. Default `30s`.
    #[serde(with = "humantime_serde")]
    pub expiry_grace: Duration,
    /// Channels a token without a `subscribe` claim may subscribe to (and read history of).
    /// `*` matches any characters, `{sub}` the token's subject.
    /// Default `["route:{sub}", "weather:*", "traffic:*", "incident:*", "poi:*"]`.
    pub default_subscribe: Vec<String>,
    /// Channels a token without a `publish` claim may publish on. Default none (updates come
    /// from backends).
    pub default_publish: Vec<String>,
}

impl Default for Auth {
    fn default() -> Self {
        Self {
            mode: AuthMode::Jwt,
            hmac_secret: String::new(),
            public_key_files: Vec::new(),
            audience: String::new(),
            issuer: String::new(),
            leeway: Duration::from_secs(5),
            max_token_lifetime: MAX_TOKEN_LIFETIME_DEFAULT,
            refresh_reminder: Duration::from_secs(60),
            expiry_grace: Duration::from_secs(30),
            default_subscribe: ["route:{sub}", "weather:*", "traffic:*", "incident:*", "poi:*"]
                .map(String::from)
                .to_vec(),
            default_publish: Vec::new(),
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

/// Rate limits (`[rate_limits]`). Over a limit a command gets `Error` 429 with
/// `retry_after_ms` and the connection stays; `max_refusals` refusals in a row close it
/// with 4504.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RateLimits {
    /// Apply the limits below. Default true.
    pub enabled: bool,
    /// Commands (Subscribe, Unsubscribe, History, Refresh, Ping) per connection.
    /// Default 100 per `1m`, burst 20.
    pub connection_commands: Bucket,
    /// Publishes per connection. Default 100 per `1m`, burst 20.
    pub connection_publishes: Bucket,
    /// Commands per user (token subject) over all their connections on this node.
    /// Default 300 per `1m`, burst 60.
    pub user_commands: Bucket,
    /// Publishes per user over all their connections on this node. Default 300 per `1m`,
    /// burst 60.
    pub user_publishes: Bucket,
    /// Refusals in a row after which the connection is closed with 4504. Default 50.
    pub max_refusals: u32,
    /// New connections per client IP address; over it the request is answered 429.
    /// Default 60 per `1m`, burst 30.
    pub connection_attempts_per_ip: Bucket,
    /// Requests to the server API (`/api/…`) per key; over it the request is answered 429
    /// with `Retry-After`. A batch is one request. Default 6000 per `1m`, burst 1000.
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

/// WebSocket heartbeats (`[heartbeat]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Heartbeat {
    /// The server pings every connection this often. Default `15s`.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// A connection nothing was heard from for this long (three missed pings by default) is
    /// closed with 4005. Default `45s`.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

impl Default for Heartbeat {
    fn default() -> Self {
        Self { interval: Duration::from_secs(15), timeout: Duration::from_secs(45) }
    }
}

/// Forgetting the state of clients that left (`[cleanup]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Cleanup {
    /// How often per-user and per-IP state of departed clients is swept. Default `30s`.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// An identity's acknowledged position on a channel that it has not acknowledged for this
    /// long is forgotten (its next acknowledged subscription starts from the channel's
    /// latest). With Redis, a channel's positions expire together, this long after its last
    /// acknowledgement. Default `24h`.
    #[serde(with = "humantime_serde")]
    pub max_inactive: Duration,
}

impl Default for Cleanup {
    fn default() -> Self {
        Self { interval: Duration::from_secs(30), max_inactive: Duration::from_secs(24 * 3600) }
    }
}

/// TLS for `wss://` (`[tls]`). Both files set: every connection speaks TLS; both empty: plain
/// `ws://` (behind a terminating proxy). Reloaded on SIGHUP; a bad pair keeps the old one.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Tls {
    /// PEM certificate chain. Default empty.
    pub cert_file: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1). Default empty.
    pub key_file: PathBuf,
}

impl Tls {
    pub fn enabled(&self) -> bool {
        !self.cert_file.as_os_str().is_empty()
    }
}
