//! Channel names, and the patterns tokens grant channels by.

/// Why a channel name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChannelNameError {
    #[error("channel name is empty")]
    Empty,
    #[error("channel name longer than {0} bytes")]
    TooLong(usize),
    #[error("channel name has a character outside A-Z a-z 0-9 : _ - . @ /")]
    BadCharacter,
}

/// Checks a channel name: 1..=`max_len` bytes of `A-Z a-z 0-9 : _ - . @ /`
/// (`route:42`, `weather:paris`, `poi:u09tv`).
pub fn validate_channel(name: &str, max_len: usize) -> Result<(), ChannelNameError> {
    if name.is_empty() {
        return Err(ChannelNameError::Empty);
    }
    if name.len() > max_len {
        return Err(ChannelNameError::TooLong(max_len));
    }
    if !name.bytes().all(|b| CHANNEL_BYTES[b as usize]) {
        return Err(ChannelNameError::BadCharacter);
    }
    Ok(())
}

/// The bytes a channel name may hold, as a table: every publish checks its channel's name.
const CHANNEL_BYTES: [bool; 256] = {
    let mut allowed = [false; 256];
    let mut b = 0;
    while b < 256 {
        allowed[b] = (b as u8).is_ascii_alphanumeric() || matches!(b as u8, b':' | b'_' | b'-' | b'.' | b'@' | b'/');
        b += 1;
    }
    allowed
};

/// The longest channel pattern.
pub(crate) const MAX_PATTERN_LEN: usize = 1024;

/// One piece of a channel pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(Box<[u8]>),
    /// `*`: any run of characters, also none.
    Any,
    /// `{sub}`: exactly the token's subject.
    Subject,
}

/// A channel pattern such as `route:{sub}` or `weather:*`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelPattern {
    parts: Vec<Part>,
}

impl ChannelPattern {
    /// Parses a pattern: channel-name characters, `*` and `{sub}`.
    pub fn parse(pattern: &str) -> Result<Self, String> {
        if pattern.is_empty() || pattern.len() > MAX_PATTERN_LEN {
            return Err(format!("a pattern has 1 to {MAX_PATTERN_LEN} characters"));
        }
        let mut parts = Vec::new();
        let mut literal = Vec::new();
        let mut rest = pattern.as_bytes();
        let flush = |literal: &mut Vec<u8>, parts: &mut Vec<Part>| {
            if !literal.is_empty() {
                parts.push(Part::Literal(std::mem::take(literal).into_boxed_slice()));
            }
        };
        while let Some(&byte) = rest.first() {
            if let Some(after) = rest.strip_prefix(b"{sub}") {
                flush(&mut literal, &mut parts);
                parts.push(Part::Subject);
                rest = after;
                continue;
            }
            match byte {
                b'*' => {
                    flush(&mut literal, &mut parts);
                    if parts.last() != Some(&Part::Any) {
                        parts.push(Part::Any);
                    }
                }
                b if b.is_ascii_alphanumeric() || b":_-.@/".contains(&b) => literal.push(b),
                _ => return Err(format!("`{}` is not allowed in a channel pattern", byte as char)),
            }
            rest = &rest[1..];
        }
        flush(&mut literal, &mut parts);
        Ok(Self { parts })
    }

    /// Whether `channel` matches for a token whose subject is `subject`.
    pub fn matches(&self, channel: &str, subject: &str) -> bool {
        self.matches_counting(channel.as_bytes(), subject.as_bytes(), &mut 0)
    }

    /// Glob matching without backtracking. The `*`s cut the pattern into segments of literals
    /// (`{sub}` is one once the subject is known): the first segment must begin the channel,
    /// the last must end it, and each one between is taken at its leftmost place after the one
    /// before, which is right because a `*` takes whatever lies between, so a match further
    /// right leaves less for the segments after it. At most (channel length + 1) × (pattern
    /// length, `{sub}` as the subject) bytes are compared, counted in `steps`.
    pub(crate) fn matches_counting(&self, text: &[u8], subject: &[u8], steps: &mut u64) -> bool {
        // `{sub}` never matches for a token without a subject.
        if subject.is_empty() && self.parts.contains(&Part::Subject) {
            return false;
        }
        let mut segments = self.parts.split(|part| *part == Part::Any);
        let first = segments.next().unwrap_or_default();
        let Some(last) = segments.next_back() else {
            // No `*`: the one segment is the whole channel.
            return segment_len(first, subject) == text.len() && segment_at(first, text, 0, subject, steps);
        };
        let (first_len, last_len) = (segment_len(first, subject), segment_len(last, subject));
        let Some(last_at) = text.len().checked_sub(last_len).filter(|&at| at >= first_len) else { return false };
        if !segment_at(first, text, 0, subject, steps) || !segment_at(last, text, last_at, subject, steps) {
            return false;
        }
        let mut from = first_len;
        for segment in segments {
            let len = segment_len(segment, subject);
            let Some(latest) = last_at.checked_sub(len) else { return false };
            match (from..=latest).find(|&at| segment_at(segment, text, at, subject, steps)) {
                Some(at) => from = at + len,
                None => return false,
            }
        }
        true
    }
}

/// Bytes a segment (parts without `*`) stands for.
fn segment_len(segment: &[Part], subject: &[u8]) -> usize {
    segment
        .iter()
        .map(|part| match part {
            Part::Literal(bytes) => bytes.len(),
            Part::Subject => subject.len(),
            Part::Any => 0,
        })
        .sum()
}

/// Whether `segment` is found in `text` at `at` (which leaves room for it).
fn segment_at(segment: &[Part], text: &[u8], mut at: usize, subject: &[u8], steps: &mut u64) -> bool {
    for part in segment {
        let expected: &[u8] = match part {
            Part::Literal(bytes) => bytes,
            Part::Subject => subject,
            Part::Any => &[],
        };
        *steps += expected.len() as u64;
        if text.get(at..at + expected.len()) != Some(expected) {
            return false;
        }
        at += expected.len();
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typical_names_pass_and_bad_ones_say_why() {
        for name in ["route:42", "weather:paris", "poi:u09tv", "user@x/route-1.2_b"] {
            validate_channel(name, 128).unwrap();
        }
        assert_eq!(validate_channel("", 128), Err(ChannelNameError::Empty));
        assert_eq!(validate_channel("route 42", 128), Err(ChannelNameError::BadCharacter));
        assert_eq!(validate_channel("ruta:é", 128), Err(ChannelNameError::BadCharacter));
        assert_eq!(validate_channel(&"a".repeat(129), 128), Err(ChannelNameError::TooLong(128)));
        // Every ASCII character: exactly letters, digits and : _ - . @ / pass.
        for c in (0..128u8).map(char::from) {
            let allowed = c.is_ascii_alphanumeric() || ":_-.@/".contains(c);
            assert_eq!(validate_channel(&format!("route{c}1"), 128).is_ok(), allowed, "{c:?}");
        }
    }
}
