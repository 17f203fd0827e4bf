//! The server's own reading of whole binary frames (`WsEndpoint::whole_binary_messages`)
//! against tungstenite's: whenever it takes a read, tungstenite must read the same bytes as
//! exactly the same messages, with no error and nothing left over.
#![no_main]
use libfuzzer_sys::fuzz_target;
use routopia_realtime::protocol::ws::{WsEndpoint, WsEvent};

fuzz_target!(|data: &[u8]| {
    // A small limit, so that frames at and over it are common.
    let max_message_size = 300;
    let fast = WsEndpoint::server(max_message_size);
    let Some(messages) = fast.whole_binary_messages(data) else { return };
    let mut taken = Vec::new();
    messages.unmask_each(|message| {
        taken.push(message.to_vec());
        true
    });
    let mut reference = WsEndpoint::server(max_message_size);
    reference.feed(data);
    let mut read = Vec::new();
    loop {
        match reference.next_event() {
            Ok(Some(WsEvent::Binary(message))) => read.push(message.to_vec()),
            Ok(None) => break,
            other => panic!("tungstenite read {other:?} where the fast path took whole binary frames"),
        }
    }
    assert_eq!(taken, read);
    reference.release_if_idle();
    assert!(!reference.has_output(), "tungstenite answered something");
});
