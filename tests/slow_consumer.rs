//! A client that stops reading while updates flood in: the server keeps its memory bounded,
//! gives way on lower-priority updates, then closes it with 4001, while a healthy client on
//! the same channel gets every ROUTE update.

mod common;

use std::io::ErrorKind;
use std::time::Duration;

use common::{within, Retrying, TestServer};
use prost::Message as _;
use routopia_realtime::protocol::envelope;
use routopia_realtime::protocol::pb::{self, client_frame::Command, server_frame::Kind, UpdateType};
use socket2::{Domain, Socket, Type};

const UPDATES: u64 = 30_000;
const PAYLOAD: usize = 1000;

/// A WebSocket over a socket with a tiny receive buffer, connected and subscribed.
fn stalled_subscriber(server: &TestServer, channel: &str) -> tungstenite::WebSocket<Retrying<std::net::TcpStream>> {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.connect(&server.addr.into()).unwrap();
    let stream: std::net::TcpStream = socket.into();
    stream.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let (mut ws, _) = tungstenite::client::client(format!("ws://{}/ws", server.addr), Retrying(stream)).unwrap();
    let connect = pb::Connect { token: common::token("stalled"), ..Default::default() };
    let subscribe = pb::Subscribe { channel: channel.into(), ..Default::default() };
    let frames = vec![
        pb::ClientFrame { id: 1, command: Some(Command::Connect(connect)) },
        pb::ClientFrame { id: 2, command: Some(Command::Subscribe(subscribe)) },
    ];
    ws.send(tungstenite::Message::Binary(envelope::encode::<pb::ClientMessage>(frames, None).into())).unwrap();
    // Wait for the subscribe reply, then never read again until the flood is over.
    loop {
        let tungstenite::Message::Binary(data) = ws.read().unwrap() else { continue };
        let frames = pb::ServerMessage::decode(data).unwrap().frames;
        if frames.iter().any(|f| matches!(&f.kind, Some(Kind::Reply(r)) if r.id == 2)) {
            return ws;
        }
    }
}

fn publication(n: u64) -> pb::Publish {
    // Every tenth is a ROUTE update; the rest TRAFFIC on eight road segments.
    let (kind, key) = if n.is_multiple_of(10) {
        (UpdateType::Route, "route".into())
    } else {
        (UpdateType::Traffic, format!("segment-{}", n % 8))
    };
    let mut payload = vec![b'.'; PAYLOAD];
    payload[..8].copy_from_slice(&n.to_be_bytes());
    pb::Publish { channel: "city:paris".into(), r#type: kind as i32, key, confidence: 1.0, payload: payload.into() }
}

#[compio::test]
async fn a_stalled_reader_is_closed_with_4001_and_memory_stays_bounded_while_a_healthy_one_gets_every_route() {
    let env = [
        ("ROUTOPIA_LIMITS__MAX_OUTBOX_BYTES", "65536"),
        ("ROUTOPIA_LIMITS__MAX_PAYLOAD_SIZE", "2048"),
        ("ROUTOPIA_DELIVERY__CONFLATE_ABOVE_BYTES", "16384"),
        ("ROUTOPIA_HISTORY__SIZE", "100"),
    ];
    let server = TestServer::start(1, &env);
    let mut stalled = stalled_subscriber(&server, "city:paris");
    let mut healthy = server.client().await;
    let sub = healthy.subscribe("city:paris").await.unwrap();
    let baseline = server.rss_bytes();
    let (mut healthy_tx, mut healthy_rx) = healthy.split();

    // The healthy client reads everything in its own task.
    let reader = compio::runtime::spawn(async move {
        let (mut last, mut routes, mut skipped) = (0u64, 0u64, 0u64);
        while last < UPDATES {
            let update = healthy_rx.next_update().await.expect("the healthy client stays connected");
            assert_eq!(update.sub_id, sub.sub_id);
            assert_eq!(update.offset, last + 1 + u64::from(update.skipped), "offsets add up with skipped");
            skipped += u64::from(update.skipped);
            if update.r#type == UpdateType::Route as i32 {
                routes += 1;
            }
            last = update.offset;
        }
        (routes, skipped)
    });
    let mut publisher = server.client().await;
    for batch in (1..=UPDATES).collect::<Vec<_>>().chunks(50) {
        let frames = batch.iter().map(|&n| pb::ClientFrame { id: 0, command: Some(Command::Publish(publication(n))) });
        publisher.send_frames(frames.collect()).await.unwrap();
    }
    let (routes, skipped) = within("the healthy client's updates", reader).await.unwrap();
    assert_eq!(routes, UPDATES / 10, "every ROUTE update reached the healthy client ({skipped} others skipped)");
    drop(healthy_tx.send_command(Command::Ping(pb::Ping::default())).await);

    // A stuck connection holds its bounded outbox, not the flood (30 MB went by).
    let grown = server.rss_bytes().saturating_sub(baseline);
    assert!(grown < 16 << 20, "server memory grew by {grown} bytes");

    // The stalled client finally reads: updates, then Disconnect 4001 and the close frame.
    let mut disconnect = None;
    let close = loop {
        match stalled.read() {
            Ok(tungstenite::Message::Binary(data)) => {
                for frame in pb::ServerMessage::decode(data).unwrap().frames {
                    if let Some(Kind::Disconnect(d)) = frame.kind {
                        disconnect = Some(d);
                    }
                }
            }
            Ok(tungstenite::Message::Close(frame)) => break frame.map(|f| u16::from(f.code)),
            Ok(_) => {}
            Err(tungstenite::Error::Io(err)) if err.kind() == ErrorKind::WouldBlock => panic!("no close within 60 s"),
            Err(err) => panic!("{err}"),
        }
    };
    assert_eq!(close, Some(4001));
    assert_eq!(disconnect.map(|d| (d.code, d.reconnect)), Some((4001, true)));
    common::wait_for_health(&server, "the slow consumer counted", |h| {
        h["protection"]["closed"]["slow_consumer"] == 1 && h["connections"] == 2
    });
}
