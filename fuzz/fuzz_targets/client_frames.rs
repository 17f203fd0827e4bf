//! The server's hand reader of publishes and pings (`client_frames::decode_common`) against
//! prost: whenever it takes a message, prost must decode the same bytes to the same frames
//! (compared by their encoding, so NaN confidences compare bit for bit); when it declines,
//! it must leave no frames behind.
#![no_main]
use libfuzzer_sys::fuzz_target;
use prost::Message;
use routopia_realtime::protocol::client_frames::decode_common;
use routopia_realtime::protocol::pb::ClientMessage;

fuzz_target!(|data: &[u8]| {
    let mut frames = Vec::new();
    if !decode_common(data, &mut frames) {
        assert!(frames.is_empty(), "a declined message left frames");
        return;
    }
    let reference = ClientMessage::decode(data).expect("prost decodes what the hand reader took");
    assert!(reference.zstd.is_empty(), "the hand reader took a zstd envelope");
    let encode = |frames| ClientMessage { frames, zstd: Default::default() }.encode_to_vec();
    assert_eq!(encode(frames), encode(reference.frames));
});
