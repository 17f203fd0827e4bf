//! The commands most messages carry (`Publish`, `Ping`) read by hand. prost's generic decoding
//! of the three nested messages of a publish took about a fifth of the server's instructions
//! per request; this reads the same bytes in one pass. It takes a message only when every
//! frame is one of those commands with fields it knows, each key in its one-byte form; for
//! anything else it declines, and prost decodes the message as before, so both always agree
//! (the `client_frames` fuzz target compares them).

use bytes::Bytes;

use super::pb::{client_frame::Command, ClientFrame, Ping, Publish};

/// Wire types.
const VARINT: u8 = 0;
const LEN: u8 = 2;
const FIXED32: u8 = 5;

const fn key(field: u8, wire_type: u8) -> u8 {
    field << 3 | wire_type
}

/// Decodes `data`, a `ClientMessage`, into `frames` (empty) when it is one this reader
/// takes; otherwise returns false with `frames` left empty.
pub fn decode_common(data: &[u8], frames: &mut Vec<ClientFrame>) -> bool {
    let mut reader = Reader(data);
    while !reader.0.is_empty() {
        let frame = match reader.byte() {
            Some(k) if k == key(1, LEN) => reader.delimited().and_then(frame),
            _ => None,
        };
        match frame {
            Some(frame) => frames.push(frame),
            None => {
                frames.clear();
                return false;
            }
        }
    }
    true
}

fn frame(bytes: &[u8]) -> Option<ClientFrame> {
    let mut reader = Reader(bytes);
    let mut id = 0;
    let mut command = None;
    while !reader.0.is_empty() {
        match reader.byte()? {
            k if k == key(1, VARINT) => id = reader.varint()? as u32,
            // A second command would be merged into the first (the same one) or replace it
            // (another): prost's business.
            k if k == key(5, LEN) && command.is_none() => {
                command = Some(Command::Publish(publish(reader.delimited()?)?))
            }
            k if k == key(7, LEN) && command.is_none() => command = Some(Command::Ping(ping(reader.delimited()?)?)),
            _ => return None,
        }
    }
    // A frame without a command is answered with an error: prost's business too.
    Some(ClientFrame { id, command: Some(command?) })
}

/// A field given twice takes its last value, as protobuf says for singular fields.
fn publish(bytes: &[u8]) -> Option<Publish> {
    let mut reader = Reader(bytes);
    let mut publish = Publish::default();
    while !reader.0.is_empty() {
        match reader.byte()? {
            k if k == key(1, LEN) => publish.channel = text(reader.delimited()?)?,
            k if k == key(2, VARINT) => publish.r#type = reader.varint()? as i32,
            k if k == key(3, LEN) => publish.key = text(reader.delimited()?)?,
            k if k == key(4, FIXED32) => publish.confidence = f32::from_le_bytes(reader.fixed32()?),
            k if k == key(5, LEN) => publish.payload = Bytes::copy_from_slice(reader.delimited()?),
            _ => return None,
        }
    }
    Some(publish)
}

fn ping(bytes: &[u8]) -> Option<Ping> {
    let mut reader = Reader(bytes);
    let mut ping = Ping::default();
    while !reader.0.is_empty() {
        match reader.byte()? {
            k if k == key(1, VARINT) => ping.timestamp_us = reader.varint()?,
            _ => return None,
        }
    }
    Some(ping)
}

fn text(bytes: &[u8]) -> Option<String> {
    std::str::from_utf8(bytes).ok().map(str::to_owned)
}

/// What is left of a message.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn byte(&mut self) -> Option<u8> {
        let (&first, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(first)
    }

    /// prost's own varint reading, so the two agree on every varint by construction.
    fn varint(&mut self) -> Option<u64> {
        prost::encoding::decode_varint(&mut self.0).ok()
    }

    fn fixed32(&mut self) -> Option<[u8; 4]> {
        let (bytes, rest) = self.0.split_first_chunk::<4>()?;
        self.0 = rest;
        Some(*bytes)
    }

    /// A length-delimited field's bytes.
    fn delimited(&mut self) -> Option<&'a [u8]> {
        let len = usize::try_from(self.varint()?).ok()?;
        let (bytes, rest) = self.0.split_at_checked(len)?;
        self.0 = rest;
        Some(bytes)
    }
}

#[cfg(test)]
mod tests;
