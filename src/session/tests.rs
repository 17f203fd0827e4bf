//! The session driven directly: bytes in, events and bytes out, no sockets, no clock.

use super::transmit::URGENT_BATCHES;
use super::*;
use crate::auth::AuthFailure;
use crate::config::Config;
use crate::core::{Now, Position};
use crate::protocol::envelope;
use crate::protocol::pb::{self, client_frame::Command, reply, server_frame::Kind, ClientMessage};
use crate::protocol::pb::{ServerMessage, UpdateType};
use crate::protocol::ws::{WsEndpoint, WsEvent};
use crate::protocol::CloseCode;
use crate::ratelimit::KeyedBuckets;
use prost::Message;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The client id of a session under test: shard 0, slot 1, generation 1.
fn label() -> ConnLabel {
    ConnLabel { shard: 0, conn: crate::core::ConnId { index: 1, generation: 1 } }
}

fn now() -> Now {
    Now { instant: Instant::now(), unix_us: 1_800_000_000_000_000 }
}

/// A config without auth: these tests are about the protocol, not tokens.
fn open_config() -> Config {
    let mut config = Config::default();
    config.auth.mode = crate::config::AuthMode::Disabled;
    config
}

fn limits(config: &Config) -> Rc<SessionLimits> {
    let verifier = crate::auth::Verifier::setup(&config.auth, now().unix_us / 1_000_000).unwrap().verifier;
    let r = &config.rate_limits;
    let users = Arc::new(KeyedBuckets::new([r.user_commands, r.user_publishes]));
    Rc::new(SessionLimits::from_config(config, verifier, users))
}

fn session() -> Session {
    Session::new(label(), limits(&open_config()), Instant::now())
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
                WsEvent::Text(_) => panic!("the server never sends text"),
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
    assert!(session.handle_subscribed(
        sub_id,
        7,
        &Position { epoch: Arc::from("e1"), offset: 12 },
        None,
        Instant::now()
    ));
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
        !session.handle_subscribed(sub_id, 2, &Position { epoch: Arc::from("e"), offset: 0 }, None, Instant::now()),
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
    let mut config = open_config();
    config.limits.max_outbox_bytes = 4096;
    config.limits.max_payload_size = 1000;
    config.delivery.conflate_above_bytes = 1024;
    let mut session = Session::new(label(), limits(&config), Instant::now());
    let mut peer = Peer::new();
    peer.command(&mut session, 1, Command::Connect(pb::Connect::default()));
    peer.receive(&mut session);
    let body = crate::protocol::push::encode_update_body(&pb::Update {
        offset: 1,
        payload: vec![0; 1000].into(),
        ..Default::default()
    });
    let publication = Rc::new(crate::protocol::push::publication(Arc::from("route:1"), 1, 1, body, Instant::now()));
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

/// While its shard lingers, a connection writes early only for frames, `URGENT_BATCHES` full
/// batches or a quarter-full outbox; one full batch waits for the tick with the rest.
#[test]
fn updates_are_urgent_from_several_full_batches_and_frames_at_once() {
    let mut config = open_config();
    config.delivery.batch_size = 3;
    let mut session = Session::new(label(), limits(&config), Instant::now());
    let mut peer = Peer::new();
    peer.command(&mut session, 1, Command::Connect(pb::Connect::default()));
    assert!(session.has_urgent(), "a reply never waits");
    peer.receive(&mut session);
    assert!(!session.has_urgent());
    let body = crate::protocol::push::encode_update_body(&pb::Update { offset: 1, ..Default::default() });
    let publication = Rc::new(crate::protocol::push::publication(Arc::from("route:1"), 1, 1, body, Instant::now()));
    for _ in 0..3 {
        session.push_update(1, &publication, Instant::now());
    }
    assert!(!session.has_urgent(), "one full batch waits for the tick with what comes after it");
    for queued in 4..URGENT_BATCHES * 3 {
        session.push_update(1, &publication, Instant::now());
        assert!(!session.has_urgent(), "{queued} updates (batch_size 3) wait for the tick");
    }
    session.push_update(1, &publication, Instant::now());
    assert!(session.has_urgent(), "{} full batches leave at once", URGENT_BATCHES);
    let (frames, _) = peer.receive(&mut session);
    assert_eq!(frames.len(), URGENT_BATCHES * 3);
    session.push_update(1, &publication, Instant::now());
    peer.command(&mut session, 2, Command::Ping(pb::Ping { timestamp_us: 1 }));
    assert!(session.has_urgent(), "a pong behind one update does not wait");
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
fn a_client_that_pings_without_reading_is_closed_once_its_pongs_pass_the_outbox_limit() {
    let mut config = open_config();
    config.limits.max_outbox_bytes = 4096;
    let mut session = Session::new(label(), limits(&config), Instant::now());
    let mut peer = Peer::new();
    peer.command(&mut session, 1, Command::Connect(pb::Connect::default()));
    peer.receive(&mut session);
    let mut pings = 0;
    while !session.is_closing() && pings < 10_000 {
        peer.ws.ping(vec![7; 100].into());
        session.handle_bytes(now(), &peer.ws.take_output());
        pings += 1;
    }
    assert_eq!(session.phase(), Phase::Closing(CloseCode::SlowConsumer), "after {pings} pings");
    assert!(pings < 50, "closed at the limit, not later: {pings} pings of 100 bytes against 4096");
    let (frames, close) = peer.receive(&mut session);
    assert_eq!(close, Some(4001));
    assert!(frames.iter().any(|f| matches!(f.kind, Some(Kind::Disconnect(pb::Disconnect { code: 4001, .. })))));
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
    let mut session = Session::new(label(), limits(&open_config()), opened);
    let timeout = Config::default().limits.connect_timeout;
    session.handle_timeout(opened + timeout / 2);
    assert_eq!(session.phase(), Phase::AwaitingConnect);
    session.handle_timeout(opened + timeout);
    assert_eq!(session.phase(), Phase::Closing(CloseCode::ConnectTimeout));
    let (connected, _) = connected();
    let mut connected = connected;
    connected.handle_timeout(opened + timeout * 3);
    assert_eq!(connected.phase(), Phase::Connected, "a connected session is not timed out");
}

/// Every idle connection keeps a session; a field added carelessly costs 10,000 times over.
#[test]
fn a_panic_in_the_timeouts_closes_only_that_connection_with_1011_and_is_counted() {
    let (mut session, mut peer) = connected();
    assert_eq!(session.unless_panicking(|_| panic!("a bug in a timeout")), 0);
    assert_eq!(session.phase(), Phase::Closing(CloseCode::InternalError));
    let (frames, close) = peer.receive(&mut session);
    assert!(
        matches!(&frames[..], [pb::ServerFrame { kind: Some(Kind::Disconnect(d)) }] if d.code == 1011 && d.reconnect)
    );
    assert_eq!(close, Some(1011));
    let shared = crate::metrics::SharedMetrics::default();
    session.limits.metrics.flush_into(&shared, false, Instant::now());
    assert_eq!(shared.timeout_panics.load(std::sync::atomic::Ordering::Relaxed), 1);
    // Later ticks find a closing session, as any other.
    assert_eq!(session.handle_timeout(Instant::now()), 0);
}

#[test]
fn a_session_stays_small() {
    let size = std::mem::size_of::<Session>();
    eprintln!("Session: {size} bytes");
    assert!(size <= 512, "Session grew to {size} bytes");
}

mod security {
    use super::*;
    use serde_json::json;

    const SECRET: &str = "session-test-secret-0123456789abcdef";
    const UNIX: u64 = 1_800_000_000;

    fn jwt_config() -> Config {
        let mut config = Config::default();
        config.auth.hmac_secret = SECRET.into();
        // Long enough that the clock jumps below never trip the heartbeat.
        config.heartbeat.interval = Duration::from_secs(3600);
        config.heartbeat.timeout = Duration::from_secs(7200);
        config
    }

    fn token(claims: serde_json::Value) -> String {
        let key = jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes());
        jsonwebtoken::encode(&jsonwebtoken::Header::default(), &claims, &key).unwrap()
    }

    /// `now` shifted by `secs` on both clocks.
    fn at(base: Instant, secs: u64) -> Now {
        Now { instant: base + Duration::from_secs(secs), unix_us: (UNIX + secs) * 1_000_000 }
    }

    fn connect(config: &Config, token: String, base: Instant) -> (Session, Peer, Vec<pb::ServerFrame>, Option<u16>) {
        let mut session = Session::new(label(), limits(config), base);
        let mut peer = Peer::new();
        let frames = vec![pb::ClientFrame {
            id: 1,
            command: Some(Command::Connect(pb::Connect { token, ..Default::default() })),
        }];
        let bytes = envelope::encode::<ClientMessage>(frames, None);
        peer.ws.send_binary(bytes.into()).unwrap();
        session.handle_bytes(at(base, 0), &peer.ws.take_output());
        let (frames, close) = peer.receive(&mut session);
        (session, peer, frames, close)
    }

    fn send(peer: &mut Peer, session: &mut Session, now: Now, id: u32, command: Command) {
        let bytes = envelope::encode::<ClientMessage>(vec![pb::ClientFrame { id, command: Some(command) }], None);
        peer.ws.send_binary(bytes.into()).unwrap();
        session.handle_bytes(now, &peer.ws.take_output());
    }

    #[test]
    fn a_bad_token_closes_with_4503_and_counts_its_reason() {
        let base = Instant::now();
        let expired = token(json!({"sub": "u", "exp": UNIX - 60}));
        let (mut session, _, frames, close) = connect(&jwt_config(), expired, base);
        assert_eq!(close, Some(4503));
        assert!(
            matches!(&frames[..], [pb::ServerFrame { kind: Some(Kind::Disconnect(d)) }] if d.reason.starts_with("expired"))
        );
        assert_eq!(session.poll_event(), Some(SessionEvent::AuthFailed(AuthFailure::Expired)));
    }

    #[test]
    fn connect_result_says_when_the_token_expires_and_how_often_pings_come() {
        let base = Instant::now();
        let (_, _, frames, close) = connect(&jwt_config(), token(json!({"sub": "u", "exp": UNIX + 600})), base);
        assert_eq!(close, None);
        let Some(Kind::Reply(pb::Reply { result: Some(reply::Result::Connect(result)), .. })) = &frames[0].kind else {
            panic!("{frames:?}")
        };
        assert_eq!(result.expires_at_unix, UNIX + 600);
        assert_eq!(result.ping_interval_ms, 3_600_000);
        assert_eq!(result.heartbeat_timeout_ms, 7_200_000);
    }

    #[test]
    fn subscribing_outside_the_grant_is_forbidden() {
        let base = Instant::now();
        let (mut session, mut peer, _, _) =
            connect(&jwt_config(), token(json!({"sub": "alice", "exp": UNIX + 600})), base);
        let subscribe =
            |channel: &str| Command::Subscribe(pb::Subscribe { channel: channel.into(), ..Default::default() });
        send(&mut peer, &mut session, at(base, 1), 2, subscribe("route:bob"));
        send(&mut peer, &mut session, at(base, 1), 3, subscribe("route:alice"));
        let (frames, _) = peer.receive(&mut session);
        assert_eq!(frames.iter().map(error_code).collect::<Vec<_>>(), vec![Some(403)]);
        assert!(
            matches!(session.poll_event(), Some(SessionEvent::Subscribe { channel, .. }) if &*channel == "route:alice")
        );
    }

    #[test]
    fn reminder_then_grace_then_4006_unless_refreshed() {
        let base = Instant::now();
        let config = jwt_config();
        let (mut session, mut peer, _, _) = connect(&config, token(json!({"sub": "u", "exp": UNIX + 120})), base);
        session.handle_timeout(at(base, 30).instant);
        assert!(peer.receive(&mut session).0.is_empty(), "no reminder yet");
        session.handle_timeout(at(base, 61).instant);
        let (frames, _) = peer.receive(&mut session);
        assert!(
            matches!(&frames[..], [pb::ServerFrame { kind: Some(Kind::TokenExpiring(pb::TokenExpiring { expires_at_unix })) }] if *expires_at_unix == UNIX + 120)
        );
        session.handle_timeout(at(base, 62).instant);
        assert!(peer.receive(&mut session).0.is_empty(), "one reminder per token");
        // Refreshed inside the grace period: the connection lives on with the new expiry.
        session.handle_timeout(at(base, 125).instant);
        assert_eq!(session.phase(), Phase::Connected);
        let refresh = Command::Refresh(pb::Refresh { token: token(json!({"sub": "u", "exp": UNIX + 900})) });
        send(&mut peer, &mut session, at(base, 126), 7, refresh);
        let (frames, _) = peer.receive(&mut session);
        assert!(
            matches!(&frames[..], [pb::ServerFrame { kind: Some(Kind::Reply(pb::Reply { id: 7, result: Some(reply::Result::Refresh(r)) })) }] if r.expires_at_unix == UNIX + 900)
        );
        session.handle_timeout(at(base, 300).instant);
        assert_eq!(session.phase(), Phase::Connected);
        // Never refreshed again: closed once the grace after the new expiry is over.
        session.handle_timeout(at(base, 930).instant);
        assert_eq!(session.phase(), Phase::Closing(CloseCode::TokenExpired));
    }

    #[test]
    fn an_exp_past_the_horizon_is_refused_as_a_bad_claim_without_touching_the_clock() {
        let base = Instant::now();
        for exp in [u64::MAX, i64::MAX as u64, UNIX + 11 * 366 * 86_400] {
            let (mut session, _, frames, close) = connect(&jwt_config(), token(json!({"sub": "u", "exp": exp})), base);
            assert_eq!(close, Some(4503), "exp {exp}");
            assert!(
                matches!(&frames[..], [pb::ServerFrame { kind: Some(Kind::Disconnect(d)) }] if d.reason.starts_with("bad_claim")),
                "exp {exp}: {frames:?}"
            );
            assert_eq!(session.poll_event(), Some(SessionEvent::AuthFailed(AuthFailure::BadClaim)));
        }
    }

    #[test]
    fn expiry_checks_never_overflow_whatever_the_settings_and_the_time() {
        let base = Instant::now();
        let config = jwt_config();
        let mut limits = SessionLimits::clone(&limits(&config));
        (limits.refresh_reminder, limits.expiry_grace) = (Duration::MAX, Duration::MAX);
        (limits.ping_interval, limits.heartbeat_timeout) = (Duration::MAX, Duration::MAX);
        let limits = Rc::new(limits);
        let mut session = Session::new(label(), limits, base);
        let mut peer = Peer::new();
        let horizon = UNIX + config.auth.max_token_lifetime.as_secs();
        let connect = pb::Connect { token: token(json!({"sub": "u", "exp": horizon})), ..Default::default() };
        send(&mut peer, &mut session, at(base, 0), 1, Command::Connect(connect));
        assert_eq!(session.phase(), Phase::Connected);
        // A reminder at once (the whole lifetime is within `Duration::MAX` of expiry), and
        // never a close: the grace never ends.
        session.handle_timeout(at(base, 1).instant);
        let (frames, _) = peer.receive(&mut session);
        assert!(matches!(&frames[1..], [pb::ServerFrame { kind: Some(Kind::TokenExpiring(_)) }]), "{frames:?}");
        session.handle_timeout(base + Duration::from_secs(config.auth.max_token_lifetime.as_secs() + 3600));
        assert_eq!(session.phase(), Phase::Connected);
    }

    #[test]
    fn in_the_grace_period_only_refresh_ack_ping_and_unsubscribe_are_served() {
        let base = Instant::now();
        let claims = json!({"sub": "u", "exp": UNIX + 120, "subscribe": ["*"], "publish": ["*"]});
        let (mut session, mut peer, _, _) = connect(&jwt_config(), token(claims), base);
        send(&mut peer, &mut session, at(base, 1), 2, subscribe("route:u"));
        let Some(SessionEvent::Subscribe { sub_id, .. }) = session.poll_event() else { panic!("no subscribe") };
        session.handle_subscribed(sub_id, 2, &Position { epoch: Arc::from("e"), offset: 0 }, None, base);
        peer.receive(&mut session);
        // Within the leeway (5 s) past `exp` the token still serves, as it would at `Connect`.
        send(&mut peer, &mut session, at(base, 124), 3, subscribe("route:early"));
        assert!(matches!(session.poll_event(), Some(SessionEvent::Subscribe { .. })));
        peer.receive(&mut session);
        let expired = at(base, 125);
        let publish = Command::Publish(pb::Publish {
            channel: "route:u".into(),
            r#type: UpdateType::Route as i32,
            payload: b"x".to_vec().into(),
            ..Default::default()
        });
        let history = Command::History(pb::History { channel: "route:u".into(), ..Default::default() });
        for (id, command) in [(4, subscribe("route:v")), (5, publish), (6, history)] {
            send(&mut peer, &mut session, expired, id, command);
        }
        let (frames, _) = peer.receive(&mut session);
        assert_eq!(frames.iter().map(error_code).collect::<Vec<_>>(), vec![Some(401); 3]);
        assert_eq!(session.poll_event(), None, "nothing reached the shard");
        send(&mut peer, &mut session, expired, 7, Command::Ping(pb::Ping { timestamp_us: 9 }));
        send(&mut peer, &mut session, expired, 8, Command::Ack(pb::Ack { sub_id, offset: 1 }));
        send(&mut peer, &mut session, expired, 9, Command::Unsubscribe(pb::Unsubscribe { sub_id }));
        let (frames, close) = peer.receive(&mut session);
        assert!(matches!(frames[0].kind, Some(Kind::Pong(pb::Pong { timestamp_us: 9 }))), "{frames:?}");
        assert_eq!(error_code(&frames[1]), Some(400), "the Ack is handled: the subscription has no acks");
        assert!(matches!(
            &frames[2].kind,
            Some(Kind::Reply(pb::Reply { id: 9, result: Some(reply::Result::Unsubscribe(_)) }))
        ));
        assert_eq!(close, None);
        let refresh = json!({"sub": "u", "exp": UNIX + 900, "subscribe": ["*"], "publish": ["*"]});
        send(&mut peer, &mut session, expired, 10, Command::Refresh(pb::Refresh { token: token(refresh) }));
        send(&mut peer, &mut session, expired, 11, subscribe("route:v"));
        let (frames, _) = peer.receive(&mut session);
        assert!(frames.iter().all(|f| error_code(f).is_none()), "{frames:?}");
        assert!(session.poll_event().is_some_and(|e| matches!(e, SessionEvent::Unsubscribe { .. })));
        assert!(matches!(session.poll_event(), Some(SessionEvent::Subscribe { req_id: 11, .. })));
    }

    #[test]
    fn refresh_for_another_subject_or_with_a_bad_token_is_refused_and_the_connection_stays() {
        let base = Instant::now();
        let (mut session, mut peer, _, _) = connect(&jwt_config(), token(json!({"sub": "u", "exp": UNIX + 600})), base);
        let other = Command::Refresh(pb::Refresh { token: token(json!({"sub": "v", "exp": UNIX + 900})) });
        send(&mut peer, &mut session, at(base, 1), 2, other);
        let bad = Command::Refresh(pb::Refresh { token: "garbage".into() });
        send(&mut peer, &mut session, at(base, 1), 3, bad);
        let (frames, close) = peer.receive(&mut session);
        assert_eq!(frames.iter().map(error_code).collect::<Vec<_>>(), vec![Some(403), Some(401)]);
        assert_eq!(close, None);
    }

    #[test]
    fn pings_on_the_interval_and_closes_when_nothing_is_heard() {
        let base = Instant::now();
        let mut config = open_config();
        config.heartbeat.interval = Duration::from_secs(15);
        config.heartbeat.timeout = Duration::from_secs(45);
        let mut session = Session::new(label(), limits(&config), base);
        let mut peer = Peer::new();
        send(&mut peer, &mut session, at(base, 0), 1, Command::Connect(pb::Connect::default()));
        peer.receive(&mut session);
        session.handle_timeout(at(base, 16).instant);
        let mut wire = Vec::new();
        session.poll_transmit(&mut wire);
        assert_eq!(wire, [0x89, 0x00], "an empty ping frame");
        // Anything from the client (here a ping command at 40 s) counts as heard.
        send(&mut peer, &mut session, at(base, 40), 0, Command::Ping(pb::Ping::default()));
        session.handle_timeout(at(base, 80).instant);
        assert_eq!(session.phase(), Phase::Connected);
        session.handle_timeout(at(base, 85).instant);
        assert_eq!(session.phase(), Phase::Closing(CloseCode::HeartbeatTimeout));
    }

    #[test]
    fn over_the_rate_limit_gets_429_with_retry_after_then_abuse_closes() {
        let base = Instant::now();
        let mut config = open_config();
        config.rate_limits.connection_commands = crate::config::Bucket::new(60, 60, 2);
        config.rate_limits.max_refusals = 3;
        let mut session = Session::new(label(), limits(&config), base);
        let mut peer = Peer::new();
        send(&mut peer, &mut session, at(base, 0), 1, Command::Connect(pb::Connect::default()));
        peer.receive(&mut session);
        for id in 2..=4 {
            send(&mut peer, &mut session, at(base, 0), id, Command::Ping(pb::Ping::default()));
        }
        let (frames, _) = peer.receive(&mut session);
        let errors: Vec<&pb::Error> = frames
            .iter()
            .filter_map(|f| match &f.kind {
                Some(Kind::Reply(pb::Reply { result: Some(reply::Result::Error(e)), .. })) => Some(e),
                _ => None,
            })
            .collect();
        assert_eq!(errors.len(), 1, "{frames:?}");
        assert_eq!((errors[0].code, errors[0].retry_after_ms), (429, 1000));
        // A second later a token is back.
        send(&mut peer, &mut session, at(base, 1), 5, Command::Ping(pb::Ping::default()));
        assert!(peer.receive(&mut session).0.iter().all(|f| error_code(f).is_none()));
        for id in 6..=10 {
            send(&mut peer, &mut session, at(base, 1), id, Command::Ping(pb::Ping::default()));
        }
        assert_eq!(session.phase(), Phase::Closing(CloseCode::RateLimitAbuse));
    }
}
