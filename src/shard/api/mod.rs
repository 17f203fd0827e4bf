//! The server API for backends, over HTTP on the main port or on `api.listen`: publish (one or
//! a batch) through the same path as WebSocket publishes, and look at channels, history and
//! clients. Every request needs a key (`Authorization: Bearer KEY`), is rate limited per key,
//! and is served on the shard that accepted it; what it needs from other shards travels as
//! shard messages and comes back to a table of waiting requests ([`Waiters`]).
//!
//! - `server`: the accept loop of `api.listen`, and a request over the socket (key, rate
//!   limit, method, body, reply);
//! - `keys`: API keys, their per-key rate limit and the counters ([`ApiShared`]);
//! - `handlers`: one function per endpoint, and [`handle_msg`] on the shard a message reaches;
//! - `codec`: bodies in protobuf or JSON; `waiters`: requests waiting for other shards.

mod codec;
mod handlers;
mod keys;
mod server;
mod waiters;

use std::time::Duration;

pub(super) use handlers::handle_msg;
pub use keys::{request_limit, ApiShared};
pub(super) use server::{accept_loop, serve};
pub use waiters::{Answer, ApiMsg, Waiters};

/// The longest a request waits for other shards or Redis before it is answered 504 (and for
/// its body before it is answered 408).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// The routes, as metric labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Route {
    Publish,
    PublishBatch,
    Channels,
    History,
    Subscriptions,
    Disconnect,
    Unknown,
}

impl Route {
    pub(super) const ALL: [Route; 7] = [
        Route::Publish,
        Route::PublishBatch,
        Route::Channels,
        Route::History,
        Route::Subscriptions,
        Route::Disconnect,
        Route::Unknown,
    ];

    pub(super) fn label(self) -> &'static str {
        match self {
            Route::Publish => "publish",
            Route::PublishBatch => "publish_batch",
            Route::Channels => "channels",
            Route::History => "history",
            Route::Subscriptions => "subscriptions",
            Route::Disconnect => "disconnect",
            Route::Unknown => "unknown",
        }
    }

    /// The route `path` names, the method it takes, and what the path holds (a channel or a
    /// client id).
    pub(super) fn of(path: &str) -> (Route, &'static str, &str) {
        if path == "/api/publish" {
            return (Route::Publish, "POST", "");
        }
        if path == "/api/publish/batch" {
            return (Route::PublishBatch, "POST", "");
        }
        if path == "/api/channels" {
            return (Route::Channels, "GET", "");
        }
        if let Some(channel) = path.strip_prefix("/api/channels/").and_then(|rest| rest.strip_suffix("/history")) {
            return (Route::History, "GET", channel);
        }
        if let Some(rest) = path.strip_prefix("/api/clients/") {
            if let Some(client) = rest.strip_suffix("/subscriptions") {
                return (Route::Subscriptions, "GET", client);
            }
            if let Some(client) = rest.strip_suffix("/disconnect") {
                return (Route::Disconnect, "POST", client);
            }
        }
        (Route::Unknown, "", "")
    }
}

pub fn is_api_path(path: &str) -> bool {
    path == "/api" || path.starts_with("/api/")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_and_their_targets() {
        assert_eq!(Route::of("/api/publish"), (Route::Publish, "POST", ""));
        assert_eq!(Route::of("/api/channels/user@x/route-1/history"), (Route::History, "GET", "user@x/route-1"));
        assert_eq!(Route::of("/api/clients/1-2-3/disconnect"), (Route::Disconnect, "POST", "1-2-3"));
        assert_eq!(Route::of("/api/clients/1-2-3/subscriptions").0, Route::Subscriptions);
        assert_eq!(Route::of("/api/nothing").0, Route::Unknown);
    }
}
