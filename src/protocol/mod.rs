//! Bytes in, bytes out, no I/O: the protobuf types generated from `proto/realtime.proto`, the
//! zstd envelope, a hand reader of the commonest client messages, pre-encoded pushes, whole
//! `ServerMessage`s written by hand around them (shared batches' heads, the zstd envelope),
//! WebSocket framing helpers, the HTTP request head, and the tables of error and close codes.

pub mod client_frames;
pub mod codes;
pub mod envelope;
pub mod http;
pub mod push;
pub mod server_message;
pub mod ws;

/// Types generated from `proto/realtime.proto` (package `routopia.realtime.v1`).
#[allow(clippy::all, missing_docs)]
pub mod pb {
    include!(concat!(env!("OUT_DIR"), "/routopia.realtime.v1.rs"));
}

pub use codes::{CloseCode, ErrorCode};
