//! The server API for backends (`[api]`): who may call it, where it listens, how large its
//! requests may be.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

/// `/api/…` over HTTP (`[api]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Api {
    /// Keys a request may present as `Authorization: Bearer KEY`; several for rotation (add
    /// the new one, move the backends, remove the old one). Default none: every `/api` request
    /// is refused until a key is set.
    pub keys: Vec<String>,
    /// An address of its own for the API (e.g. `127.0.0.1:3001`), so it never faces the
    /// internet; when set, the main port answers `/api` with 404. Default none (`/api` is on
    /// `listen`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<SocketAddr>,
    /// Largest request body, bytes. Over it: 413. Default 1048576 (1 MiB).
    pub max_body_bytes: usize,
    /// Most publications in one `POST /api/publish/batch`. Over it: 413. Default 1000.
    pub max_batch_publications: usize,
}

/// Shortest key accepted: a key is a secret, not a password a person types.
pub const MIN_KEY_BYTES: usize = 16;

impl Default for Api {
    fn default() -> Self {
        Self { keys: Vec::new(), listen: None, max_body_bytes: 1024 * 1024, max_batch_publications: 1000 }
    }
}
