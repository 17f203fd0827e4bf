//! The protobuf/zstd envelope decoder: any bytes, bounded output (zstd bombs refused).
#![no_main]
use libfuzzer_sys::fuzz_target;
use routopia_realtime::protocol::envelope::{decode, Dictionaries};
use routopia_realtime::protocol::pb::{ClientMessage, ServerMessage};

fuzz_target!(|data: &[u8]| {
    let bytes = bytes::Bytes::copy_from_slice(data);
    let dictionaries = Dictionaries::default();
    let _ = decode::<ClientMessage>(bytes.clone(), 65536, &dictionaries);
    let _ = decode::<ServerMessage>(bytes, 65536, &dictionaries);
});
