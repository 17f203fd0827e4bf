//! The message envelope: one protobuf `ClientMessage`/`ServerMessage` per WebSocket message,
//! holding frames either directly or inside a zstd-compressed copy of the same message type.

use bytes::Bytes;
use prost::Message;

use super::pb::{ClientFrame, ClientMessage, ServerFrame, ServerMessage};

/// Why a WebSocket message did not decode.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum EnvelopeError {
    #[error("not a valid protobuf message: {0}")]
    Decode(#[from] prost::DecodeError),
    #[error("zstd envelope does not decompress within {limit} bytes: {reason}")]
    Zstd { limit: usize, reason: String },
    #[error("a message carries both frames and a zstd envelope")]
    Ambiguous,
    #[error("a zstd envelope holds another zstd envelope")]
    Nested,
}

/// A message type that carries frames or a zstd envelope of itself.
pub trait Envelope: Message + Default {
    type Frame;
    fn parts(self) -> (Vec<Self::Frame>, Bytes);
    fn from_frames(frames: Vec<Self::Frame>) -> Self;
    fn from_zstd(compressed: Bytes) -> Self;
}

impl Envelope for ClientMessage {
    type Frame = ClientFrame;
    fn parts(self) -> (Vec<ClientFrame>, Bytes) {
        (self.frames, self.zstd)
    }
    fn from_frames(frames: Vec<ClientFrame>) -> Self {
        Self { frames, zstd: Bytes::new() }
    }
    fn from_zstd(zstd: Bytes) -> Self {
        Self { frames: Vec::new(), zstd }
    }
}

impl Envelope for ServerMessage {
    type Frame = ServerFrame;
    fn parts(self) -> (Vec<ServerFrame>, Bytes) {
        (self.frames, self.zstd)
    }
    fn from_frames(frames: Vec<ServerFrame>) -> Self {
        Self { frames, zstd: Bytes::new() }
    }
    fn from_zstd(zstd: Bytes) -> Self {
        Self { frames: Vec::new(), zstd }
    }
}

/// Decodes one WebSocket message into its frames, unwrapping a zstd envelope whose content
/// may be at most `max_decompressed` bytes.
pub fn decode<M: Envelope>(bytes: Bytes, max_decompressed: usize) -> Result<Vec<M::Frame>, EnvelopeError> {
    let (frames, compressed) = M::decode(bytes)?.parts();
    if compressed.is_empty() {
        return Ok(frames);
    }
    if !frames.is_empty() {
        return Err(EnvelopeError::Ambiguous);
    }
    let inner = zstd::bulk::decompress(&compressed, max_decompressed)
        .map_err(|err| EnvelopeError::Zstd { limit: max_decompressed, reason: err.to_string() })?;
    let (frames, nested) = M::decode(inner.as_slice())?.parts();
    if !nested.is_empty() {
        return Err(EnvelopeError::Nested);
    }
    Ok(frames)
}

/// Encodes frames as one message, compressed with zstd at `level` when `compress` is set.
pub fn encode<M: Envelope>(frames: Vec<M::Frame>, compress: Option<i32>) -> Vec<u8> {
    let plain = M::from_frames(frames).encode_to_vec();
    match compress {
        Some(level) => match zstd::bulk::compress(&plain, level) {
            Ok(compressed) => M::from_zstd(compressed.into()).encode_to_vec(),
            Err(_) => plain,
        },
        None => plain,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::pb::{client_frame::Command, Ping};

    fn ping_frames(n: u32) -> Vec<ClientFrame> {
        (1..=n).map(|id| ClientFrame { id, command: Some(Command::Ping(Ping { timestamp_us: id as u64 })) }).collect()
    }

    #[test]
    fn plain_and_zstd_decode_to_the_same_frames() {
        let plain = encode::<ClientMessage>(ping_frames(20), None);
        let packed = encode::<ClientMessage>(ping_frames(20), Some(3));
        assert_ne!(plain, packed);
        let a = decode::<ClientMessage>(plain.into(), 1 << 16).unwrap();
        let b = decode::<ClientMessage>(packed.into(), 1 << 16).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.len(), 20);
    }

    #[test]
    fn zstd_bomb_is_refused_at_the_limit() {
        let big = ClientMessage::from_frames(ping_frames(5000)).encode_to_vec();
        let packed = ClientMessage::from_zstd(zstd::bulk::compress(&big, 1).unwrap().into()).encode_to_vec();
        let err = decode::<ClientMessage>(packed.into(), 1024).unwrap_err();
        assert!(matches!(err, EnvelopeError::Zstd { limit: 1024, .. }), "{err}");
    }

    #[test]
    fn garbage_is_a_decode_error() {
        let err = decode::<ClientMessage>(Bytes::from_static(&[0xff, 0xff, 0xff, 0x01]), 1024).unwrap_err();
        assert!(matches!(err, EnvelopeError::Decode(_)));
    }

    #[test]
    fn frames_and_zstd_together_are_ambiguous() {
        let msg = ClientMessage { frames: ping_frames(1), zstd: Bytes::from_static(b"x") };
        let err = decode::<ClientMessage>(msg.encode_to_vec().into(), 1024).unwrap_err();
        assert_eq!(err, EnvelopeError::Ambiguous);
    }
}
