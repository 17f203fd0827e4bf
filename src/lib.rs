//! routopia-realtime: a WebSocket pub/sub server that pushes typed navigation updates (ROUTE,
//! WEATHER, TRAFFIC, INCIDENT, POI) to many connections per machine, thread-per-core on
//! io_uring, speaking protobuf frames.
//!
//! # Layout
//! Dependencies point down; nothing below `shard` knows about sockets, runtimes or clocks.
//! - [`config`]: the one `Config` (TOML file, `ROUTOPIA_*` environment, flags), validated.
//! - [`shard`]: a compio runtime per core with its own listener, connections and inbox.
//! - [`session`]: one connection's protocol state machine, sans I/O.
//! - [`outbox`]: a connection's bounded outbound queue, packing frames into batches.
//! - [`compression`]: zstd for outgoing batches, shared by subscribers; trained dictionaries.
//! - [`auth`]: JWT verification and channel permissions from claims.
//! - [`acks`]: acknowledged delivery of one subscription: resend when overdue, then fail.
//! - [`ratelimit`]: token buckets per connection, user and IP address.
//! - [`router`]: a shard's index of local subscribers per channel.
//! - [`broker`]: channels, offsets and epochs; the embedded in-memory broker.
//! - [`protocol`]: protobuf types, zstd envelope, shared pushes, WebSocket and HTTP framing.
//! - [`metrics`]: per-shard tallies and histograms, merged and written for Prometheus.
//! - [`tls`]: the server's certificate and key for `wss://`, reloadable.
//! - [`client`]: a client library (used by the tests and the loadtest).

pub mod acks;
pub mod auth;
pub mod broker;
pub mod client;
pub mod compression;
pub mod config;
pub mod core;
pub mod metrics;
pub mod outbox;
pub mod protocol;
pub mod ratelimit;
pub mod session;
pub mod shard;
pub mod tls;
