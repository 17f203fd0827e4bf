//! Connection admission before the WebSocket upgrade: connection limits answer 503, the
//! attempts bucket answers 429 with `Retry-After`, refusals are counted in `/health`, and
//! `GET /config/limits` shows the limits in force without secrets. Upgrades are raw HTTP: only
//! the status of the answer matters here.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use common::{http_request, wait_for_health, TestServer};

const UPGRADE: &str = "GET /ws HTTP/1.1\r\nHost: test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";

/// An upgrade that got its answer: the status, the response head and, when refused, the body.
struct Upgrade {
    status: u16,
    head: String,
    body: String,
    /// Open while the upgrade is held (101).
    stream: TcpStream,
}

/// Sends a WebSocket upgrade and reads the answer's head (and the body of a refusal, which
/// the server closes after).
fn upgrade(addr: SocketAddr) -> Upgrade {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    stream.write_all(UPGRADE.as_bytes()).unwrap();
    let mut received = Vec::new();
    let mut byte = [0u8; 1];
    while !received.ends_with(b"\r\n\r\n") {
        match stream.read(&mut byte) {
            Ok(1) => received.push(byte[0]),
            other => panic!("answer ended early ({other:?}): {:?}", String::from_utf8_lossy(&received)),
        }
    }
    let head = String::from_utf8_lossy(&received).into_owned();
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let mut body = String::new();
    if status != 101 {
        stream.read_to_string(&mut body).expect("refusal body until close");
    }
    Upgrade { status, head, body, stream }
}

/// A server whose upgraded connections stay open without `Connect` for as long as a test
/// could take.
fn start(shards: usize, env_in: &[(&str, &str)]) -> TestServer {
    // Rate limits on, as in production (the test server turns them off unless told).
    let mut env = [("ROUTOPIA_RATE_LIMITS__ENABLED", "true")].to_vec();
    env.extend_from_slice(env_in);
    env.push(("ROUTOPIA_LIMITS__CONNECT_TIMEOUT", "10m"));
    TestServer::start(shards, &env)
}

fn refused(health: &serde_json::Value, reason: &str) -> u64 {
    health["refused_connections"][reason].as_u64().unwrap_or_else(|| panic!("no count for {reason}: {health}"))
}

#[test]
fn per_ip_limit_refuses_with_503_and_a_freed_place_admits_again() {
    let server = start(2, &[("ROUTOPIA_LIMITS__MAX_CONNECTIONS_PER_IP", "2")]);
    let first = upgrade(server.addr);
    let mut second = upgrade(server.addr);
    assert_eq!((first.status, second.status), (101, 101));
    let third = upgrade(server.addr);
    assert_eq!(third.status, 503, "{}", third.head);
    assert!(third.body.contains("limits.max_connections_per_ip"), "{}", third.body);
    assert_eq!(refused(&server.health(), "per_ip"), 1);

    // The held connections are untouched by the refusal: the second still answers a ping.
    // (Masked client frame: FIN + ping, mask bit + length 0, four mask bytes.)
    second.stream.write_all(&[0x89, 0x80, 1, 2, 3, 4]).unwrap();
    let mut pong = [0u8; 2];
    second.stream.read_exact(&mut pong).expect("pong from the held connection");
    assert_eq!(pong, [0x8a, 0x00]);

    drop(first);
    // The place comes back once the server has seen the first connection end.
    wait_for_health(&server, "the first connection gone", |h| h["admission"]["connections"] == 1);
    let again = upgrade(server.addr);
    assert_eq!(again.status, 101, "{}", again.head);
    drop((second, again));
    wait_for_health(&server, "no address remembered", |h| {
        h["admission"]["connections"] == 0 && h["admission"]["addresses"] == 0
    });
}

#[test]
fn per_shard_limit_refuses_with_503() {
    let server = start(1, &[("ROUTOPIA_LIMITS__MAX_CONNECTIONS_PER_SHARD", "2")]);
    let held = [upgrade(server.addr), upgrade(server.addr)];
    assert!(held.iter().all(|u| u.status == 101));
    let refused_upgrade = upgrade(server.addr);
    assert_eq!(refused_upgrade.status, 503, "{}", refused_upgrade.head);
    assert!(refused_upgrade.body.contains("limits.max_connections_per_shard"), "{}", refused_upgrade.body);
    // Plain HTTP is not connection-limited.
    let health = server.health();
    assert_eq!(refused(&health, "per_shard"), 1);
    assert_eq!(refused(&health, "per_ip"), 0);
    assert_eq!(health["connections"], 2);
}

#[test]
fn global_limit_refuses_with_503() {
    let server = start(2, &[("ROUTOPIA_LIMITS__MAX_CONNECTIONS", "3")]);
    let held: Vec<Upgrade> = (0..3).map(|_| upgrade(server.addr)).collect();
    assert!(held.iter().all(|u| u.status == 101));
    let refused_upgrade = upgrade(server.addr);
    assert_eq!(refused_upgrade.status, 503, "{}", refused_upgrade.head);
    assert!(refused_upgrade.body.contains("limits.max_connections"), "{}", refused_upgrade.body);
    assert_eq!(refused(&server.health(), "max_connections"), 1);
}

#[test]
fn connection_attempts_over_the_bucket_get_429_with_retry_after() {
    // Burst 3, then one token every 30 s: the fourth attempt in a row must wait.
    let server = start(
        2,
        &[
            ("ROUTOPIA_RATE_LIMITS__CONNECTION_ATTEMPTS_PER_IP__REQUESTS", "2"),
            ("ROUTOPIA_RATE_LIMITS__CONNECTION_ATTEMPTS_PER_IP__BURST", "3"),
        ],
    );
    for _ in 0..3 {
        assert_eq!(upgrade(server.addr).status, 101);
    }
    let limited = upgrade(server.addr);
    assert_eq!(limited.status, 429, "{}", limited.head);
    let retry_after: u64 = limited
        .head
        .lines()
        .find_map(|line| line.strip_prefix("Retry-After: "))
        .unwrap_or_else(|| panic!("no Retry-After in {}", limited.head))
        .trim()
        .parse()
        .unwrap();
    assert!((1..=30).contains(&retry_after), "Retry-After {retry_after}");
    assert!(limited.body.contains("rate_limits.connection_attempts_per_ip"), "{}", limited.body);
    // Health checks do not spend connection attempts, and they see the refusal.
    let health = server.health();
    assert_eq!(refused(&health, "attempts_per_ip"), 1);
    assert_eq!(health["admission"]["attempt_buckets"], 1);
}

#[test]
fn attempts_are_not_limited_when_rate_limits_are_off() {
    let server = start(
        1,
        &[
            ("ROUTOPIA_RATE_LIMITS__ENABLED", "false"),
            ("ROUTOPIA_RATE_LIMITS__CONNECTION_ATTEMPTS_PER_IP__REQUESTS", "1"),
            ("ROUTOPIA_RATE_LIMITS__CONNECTION_ATTEMPTS_PER_IP__BURST", "1"),
        ],
    );
    for _ in 0..3 {
        assert_eq!(upgrade(server.addr).status, 101);
    }
    assert_eq!(refused(&server.health(), "attempts_per_ip"), 0);
}

#[test]
fn config_limits_shows_the_limits_in_force_and_no_secret() {
    const SECRET: &str = "correct-horse-battery-staple-0123456789";
    let server = start(
        1,
        &[
            ("ROUTOPIA_AUTH__HMAC_SECRET", SECRET),
            ("ROUTOPIA_LIMITS__MAX_CONNECTIONS_PER_IP", "7"),
            ("ROUTOPIA_HEARTBEAT__INTERVAL", "20s"),
            ("ROUTOPIA_HEARTBEAT__TIMEOUT", "1m"),
        ],
    );
    let (status, body) = server.http_get("/config/limits");
    assert_eq!(status, 200, "{body}");
    assert!(!body.contains(SECRET), "{body}");
    assert!(!body.contains("hmac_secret") && !body.contains("public_key_files"), "{body}");
    let limits: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(limits["limits"]["max_connections_per_ip"], 7);
    assert_eq!(limits["limits"]["max_connections"], 1_000_000);
    assert_eq!(limits["limits"]["handshake_timeout"], "10s");
    assert_eq!(limits["heartbeat"]["interval"], "20s");
    assert_eq!(limits["heartbeat"]["timeout"], "1m");
    assert_eq!(limits["rate_limits"]["connection_attempts_per_ip"]["window"], "1m");
    assert_eq!(limits["rate_limits"]["enabled"], true);
    assert_eq!(limits["delivery"]["batch_size"], 100);
    assert_eq!(limits["delivery"]["priority_types"], serde_json::json!(["ROUTE", "WEATHER"]));
    assert_eq!(limits["auth"]["mode"], "jwt");
    assert_eq!(limits["auth"]["leeway"], "5s");
    assert!(limits["auth"]["default_subscribe"].is_array());
    let (status, _) = http_request(server.addr, "POST /config/limits HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n");
    assert_eq!(status, 405);
}
