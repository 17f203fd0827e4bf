//! Who may connect, and to what (`[auth]`): JWT verification and the channels a token
//! without claims may use.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{invalid, ConfigError};

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

/// JWT authentication (`[auth]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Auth {
    /// `jwt` or `disabled`. With `jwt` and no key configured, the server makes a random HS256
    /// secret for this run only and, started from a terminal, logs a development token;
    /// nothing is ever open by accident.
    pub mode: AuthMode,
    /// Shared secret for HS256 tokens (empty: none).
    pub hmac_secret: String,
    /// PEM files holding RSA (RS256) or EC P-256 (ES256) public keys; a token verified by any
    /// of them is accepted.
    pub public_key_files: Vec<PathBuf>,
    /// Required `aud` claim (empty: not checked).
    pub audience: String,
    /// Required `iss` claim (empty: not checked).
    pub issuer: String,
    /// Clock skew allowed when checking `exp` and `nbf`.
    #[serde(with = "humantime_serde")]
    pub leeway: Duration,
    /// A token whose `exp` lies further ahead than this is refused (`bad_claim`): no issuer
    /// means a token to outlive the deployment, and a far-future `exp` is a forgery or a bug.
    /// Between `1m` and `100years`.
    #[serde(with = "humantime_serde")]
    pub max_token_lifetime: Duration,
    /// The server sends `TokenExpiring` this long before a connection's token expires.
    #[serde(with = "humantime_serde")]
    pub refresh_reminder: Duration,
    /// A connection whose token expired may still send `Refresh` this long; then it is closed
    /// with 4006.
    #[serde(with = "humantime_serde")]
    pub expiry_grace: Duration,
    /// Channels a token without a `subscribe` claim may subscribe to (and read history of).
    /// `*` matches any characters, `{sub}` the token's subject.
    pub default_subscribe: Vec<String>,
    /// Channels a token without a `publish` claim may publish on (empty: none, updates come
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
            max_token_lifetime: Duration::from_secs(10 * YEAR.as_secs()),
            refresh_reminder: Duration::from_secs(60),
            expiry_grace: Duration::from_secs(30),
            default_subscribe: ["route:{sub}", "weather:*", "traffic:*", "incident:*", "poi:*"]
                .map(String::from)
                .to_vec(),
            default_publish: Vec::new(),
        }
    }
}

/// A humantime year (365.25 days), as `10years` in a config file means.
const YEAR: Duration = Duration::from_secs(31_557_600);
/// The longest `auth.max_token_lifetime` allowed: every expiry the server computes stays far
/// inside what its clocks can represent.
const MAX_TOKEN_LIFETIME_LIMIT: Duration = Duration::from_secs(100 * YEAR.as_secs());

impl Auth {
    /// Checks what types alone cannot; each refusal names its setting.
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        for file in &self.public_key_files {
            if !file.is_file() {
                return Err(invalid("auth.public_key_files", format!("{} is not a readable file", file.display())));
            }
        }
        if !self.hmac_secret.is_empty() && self.hmac_secret.len() < 32 {
            return Err(invalid("auth.hmac_secret", "must be at least 32 bytes (256 bits) long"));
        }
        if self.expiry_grace > Duration::from_secs(3600) {
            return Err(invalid("auth.expiry_grace", "at most 1h"));
        }
        if !(Duration::from_secs(60)..=MAX_TOKEN_LIFETIME_LIMIT).contains(&self.max_token_lifetime) {
            return Err(invalid("auth.max_token_lifetime", "between 1m and 100years"));
        }
        for pattern in self.default_subscribe.iter().chain(&self.default_publish) {
            if let Err(err) = crate::core::ChannelPattern::parse(pattern) {
                return Err(invalid("auth.default_subscribe/default_publish", format!("`{pattern}`: {err}")));
            }
        }
        Ok(())
    }
}
