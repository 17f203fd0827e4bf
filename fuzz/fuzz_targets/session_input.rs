//! Everything a client can send after the upgrade: WebSocket framing (unmasking, fragments,
//! control frames, limits), the envelope, and every command, through one session. Auth is off
//! so every command is reachable (the `token` target covers tokens); rate limits are on.
#![no_main]
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use libfuzzer_sys::fuzz_target;
use routopia_realtime::config::{AuthMode, Config};
use routopia_realtime::ratelimit::KeyedBuckets;
use routopia_realtime::core::{ConnId, ConnLabel, Now};
use routopia_realtime::session::{Session, SessionLimits};

fuzz_target!(|data: &[u8]| {
    let mut config = Config::default();
    config.auth.mode = AuthMode::Disabled;
    let users = Arc::new(KeyedBuckets::new([config.rate_limits.user_commands, config.rate_limits.user_publishes]));
    let limits = Rc::new(SessionLimits::from_config(&config, None, users));
    let now = Now { instant: Instant::now(), unix_us: 1 };
    let mut session =
        Session::new(ConnLabel { shard: 0, conn: ConnId { index: 1, generation: 1 } }, limits, now.instant);
    // Feed in uneven pieces, as TCP would.
    for chunk in data.chunks(97) {
        session.handle_bytes(now, chunk);
        while session.poll_event().is_some() {}
        let mut out = Vec::new();
        session.poll_transmit(&mut out);
        session.handle_timeout(now.instant);
    }
});
