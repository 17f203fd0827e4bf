//! The channel-pattern matcher against the backtracking one it replaced, on any pattern,
//! channel and subject, spelled from small alphabets so that they often match.
#![no_main]
use libfuzzer_sys::fuzz_target;
use routopia_realtime::core::ChannelPattern;

#[path = "../../src/auth/backtracking.rs"]
mod backtracking;

const PATTERN: &[&str] = &["a", "b", ":", "*", "*", "{sub}", "{", "}"];
const TEXT: &[&str] = &["a", "b", ":", "*", "{sub}"];

fn spell(bytes: &[u8], alphabet: &[&str]) -> String {
    bytes.iter().map(|&b| alphabet[usize::from(b) % alphabet.len()]).collect()
}

fuzz_target!(|input: (&[u8], &[u8], &[u8])| {
    let (pattern, channel, subject) = input;
    let (pattern, channel, subject) = (spell(pattern, PATTERN), spell(channel, TEXT), spell(subject, TEXT));
    // The oracle tries every split for each `*`: keep its cases small enough to run quickly.
    if pattern.matches('*').count() > 5 || channel.len() > 32 || subject.len() > 10 {
        return;
    }
    let Ok(parsed) = ChannelPattern::parse(&pattern) else { return };
    let expected = backtracking::matches(&pattern, &channel, &subject, &mut 0);
    assert_eq!(parsed.matches(&channel, &subject), expected, "{pattern:?} {channel:?} {subject:?}");
});
