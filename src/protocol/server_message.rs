//! Whole `ServerMessage`s written by hand as WebSocket binary messages, around frames encoded
//! elsewhere (pushes and replies, see `push`): the head of a shared batch, which names its
//! `sub_id` in the envelope, and the zstd envelope.
//!
//! A batch of one subscription's updates is the same for every subscriber but for `sub_id`,
//! so it is encoded once without it, and each connection's copy starts with its own head:
//! the WebSocket header and `ServerMessage.sub_id` (protobuf allows it before the frames), so
//! the shared bytes can follow untouched, copied or by a vectored write.

use prost::encoding::encoded_len_varint;

use super::push::append_varint;
use super::ws::write_binary_header;

/// Key of `ServerMessage.zstd` (field 2, length-delimited) and `ServerMessage.sub_id` (field 3).
const SERVER_MESSAGE_ZSTD_KEY: u8 = 0x12;
const SERVER_MESSAGE_SUB_ID_KEY: u8 = 0x18;

/// Appends what one connection's copy of a shared batch of `frames_len` bytes starts with:
/// the WebSocket header and `ServerMessage.sub_id`.
pub fn write_shared_head(out: &mut Vec<u8>, frames_len: usize, sub_id: u32) {
    write_binary_header(out, 1 + encoded_len_varint(u64::from(sub_id)) + frames_len);
    out.push(SERVER_MESSAGE_SUB_ID_KEY);
    append_varint(out, u64::from(sub_id));
}

/// Appends a shared plain batch as one message: its head, then its `frames` as they are.
pub fn write_shared_batch(out: &mut Vec<u8>, frames: &[u8], sub_id: u32) {
    out.reserve(frames.len() + 16);
    write_shared_head(out, frames.len(), sub_id);
    out.extend_from_slice(frames);
}

/// Appends a message holding only `ServerMessage.zstd` (and the `sub_id` its updates lack
/// when the compressed batch is shared; 0: none).
pub fn write_zstd_envelope(out: &mut Vec<u8>, compressed: &[u8], sub_id: u32) {
    let sub_id_len = if sub_id == 0 { 0 } else { 1 + encoded_len_varint(u64::from(sub_id)) };
    let len = 1 + encoded_len_varint(compressed.len() as u64) + compressed.len() + sub_id_len;
    out.reserve(len + 10);
    write_binary_header(out, len);
    out.push(SERVER_MESSAGE_ZSTD_KEY);
    append_varint(out, compressed.len() as u64);
    out.extend_from_slice(compressed);
    if sub_id != 0 {
        out.push(SERVER_MESSAGE_SUB_ID_KEY);
        append_varint(out, u64::from(sub_id));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::pb::{server_frame::Kind, ServerMessage, Update};
    use crate::protocol::push::{encode_update_body, write_push};
    use prost::Message;

    /// The `ServerMessage` of one short binary WebSocket message (a two-byte header).
    fn message(wire: &[u8]) -> ServerMessage {
        assert_eq!((wire[0], wire[1] as usize), (0x82, wire.len() - 2), "one short binary message");
        ServerMessage::decode(&wire[2..]).unwrap()
    }

    #[test]
    fn a_shared_batch_decodes_with_the_sub_id_of_its_head() {
        let mut frames = Vec::new();
        for offset in [1, 2] {
            write_push(&mut frames, 0, &encode_update_body(&Update { offset, ..Default::default() }));
        }
        for sub_id in [1, 300_000] {
            let mut out = Vec::new();
            write_shared_batch(&mut out, &frames, sub_id);
            let decoded = message(&out);
            assert_eq!(decoded.sub_id, sub_id);
            let offsets: Vec<u64> = decoded
                .frames
                .iter()
                .map(|f| match &f.kind {
                    Some(Kind::Update(u)) => u.offset,
                    other => panic!("not an update: {other:?}"),
                })
                .collect();
            assert_eq!(offsets, [1, 2]);
        }
    }

    #[test]
    fn a_zstd_envelope_holds_the_bytes_and_names_a_sub_id_only_when_shared() {
        for sub_id in [0, 7, 70_000] {
            let mut out = Vec::new();
            write_zstd_envelope(&mut out, b"not really zstd", sub_id);
            let decoded = message(&out);
            assert_eq!((&decoded.zstd[..], decoded.sub_id, decoded.frames.len()), (&b"not really zstd"[..], sub_id, 0));
        }
    }
}
