//! The channel-pattern matcher the server used before its linear one: recursion that tries
//! every length for each `*`, exponential in the number of `*`s. Kept only as the oracle the
//! new matcher is checked against (the unit tests, and the `channel_pattern` fuzz target,
//! which includes this file by path); never part of the server.

/// One piece of a pattern, as the old parser made them.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(Vec<u8>),
    Any,
    Subject,
}

/// Whether `channel` matches `pattern` (one that `ChannelPattern::parse` accepts) for a token
/// whose subject is `subject`; `steps` counts the comparisons made.
pub fn matches(pattern: &str, channel: &str, subject: &str, steps: &mut u64) -> bool {
    matches_from(&parts(pattern), channel.as_bytes(), subject.as_bytes(), steps)
}

fn parts(pattern: &str) -> Vec<Part> {
    let mut parts = Vec::new();
    let mut literal = Vec::new();
    let mut rest = pattern.as_bytes();
    let flush = |literal: &mut Vec<u8>, parts: &mut Vec<Part>| {
        if !literal.is_empty() {
            parts.push(Part::Literal(std::mem::take(literal)));
        }
    };
    while let Some(&byte) = rest.first() {
        if let Some(after) = rest.strip_prefix(b"{sub}") {
            flush(&mut literal, &mut parts);
            parts.push(Part::Subject);
            rest = after;
            continue;
        }
        if byte == b'*' {
            flush(&mut literal, &mut parts);
            if parts.last() != Some(&Part::Any) {
                parts.push(Part::Any);
            }
        } else {
            literal.push(byte);
        }
        rest = &rest[1..];
    }
    flush(&mut literal, &mut parts);
    parts
}

fn matches_from(parts: &[Part], text: &[u8], subject: &[u8], steps: &mut u64) -> bool {
    *steps += 1;
    let Some((first, rest)) = parts.split_first() else { return text.is_empty() };
    match first {
        Part::Literal(bytes) => text.strip_prefix(&bytes[..]).is_some_and(|t| matches_from(rest, t, subject, steps)),
        Part::Subject => {
            !subject.is_empty() && text.strip_prefix(subject).is_some_and(|t| matches_from(rest, t, subject, steps))
        }
        Part::Any => (0..=text.len()).any(|skip| matches_from(rest, &text[skip..], subject, steps)),
    }
}
