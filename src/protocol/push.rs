//! Pushes encoded once, shared by every subscriber.
//!
//! An `Update` differs between subscribers only in `sub_id`. Protobuf allows fields in any
//! order and merges repeated messages by concatenation, so the server encodes fields 2..7 of
//! the `Update` once per publication (the *body*) and writes, per subscriber, only a few bytes
//! of prefix: the `ServerMessage.frames` key and length, the `ServerFrame.update` key and
//! length, and the `sub_id` field. A batch of frames is the concatenation of such pieces.

use bytes::Bytes;
use prost::encoding::encoded_len_varint;
use prost::Message;

use std::sync::Arc;
use std::time::Instant;

use super::pb::{self, ServerFrame, Update};
use crate::core::{HistoryPage, Publication};

/// Key of `ServerMessage.frames` (field 1, length-delimited).
const SERVER_MESSAGE_FRAMES_KEY: u8 = 0x0a;
/// Key of `ServerFrame.update` (field 2, length-delimited).
const SERVER_FRAME_UPDATE_KEY: u8 = 0x12;
/// Key of `Update.sub_id` (field 1, varint).
const UPDATE_SUB_ID_KEY: u8 = 0x08;

/// Encodes the subscriber-independent part of an update (its `sub_id` left at 0, so absent),
/// byte for byte as prost would. By hand, because prost writes a `Bytes` field through a clone,
/// which costs the payload a shared header (an allocation) on every publish.
pub fn encode_update_body(update: &Update) -> Bytes {
    debug_assert_eq!(update.sub_id, 0);
    // The same bytes as prost's, so prost's length.
    let len = update.encoded_len();
    let mut body = Vec::with_capacity(len);
    put_varint_field(&mut body, UPDATE_OFFSET_KEY, update.offset);
    // An enum is an int32: negative values take ten bytes, sign-extended.
    put_varint_field(&mut body, UPDATE_TYPE_KEY, update.r#type as i64 as u64);
    put_bytes_field(&mut body, UPDATE_KEY_KEY, update.key.as_bytes());
    if update.confidence != 0.0 {
        body.push(UPDATE_CONFIDENCE_KEY);
        body.extend_from_slice(&update.confidence.to_le_bytes());
    }
    put_varint_field(&mut body, UPDATE_TIMESTAMP_KEY, update.timestamp_us);
    put_bytes_field(&mut body, UPDATE_PAYLOAD_KEY, &update.payload);
    put_varint_field(&mut body, UPDATE_SKIPPED_KEY, u64::from(update.skipped));
    // Exactly full, so `Bytes` takes the vector as it is (a spare byte would cost a header).
    debug_assert_eq!((body.len(), body.capacity()), (len, len));
    body.into()
}

/// Keys of `Update`'s fields 3 to 7.
const UPDATE_TYPE_KEY: u8 = 0x18;
const UPDATE_KEY_KEY: u8 = 0x22;
const UPDATE_CONFIDENCE_KEY: u8 = 0x2d;
const UPDATE_TIMESTAMP_KEY: u8 = 0x30;
const UPDATE_PAYLOAD_KEY: u8 = 0x3a;

/// The answer to a `Publish`, as a `ServerMessage.frames` element, byte for byte as
/// `encoded_frame` would: what every publish with a request id costs, without building
/// the frame's messages (and its epoch string) first. Allocated at its exact size.
pub fn publish_result(id: u32, epoch: &str, offset: u64) -> Vec<u8> {
    let result_len = bytes_field_len(epoch.as_bytes()) + varint_field_len(offset);
    let reply_len = varint_field_len(u64::from(id)) + 1 + encoded_len_varint(result_len as u64) + result_len;
    let frame_len = 1 + encoded_len_varint(reply_len as u64) + reply_len;
    let mut out = Vec::with_capacity(1 + encoded_len_varint(frame_len as u64) + frame_len);
    out.push(SERVER_MESSAGE_FRAMES_KEY);
    append_varint(&mut out, frame_len as u64);
    out.push(SERVER_FRAME_REPLY_KEY);
    append_varint(&mut out, reply_len as u64);
    put_varint_field(&mut out, REPLY_ID_KEY, u64::from(id));
    out.push(REPLY_PUBLISH_KEY);
    append_varint(&mut out, result_len as u64);
    put_bytes_field(&mut out, PUBLISH_RESULT_EPOCH_KEY, epoch.as_bytes());
    put_varint_field(&mut out, PUBLISH_RESULT_OFFSET_KEY, offset);
    out
}

/// Appends a varint field, left out when 0 as proto3 does.
fn put_varint_field(out: &mut Vec<u8>, key: u8, value: u64) {
    if value != 0 {
        out.push(key);
        append_varint(out, value);
    }
}

/// Appends a length-delimited field, left out when empty as proto3 does.
fn put_bytes_field(out: &mut Vec<u8>, key: u8, value: &[u8]) {
    if !value.is_empty() {
        out.push(key);
        append_varint(out, value.len() as u64);
        out.extend_from_slice(value);
    }
}

/// Keys of `ServerFrame.reply`, `Reply.id`, `Reply.publish`, `PublishResult.epoch` and
/// `PublishResult.offset`.
const SERVER_FRAME_REPLY_KEY: u8 = 0x0a;
const REPLY_ID_KEY: u8 = 0x08;
const REPLY_PUBLISH_KEY: u8 = 0x32;
const PUBLISH_RESULT_EPOCH_KEY: u8 = 0x0a;
const PUBLISH_RESULT_OFFSET_KEY: u8 = 0x10;

/// Bytes `put_varint_field` appends for `value`.
fn varint_field_len(value: u64) -> usize {
    if value == 0 {
        0
    } else {
        1 + encoded_len_varint(value)
    }
}

/// Bytes `put_bytes_field` appends for `value`.
fn bytes_field_len(value: &[u8]) -> usize {
    if value.is_empty() {
        0
    } else {
        1 + encoded_len_varint(value.len() as u64) + value.len()
    }
}

/// Key of `Update.offset` (field 2, varint).
const UPDATE_OFFSET_KEY: u8 = 0x10;

/// The body of an update whose other fields were encoded without an offset (as the Redis
/// broker stores them, assigning the offset inside Redis): the offset field, then the rest.
pub fn body_with_offset(offset: u64, rest: &[u8]) -> Bytes {
    let mut body = Vec::with_capacity(rest.len() + 11);
    body.push(UPDATE_OFFSET_KEY);
    append_varint(&mut body, offset);
    body.extend_from_slice(rest);
    body.into()
}

/// Key of `Update.skipped` (field 8, varint).
const UPDATE_SKIPPED_KEY: u8 = 0x40;
/// Key of `Update.key` (field 4, length-delimited).
const UPDATE_KEY_TAG: u32 = 4;

/// Bytes a push of `body_len` body bytes to `sub_id` takes inside a `ServerMessage`.
pub fn push_len(sub_id: u32, body_len: usize) -> usize {
    push_len_skipped(sub_id, 0, body_len)
}

/// `push_len` of a push that also says how many updates before it were `skipped`.
#[inline]
pub fn push_len_skipped(sub_id: u32, skipped: u32, body_len: usize) -> usize {
    let update_len = varint_field_len(u64::from(sub_id)) + body_len + varint_field_len(u64::from(skipped));
    let frame_len = 1 + encoded_len_varint(update_len as u64) + update_len;
    1 + encoded_len_varint(frame_len as u64) + frame_len
}

/// Appends one push (prefix and shared body) as an element of `ServerMessage.frames`.
pub fn write_push(out: &mut Vec<u8>, sub_id: u32, body: &[u8]) {
    write_push_skipped(out, sub_id, 0, body)
}

/// `write_push`, with `Update.skipped` written after the body when nonzero.
///
/// The hot loop of every fan-out: the prefix (at most 18 bytes) is assembled on the stack and
/// appended with the body in two copies.
#[inline]
pub fn write_push_skipped(out: &mut Vec<u8>, sub_id: u32, skipped: u32, body: &[u8]) {
    let update_len = varint_field_len(u64::from(sub_id)) + body.len() + varint_field_len(u64::from(skipped));
    let frame_len = 1 + encoded_len_varint(update_len as u64) + update_len;
    let mut prefix = [0u8; 18];
    prefix[0] = SERVER_MESSAGE_FRAMES_KEY;
    let mut at = 1 + put_varint(&mut prefix[1..], frame_len as u64);
    prefix[at] = SERVER_FRAME_UPDATE_KEY;
    at += 1 + put_varint(&mut prefix[at + 1..], update_len as u64);
    if sub_id != 0 {
        prefix[at] = UPDATE_SUB_ID_KEY;
        at += 1 + put_varint(&mut prefix[at + 1..], u64::from(sub_id));
    }
    // A fixed-size copy (two vector moves) is cheaper than a call for a variable one.
    let start = out.len();
    out.extend_from_slice(&prefix);
    out.truncate(start + at);
    out.extend_from_slice(body);
    put_varint_field(out, UPDATE_SKIPPED_KEY, u64::from(skipped));
}

/// Appends `value` as a varint. prost's `encode_varint` goes through `BufMut::put_slice` for
/// every byte; this pushes a one-byte varint (most lengths and ids) directly, and copies a
/// longer one from the stack. Never reaches past the exact capacity the encoders here ask.
#[inline(always)]
pub(crate) fn append_varint(out: &mut Vec<u8>, value: u64) {
    if value < 0x80 {
        out.push(value as u8);
    } else {
        let mut bytes = [0u8; 10];
        let len = put_varint(&mut bytes, value);
        out.extend_from_slice(&bytes[..len]);
    }
}

/// Writes `value` as a varint at the start of `buf` (which must have room: 10 bytes for any
/// `u64`, 5 for the lengths and ids of a push prefix); returns its length.
#[inline(always)]
fn put_varint(buf: &mut [u8], mut value: u64) -> usize {
    let mut i = 0;
    while value >= 0x80 {
        buf[i] = value as u8 | 0x80;
        value >>= 7;
        i += 1;
    }
    buf[i] = value as u8;
    i + 1
}

/// A hash of the `key` field of an encoded update body (0 when it has none), found by
/// walking the top-level fields without decoding the rest.
pub fn key_hash(body: &[u8]) -> u64 {
    use prost::encoding::{decode_key, decode_varint, skip_field, DecodeContext, WireType};
    let mut buf = body;
    while !buf.is_empty() {
        let Ok((tag, wire_type)) = decode_key(&mut buf) else { return 0 };
        if tag == UPDATE_KEY_TAG && wire_type == WireType::LengthDelimited {
            let Ok(len) = decode_varint(&mut buf) else { return 0 };
            let Some(key) = buf.get(..len as usize) else { return 0 };
            return key_hash_of(key);
        }
        if skip_field(wire_type, tag, &mut buf, DecodeContext::default()).is_err() {
            return 0;
        }
    }
    0
}

/// The hash `key_hash` finds for an update whose key is `key`: 0 for none, else never 0.
pub fn key_hash_of(key: &[u8]) -> u64 {
    use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
    if key.is_empty() {
        return 0;
    }
    BuildHasherDefault::<DefaultHasher>::default().hash_one(key) | 1
}

/// A publication from an encoded update body (another node's, through Redis; history): its
/// key is found in the body.
pub fn publication(channel: Arc<str>, offset: u64, update_type: i32, body: Bytes, accepted_at: Instant) -> Publication {
    let key_hash = key_hash(&body);
    Publication::with_key_hash(channel, offset, update_type, body, accepted_at, key_hash)
}

/// A publication of an update this server accepted: encodes it, and hashes the key it
/// already has instead of walking the body for it.
pub fn publication_of(channel: Arc<str>, update: &Update, accepted_at: Instant) -> Publication {
    let body = encode_update_body(update);
    let key_hash = key_hash_of(update.key.as_bytes());
    Publication::with_key_hash(channel, update.offset, update.r#type, body, accepted_at, key_hash)
}

/// A page of history as the protocol's `HistoryResult` (WebSocket `History` and the server
/// API).
pub fn history_result(page: &HistoryPage) -> pb::HistoryResult {
    let publications = page
        .publications
        .iter()
        .filter_map(|p| Update::decode(p.body.clone()).ok())
        .map(|u| pb::Publication {
            offset: u.offset,
            r#type: u.r#type,
            key: u.key,
            confidence: u.confidence,
            timestamp_us: u.timestamp_us,
            payload: u.payload,
        })
        .collect();
    pb::HistoryResult {
        epoch: page.position.epoch.to_string(),
        offset: page.position.offset,
        publications,
        truncated: page.truncated,
    }
}

/// Any frame as an element of `ServerMessage.frames`, allocated at its exact size.
pub fn encoded_frame(frame: &ServerFrame) -> Vec<u8> {
    let len = frame.encoded_len();
    let mut out = Vec::with_capacity(1 + encoded_len_varint(len as u64) + len);
    out.push(SERVER_MESSAGE_FRAMES_KEY);
    append_varint(&mut out, len as u64);
    // Encoding into a Vec only fails for lack of capacity, which a Vec grows.
    let _ = frame.encode(&mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::pb::{server_frame::Kind, Pong, ServerMessage, UpdateType};

    fn update(sub_id: u32) -> Update {
        Update {
            sub_id,
            offset: 7,
            r#type: UpdateType::Route as i32,
            key: "segment-12".into(),
            confidence: 0.5,
            timestamp_us: 1_700_000_000_000_000,
            payload: Bytes::from(vec![3u8; 300]),
            skipped: 0,
        }
    }

    #[test]
    fn shared_body_with_prefix_decodes_as_the_full_update() {
        let body = encode_update_body(&update(0));
        let mut message = Vec::new();
        for sub_id in [1u32, 127, 128, 300_000] {
            write_push(&mut message, sub_id, &body);
        }
        let pong = ServerFrame { kind: Some(Kind::Pong(Pong { timestamp_us: 9 })) };
        message.extend_from_slice(&encoded_frame(&pong));
        let decoded = ServerMessage::decode(message.as_slice()).unwrap();
        let subs: Vec<u32> = decoded
            .frames
            .iter()
            .filter_map(|f| match &f.kind {
                Some(Kind::Update(u)) => {
                    assert_eq!(u, &update(u.sub_id));
                    Some(u.sub_id)
                }
                _ => None,
            })
            .collect();
        assert_eq!(subs, vec![1, 127, 128, 300_000]);
        assert_eq!(decoded.frames.last(), Some(&pong));
    }

    #[test]
    fn offset_prefixed_body_decodes_as_the_full_update() {
        let rest = encode_update_body(&Update { offset: 0, ..update(0) });
        let body = body_with_offset(7, &rest);
        assert_eq!(Update::decode(body).unwrap(), update(0));
    }

    #[test]
    fn skipped_is_written_per_copy_and_decodes() {
        let body = encode_update_body(&update(0));
        let mut message = Vec::new();
        write_push_skipped(&mut message, 9, 300, &body);
        assert_eq!(message.len(), push_len_skipped(9, 300, body.len()));
        let decoded = ServerMessage::decode(message.as_slice()).unwrap();
        let Some(Kind::Update(got)) = &decoded.frames[0].kind else { panic!() };
        assert_eq!(got, &Update { sub_id: 9, skipped: 300, ..update(0) });
    }

    #[test]
    fn update_bodies_by_hand_are_what_prost_writes() {
        let full = update(0);
        let cases = [
            full.clone(),
            Update::default(),
            Update { offset: u64::MAX, skipped: u32::MAX, ..full.clone() },
            Update { r#type: -1, confidence: -0.0, key: String::new(), ..full.clone() },
            Update { confidence: f32::NAN, payload: Bytes::new(), timestamp_us: 0, ..full.clone() },
            Update { payload: Bytes::from(vec![9u8; 70_000]), ..full },
        ];
        for update in cases {
            assert_eq!(encode_update_body(&update).as_ref(), update.encode_to_vec().as_slice(), "{update:?}");
        }
    }

    #[test]
    fn publish_results_by_hand_are_what_encoded_frame_gives() {
        use crate::protocol::pb::{reply, PublishResult, Reply};
        for (id, epoch, offset) in
            [(1, "k3x9", 1), (0, "", 0), (u32::MAX, "e".repeat(300).as_str(), u64::MAX), (7, "", 5)]
        {
            let result = PublishResult { epoch: epoch.into(), offset };
            let frame =
                ServerFrame { kind: Some(Kind::Reply(Reply { id, result: Some(reply::Result::Publish(result)) })) };
            let expected = encoded_frame(&frame);
            let out = publish_result(id, epoch, offset);
            assert_eq!(out, expected, "id {id}, epoch {epoch:?}, offset {offset}");
            assert_eq!(out.capacity(), expected.len(), "allocated at its exact size");
        }
    }

    #[test]
    fn key_hash_finds_the_key_or_says_none() {
        let with_key = encode_update_body(&update(0));
        let same_key = encode_update_body(&Update { offset: 99, payload: Bytes::new(), ..update(0) });
        let other = encode_update_body(&Update { key: "segment-13".into(), ..update(0) });
        let none = encode_update_body(&Update { key: String::new(), ..update(0) });
        assert_ne!(key_hash(&with_key), 0);
        assert_eq!(key_hash(&with_key), key_hash(&same_key));
        assert_ne!(key_hash(&with_key), key_hash(&other));
        assert_eq!(key_hash(&none), 0);
        assert_eq!(key_hash(&[0xff, 0xff]), 0, "garbage has no key");
        // A publication made from its update hashes the key it has: the same figure.
        assert_eq!(key_hash(&with_key), key_hash_of(b"segment-12"));
        assert_eq!(key_hash_of(b""), 0);
    }

    #[test]
    fn lengths_match_what_is_written() {
        let body = encode_update_body(&update(0));
        for sub_id in [1u32, 200, 70_000] {
            let mut out = Vec::new();
            write_push(&mut out, sub_id, &body);
            assert_eq!(out.len(), push_len(sub_id, body.len()));
        }
        // The widest prefix: the largest sub_id and a body whose lengths take three bytes.
        let big = encode_update_body(&Update { payload: vec![7; 70_000].into(), ..update(0) });
        let mut out = Vec::new();
        write_push_skipped(&mut out, u32::MAX, 5, &big);
        assert_eq!(out.len(), push_len_skipped(u32::MAX, 5, big.len()));
        let decoded = ServerMessage::decode(out.as_slice()).unwrap();
        let Some(Kind::Update(u)) = &decoded.frames[0].kind else { panic!("an update") };
        assert_eq!((u.sub_id, u.skipped, u.payload.len()), (u32::MAX, 5, 70_000));
        let pong = ServerFrame { kind: Some(Kind::Pong(Pong { timestamp_us: 1 })) };
        let out = encoded_frame(&pong);
        assert_eq!(out.len(), out.capacity(), "allocated at its exact size");
        assert_eq!(ServerMessage::decode(out.as_slice()).unwrap().frames, [pong]);
    }
}
