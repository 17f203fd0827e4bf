//! The server API for backends, over HTTP on the main port or on `api.listen`: publish (one or
//! a batch) through the same path as WebSocket publishes, and look at channels, history and
//! clients. Every request needs a key (`Authorization: Bearer KEY`), is rate limited per key,
//! and is served on the shard that accepted it; what it needs from other shards travels as
//! shard messages and comes back to a table of waiting requests ([`Waiters`]).
//!
//! - `server`: the accept loop of `api.listen`, and a request over the socket (key, rate
//!   limit, method, body, reply); which route a path names is the one router's (`routes.rs`);
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
