//! The HTTP request head parser must refuse or accept any bytes without panicking.
#![no_main]
use libfuzzer_sys::fuzz_target;
use routopia_realtime::protocol::http::parse_head;

fuzz_target!(|data: &[u8]| {
    if let Ok(Some((head, used))) = parse_head(data, 8192, 32) {
        assert!(used <= data.len());
        assert!(head.websocket_key.is_none() || head.upgrade_problem.is_none());
    }
});
