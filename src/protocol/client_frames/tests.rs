use prost::Message;

use super::*;
use crate::protocol::pb::{self, ClientMessage};

/// What prost makes of `data`, if anything.
fn by_prost(data: &[u8]) -> Option<Vec<ClientFrame>> {
    ClientMessage::decode(data).ok().filter(|message| message.zstd.is_empty()).map(|message| message.frames)
}

/// Frames compared by their encoding, which also compares NaN confidences bit for bit.
fn encoded(frames: &[ClientFrame]) -> Vec<u8> {
    ClientMessage { frames: frames.to_vec(), zstd: Bytes::new() }.encode_to_vec()
}

/// Decodes by hand; when taken, asserts prost decodes the same frames.
fn by_hand(data: &[u8]) -> Option<Vec<ClientFrame>> {
    let mut frames = Vec::new();
    if !decode_common(data, &mut frames) {
        assert!(frames.is_empty(), "a declined message leaves no frames");
        return None;
    }
    let prost = by_prost(data).expect("prost takes what the hand reader takes");
    assert_eq!(encoded(&frames), encoded(&prost), "{data:02x?}");
    Some(frames)
}

fn publish(id: u32, channel: &str, update_type: i32, key: &str, confidence: f32, payload: &[u8]) -> ClientFrame {
    let publish = Publish {
        channel: channel.into(),
        r#type: update_type,
        key: key.into(),
        confidence,
        payload: Bytes::copy_from_slice(payload),
    };
    ClientFrame { id, command: Some(Command::Publish(publish)) }
}

fn ping(id: u32, timestamp_us: u64) -> ClientFrame {
    ClientFrame { id, command: Some(Command::Ping(Ping { timestamp_us })) }
}

fn message(frames: Vec<ClientFrame>) -> Vec<u8> {
    ClientMessage { frames, zstd: Bytes::new() }.encode_to_vec()
}

#[test]
fn publishes_and_pings_decode_as_prost_decodes_them() {
    let frames = vec![
        publish(7, "route:42", pb::UpdateType::Route as i32, "leg-3", 0.75, b"eta=12"),
        ping(8, 1_764_000_000_000_000),
        publish(0, "poi:berlin", pb::UpdateType::Poi as i32, "", 0.0, b""),
        publish(u32::MAX, "w", -1, "k\u{e9}y", f32::NAN, &[0xff; 300]),
        ping(0, u64::MAX),
    ];
    let data = message(frames.clone());
    assert_eq!(encoded(&by_hand(&data).expect("taken")), encoded(&frames));
    assert_eq!(by_hand(&[]).expect("an empty message is no frames"), vec![]);
}

#[test]
fn a_field_given_twice_keeps_its_last_value_as_prost_does() {
    let mut body = Vec::new();
    for (channel, update_type) in [("route:1", 1), ("route:2", 2)] {
        body.extend([key(1, LEN), channel.len() as u8]);
        body.extend(channel.as_bytes());
        body.extend([key(2, VARINT), update_type]);
    }
    let mut frame = vec![key(1, VARINT), 1, key(5, LEN), body.len() as u8];
    frame.extend(&body);
    frame.extend([key(1, VARINT), 9]);
    let mut data = vec![key(1, LEN), frame.len() as u8];
    data.extend(&frame);
    let frames = by_hand(&data).expect("taken");
    assert_eq!(frames[0].id, 9);
    let Some(Command::Publish(publish)) = &frames[0].command else { panic!("{frames:?}") };
    assert_eq!((publish.channel.as_str(), publish.r#type), ("route:2", 2));
}

#[test]
fn anything_else_is_left_to_prost() {
    let subscribe = ClientFrame {
        id: 1,
        command: Some(Command::Subscribe(pb::Subscribe { channel: "route:1".into(), ..Default::default() })),
    };
    let zstd = ClientMessage { frames: vec![], zstd: Bytes::from_static(b"\x28\xb5\x2f\xfd") }.encode_to_vec();
    let no_command = message(vec![ClientFrame { id: 3, command: None }]);
    let mixed = message(vec![ping(1, 2), subscribe.clone()]);
    let mut unknown_field = message(vec![ping(1, 2)]);
    // Field 15 (varint) inside the frame: prost skips it, the hand reader declines.
    unknown_field[1] += 2;
    unknown_field.extend([key(15, VARINT), 1]);
    let mut long_key = vec![key(1, LEN) | 0x80, 0x00];
    long_key.extend(&message(vec![ping(1, 2)])[1..]);
    let mut two_commands = message(vec![ping(1, 2)]);
    let ping_again = [key(7, LEN), 2, key(1, VARINT), 5];
    two_commands[1] += ping_again.len() as u8;
    two_commands.extend(ping_again);
    let bad_text = message(vec![publish(1, "route:1", 1, "", 0.0, b"x")]);
    let bad_text: Vec<u8> = bad_text.iter().map(|&b| if b == b'1' { 0xc3 } else { b }).collect();
    for (case, data) in [
        ("subscribe", message(vec![subscribe])),
        ("zstd", zstd),
        ("no command", no_command),
        ("mixed", mixed),
        ("unknown field", unknown_field),
        ("two-byte key", long_key),
        ("two commands", two_commands),
        ("invalid UTF-8", bad_text),
    ] {
        assert!(by_hand(&data).is_none(), "{case}");
    }
    let whole = message(vec![publish(1, "route:1", 1, "k", 0.5, b"payload")]);
    for cut in 1..whole.len() {
        assert!(by_hand(&whole[..cut]).is_none(), "cut at {cut}");
        assert!(by_prost(&whole[..cut]).is_none(), "prost refuses it too, cut at {cut}");
    }
}

#[test]
fn varints_take_ten_bytes_at_most_as_prost_does() {
    for tenth in [0x00, 0x01, 0x02, 0x7f] {
        let mut data = vec![key(1, LEN), 13, key(7, LEN), 11, key(1, VARINT)];
        data.extend([0xff; 9]);
        data.push(tenth);
        let taken = by_hand(&data);
        assert_eq!(taken.is_some(), tenth < 2, "tenth byte {tenth:#x}");
        assert_eq!(by_prost(&data).is_some(), tenth < 2, "prost, tenth byte {tenth:#x}");
    }
}
