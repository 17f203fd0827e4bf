//! Aids for testing the server itself (`[testing]`); not for production.

use serde::{Deserialize, Serialize};

/// Aids for testing the server itself (`[testing]`). A restart applies a change.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Testing {
    /// Serve `/echo`: a WebSocket endpoint that sends every text and binary message back as
    /// it came, for WebSocket conformance suites (Autobahn). It takes the same path as `/ws`
    /// (admission, handshake, framing, limits, close handshake) with no protocol session
    /// behind it. False: `/echo` answers 404 like any unknown path.
    pub echo_endpoint: bool,
    /// Every shard paces its writes as a busy one does, whatever its load: the linger stays
    /// at `delivery.batch_interval`, so a connection writes at most once per linger and its
    /// updates leave in batches at its pacing ticks. Lets tests exercise the paced path on an
    /// idle machine. False: the linger follows the load.
    pub always_linger: bool,
}
