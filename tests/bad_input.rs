//! Bad input from the network: each case gets a clear error or close code, and the other
//! clients keep receiving.

mod common;

use bytes::Bytes;
use common::{expect_disconnect, payload, within, TestServer};
use prost::Message;
use routopia_realtime::client::Client;
use routopia_realtime::protocol::pb::{self, client_frame::Command, server_frame::Kind, UpdateType};

/// A subscriber and a publisher on an unrelated channel, checked after every bad input.
struct Bystander {
    subscriber: Client,
    publisher: Client,
    sent: u64,
}

impl Bystander {
    async fn new(server: &TestServer) -> Self {
        let mut subscriber = server.client().await;
        subscriber.subscribe("route:bystander").await.unwrap();
        Bystander { subscriber, publisher: server.client().await, sent: 0 }
    }

    async fn still_receives(&mut self) {
        self.sent += 1;
        self.publisher.publish("route:bystander", UpdateType::Route, "k", payload(self.sent)).await.unwrap();
        let update = within("bystander update", self.subscriber.next_update()).await.unwrap();
        assert_eq!(update.offset, self.sent);
    }
}

/// Expects a `Disconnect` with `code`, then a WebSocket close with the same code.
/// A client-to-server frame built by hand: `opcode`, masked or not.
fn wire_frame(opcode: u8, payload: &[u8], masked: bool) -> Vec<u8> {
    assert!(payload.len() < 126);
    let mut out = vec![0x80 | opcode, (if masked { 0x80 } else { 0 }) | payload.len() as u8];
    let mask = [0x12, 0x34, 0x56, 0x78];
    if masked {
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    } else {
        out.extend_from_slice(payload);
    }
    out
}

#[compio::test]
async fn garbage_bytes_close_with_4500() {
    let server = TestServer::start(2, &[]);
    let mut bystander = Bystander::new(&server).await;
    let mut bad = server.client().await;
    bad.send_binary(Bytes::from_static(&[0xff, 0xff, 0xff, 0xff, 0x0f])).await.unwrap();
    expect_disconnect(&mut bad, 4500).await;
    bystander.still_receives().await;
}

#[compio::test]
async fn truncated_protobuf_closes_with_4500() {
    let server = TestServer::start(2, &[]);
    let mut bystander = Bystander::new(&server).await;
    let mut bad = server.client().await;
    let publish =
        pb::Publish { channel: "route:x".into(), r#type: 1, payload: vec![1; 40].into(), ..Default::default() };
    let message = pb::ClientMessage {
        frames: vec![pb::ClientFrame { id: 1, command: Some(Command::Publish(publish)) }],
        zstd: Bytes::new(),
    };
    let mut bytes = message.encode_to_vec();
    bytes.truncate(bytes.len() - 10);
    bad.send_binary(bytes.into()).await.unwrap();
    expect_disconnect(&mut bad, 4500).await;
    bystander.still_receives().await;
}

#[compio::test]
async fn oversized_message_closes_with_1009() {
    let server = TestServer::start(2, &[]);
    let mut bystander = Bystander::new(&server).await;
    let mut bad = server.client().await;
    bad.send_binary(Bytes::from(vec![0u8; 70 * 1024])).await.unwrap();
    expect_disconnect(&mut bad, 1009).await;
    bystander.still_receives().await;
}

#[compio::test]
async fn zstd_bomb_closes_with_1009() {
    let server = TestServer::start(1, &[]);
    let mut bystander = Bystander::new(&server).await;
    let mut bad = server.client().await;
    let frames: Vec<pb::ClientFrame> =
        (0..20_000).map(|_| pb::ClientFrame { id: 1, command: Some(Command::Ping(pb::Ping::default())) }).collect();
    let inner = pb::ClientMessage { frames, zstd: Bytes::new() }.encode_to_vec();
    let packed = pb::ClientMessage { frames: vec![], zstd: zstd::bulk::compress(&inner, 3).unwrap().into() };
    assert!(packed.encoded_len() < 4096, "the bomb itself is small");
    bad.send_binary(packed.encode_to_vec().into()).await.unwrap();
    expect_disconnect(&mut bad, 1009).await;
    bystander.still_receives().await;
}

#[compio::test]
async fn corrupt_zstd_closes_with_4500_not_as_too_big() {
    let server = TestServer::start(1, &[]);
    let mut bystander = Bystander::new(&server).await;
    let frames: Vec<pb::ClientFrame> =
        (0..50).map(|id| pb::ClientFrame { id, command: Some(Command::Ping(pb::Ping::default())) }).collect();
    let inner = pb::ClientMessage { frames, zstd: Bytes::new() }.encode_to_vec();
    let mut compressed = zstd::bulk::compress(&inner, 3).unwrap();
    let middle = compressed.len() / 2;
    compressed[middle..].fill(0xa5);
    for garbage in [compressed, b"not zstd at all".to_vec()] {
        let mut bad = server.client().await;
        let packed = pb::ClientMessage { frames: vec![], zstd: garbage.into() };
        bad.send_binary(packed.encode_to_vec().into()).await.unwrap();
        let disconnect = expect_disconnect(&mut bad, 4500).await;
        assert!(disconnect.reason.contains("does not decompress"), "{disconnect:?}");
    }
    common::wait_for_metrics(server.addr, "two bad messages, no message too big", |m| {
        m.get("realtime_connections_closed_total", &[("reason", "bad_message")]) == 2.0
            && m.get("realtime_connections_closed_total", &[("reason", "message_too_big")]) == 0.0
    });
    bystander.still_receives().await;
}

#[compio::test]
async fn unknown_command_gets_error_450_and_the_connection_stays() {
    let server = TestServer::start(1, &[]);
    let mut client = server.client().await;
    // A frame with request id 5 and only field 20, which no version of the protocol defines.
    let frame = [0x08, 0x05, 0xa0, 0x01, 0x01];
    let mut message = vec![0x0a, frame.len() as u8];
    message.extend_from_slice(&frame);
    client.send_binary(message.into()).await.unwrap();
    match within("error reply", client.next_frame()).await.unwrap().kind {
        Some(Kind::Reply(pb::Reply { id: 5, result: Some(pb::reply::Result::Error(error)) })) => {
            assert_eq!(error.code, 450, "{error:?}")
        }
        other => panic!("expected error 450, got {other:?}"),
    }
    client.subscribe("route:still-here").await.unwrap();
}

#[compio::test]
async fn text_frame_closes_with_1003() {
    let server = TestServer::start(2, &[]);
    let mut bystander = Bystander::new(&server).await;
    let mut bad = server.client().await;
    bad.send_wire(wire_frame(0x1, b"{\"subscribe\":\"route:1\"}", true)).await.unwrap();
    expect_disconnect(&mut bad, 1003).await;
    bystander.still_receives().await;
}

#[compio::test]
async fn unmasked_client_frame_closes_with_1002() {
    let server = TestServer::start(1, &[]);
    let mut bystander = Bystander::new(&server).await;
    let mut bad = server.client().await;
    bad.send_wire(wire_frame(0x2, &[0x0a, 0x00], false)).await.unwrap();
    expect_disconnect(&mut bad, 1002).await;
    bystander.still_receives().await;
}

#[compio::test]
async fn command_before_connect_closes_with_4501() {
    let server = TestServer::start(1, &[]);
    let mut bystander = Bystander::new(&server).await;
    let mut bad = Client::connect_raw(server.addr, "/ws").await.unwrap();
    let subscribe = pb::Subscribe { channel: "route:bystander".into(), ..Default::default() };
    bad.send_frames(vec![pb::ClientFrame { id: 1, command: Some(Command::Subscribe(subscribe)) }]).await.unwrap();
    expect_disconnect(&mut bad, 4501).await;
    bystander.still_receives().await;
}

#[compio::test]
async fn too_many_frames_close_with_4502() {
    let server = TestServer::start(1, &[("ROUTOPIA_LIMITS__MAX_FRAMES_PER_MESSAGE", "10")]);
    let mut bystander = Bystander::new(&server).await;
    let mut bad = server.client().await;
    let frames = (1..=11).map(|id| pb::ClientFrame { id, command: Some(Command::Ping(pb::Ping::default())) }).collect();
    bad.send_frames(frames).await.unwrap();
    expect_disconnect(&mut bad, 4502).await;
    bystander.still_receives().await;
}

#[compio::test]
async fn oversized_payload_and_untyped_publish_are_refused_with_errors() {
    let server = TestServer::start(1, &[]);
    let mut client = server.client().await;
    let err = client.publish("route:1", UpdateType::Route, "k", vec![0; 40 * 1024]).await.unwrap_err();
    assert!(err.to_string().contains("413"), "{err}");
    let err = client.publish("route:1", UpdateType::Unspecified, "k", vec![1]).await.unwrap_err();
    assert!(err.to_string().contains("400"), "{err}");
    // Nothing was published: the first real publication gets offset 1.
    let result = client.publish("route:1", UpdateType::Route, "k", vec![1]).await.unwrap();
    assert_eq!(result.offset, 1);
}
