//! The session driven directly: bytes in, events and bytes out, no sockets, no clock.

use super::*;
use crate::config::Config;
use crate::protocol::pb::{ServerMessage, UpdateType};
use prost::Message;
use std::time::Instant;

fn now() -> Now {
    Now { instant: Instant::now(), unix_us: 1_800_000_000_000_000 }
}

fn session() -> Session {
    Session::new(Arc::from("0-1-1"), Rc::new(SessionLimits::from_config(&Config::default())), Instant::now())
}

/// A client-side WebSocket that encodes commands and decodes what the session sends.
struct Peer {
    ws: WsEndpoint,
}

impl Peer {
    fn new() -> Self {
        Peer { ws: WsEndpoint::client(1 << 24) }
    }

    fn send(&mut self, session: &mut Session, frames: Vec<pb::ClientFrame>) {
        let bytes = envelope::encode::<ClientMessage>(frames, None);
        self.ws.send_binary(bytes.into()).unwrap();
        session.handle_bytes(now(), &self.ws.take_output());
    }

    fn command(&mut self, session: &mut Session, id: u32, command: Command) {
        self.send(session, vec![pb::ClientFrame { id, command: Some(command) }]);
    }

    /// Every frame the session has queued, with the WebSocket close code if it closed.
    fn receive(&mut self, session: &mut Session) -> (Vec<pb::ServerFrame>, Option<u16>) {
        let mut wire = Vec::new();
        session.poll_transmit(&mut wire);
        self.ws.feed(&wire);
        let mut frames = Vec::new();
        let mut close = None;
        while let Some(event) = self.ws.next_event().unwrap() {
            match event {
                WsEvent::Binary(data) => frames.extend(ServerMessage::decode(data).unwrap().frames),
                WsEvent::Closed(code) => close = code,
                WsEvent::Text => panic!("the server never sends text"),
            }
        }
        (frames, close)
    }
}

fn connected() -> (Session, Peer) {
    let mut session = session();
    let mut peer = Peer::new();
    peer.command(&mut session, 1, Command::Connect(pb::Connect::default()));
    let (frames, _) = peer.receive(&mut session);
    assert!(matches!(
        &frames[..],
        [pb::ServerFrame { kind: Some(Kind::Reply(pb::Reply { id: 1, result: Some(reply::Result::Connect(_)) })) }]
    ));
    (session, peer)
}

fn subscribe(channel: &str) -> Command {
    Command::Subscribe(pb::Subscribe { channel: channel.into(), ..Default::default() })
}

fn error_code(frame: &pb::ServerFrame) -> Option<u32> {
    match &frame.kind {
        Some(Kind::Reply(pb::Reply { result: Some(reply::Result::Error(e)), .. })) => Some(e.code),
        _ => None,
    }
}

#[test]
fn subscribe_waits_for_the_owner_then_replies_with_position() {
    let (mut session, mut peer) = connected();
    peer.command(&mut session, 7, subscribe("route:42"));
    let Some(SessionEvent::Subscribe { channel, sub_id, req_id: 7, since: None, resume: None }) = session.poll_event()
    else {
        panic!("no event")
    };
    assert_eq!(&*channel, "route:42");
    assert!(!session.wants_write(), "no reply before the owner answers");
    assert!(session.on_subscribed(sub_id, 7, &Position { epoch: Arc::from("e1"), offset: 12 }, None, Instant::now()));
    let (frames, _) = peer.receive(&mut session);
    match &frames[0].kind {
        Some(Kind::Reply(pb::Reply { id: 7, result: Some(reply::Result::Subscribe(result)) })) => {
            assert_eq!((result.sub_id, result.epoch.as_str(), result.offset), (sub_id, "e1", 12));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn unsubscribing_a_pending_subscription_makes_its_answer_refused() {
    let (mut session, mut peer) = connected();
    peer.command(&mut session, 2, subscribe("poi:1"));
    let Some(SessionEvent::Subscribe { sub_id, .. }) = session.poll_event() else { panic!() };
    peer.command(&mut session, 3, Command::Unsubscribe(pb::Unsubscribe { sub_id }));
    assert!(matches!(session.poll_event(), Some(SessionEvent::Unsubscribe { was_active: false, .. })));
    assert!(
        !session.on_subscribed(sub_id, 2, &Position { epoch: Arc::from("e"), offset: 0 }, None, Instant::now()),
        "the shard must take back the owner's count"
    );
}

#[test]
fn publish_is_stamped_with_the_time_passed_in() {
    let (mut session, mut peer) = connected();
    let publish = pb::Publish {
        channel: "traffic:a1".into(),
        r#type: UpdateType::Traffic as i32,
        key: "jam".into(),
        confidence: 0.9,
        payload: vec![1, 2].into(),
    };
    peer.command(&mut session, 4, Command::Publish(publish));
    match session.poll_event() {
        Some(SessionEvent::Publish { channel, req_id: 4, update }) => {
            assert_eq!(&*channel, "traffic:a1");
            assert_eq!(update.timestamp_us, now().unix_us);
            assert_eq!(update.key, "jam");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn errors_are_reported_even_for_fire_and_forget_commands() {
    let (mut session, mut peer) = connected();
    peer.command(&mut session, 0, subscribe("bad channel"));
    let (frames, _) = peer.receive(&mut session);
    assert_eq!(frames.iter().map(error_code).collect::<Vec<_>>(), vec![Some(400)]);
}

#[test]
fn slow_consumer_is_closed_with_4001_and_nothing_else_is_queued() {
    let mut config = Config::default();
    config.limits.max_outbox_bytes = 4096;
    config.limits.max_payload_size = 1000;
    let mut session = Session::new(Arc::from("s"), Rc::new(SessionLimits::from_config(&config)), Instant::now());
    let mut peer = Peer::new();
    peer.command(&mut session, 1, Command::Connect(pb::Connect::default()));
    peer.receive(&mut session);
    let body = crate::protocol::push::encode_update_body(&pb::Update {
        offset: 1,
        payload: vec![0; 1000].into(),
        ..Default::default()
    });
    let publication = Rc::new(Publication::new(Arc::from("route:1"), 1, 1, body, Instant::now()));
    for _ in 0..5 {
        session.push_update(1, &publication, Instant::now());
    }
    assert_eq!(session.phase(), Phase::Closing(CloseCode::SlowConsumer));
    let (frames, close) = peer.receive(&mut session);
    assert_eq!(close, Some(4001));
    assert!(
        matches!(
            &frames[..],
            [pb::ServerFrame { kind: Some(Kind::Disconnect(pb::Disconnect { code: 4001, reconnect: true, .. })) }]
        ),
        "{frames:?}"
    );
    session.push_update(1, &publication, Instant::now());
    assert!(!session.wants_write(), "a closing session queues nothing more");
}

#[test]
fn ping_gets_pong_with_the_same_timestamp() {
    let (mut session, mut peer) = connected();
    peer.command(&mut session, 0, Command::Ping(pb::Ping { timestamp_us: 99 }));
    let (frames, _) = peer.receive(&mut session);
    assert!(matches!(&frames[..], [pb::ServerFrame { kind: Some(Kind::Pong(pb::Pong { timestamp_us: 99 })) }]));
}

#[test]
fn second_connect_is_an_error_and_the_session_stays() {
    let (mut session, mut peer) = connected();
    peer.command(&mut session, 5, Command::Connect(pb::Connect::default()));
    let (frames, close) = peer.receive(&mut session);
    assert_eq!(frames.iter().map(error_code).collect::<Vec<_>>(), vec![Some(400)]);
    assert_eq!(close, None);
    assert_eq!(session.phase(), Phase::Connected);
}

#[test]
fn client_close_is_answered_and_ends_the_session() {
    let (mut session, mut peer) = connected();
    peer.ws.close(1000, "bye");
    session.handle_bytes(now(), &peer.ws.take_output());
    assert!(session.is_closing());
    assert!(session.wants_write(), "the close reply is queued");
    let (frames, close) = peer.receive(&mut session);
    assert!(frames.is_empty());
    assert_eq!(close, Some(1000), "the reply echoes the client's code");
}

#[test]
fn a_connection_that_never_connects_is_closed_after_the_timeout() {
    let opened = Instant::now();
    let mut session = Session::new(Arc::from("idle"), Rc::new(SessionLimits::from_config(&Config::default())), opened);
    let timeout = Config::default().limits.connect_timeout;
    session.handle_timeout(opened + timeout / 2);
    assert_eq!(session.phase(), Phase::AwaitingConnect);
    session.handle_timeout(opened + timeout);
    assert_eq!(session.phase(), Phase::Closing(CloseCode::ConnectTimeout));
    let (connected, _) = connected();
    let mut connected = connected;
    connected.handle_timeout(opened + timeout * 10);
    assert_eq!(connected.phase(), Phase::Connected, "a connected session is not timed out");
}
