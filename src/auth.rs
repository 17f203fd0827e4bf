//! Who a client is and what it may do: JWT verification (HS256, RS256, ES256) and channel
//! permissions from claims. Sans I/O: the caller passes the time.
//!
//! Claims the server reads:
//! - `sub` (required): the user; identities of acknowledged positions and per-user limits.
//! - `exp` (required), `nbf` (optional): seconds since the Unix epoch; an `exp` further ahead
//!   than `auth.max_token_lifetime` is refused, so every expiry stays a time the clocks hold.
//! - `aud`, `iss`: checked when `auth.audience` / `auth.issuer` are set.
//! - `subscribe`, `publish` (optional): lists of channel patterns; absent, the configured
//!   defaults apply. `*` matches any run of characters, `{sub}` exactly the token's subject.

use std::sync::Arc;

use base64::Engine;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::config::{Auth, AuthMode};
use crate::core::ChannelPattern;

/// Why a token was refused; the label goes into the `Disconnect` reason and the metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AuthFailure {
    MissingToken,
    Malformed,
    AlgNone,
    WrongAlgorithm,
    BadSignature,
    Expired,
    NotYetValid,
    WrongAudience,
    WrongIssuer,
    MissingClaim,
    BadClaim,
    /// A `Refresh` token names another subject than the connection's.
    SubjectChanged,
}

impl AuthFailure {
    pub const ALL: [AuthFailure; 12] = [
        AuthFailure::MissingToken,
        AuthFailure::Malformed,
        AuthFailure::AlgNone,
        AuthFailure::WrongAlgorithm,
        AuthFailure::BadSignature,
        AuthFailure::Expired,
        AuthFailure::NotYetValid,
        AuthFailure::WrongAudience,
        AuthFailure::WrongIssuer,
        AuthFailure::MissingClaim,
        AuthFailure::BadClaim,
        AuthFailure::SubjectChanged,
    ];

    pub fn label(self) -> &'static str {
        match self {
            AuthFailure::MissingToken => "missing_token",
            AuthFailure::Malformed => "malformed",
            AuthFailure::AlgNone => "alg_none",
            AuthFailure::WrongAlgorithm => "wrong_algorithm",
            AuthFailure::BadSignature => "bad_signature",
            AuthFailure::Expired => "expired",
            AuthFailure::NotYetValid => "not_yet_valid",
            AuthFailure::WrongAudience => "wrong_audience",
            AuthFailure::WrongIssuer => "wrong_issuer",
            AuthFailure::MissingClaim => "missing_claim",
            AuthFailure::BadClaim => "bad_claim",
            AuthFailure::SubjectChanged => "subject_changed",
        }
    }

    pub fn index(self) -> usize {
        Self::ALL.iter().position(|&f| f == self).unwrap_or(0)
    }
}

/// A refusal with a sentence for the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub failure: AuthFailure,
    pub detail: String,
}

impl Refusal {
    fn new(failure: AuthFailure, detail: impl Into<String>) -> Self {
        Self { failure, detail: detail.into() }
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.failure.label(), self.detail)
    }
}

/// Patterns a `subscribe` or `publish` claim may list, and their bytes together: a check
/// compares at most (channel length + 1) × these bytes, so a token's patterns cannot hold a
/// shard (at the longest channel allowed, 1024, some 16 M byte comparisons; at the default
/// 128, 2 M).
const MAX_CLAIMED_PATTERNS: usize = 256;
const MAX_CLAIMED_PATTERN_BYTES: usize = 16 * 1024;

/// What a connection may do, from its token (or everything, with auth disabled).
#[derive(Debug, Clone)]
pub struct Grant {
    /// The token's `sub`; `None` with auth disabled.
    pub subject: Option<Arc<str>>,
    /// `exp`, seconds since the Unix epoch; 0 = never.
    pub expires_at_unix: u64,
    subscribe: Option<Arc<[ChannelPattern]>>,
    publish: Option<Arc<[ChannelPattern]>>,
}

impl Grant {
    /// Everything allowed (auth disabled).
    pub fn unrestricted() -> Self {
        Self { subject: None, expires_at_unix: 0, subscribe: None, publish: None }
    }

    pub fn may_subscribe(&self, channel: &str) -> bool {
        self.allows(self.subscribe.as_deref(), channel)
    }

    pub fn may_publish(&self, channel: &str) -> bool {
        self.allows(self.publish.as_deref(), channel)
    }

    fn allows(&self, patterns: Option<&[ChannelPattern]>, channel: &str) -> bool {
        let Some(patterns) = patterns else { return true };
        let subject = self.subject.as_deref().unwrap_or("");
        patterns.iter().any(|p| p.matches(channel, subject))
    }
}

/// The claims the server reads.
#[derive(Debug, Deserialize)]
struct Claims {
    sub: Option<String>,
    exp: Option<u64>,
    nbf: Option<u64>,
    subscribe: Option<Vec<String>>,
    publish: Option<Vec<String>>,
}

/// Claims of a development token the server signs for itself.
#[derive(Serialize)]
struct DevClaims<'a> {
    sub: &'a str,
    exp: u64,
    subscribe: [&'a str; 1],
    publish: [&'a str; 1],
}

/// Verifies tokens with the configured keys. Built once, shared by every shard.
pub struct Verifier {
    hmac: Option<DecodingKey>,
    rsa: Vec<DecodingKey>,
    ec: Vec<DecodingKey>,
    audience: Option<String>,
    issuer: Option<String>,
    leeway: u64,
    /// `auth.max_token_lifetime`, seconds.
    max_lifetime: u64,
    default_subscribe: Arc<[ChannelPattern]>,
    default_publish: Arc<[ChannelPattern]>,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the keys themselves.
        f.debug_struct("Verifier")
            .field("hmac", &self.hmac.is_some())
            .field("rsa_keys", &self.rsa.len())
            .field("ec_keys", &self.ec.len())
            .field("audience", &self.audience)
            .field("issuer", &self.issuer)
            .finish()
    }
}

/// The verifier and, when no key was configured, the development token it made.
pub struct AuthSetup {
    pub verifier: Option<Arc<Verifier>>,
    pub development_token: Option<String>,
}

impl Verifier {
    /// Builds the verifier for `config` (`None` when auth is disabled). With `jwt` and no key,
    /// signs with a random secret that lives as long as this process.
    pub fn setup(config: &Auth, now_unix: u64) -> Result<AuthSetup, String> {
        if config.mode == AuthMode::Disabled {
            return Ok(AuthSetup { verifier: None, development_token: None });
        }
        let mut rsa = Vec::new();
        let mut ec = Vec::new();
        for file in &config.public_key_files {
            let pem = std::fs::read(file).map_err(|err| format!("{}: {err}", file.display()))?;
            if let Ok(key) = DecodingKey::from_rsa_pem(&pem) {
                rsa.push(key);
            } else if let Ok(key) = DecodingKey::from_ec_pem(&pem) {
                ec.push(key);
            } else {
                return Err(format!("{}: not an RSA or EC public key in PEM", file.display()));
            }
        }
        let mut development_token = None;
        let hmac = if !config.hmac_secret.is_empty() {
            Some(DecodingKey::from_secret(config.hmac_secret.as_bytes()))
        } else if rsa.is_empty() && ec.is_empty() {
            let secret: [u8; 32] = rand::random();
            let exp = now_unix.saturating_add(24 * 3600);
            let claims = DevClaims { sub: "developer", exp, subscribe: ["*"], publish: ["*"] };
            let token =
                jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(&secret))
                    .map_err(|err| format!("cannot sign the development token: {err}"))?;
            development_token = Some(token);
            Some(DecodingKey::from_secret(&secret))
        } else {
            None
        };
        let verifier = Verifier {
            hmac,
            rsa,
            ec,
            audience: (!config.audience.is_empty()).then(|| config.audience.clone()),
            issuer: (!config.issuer.is_empty()).then(|| config.issuer.clone()),
            leeway: config.leeway.as_secs(),
            max_lifetime: config.max_token_lifetime.as_secs(),
            default_subscribe: parse_patterns(&config.default_subscribe)?,
            default_publish: parse_patterns(&config.default_publish)?,
        };
        Ok(AuthSetup { verifier: Some(Arc::new(verifier)), development_token })
    }

    /// Checks `token` at `now_unix` (seconds since the Unix epoch).
    pub fn verify(&self, token: &str, now_unix: u64) -> Result<Grant, Refusal> {
        if token.is_empty() {
            return Err(Refusal::new(AuthFailure::MissingToken, "Connect carries no token"));
        }
        let header = match jsonwebtoken::decode_header(token) {
            Ok(header) => header,
            Err(_) if declares_alg_none(token) => {
                return Err(Refusal::new(AuthFailure::AlgNone, "unsigned tokens (alg none) are never accepted"))
            }
            Err(_) => return Err(Refusal::new(AuthFailure::Malformed, "not a JWT")),
        };
        let keys: &[DecodingKey] = match header.alg {
            Algorithm::HS256 => self.hmac.as_slice(),
            Algorithm::RS256 => &self.rsa,
            Algorithm::ES256 => &self.ec,
            _ => &[],
        };
        if keys.is_empty() {
            let detail = format!("{:?} tokens are not accepted by this server", header.alg);
            return Err(Refusal::new(AuthFailure::WrongAlgorithm, detail));
        }
        let mut validation = Validation::new(header.alg);
        // Time claims are checked below against the caller's clock.
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.required_spec_claims.clear();
        validation.validate_aud = self.audience.is_some();
        if let Some(audience) = &self.audience {
            validation.set_audience(&[audience]);
        }
        if let Some(issuer) = &self.issuer {
            validation.set_issuer(&[issuer]);
        }
        let mut last = Refusal::new(AuthFailure::BadSignature, "no configured key verifies the signature");
        for key in keys {
            match jsonwebtoken::decode::<Claims>(token, key, &validation) {
                Ok(data) => return self.grant(data.claims, now_unix),
                Err(err) => {
                    last = refusal(err.kind());
                    if last.failure != AuthFailure::BadSignature {
                        break;
                    }
                }
            }
        }
        Err(last)
    }

    fn grant(&self, claims: Claims, now_unix: u64) -> Result<Grant, Refusal> {
        let subject = match claims.sub {
            Some(sub) if !sub.is_empty() && sub.len() <= 256 => Arc::<str>::from(sub),
            _ => return Err(Refusal::new(AuthFailure::MissingClaim, "the token needs a `sub` of 1 to 256 characters")),
        };
        let Some(exp) = claims.exp else {
            return Err(Refusal::new(AuthFailure::MissingClaim, "the token needs an `exp`"));
        };
        if exp.saturating_add(self.leeway) <= now_unix {
            return Err(Refusal::new(AuthFailure::Expired, format!("the token expired at {exp}")));
        }
        if exp > now_unix.saturating_add(self.max_lifetime) {
            let detail = format!("`exp` {exp} is more than auth.max_token_lifetime ({} s) ahead", self.max_lifetime);
            return Err(Refusal::new(AuthFailure::BadClaim, detail));
        }
        if let Some(nbf) = claims.nbf {
            if nbf > now_unix.saturating_add(self.leeway) {
                return Err(Refusal::new(AuthFailure::NotYetValid, format!("the token is valid from {nbf}")));
            }
        }
        let patterns = |list: Option<Vec<String>>, default: &Arc<[ChannelPattern]>| match list {
            None => Ok(default.clone()),
            Some(list) if list.len() > MAX_CLAIMED_PATTERNS => {
                Err(Refusal::new(AuthFailure::BadClaim, format!("at most {MAX_CLAIMED_PATTERNS} channel patterns")))
            }
            Some(list) if list.iter().map(String::len).sum::<usize>() > MAX_CLAIMED_PATTERN_BYTES => Err(Refusal::new(
                AuthFailure::BadClaim,
                format!("at most {MAX_CLAIMED_PATTERN_BYTES} bytes of channel patterns"),
            )),
            Some(list) => parse_patterns(&list).map_err(|e| Refusal::new(AuthFailure::BadClaim, e)),
        };
        Ok(Grant {
            subject: Some(subject),
            expires_at_unix: exp,
            subscribe: Some(patterns(claims.subscribe, &self.default_subscribe)?),
            publish: Some(patterns(claims.publish, &self.default_publish)?),
        })
    }
}

/// Parses every pattern of `list`; the error names the one refused.
fn parse_patterns(list: &[String]) -> Result<Arc<[ChannelPattern]>, String> {
    list.iter()
        .map(|p| ChannelPattern::parse(p).map_err(|e| format!("`{p}`: {e}")))
        .collect::<Result<Vec<_>, _>>()
        .map(Arc::from)
}

fn refusal(kind: &ErrorKind) -> Refusal {
    match kind {
        ErrorKind::InvalidSignature => Refusal::new(AuthFailure::BadSignature, "the signature does not verify"),
        ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => {
            Refusal::new(AuthFailure::WrongAlgorithm, "the key does not fit the token's algorithm")
        }
        ErrorKind::InvalidAudience => Refusal::new(AuthFailure::WrongAudience, "the token is for another audience"),
        ErrorKind::InvalidIssuer => Refusal::new(AuthFailure::WrongIssuer, "the token is from another issuer"),
        ErrorKind::MissingRequiredClaim(claim) => {
            Refusal::new(AuthFailure::MissingClaim, format!("no `{claim}` claim"))
        }
        ErrorKind::Json(_) | ErrorKind::InvalidClaimFormat(_) => {
            Refusal::new(AuthFailure::BadClaim, "the claims are not what this server reads")
        }
        _ => Refusal::new(AuthFailure::Malformed, "not a valid JWT"),
    }
}

/// Whether the token's header says `"alg": "none"` (any case), which the JWT library does
/// not even parse; such tokens get their own refusal reason.
fn declares_alg_none(token: &str) -> bool {
    let Some(encoded) = token.split('.').next() else { return false };
    let Ok(bytes) = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(encoded.trim_end_matches('=')) else {
        return false;
    };
    #[derive(Deserialize)]
    struct AlgOnly {
        alg: String,
    }
    serde_json::from_slice::<AlgOnly>(&bytes).is_ok_and(|h| h.alg.eq_ignore_ascii_case("none"))
}

#[cfg(test)]
mod backtracking;
#[cfg(test)]
mod tests;
