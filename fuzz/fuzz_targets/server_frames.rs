//! The client's reader of server frames must not panic on any bytes.
#![no_main]
use libfuzzer_sys::fuzz_target;
use routopia_realtime::protocol::ws::MessageReader;

fuzz_target!(|data: &[u8]| {
    let mut reader = MessageReader::new(1 << 20);
    for chunk in data.chunks(61) {
        reader.feed(chunk);
        while let Ok(Some(_)) = reader.next_event() {}
    }
});
