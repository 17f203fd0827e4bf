//! What the server logs: the filter and format the layers choose, and, at debug, every line
//! about a connection naming it, requests by their id, and never a token.

mod common;

use std::path::Path;

use common::{sign, token, unix_now, within, TestServer};
use routopia_realtime::client::{Client, ClientError, ConnectOptions};
use routopia_realtime::protocol::pb::{self, client_frame::Command, reply, UpdateType};
use serde_json::Value;

/// The log file as JSON objects; every line must be one.
fn json_lines(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).expect("read the log");
    text.lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|err| panic!("not a JSON line ({err}): {line}")))
        .collect()
}

fn frame(id: u32, command: Command) -> Vec<pb::ClientFrame> {
    vec![pb::ClientFrame { id, command: Some(command) }]
}

/// The one line with `message` on which `matches` holds.
fn line<'a>(lines: &'a [Value], message: &str, matches: impl Fn(&Value) -> bool) -> &'a Value {
    let found: Vec<&Value> = lines.iter().filter(|l| l["message"] == message && matches(l)).collect();
    assert_eq!(found.len(), 1, "one `{message}` line expected, found {found:?}");
    found[0]
}

fn frame_line<'a>(lines: &'a [Value], message: &str, kind: &str, req_id: u32) -> &'a Value {
    line(lines, message, |l| l["kind"] == kind && l["req_id"] == req_id)
}

#[compio::test]
async fn json_debug_lines_carry_the_connection_and_request_ids_and_never_a_token() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("server.log");
    let server = TestServer::start_logging_to(&log, 2, &[], &["--log-format", "json", "--debug"]);
    let connect_token = token("logger");
    let options = ConnectOptions { token: connect_token.clone(), name: "logger".into(), ..ConnectOptions::default() };
    let (client, connected) = within("connect", Client::connect(server.addr, options)).await.unwrap();
    let conn = connected.client_id;
    let (mut tx, mut rx) = client.split();

    let subscribe = pb::Subscribe { channel: "route:logs".into(), ..Default::default() };
    tx.send_frames(frame(11, Command::Subscribe(subscribe))).await.unwrap();
    let Ok(reply::Result::Subscribe(subscribed)) = within("subscribe", rx.reply(11)).await else { panic!() };
    let publish = pb::Publish {
        channel: "route:logs".into(),
        r#type: UpdateType::Route as i32,
        key: "k".into(),
        payload: b"logged".to_vec().into(),
        ..Default::default()
    };
    tx.send_frames(frame(12, Command::Publish(publish))).await.unwrap();
    let Ok(reply::Result::Publish(published)) = within("publish", rx.reply(12)).await else { panic!() };
    within("update", rx.next_update()).await.unwrap();
    let bad = pb::Subscribe { channel: "no spaces".into(), ..Default::default() };
    tx.send_frames(frame(13, Command::Subscribe(bad))).await.unwrap();
    match within("bad subscribe", rx.reply(13)).await {
        Err(ClientError::Server(error)) => assert_eq!(error.code, 400),
        other => panic!("expected Error 400, got {other:?}"),
    }
    let claims = serde_json::json!({"sub": "logger", "exp": unix_now() + 7200, "subscribe": ["*"], "publish": ["*"]});
    let refresh_token = sign(claims);
    tx.send_frames(frame(14, Command::Refresh(pb::Refresh { token: refresh_token.clone() }))).await.unwrap();
    assert!(matches!(within("refresh", rx.reply(14)).await, Ok(reply::Result::Refresh(_))));
    drop((tx, rx));
    // A second client, whose token is refused (closed with 4503).
    let expired_token = sign(serde_json::json!({"sub": "logger", "exp": unix_now() - 3600}));
    let refused = ConnectOptions { token: expired_token.clone(), ..ConnectOptions::default() };
    match within("refused connect", Client::connect(server.addr, refused)).await {
        Err(ClientError::Disconnected(disconnect)) => assert_eq!(disconnect.code, 4503),
        other => panic!("expected Disconnect 4503, got {:?}", other.map(|(_, result)| result)),
    }
    assert!(server.terminate().success());

    let lines = json_lines(&log);
    // Every line from a session or a connection's socket and every line about a request or
    // subscription names its connection.
    for l in &lines {
        let target = l["target"].as_str().unwrap_or_default();
        let about_a_connection = target.starts_with("routopia_realtime::session")
            || target == "routopia_realtime::shard::conn"
            || l.get("req_id").is_some()
            || l.get("sub_id").is_some();
        if about_a_connection {
            assert!(l["conn"].as_str().is_some_and(|c| !c.is_empty()), "{l}");
        }
    }
    let ours = |l: &Value| l["conn"] == conn.as_str();
    let refusal = line(&lines, "frame out", |l| l["kind"] == "Disconnect" && l["code"] == 4503);
    assert_ne!(refusal["conn"], conn.as_str(), "each connection has its own id");
    let upgraded = line(&lines, "connection upgraded", ours);
    let peer = upgraded["peer"].as_str().expect("the peer's address");
    assert!(peer.starts_with("127.0.0.1:"), "{peer}");
    let connect = line(&lines, "frame in", |l| ours(l) && l["kind"] == "Connect");
    assert_eq!((&connect["req_id"], &connect["token_bytes"]), (&Value::from(1), &Value::from(connect_token.len())));
    assert_eq!(line(&lines, "connected", ours)["user"], "logger");
    assert_eq!(frame_line(&lines, "frame in", "Subscribe", 11)["channel"], "route:logs");
    assert_eq!(frame_line(&lines, "frame out", "SubscribeResult", 11)["sub_id"], subscribed.sub_id);
    let publish = frame_line(&lines, "frame in", "Publish", 12);
    assert_eq!((&publish["channel"], &publish["payload_bytes"]), (&Value::from("route:logs"), &Value::from(6)));
    assert_eq!(frame_line(&lines, "frame out", "PublishResult", 12)["offset"], published.offset);
    // The owner ties the request to the publication, which channel and offset name from then on.
    line(&lines, "published", |l| ours(l) && l["req_id"] == 12 && l["offset"] == published.offset);
    line(&lines, "delivering", |l| l["channel"] == "route:logs" && l["offset"] == published.offset);
    assert!(lines.iter().any(|l| l["message"] == "write" && ours(l) && l["frames"].as_u64() > Some(0)));
    let error = frame_line(&lines, "frame out", "Error", 13);
    assert_eq!(error["code"], 400);
    assert_eq!(frame_line(&lines, "frame in", "Refresh", 14)["token_bytes"], refresh_token.len());
    let closed = lines
        .iter()
        .find(|l| ours(l) && l["message"].as_str().is_some_and(|m| m.starts_with("connection closed")))
        .expect("a line for the connection's end");
    assert_eq!(closed["peer"], peer);

    let text = std::fs::read_to_string(&log).unwrap();
    for token in [&connect_token, &refresh_token, &expired_token] {
        for part in std::iter::once(token.as_str()).chain(token.split('.')) {
            assert!(!text.contains(part), "token text {part} is in the log");
        }
    }
}

/// Whether the server logged its `shard started` line (info) when started with `env` and
/// `flags`; with `json`, also checks that every line is JSON.
fn logs_info(env: &[(&str, &str)], flags: &[&str], json: bool) -> bool {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("server.log");
    // Start-up lines are written before the server says it listens, which `start` waits for.
    let server = TestServer::start_logging_to(&log, 1, env, flags);
    drop(server);
    if json {
        return json_lines(&log).iter().any(|l| l["message"] == "shard started");
    }
    std::fs::read_to_string(&log).unwrap().contains("shard started")
}

#[test]
fn the_level_flag_beats_routopia_log_level_which_beats_rust_log() {
    assert!(logs_info(&[("RUST_LOG", "info")], &[], false), "RUST_LOG alone applies");
    assert!(!logs_info(&[("RUST_LOG", "info")], &["--log-level", "warn"], false), "the flag wins");
    assert!(!logs_info(&[("RUST_LOG", "info"), ("ROUTOPIA_LOG_LEVEL", "warn")], &[], false), "the setting wins");
    assert!(logs_info(&[("ROUTOPIA_LOG_LEVEL", "warn")], &["--log-level", "info"], false), "the flag wins");
}

#[test]
fn the_format_comes_from_the_environment_or_the_flag() {
    assert!(logs_info(&[("RUST_LOG", "info"), ("ROUTOPIA_LOG_FORMAT", "json")], &[], true));
    assert!(logs_info(&[("RUST_LOG", "info")], &["--log-format", "json"], true));
    let refused = std::process::Command::new(common::BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--log-format", "yaml"])
        .output()
        .unwrap();
    assert_eq!(refused.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("pretty, json"));
}
