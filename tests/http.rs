//! Plain HTTP on the WebSocket port: health, bad upgrades, unknown paths, oversized heads.

mod common;

use common::{http_request, within, TestServer};
use routopia_realtime::client::{Client, ClientError};

#[test]
fn health_reports_status_version_driver_shards_connections_uptime() {
    let server = TestServer::start(2, &[]);
    let health = server.health();
    assert_eq!(health["status"], "ok");
    assert_eq!(health["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(health["shards"], 2);
    assert_eq!(health["connections"], 0);
    assert!(health["uptime_seconds"].is_u64());
    let driver = health["driver"].as_str().unwrap();
    assert!(driver == "io_uring" || driver == "epoll", "{driver}");
    for shard in health["per_shard"].as_array().unwrap() {
        assert_eq!(shard["driver"], driver);
    }
}

#[test]
fn unknown_path_is_404_and_bad_upgrade_is_400() {
    let server = TestServer::start(1, &[]);
    assert_eq!(server.http_get("/nowhere").0, 404);
    let (status, body) = server.http_get("/ws");
    assert_eq!(status, 400);
    assert!(body.contains("Upgrade"), "{body}");
    let wrong_version = "GET /ws HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 8\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";
    let (status, body) = http_request(server.addr, wrong_version);
    assert_eq!(status, 400);
    assert!(body.contains("Version"), "{body}");
    let (status, _) = http_request(server.addr, "POST /health HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n");
    assert_eq!(status, 405);
}

#[test]
fn oversized_or_malformed_heads_are_refused_and_closed() {
    let server = TestServer::start(1, &[]);
    let huge = format!("GET /health HTTP/1.1\r\nHost: t\r\nX-Filler: {}\r\n\r\n", "a".repeat(10_000));
    assert_eq!(http_request(server.addr, &huge).0, 431);
    let many: String = (0..40).map(|i| format!("X-H{i}: v\r\n")).collect();
    assert_eq!(http_request(server.addr, &format!("GET /health HTTP/1.1\r\n{many}\r\n")).0, 431);
    assert_eq!(http_request(server.addr, "\x16\x03\x01\x02\x00garbage\r\n\r\n").0, 400);
    // The server is fine afterwards.
    assert_eq!(server.health()["status"], "ok");
}

#[compio::test]
async fn sigterm_tells_clients_to_reconnect_elsewhere_and_exits_zero() {
    let server = TestServer::start(2, &[]);
    let mut client = server.client().await;
    client.subscribe("route:1").await.unwrap();
    let status = server.terminate();
    assert!(status.success(), "{status:?}");
    match within("disconnect", client.next_update()).await {
        Err(ClientError::Disconnected(d)) => {
            assert_eq!(d.code, 4000);
            assert!(d.reconnect);
        }
        other => panic!("expected Disconnect 4000, got {other:?}"),
    }
}

#[compio::test]
async fn an_upgraded_connection_that_never_sends_connect_is_closed_with_4004() {
    let server = TestServer::start(1, &[("ROUTOPIA_LIMITS__CONNECT_TIMEOUT", "200ms")]);
    let mut silent = Client::connect_raw(server.addr, "/ws").await.unwrap();
    match within("disconnect", silent.next_frame()).await.unwrap().kind {
        Some(routopia_realtime::protocol::pb::server_frame::Kind::Disconnect(d)) => {
            assert_eq!(d.code, 4004, "{d:?}");
        }
        other => panic!("expected Disconnect 4004, got {other:?}"),
    }
    assert!(matches!(silent.next_message().await, Err(ClientError::Closed(Some(4004)))));
    common::wait_for_health(&server, "the connection gone", |h| h["connections"] == 0);
}
