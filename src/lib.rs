//! routopia-realtime: a WebSocket pub/sub server that pushes typed navigation updates (ROUTE,
//! WEATHER, TRAFFIC, INCIDENT, POI) to many connections per machine, thread-per-core on
//! io_uring, speaking protobuf frames.
//!
//! # Layout
//! The modules in layers, top first. A module imports only modules listed below it, never
//! one above, so no two import each other; `tests/layers.rs` reads `src/` and holds the code
//! to this list. Sockets and runtimes are `shard`'s (and, on its own thread, the Redis
//! bridge's in `broker::redis`); the shard hands the time to the code below it.
//! - [`shard`]: a compio runtime per core with its own listener, connections, inbox, HTTP
//!   routes and server API; dispatches to sessions and to its part of the broker.
//! - [`client`]: a client library (used by the tests and the loadtest).
//! - [`session`]: one connection's protocol state machine.
//! - [`outbox`]: a connection's bounded outbound queue: lanes, conflation, fan-out runs, batches.
//! - [`broker`]: channels, offsets, epochs, history, recovery and acks behind `trait Broker`:
//!   the embedded broker and the Redis broker.
//! - [`acks`]: acknowledged delivery of one subscription: resend when overdue, then fail.
//! - [`auth`]: JWT verification and channel permissions from claims.
//! - [`ratelimit`]: token buckets per connection, user and IP address.
//! - [`compression`]: zstd for outgoing batches, shared by subscribers; trained dictionaries.
//! - [`tls`]: the server's certificate and key for `wss://`, reloadable.
//! - [`metrics`]: per-shard tallies and histograms, merged and written for Prometheus.
//! - [`config`]: the one `Config` (TOML file, `ROUTOPIA_*` environment, flags), validated.
//! - [`protocol`]: bytes in, bytes out: protobuf types, zstd envelope, shared pushes,
//!   WebSocket and HTTP framing.
//! - [`core`]: the shared vocabulary: publications, connection ids, positions, channel names
//!   and patterns, the clock.

pub mod shard;

pub mod client;
pub mod session;

pub mod outbox;

pub mod broker;

pub mod acks;
pub mod auth;
pub mod compression;
pub mod ratelimit;
pub mod tls;

pub mod metrics;

pub mod config;

pub mod protocol;

pub mod core;
