//! Whatever a client puts in `Connect.token`: JWT header and claims parsing, algorithm checks,
//! channel patterns from claims, and matching them.
#![no_main]
use libfuzzer_sys::fuzz_target;
use routopia_realtime::auth::Verifier;
use routopia_realtime::config::Auth;

fuzz_target!(|data: &[u8]| {
    let Ok(token) = std::str::from_utf8(data) else { return };
    let config = Auth { hmac_secret: "fuzz-secret-fuzz-secret-fuzz-secret!".into(), ..Auth::default() };
    let verifier = Verifier::setup(&config, 1_800_000_000).unwrap().verifier.unwrap();
    if let Ok(grant) = verifier.verify(token, 1_800_000_000) {
        let _ = grant.may_subscribe(token) && grant.may_publish(token);
    }
    if let Ok(pattern) = routopia_realtime::core::ChannelPattern::parse(token) {
        let _ = pattern.matches(token, token);
    }
});
