//! The server API for backends (`[api]`): who may call it, where it listens, how large its
//! requests may be.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use super::{invalid, ConfigError};

/// `/api/…` over HTTP (`[api]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Api {
    /// Keys a request may present as `Authorization: Bearer KEY`; several for rotation (add
    /// the new one, move the backends, remove the old one). Empty: every `/api` request is
    /// refused until a key is set.
    pub keys: Vec<String>,
    /// An address of its own for the API (e.g. `127.0.0.1:3001`), so it never faces the
    /// internet; when set, the main port answers `/api` with 404. None: `/api` is on `listen`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<SocketAddr>,
    /// Largest request body, bytes. Over it: 413.
    pub max_body_bytes: usize,
    /// Most publications in one `POST /api/publish/batch`. Over it: 413.
    pub max_batch_publications: usize,
}

impl Default for Api {
    fn default() -> Self {
        Self { keys: Vec::new(), listen: None, max_body_bytes: 1024 * 1024, max_batch_publications: 1000 }
    }
}

/// Shortest key accepted: a key is a secret, not a password a person types.
const MIN_KEY_BYTES: usize = 16;

impl Api {
    /// Checks what types alone cannot; each refusal names its setting. That `listen` differs
    /// from the server's other addresses is checked in [`super::Config::validate`].
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if self.keys.iter().any(|key| key.len() < MIN_KEY_BYTES) {
            return Err(invalid("api.keys", format!("each key must be at least {MIN_KEY_BYTES} bytes")));
        }
        if self.keys.iter().any(|key| key.bytes().any(|b| !b.is_ascii_graphic())) {
            return Err(invalid("api.keys", "keys are printable ASCII without spaces (they travel in a header)"));
        }
        if !(1024..=64 * 1024 * 1024).contains(&self.max_body_bytes) {
            return Err(invalid("api.max_body_bytes", "must be between 1024 and 67108864 bytes"));
        }
        if !(1..=100_000).contains(&self.max_batch_publications) {
            return Err(invalid("api.max_batch_publications", "must be between 1 and 100000"));
        }
        Ok(())
    }
}
