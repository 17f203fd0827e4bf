//! The message envelope: one protobuf `ClientMessage`/`ServerMessage` per WebSocket message,
//! holding frames either directly or inside a zstd-compressed copy of the same message type.

use std::collections::HashMap;

use bytes::{Buf, Bytes};
use prost::Message;
use zstd::dict::DecoderDictionary;
use zstd::zstd_safe;

use super::pb::{server_frame, ClientFrame, ClientMessage, ServerFrame, ServerMessage};

/// Why a WebSocket message did not decode.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum EnvelopeError {
    #[error("not a valid protobuf message: {0}")]
    Decode(#[from] prost::DecodeError),
    /// The envelope is fine but holds more than the limit (close 1009).
    #[error("zstd envelope decompresses past {limit} bytes")]
    TooLarge { limit: usize },
    /// The envelope is not valid zstd (close 4500).
    #[error("zstd envelope does not decompress: {reason}")]
    Zstd { reason: String },
    #[error("a message carries both frames and a zstd envelope")]
    Ambiguous,
    #[error("a zstd envelope holds another zstd envelope")]
    Nested,
    #[error("zstd envelope needs dictionary {0}, which this side does not have")]
    UnknownDictionary(u32),
}

/// zstd dictionaries a decoder holds, by the id zstd writes into each frame.
#[derive(Default)]
pub struct Dictionaries {
    by_id: HashMap<u32, DecoderDictionary<'static>>,
}

impl Dictionaries {
    /// Adds a dictionary (as served at `GET /zstd/dictionaries/{id}`); returns its id, or
    /// `None` when the bytes are not a zstd dictionary.
    pub fn add(&mut self, dictionary: &[u8]) -> Option<u32> {
        let id = zstd_safe::get_dict_id_from_dict(dictionary)?.get();
        self.by_id.insert(id, DecoderDictionary::copy(dictionary));
        Some(id)
    }

    pub fn ids(&self) -> Vec<u32> {
        self.by_id.keys().copied().collect()
    }
}

impl std::fmt::Debug for Dictionaries {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.by_id.keys()).finish()
    }
}

/// A message type that carries frames or a zstd envelope of itself.
pub trait Envelope: Message + Default {
    type Frame;
    fn take_parts(&mut self) -> (Vec<Self::Frame>, Bytes);
    /// After decompressing: what the envelope says of the frames inside (the server's
    /// `sub_id` of shared batches).
    fn adopt(&self, _frames: &mut [Self::Frame]) {}
    fn from_frames(frames: Vec<Self::Frame>) -> Self;
    fn from_zstd(compressed: Bytes) -> Self;
}

impl Envelope for ClientMessage {
    type Frame = ClientFrame;
    fn take_parts(&mut self) -> (Vec<ClientFrame>, Bytes) {
        (std::mem::take(&mut self.frames), std::mem::take(&mut self.zstd))
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
    fn take_parts(&mut self) -> (Vec<ServerFrame>, Bytes) {
        (std::mem::take(&mut self.frames), std::mem::take(&mut self.zstd))
    }
    fn from_frames(frames: Vec<ServerFrame>) -> Self {
        Self { frames, zstd: Bytes::new(), sub_id: 0 }
    }
    fn from_zstd(zstd: Bytes) -> Self {
        Self { frames: Vec::new(), zstd, sub_id: 0 }
    }
    fn adopt(&self, frames: &mut [ServerFrame]) {
        if self.sub_id == 0 {
            return;
        }
        for frame in frames {
            if let Some(server_frame::Kind::Update(update)) = &mut frame.kind {
                if update.sub_id == 0 {
                    update.sub_id = self.sub_id;
                }
            }
        }
    }
}

/// Decodes one WebSocket message into its frames, unwrapping a zstd envelope whose content
/// may be at most `max_decompressed` bytes.
/// `dictionaries` are those the frame may name.
pub fn decode<M: Envelope>(
    bytes: impl Buf,
    max_decompressed: usize,
    dictionaries: &Dictionaries,
) -> Result<Vec<M::Frame>, EnvelopeError> {
    let mut frames = Vec::new();
    decode_into::<M>(&mut frames, bytes, max_decompressed, dictionaries)?;
    Ok(frames)
}

/// `decode` into `frames` (empty), whose capacity is reused: a server decodes every message
/// into the same vector. On an error `frames` holds whatever was decoded.
pub fn decode_into<M: Envelope>(
    frames: &mut Vec<M::Frame>,
    bytes: impl Buf,
    max_decompressed: usize,
    dictionaries: &Dictionaries,
) -> Result<(), EnvelopeError> {
    let mut outer = M::from_frames(std::mem::take(frames));
    let merged = outer.merge(bytes);
    let compressed;
    (*frames, compressed) = outer.take_parts();
    merged?;
    if compressed.is_empty() {
        outer.adopt(frames);
        return Ok(());
    }
    if !frames.is_empty() {
        return Err(EnvelopeError::Ambiguous);
    }
    let inner = decompress(&compressed, max_decompressed, dictionaries)?;
    let nested;
    (*frames, nested) = M::decode(inner.as_slice())?.take_parts();
    if !nested.is_empty() {
        return Err(EnvelopeError::Nested);
    }
    outer.adopt(frames);
    Ok(())
}

fn decompress(compressed: &[u8], limit: usize, dictionaries: &Dictionaries) -> Result<Vec<u8>, EnvelopeError> {
    let dictionary = match zstd_safe::get_dict_id_from_frame(compressed) {
        Some(id) => Some(dictionaries.by_id.get(&id.get()).ok_or(EnvelopeError::UnknownDictionary(id.get()))?),
        None => None,
    };
    let corrupt = |reason: &str| EnvelopeError::Zstd { reason: reason.to_owned() };
    let mut context = zstd_safe::DCtx::try_create().ok_or_else(|| corrupt("no memory for a zstd context"))?;
    // Decompressed into at most `limit` bytes: a bomb stops there.
    let mut out = Vec::with_capacity(limit);
    let decompressed = match dictionary {
        Some(dictionary) => context.decompress_using_ddict(&mut out, compressed, dictionary.as_ddict()),
        None => context.decompress(&mut out, compressed),
    };
    match decompressed {
        Ok(_) => Ok(out),
        Err(code) if output_would_not_fit(code) => Err(EnvelopeError::TooLarge { limit }),
        Err(code) => Err(corrupt(zstd_safe::get_error_name(code))),
    }
}

/// Whether a zstd error says the output would not fit in the space given: too large, not
/// corrupt.
fn output_would_not_fit(code: zstd_safe::ErrorCode) -> bool {
    // SAFETY: ZSTD_getErrorCode only reads the integer it is given.
    let code = unsafe { zstd_safe::zstd_sys::ZSTD_getErrorCode(code) };
    code == zstd_safe::zstd_sys::ZSTD_ErrorCode::ZSTD_error_dstSize_tooSmall
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
        let a = decode::<ClientMessage>(&plain[..], 1 << 16, &Dictionaries::default()).unwrap();
        let b = decode::<ClientMessage>(&packed[..], 1 << 16, &Dictionaries::default()).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.len(), 20);
    }

    #[test]
    fn zstd_bomb_is_refused_at_the_limit() {
        let big = ClientMessage::from_frames(ping_frames(5000)).encode_to_vec();
        let packed = ClientMessage::from_zstd(zstd::bulk::compress(&big, 1).unwrap().into()).encode_to_vec();
        let err = decode::<ClientMessage>(&packed[..], 1024, &Dictionaries::default()).unwrap_err();
        assert_eq!(err, EnvelopeError::TooLarge { limit: 1024 });
    }

    #[test]
    fn corrupt_zstd_is_told_apart_from_too_large() {
        let big = ClientMessage::from_frames(ping_frames(50)).encode_to_vec();
        let mut compressed = zstd::bulk::compress(&big, 1).unwrap();
        let middle = compressed.len() / 2;
        compressed[middle..].fill(0xa5);
        for garbage in [compressed, b"not zstd at all".to_vec(), vec![0x28, 0xb5, 0x2f, 0xfd]] {
            let packed = ClientMessage::from_zstd(garbage.into()).encode_to_vec();
            let err = decode::<ClientMessage>(&packed[..], 1 << 20, &Dictionaries::default()).unwrap_err();
            assert!(matches!(err, EnvelopeError::Zstd { .. }), "{err}");
        }
    }

    #[test]
    fn garbage_is_a_decode_error() {
        let err =
            decode::<ClientMessage>(Bytes::from_static(&[0xff, 0xff, 0xff, 0x01]), 1024, &Dictionaries::default())
                .unwrap_err();
        assert!(matches!(err, EnvelopeError::Decode(_)));
    }

    #[test]
    fn frames_and_zstd_together_are_ambiguous() {
        let msg = ClientMessage { frames: ping_frames(1), zstd: Bytes::from_static(b"x") };
        let err = decode::<ClientMessage>(&msg.encode_to_vec()[..], 1024, &Dictionaries::default()).unwrap_err();
        assert_eq!(err, EnvelopeError::Ambiguous);
    }
}
