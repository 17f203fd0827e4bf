//! Authentication, permissions, in-band refresh, rate limits and heartbeats, through the real
//! binary over real sockets.

mod common;

use std::time::Duration;

use common::{expect_disconnect, options, sign, unix_now, within, Retrying, TestServer};
use routopia_realtime::client::resilient::{Backoff, Event, ResilientClient};
use routopia_realtime::client::{Client, ClientError, ConnectOptions, TokenSource};
use routopia_realtime::protocol::envelope;
use routopia_realtime::protocol::pb::{self, client_frame::Command, server_frame::Kind, UpdateType};
use routopia_realtime::protocol::ws::WsEndpoint;
use serde_json::json;

fn fixture(name: &str) -> String {
    format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// Connects with `token` and expects the server to refuse it with 4503 naming `reason`.
async fn refused(server: &TestServer, token: String, reason: &str) {
    let mut client = Client::connect_raw(server.addr, "/ws").await.unwrap();
    let connect = pb::Connect { token, ..Default::default() };
    client.send_frames(vec![pb::ClientFrame { id: 1, command: Some(Command::Connect(connect)) }]).await.unwrap();
    let disconnect = expect_disconnect(&mut client, 4503).await;
    assert!(disconnect.reason.starts_with(reason), "{disconnect:?}");
    assert!(!disconnect.reconnect);
}

fn signed_with(alg: jsonwebtoken::Algorithm, key_file: &str, claims: serde_json::Value) -> String {
    let pem = std::fs::read(fixture(key_file)).unwrap();
    let key = match alg {
        jsonwebtoken::Algorithm::RS256 => jsonwebtoken::EncodingKey::from_rsa_pem(&pem).unwrap(),
        _ => jsonwebtoken::EncodingKey::from_ec_pem(&pem).unwrap(),
    };
    jsonwebtoken::encode(&jsonwebtoken::Header::new(alg), &claims, &key).unwrap()
}

#[compio::test]
async fn forged_expired_wrong_alg_and_none_alg_tokens_are_refused_and_counted() {
    let server = TestServer::start(2, &[]);
    let claims = json!({"sub": "mallory", "exp": unix_now() + 600});
    let forged = {
        let key = jsonwebtoken::EncodingKey::from_secret(b"not-the-server-secret-not-the-server");
        jsonwebtoken::encode(&jsonwebtoken::Header::default(), &claims, &key).unwrap()
    };
    refused(&server, forged, "bad_signature").await;
    refused(&server, sign(json!({"sub": "mallory", "exp": unix_now() - 600})), "expired").await;
    refused(&server, signed_with(jsonwebtoken::Algorithm::RS256, "rsa-private.pem", claims.clone()), "wrong_algorithm")
        .await;
    use base64::Engine;
    let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
    let none = format!("{}.{}.", b64(r#"{"alg":"none","typ":"JWT"}"#), b64(r#"{"sub":"mallory","exp":9999999999}"#));
    refused(&server, none, "alg_none").await;
    refused(&server, String::new(), "missing_token").await;
    let early = sign(json!({"sub": "mallory", "exp": unix_now() + 900, "nbf": unix_now() + 600}));
    refused(&server, early, "not_yet_valid").await;
    common::wait_for_health(&server, "every refusal counted", |h| {
        let f = &h["protection"]["auth_failures"];
        ["bad_signature", "expired", "wrong_algorithm", "alg_none", "missing_token", "not_yet_valid"]
            .iter()
            .all(|reason| f[reason] == 1)
            && h["protection"]["closed"]["unauthorized"] == 6
    });
}

#[compio::test]
async fn an_exp_past_the_horizon_is_refused_as_a_bad_claim_and_the_server_serves_on_and_stops_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let log_path = dir.path().join("server.log");
    let env = [("ROUTOPIA_AUTH__MAX_TOKEN_LIFETIME", "1day"), ("RUST_LOG", "info"), ("ROUTOPIA_LOG_FORMAT", "json")];
    let log = std::fs::File::create(&log_path).unwrap();
    let mut server = TestServer::start_with("127.0.0.1:0", 2, &[], &env, log);
    let (mut bystander, _) = Client::connect(server.addr, options("bystander")).await.unwrap();
    let subscription = bystander.subscribe("route:bystander").await.unwrap();
    // The largest `exp` there is, one that overflowed the shard's clock sums, and one just
    // past `auth.max_token_lifetime`.
    let horizon = unix_now() + 86_400;
    for exp in [u64::MAX, i64::MAX as u64, horizon + 60] {
        refused(&server, sign(json!({"sub": "mallory", "exp": exp, "subscribe": ["*"]})), "bad_claim").await;
    }
    let mut publisher = server.client().await;
    publisher.publish("route:bystander", UpdateType::Route, "leg", b"eta".to_vec()).await.unwrap();
    let update = within("the bystander's update", bystander.next_update()).await.unwrap();
    assert_eq!(update.sub_id, subscription.sub_id);
    common::wait_for_health(&server, "three bad claims counted", |h| {
        h["protection"]["auth_failures"]["bad_claim"] == 3 && h["protection"]["closed"]["unauthorized"] == 3
    });
    let health = server.health();
    assert_eq!(health["status"], "ok", "{health}");
    assert!(health["panics"].as_object().unwrap().values().all(|count| count == 0), "{health}");
    let metrics = common::Metrics::fetch(server.addr);
    assert_eq!(metrics.get("realtime_auth_failures_total", &[("reason", "bad_claim")]), 3.0);
    let panics: f64 = metrics
        .scrape
        .samples
        .iter()
        .filter(|s| s.metric == "realtime_shard_panics_total")
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v) => v,
            _ => panic!("a counter"),
        })
        .sum();
    assert_eq!(panics, 0.0);
    // Every connection ended and was forgotten: the shutdown drains the bystanders and cuts none.
    server.signal(libc::SIGTERM);
    let status = server.exited().await;
    assert!(status.success(), "{status:?}");
    let log = std::fs::read_to_string(&log_path).unwrap();
    let stopped = log
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .find(|line| line["message"] == "stopped")
        .unwrap_or_else(|| panic!("no `stopped` line in {log}"));
    assert_eq!(stopped["cut_at_timeout"], 0, "{stopped}");
    assert_eq!(stopped["drained"], 2, "{stopped}");
    drop((bystander, publisher));
}

#[compio::test]
async fn rs256_and_es256_tokens_verify_with_public_key_files_and_audience_is_checked() {
    let keys = format!("[\"{}\", \"{}\"]", fixture("rsa-public.pem"), fixture("ec-public.pem"));
    let server =
        TestServer::start(1, &[("ROUTOPIA_AUTH__PUBLIC_KEY_FILES", &keys), ("ROUTOPIA_AUTH__AUDIENCE", "routopia")]);
    let claims = json!({"sub": "u1", "exp": unix_now() + 600, "aud": "routopia"});
    for (alg, key) in
        [(jsonwebtoken::Algorithm::RS256, "rsa-private.pem"), (jsonwebtoken::Algorithm::ES256, "ec-private.pem")]
    {
        let token = signed_with(alg, key, claims.clone());
        let (_, info) = Client::connect(server.addr, ConnectOptions { token, ..Default::default() }).await.unwrap();
        assert_eq!(info.expires_at_unix, claims["exp"].as_u64().unwrap());
    }
    let elsewhere = json!({"sub": "u1", "exp": unix_now() + 600, "aud": "another-app"});
    refused(&server, signed_with(jsonwebtoken::Algorithm::ES256, "ec-private.pem", elsewhere), "wrong_audience").await;
}

#[compio::test]
async fn a_user_can_never_read_another_users_route_channel() {
    let server = TestServer::start(2, &[]);
    // No `subscribe` claim: the default patterns apply (`route:{sub}`, `weather:*`, ...).
    let token = sign(json!({"sub": "alice", "exp": unix_now() + 600}));
    let (mut alice, _) = Client::connect(server.addr, ConnectOptions { token, ..Default::default() }).await.unwrap();
    for channel in ["route:bob", "route:alice2", "route:", "admin:all"] {
        match alice.subscribe(channel).await {
            Err(ClientError::Server(error)) => assert!(error.code == 403 || error.code == 400, "{channel}: {error:?}"),
            other => panic!("{channel}: {other:?}"),
        }
    }
    match alice.history("route:bob", 0, 10).await {
        Err(ClientError::Server(error)) => assert_eq!(error.code, 403),
        other => panic!("{other:?}"),
    }
    match alice.publish("route:alice", UpdateType::Route, "k", b"x".to_vec()).await {
        Err(ClientError::Server(error)) => assert_eq!(error.code, 403, "publishing is not granted by default"),
        other => panic!("{other:?}"),
    }
    let own = alice.subscribe("route:alice").await.unwrap();
    alice.subscribe("weather:paris").await.unwrap();
    let mut backend = server.client().await;
    backend.publish("route:alice", UpdateType::Route, "leg", b"eta".to_vec()).await.unwrap();
    let update = within("alice's update", alice.next_update()).await.unwrap();
    assert_eq!(update.sub_id, own.sub_id);
}

#[compio::test]
async fn refresh_before_expiry_extends_and_a_bad_refresh_keeps_the_connection() {
    let server = TestServer::start(1, &[]);
    let (mut client, info) = Client::connect(server.addr, options("driver-1")).await.unwrap();
    let later = unix_now() + 7200;
    let result = client.refresh(sign(json!({"sub": "driver-1", "exp": later, "subscribe": ["*"]}))).await.unwrap();
    assert!(later > info.expires_at_unix);
    assert_eq!(result.expires_at_unix, later);
    match client.refresh(sign(json!({"sub": "someone-else", "exp": later}))).await {
        Err(ClientError::Server(error)) => assert_eq!(error.code, 403),
        other => panic!("{other:?}"),
    }
    match client.refresh("garbage".into()).await {
        Err(ClientError::Server(error)) => assert_eq!(error.code, 401),
        other => panic!("{other:?}"),
    }
    client.subscribe("route:anything").await.expect("still connected, still allowed");
}

/// Waits until the wall clock has passed `unix` (the condition is the clock itself).
async fn until_after(unix: u64) {
    while unix_now() <= unix {
        compio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[compio::test]
async fn an_expired_token_is_reminded_then_given_grace_then_closed_with_4006() {
    let env = [
        ("ROUTOPIA_AUTH__REFRESH_REMINDER", "1s"),
        ("ROUTOPIA_AUTH__EXPIRY_GRACE", "1s"),
        ("ROUTOPIA_AUTH__LEEWAY", "0s"),
    ];
    let server = TestServer::start(1, &env);
    let exp = unix_now() + 2;
    let token = sign(json!({"sub": "u", "exp": exp, "subscribe": ["*"]}));
    let (mut client, info) =
        Client::connect(server.addr, ConnectOptions { token, ..Default::default() }).await.unwrap();
    assert_eq!(info.expires_at_unix, exp);
    let reminder = loop {
        match within("reminder", client.next_frame()).await.unwrap().kind {
            Some(Kind::TokenExpiring(expiring)) => break expiring,
            _ => continue,
        }
    };
    assert_eq!(reminder.expires_at_unix, exp);
    let disconnect = expect_disconnect(&mut client, 4006).await;
    assert!(disconnect.reconnect, "reconnect with a fresh token");
    assert!(unix_now() >= exp, "never before the token expired");
}

#[compio::test]
async fn a_refresh_inside_the_grace_period_saves_the_connection() {
    let env = [("ROUTOPIA_AUTH__EXPIRY_GRACE", "5s"), ("ROUTOPIA_AUTH__LEEWAY", "0s")];
    let server = TestServer::start(1, &env);
    // Seconds of margin: the token must still be valid when `Connect` is handled, even on a
    // loaded machine (with one second, a connect that came late was refused as expired).
    let exp = unix_now() + 3;
    let token = sign(json!({"sub": "u", "exp": exp, "subscribe": ["*"]}));
    let (mut client, _) = Client::connect(server.addr, ConnectOptions { token, ..Default::default() }).await.unwrap();
    until_after(exp).await;
    let fresh = unix_now() + 600;
    let result = client.refresh(sign(json!({"sub": "u", "exp": fresh, "subscribe": ["*"]}))).await.unwrap();
    assert_eq!(result.expires_at_unix, fresh);
    // Past the old token's grace, the connection still serves requests.
    until_after(exp + 6).await;
    client.subscribe("route:u").await.expect("the refreshed connection stays");
}

#[compio::test]
async fn an_expired_token_in_its_grace_period_may_refresh_and_unsubscribe_but_not_subscribe_or_publish() {
    let env = [("ROUTOPIA_AUTH__EXPIRY_GRACE", "1m"), ("ROUTOPIA_AUTH__LEEWAY", "0s")];
    let server = TestServer::start(1, &env);
    let exp = unix_now() + 3;
    let claims = |exp| json!({"sub": "u", "exp": exp, "subscribe": ["*"], "publish": ["*"]});
    let token = sign(claims(exp));
    let (mut client, _) = Client::connect(server.addr, ConnectOptions { token, ..Default::default() }).await.unwrap();
    let subscription = client.subscribe("route:u").await.unwrap();
    until_after(exp).await;
    match client.subscribe("route:other").await {
        Err(ClientError::Server(error)) => assert_eq!(error.code, 401, "{error:?}"),
        other => panic!("{other:?}"),
    }
    match client.publish("route:u", UpdateType::Route, "k", b"x".to_vec()).await {
        Err(ClientError::Server(error)) => assert_eq!(error.code, 401, "{error:?}"),
        other => panic!("{other:?}"),
    }
    client.unsubscribe(subscription.sub_id).await.expect("unsubscribing stays possible");
    client.refresh(sign(claims(unix_now() + 600))).await.expect("refreshing stays possible");
    client.subscribe("route:other").await.expect("served again once refreshed");
    common::wait_for_metrics(server.addr, "two commands refused as expired", |m| {
        m.get("realtime_errors_total", &[("code", "401")]) == 2.0
    });
}

#[compio::test]
async fn the_resilient_client_refreshes_by_itself_before_expiry() {
    let server = TestServer::start(1, &[("ROUTOPIA_AUTH__LEEWAY", "0s")]);
    let fetched = std::rc::Rc::new(std::cell::Cell::new(0u32));
    let counter = fetched.clone();
    // Tokens that expire in 2 minutes, inside the default 5-minute refresh threshold.
    let source = TokenSource::new(move || {
        counter.set(counter.get() + 1);
        async { Ok(sign(json!({"sub": "phone", "exp": unix_now() + 120, "subscribe": ["*"], "publish": ["*"]}))) }
    });
    let options = ConnectOptions { token_source: Some(source), ..ConnectOptions::default() };
    let mut phone = ResilientClient::connect(server.addr, options, Backoff::default()).await.unwrap();
    phone.subscribe("route:phone").await.unwrap();
    let mut backend = server.client().await;
    backend.publish("route:phone", UpdateType::Route, "leg", b"1".to_vec()).await.unwrap();
    let mut saw_update = false;
    let refreshed = loop {
        match within("events", phone.next_event()).await.unwrap() {
            Event::Update { .. } => saw_update = true,
            Event::TokenRefreshed { expires_at_unix } => break expires_at_unix,
            other => panic!("{other:?}"),
        }
    };
    assert!(refreshed > unix_now());
    assert_eq!(fetched.get(), 2, "one token to connect, one to refresh");
    assert_eq!(phone.stats().refreshes, 1);
    if !saw_update {
        assert!(matches!(within("update", phone.next_event()).await.unwrap(), Event::Update { .. }));
    }
}

#[compio::test]
async fn over_the_rate_limit_gets_429_with_retry_after_and_recovers_then_abuse_disconnects() {
    let env = [
        ("ROUTOPIA_RATE_LIMITS__ENABLED", "true"),
        ("ROUTOPIA_RATE_LIMITS__CONNECTION_PUBLISHES__REQUESTS", "600"),
        ("ROUTOPIA_RATE_LIMITS__CONNECTION_PUBLISHES__WINDOW", "1m"),
        ("ROUTOPIA_RATE_LIMITS__CONNECTION_PUBLISHES__BURST", "3"),
        ("ROUTOPIA_RATE_LIMITS__MAX_REFUSALS", "20"),
    ];
    let server = TestServer::start(1, &env);
    let mut client = server.client().await;
    for n in 0..3 {
        client.publish("traffic:a1", UpdateType::Traffic, "k", common::payload(n)).await.unwrap();
    }
    let error = match client.publish("traffic:a1", UpdateType::Traffic, "k", common::payload(3)).await {
        Err(ClientError::Server(error)) => error,
        other => panic!("{other:?}"),
    };
    assert_eq!(error.code, 429);
    assert!((1..=100).contains(&error.retry_after_ms), "one token per 100 ms: {error:?}");
    compio::time::sleep(Duration::from_millis(error.retry_after_ms)).await;
    client.publish("traffic:a1", UpdateType::Traffic, "k", common::payload(3)).await.expect("a token is back");
    // Commands have their own bucket: not touched by publishing.
    client.subscribe("traffic:a1").await.unwrap();
    // Ignoring 429s: the connection is closed.
    let publish =
        pb::Publish { channel: "traffic:a1".into(), r#type: UpdateType::Traffic as i32, ..Default::default() };
    let flood = (0..50).map(|_| pb::ClientFrame { id: 0, command: Some(Command::Publish(publish.clone())) }).collect();
    client.send_frames(flood).await.unwrap();
    expect_disconnect(&mut client, 4504).await;
    common::wait_for_health(&server, "rate limits counted", |h| h["protection"]["rate_limited"].as_u64() >= Some(21));
}

#[compio::test]
async fn a_client_that_answers_pings_stays_and_one_that_does_not_is_closed_with_4005() {
    // A timeout of ten intervals leaves room for a busy test machine to answer late.
    let env = [("ROUTOPIA_HEARTBEAT__INTERVAL", "200ms"), ("ROUTOPIA_HEARTBEAT__TIMEOUT", "2s")];
    let server = TestServer::start(1, &env);
    // Silent: upgrades and connects, then never sends another byte (no pongs).
    let mut raw = Retrying(std::net::TcpStream::connect(server.addr).unwrap());
    let upgrade = "GET /ws HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                   Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";
    let connect = pb::Connect { token: common::token("silent"), ..Default::default() };
    let frames = vec![pb::ClientFrame { id: 1, command: Some(Command::Connect(connect)) }];
    let mut ws = WsEndpoint::client(1 << 20);
    ws.send_binary(envelope::encode::<pb::ClientMessage>(frames, None).into()).unwrap();
    std::io::Write::write_all(&mut raw, upgrade.as_bytes()).unwrap();
    std::io::Write::write_all(&mut raw, &ws.take_output()).unwrap();
    raw.0.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut received = Vec::new();
    let mut chunk = [0u8; 4096];
    // The close frame's code 4005 (0x0FA5) arrives after pings the client never answered.
    while !received.windows(2).any(|w| w == [0x0f, 0xa5]) {
        let n = std::io::Read::read(&mut raw, &mut chunk).expect("the server closes, not the timeout");
        assert!(n > 0, "closed without the 4005 close frame: {received:?}");
        received.extend_from_slice(&chunk[..n]);
    }
    // Answering: a subscriber that only reads (its receiver answers pings) outlives many
    // timeouts.
    let mut phone = server.client().await;
    let sub = phone.subscribe("weather:paris").await.unwrap();
    let mut publisher = server.client().await;
    let mut n = 0;
    // Twenty pings answered: the connection outlived two timeouts.
    while phone.pings() < 20 {
        n += 1;
        publisher.publish("weather:paris", UpdateType::Weather, "now", common::payload(n)).await.unwrap();
        let update = within("update", phone.next_update()).await.expect("still connected");
        assert_eq!((update.sub_id, update.offset), (sub.sub_id, n));
        compio::time::sleep(Duration::from_millis(100)).await;
    }
}
