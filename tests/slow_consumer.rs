//! A client that stops reading while updates flood in: the server keeps its memory bounded
//! and gives way on lower-priority updates; it closes it with 4001 only when ROUTE updates
//! alone overflow its queue, while a healthy client on the same channel gets every ROUTE
//! update. A client that stalls on a channel where ROUTE is rare keeps every ROUTE update and
//! is told what it missed. A client that stops reading while its answers
//! are large gets them whole and in order once it reads again, and so do subscribers whose
//! batches wait for the pacing tick.

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

type Stalled = tungstenite::WebSocket<Retrying<std::net::TcpStream>>;

/// A WebSocket over a socket with a tiny receive buffer, connected and subscribed.
fn stalled_subscriber(server: &TestServer, channel: &str) -> Stalled {
    let subscribe = pb::Subscribe { channel: channel.into(), ..Default::default() };
    small_window_client(server, Some(Command::Subscribe(subscribe)))
}

/// A WebSocket over a socket with a tiny receive buffer, connected, and answered `then` if
/// given (frame id 2).
fn small_window_client(server: &TestServer, then: Option<Command>) -> Stalled {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.connect(&server.addr.into()).unwrap();
    let stream: std::net::TcpStream = socket.into();
    stream.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let (mut ws, _) = tungstenite::client::client(format!("ws://{}/ws", server.addr), Retrying(stream)).unwrap();
    let connect = pb::Connect { token: common::token("stalled"), ..Default::default() };
    let mut frames = vec![pb::ClientFrame { id: 1, command: Some(Command::Connect(connect)) }];
    frames.extend(then.map(|command| pb::ClientFrame { id: 2, command: Some(command) }));
    let last = frames.len() as u32;
    ws.send(tungstenite::Message::Binary(envelope::encode::<pb::ClientMessage>(frames, None).into())).unwrap();
    // Wait for the last reply, then never read again until told.
    loop {
        let tungstenite::Message::Binary(data) = ws.read().unwrap() else { continue };
        let frames = pb::ServerMessage::decode(data).unwrap().frames;
        if frames.iter().any(|f| matches!(&f.kind, Some(Kind::Reply(r)) if r.id == last)) {
            return ws;
        }
    }
}

/// A publication of `kind` under `key` on `channel`.
fn publish(channel: &str, kind: UpdateType, key: String, payload: Vec<u8>) -> Command {
    Command::Publish(pb::Publish {
        channel: channel.into(),
        r#type: kind as i32,
        key,
        confidence: 1.0,
        payload: payload.into(),
    })
}

fn publication(n: u64) -> Command {
    // Every tenth is a ROUTE update; the rest TRAFFIC on eight road segments.
    let (kind, key) = if n.is_multiple_of(10) {
        (UpdateType::Route, "route".into())
    } else {
        (UpdateType::Traffic, format!("segment-{}", n % 8))
    };
    let mut payload = vec![b'.'; PAYLOAD];
    payload[..8].copy_from_slice(&n.to_be_bytes());
    publish("city:paris", kind, key, payload)
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
        let frames = batch.iter().map(|&n| pb::ClientFrame { id: 0, command: Some(publication(n)) });
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

/// The operator's probe: a reader stalls on a channel where ROUTE is 1 % of the updates, far
/// under its queue's limit, while the flood is many times the limit (and the socket's
/// buffers), and the server pings it meanwhile. It is not closed; when it reads again it gets
/// every ROUTE update, and every update says how many before it were skipped.
#[compio::test]
async fn a_stalled_reader_on_a_channel_with_rare_routes_keeps_every_route_and_is_not_closed() {
    const UPDATES: u64 = 20_000;
    const CHANNEL: &str = "city:lyon";
    let env = [
        ("ROUTOPIA_LIMITS__MAX_OUTBOX_BYTES", "262144"),
        ("ROUTOPIA_LIMITS__MAX_PAYLOAD_SIZE", "2048"),
        ("ROUTOPIA_DELIVERY__CONFLATE_ABOVE_BYTES", "65536"),
        ("ROUTOPIA_HISTORY__SIZE", "100"),
        // Pings queue behind the stalled reader's updates, as over a long stall.
        ("ROUTOPIA_HEARTBEAT__INTERVAL", "100ms"),
        ("ROUTOPIA_HEARTBEAT__TIMEOUT", "10m"),
    ];
    let server = TestServer::start(1, &env);
    let mut stalled = stalled_subscriber(&server, CHANNEL);
    // A healthy subscriber reads everything: once it has the last update, the stalled one's
    // queue has been offered every update too.
    let mut healthy = server.client().await;
    healthy.subscribe(CHANNEL).await.unwrap();
    let (_healthy_tx, mut healthy_rx) = healthy.split();
    let reader = compio::runtime::spawn(async move {
        while healthy_rx.next_update().await.expect("the healthy client stays connected").offset < UPDATES {}
    });
    // Every hundredth update (the last among them) is a ROUTE update; the rest TRAFFIC, keyless.
    let rare_route = |n: u64| {
        let mut payload = vec![b'.'; PAYLOAD];
        payload[..8].copy_from_slice(&n.to_be_bytes());
        match n.is_multiple_of(100) {
            true => publish(CHANNEL, UpdateType::Route, "route".into(), payload),
            false => publish(CHANNEL, UpdateType::Traffic, String::new(), payload),
        }
    };
    let mut publisher = server.client().await;
    for batch in (1..=UPDATES).collect::<Vec<_>>().chunks(50) {
        let frames = batch.iter().map(|&n| pb::ClientFrame { id: 0, command: Some(rare_route(n)) });
        publisher.send_frames(frames.collect()).await.unwrap();
    }
    within("the healthy client's updates", reader).await.unwrap();

    // The stalled client reads again: every ROUTE update, offsets that add up, and no close.
    let (mut last, mut routes, mut skipped) = (0u64, 0u64, 0u64);
    while last < UPDATES {
        let message = match stalled.read() {
            Ok(tungstenite::Message::Binary(data)) => pb::ServerMessage::decode(data).unwrap(),
            Ok(tungstenite::Message::Close(frame)) => panic!("closed after offset {last}: {frame:?}"),
            Ok(_) => continue,
            Err(err) => panic!("after offset {last}: {err}"),
        };
        for frame in message.frames {
            match frame.kind {
                Some(Kind::Update(update)) => {
                    assert_eq!(update.offset, last + 1 + u64::from(update.skipped), "offsets add up with skipped");
                    assert_eq!(update.payload[..8], update.offset.to_be_bytes());
                    skipped += u64::from(update.skipped);
                    routes += u64::from(update.r#type == UpdateType::Route as i32);
                    last = update.offset;
                }
                Some(Kind::Disconnect(disconnect)) => panic!("disconnected after offset {last}: {disconnect:?}"),
                _ => {}
            }
        }
    }
    assert_eq!(routes, UPDATES / 100, "every ROUTE update arrived ({skipped} others skipped)");
    assert!(skipped > 0, "the flood outgrew the queue");
    // Still connected: a ping is answered.
    let ping = pb::ClientFrame { id: 3, command: Some(Command::Ping(pb::Ping { timestamp_us: 7 })) };
    stalled.send(tungstenite::Message::Binary(envelope::encode::<pb::ClientMessage>(vec![ping], None).into())).unwrap();
    loop {
        let tungstenite::Message::Binary(data) = stalled.read().unwrap() else { continue };
        let frames = pb::ServerMessage::decode(data).unwrap().frames;
        if frames.iter().any(|f| matches!(&f.kind, Some(Kind::Pong(pong)) if pong.timestamp_us == 7)) {
            break;
        }
    }
    let health = server.health();
    assert_eq!(health["protection"]["closed"]["slow_consumer"], 0, "{health}");
    assert!(health["protection"]["dropped"].as_u64() > Some(0), "{health}");
}

/// The answer to a read goes out from the reader as far as the socket takes it; what it does
/// not take, the writer sends before anything else. Large answers to a client that stopped
/// reading (its 4 KiB window full) must still arrive whole and in request order.
#[compio::test]
async fn large_answers_to_a_client_that_stopped_reading_arrive_whole_and_in_order() {
    const PUBLICATIONS: u64 = 100;
    const REQUESTS: u32 = 100;
    // Room for all answers: the outbox is not what this is about.
    let server = TestServer::start(1, &[("ROUTOPIA_LIMITS__MAX_OUTBOX_BYTES", "16777216")]);
    let mut publisher = server.client().await;
    for n in 1..=PUBLICATIONS {
        let mut payload = vec![b'.'; PAYLOAD];
        payload[..8].copy_from_slice(&n.to_be_bytes());
        publisher.publish("route:history", UpdateType::Route, "r", payload).await.unwrap();
    }
    let mut client = small_window_client(&server, None);
    // Each request in its own message and write, so each is answered from its own read.
    for id in 10..10 + REQUESTS {
        let history = pb::History { channel: "route:history".into(), since: 0, limit: PUBLICATIONS as u32 };
        let frame = pb::ClientFrame { id, command: Some(Command::History(history)) };
        client
            .send(tungstenite::Message::Binary(envelope::encode::<pb::ClientMessage>(vec![frame], None).into()))
            .unwrap();
    }
    // About 100 KB per answer, 10 MB in all: more than a loopback socket buffers (its send
    // buffer grows to 4 MiB at most) while nobody reads.
    let mut answered = Vec::new();
    while answered.len() < REQUESTS as usize {
        let tungstenite::Message::Binary(data) = client.read().unwrap() else { continue };
        for frame in pb::ServerMessage::decode(data).unwrap().frames {
            let Some(Kind::Reply(reply)) = frame.kind else { continue };
            let Some(pb::reply::Result::History(history)) = reply.result else {
                panic!("reply {} is not a history result: {:?}", reply.id, reply.result);
            };
            let offsets: Vec<u64> = history.publications.iter().map(|p| p.offset).collect();
            assert_eq!(offsets, (1..=PUBLICATIONS).collect::<Vec<_>>(), "reply {}", reply.id);
            for publication in &history.publications {
                assert_eq!(publication.payload.len(), PAYLOAD);
                assert_eq!(publication.payload[..8], publication.offset.to_be_bytes());
            }
            answered.push(reply.id);
        }
    }
    assert_eq!(answered, (10..10 + REQUESTS).collect::<Vec<_>>());
}

/// The payload of paced update `n`: its number, then filler to 32 KiB; the first is small.
fn paced_payload(n: u64) -> Vec<u8> {
    let mut payload = vec![b'.'; if n == 1 { 1000 } else { 32 * 1024 }];
    payload[..8].copy_from_slice(&n.to_be_bytes());
    payload
}

/// Reads `count` updates (see `paced_payload`), checking each whole and in offset order;
/// returns the most updates one message carried.
fn read_paced_updates(mut ws: Stalled, count: u64) -> usize {
    let (mut last, mut most) = (0u64, 0usize);
    while last < count {
        let tungstenite::Message::Binary(data) = ws.read().unwrap() else { continue };
        let frames = pb::ServerMessage::decode(data).unwrap().frames;
        let mut updates = 0;
        for frame in frames {
            let Some(Kind::Update(update)) = frame.kind else { continue };
            assert_eq!(update.offset, last + 1, "in order, none skipped");
            assert!(update.payload == paced_payload(update.offset), "update {} whole", update.offset);
            last = update.offset;
            updates += 1;
        }
        most = most.max(updates);
    }
    most
}

/// A lingering shard sends a connection's batch from the pacing tick itself as far as the
/// socket takes it, and leaves the rest to the connection's writer, first. Every update must
/// still arrive whole and in order: to a subscriber that keeps reading (in batches, as the
/// shard lingers) and to one whose 4 KiB window stays full until the flood is over.
#[compio::test]
async fn batches_sent_at_the_pacing_tick_arrive_whole_and_in_order() {
    // Under four full batches (`4 × delivery.batch_size`), which would leave at once, yet
    // 9.8 MB: more than a loopback socket buffers (its send buffer grows to 4 MiB at most).
    const COUNT: u64 = 300;
    let env = [
        ("ROUTOPIA_TESTING__ALWAYS_LINGER", "true"),
        // Long enough that the flood below lands in the tick of the first update's write.
        ("ROUTOPIA_DELIVERY__BATCH_INTERVAL", "1s"),
        ("ROUTOPIA_LIMITS__MAX_PAYLOAD_SIZE", "65536"),
        ("ROUTOPIA_LIMITS__MAX_MESSAGE_SIZE", "131072"),
        // Room for all of it under a quarter of the outbox, which would leave at once too.
        ("ROUTOPIA_LIMITS__MAX_OUTBOX_BYTES", "67108864"),
    ];
    let server = TestServer::start(1, &env);
    common::wait_for_metrics(server.addr, "the shard lingering", |m| {
        m.get("realtime_linger_seconds", &[("shard", "0")]) == 1.0
    });
    let stalled = stalled_subscriber(&server, "route:paced");
    let reading = stalled_subscriber(&server, "route:paced");
    let reader = std::thread::spawn(move || read_paced_updates(reading, COUNT));
    // A key per update: nothing may be conflated away.
    let paced = |n: u64| publish("route:paced", UpdateType::Route, format!("route-{n}"), paced_payload(n));
    let mut publisher = server.client().await;
    // The first update, small, alone: each subscriber writes it at once (it fits the 4 KiB
    // window), so what follows in the same tick waits for the next, then leaves from the
    // tick, which fills the stalled subscriber's window and leaves the rest to its writer.
    publisher.request(paced(1)).await.unwrap();
    for n in 2..=COUNT {
        publisher.send_frames(vec![pb::ClientFrame { id: 0, command: Some(paced(n)) }]).await.unwrap();
    }
    let most = reader.join().expect("the reading subscriber got every update");
    assert!(most > 1, "updates that waited for the tick leave together ({most} at most per message)");
    assert!(read_paced_updates(stalled, COUNT) > 1);
}
