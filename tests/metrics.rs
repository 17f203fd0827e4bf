//! `/metrics` through the real binary: it parses as the Prometheus text format, and its
//! counters, gauges and histograms move as scripted clients subscribe, publish, acknowledge,
//! get rate limited and fail authentication.

mod common;

use common::{expect_disconnect, http_request, payload, unix_now, wait_for_metrics, within, Metrics, TestServer};
use routopia_realtime::client::{Client, ClientError};
use routopia_realtime::protocol::pb::{self, client_frame::Command, UpdateType};

/// A sample's name, labels and value.
type Expected = (&'static str, &'static [(&'static str, &'static str)], f64);

/// Cumulative bucket counts never fall, and the last equals the count.
fn assert_histogram(metrics: &Metrics, name: &str, labels: &[(&str, &str)], at_least: f64) {
    let buckets = metrics.buckets(name, labels);
    assert!(!buckets.is_empty(), "no {name}{labels:?} in\n{}", metrics.text);
    assert!(buckets.windows(2).all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1), "{name}{labels:?}: {buckets:?}");
    let (last_bound, last_count) = *buckets.last().unwrap();
    assert!(last_bound.is_infinite(), "{buckets:?}");
    assert!(last_count >= at_least, "{name}{labels:?}: {last_count} < {at_least}");
    assert_eq!(metrics.get(&format!("{name}_count"), labels), last_count);
}

#[compio::test]
async fn counters_gauges_and_histograms_move_with_traffic() {
    let server = TestServer::start(
        2,
        &[
            ("ROUTOPIA_RATE_LIMITS__ENABLED", "true"),
            ("ROUTOPIA_RATE_LIMITS__CONNECTION_COMMANDS__REQUESTS", "1"),
            ("ROUTOPIA_RATE_LIMITS__CONNECTION_COMMANDS__BURST", "2"),
        ],
    );
    let before = Metrics::fetch(server.addr);
    for family in [
        "realtime_connections",
        "realtime_updates_delivered_total",
        "realtime_latency_seconds",
        "realtime_request_duration_seconds",
        "realtime_errors_total",
        "realtime_process_resident_memory_bytes",
    ] {
        assert!(before.text.contains(&format!("# TYPE {family} ")), "{family} has no TYPE line");
    }
    assert_eq!(before.get("realtime_subscriptions", &[("type", "route")]), 0.0);

    let mut subscriber = server.client().await;
    let sub = subscriber.subscribe("route:metrics").await.unwrap();
    let mut publisher = server.client().await;
    for n in 1..=5 {
        publisher.publish("route:metrics", UpdateType::Route, "k", payload(n)).await.unwrap();
    }
    for n in 1..=5 {
        assert_eq!(within("update", subscriber.next_update()).await.unwrap().offset, n);
    }
    // Burst 2: the third command of this connection is refused with 429.
    let mut noisy = server.client().await;
    let mut limited = 0;
    for _ in 0..3 {
        match noisy.history("route:metrics", 0, 10).await {
            Ok(_) => {}
            Err(ClientError::Server(error)) if error.code == 429 => limited += 1,
            Err(other) => panic!("{other}"),
        }
    }
    assert_eq!(limited, 1);
    // A token signed with another secret.
    let mut stranger = Client::connect_raw(server.addr, "/ws").await.unwrap();
    let forged = {
        let key = jsonwebtoken::EncodingKey::from_secret(b"not-the-server-secret-not-the-server");
        let claims = serde_json::json!({"sub": "mallory", "exp": unix_now() + 600});
        jsonwebtoken::encode(&jsonwebtoken::Header::default(), &claims, &key).unwrap()
    };
    let connect = pb::Connect { token: forged, ..Default::default() };
    stranger.send_frames(vec![pb::ClientFrame { id: 1, command: Some(Command::Connect(connect)) }]).await.unwrap();
    expect_disconnect(&mut stranger, 4503).await;

    // Shards publish their figures on their own ticks: wait for all, then check none overcounts.
    let expected: [Expected; 12] = [
        ("realtime_updates_published_total", &[("type", "route")], 5.0),
        ("realtime_updates_delivered_total", &[("type", "route")], 5.0),
        ("realtime_commands_total", &[("command", "publish")], 5.0),
        ("realtime_commands_total", &[("command", "subscribe")], 1.0),
        ("realtime_commands_total", &[("command", "history")], 3.0),
        ("realtime_rate_limited_total", &[], 1.0),
        ("realtime_errors_total", &[("code", "429")], 1.0),
        ("realtime_auth_failures_total", &[("reason", "bad_signature")], 1.0),
        ("realtime_subscriptions", &[("type", "route")], 1.0),
        ("realtime_latency_seconds_count", &[("type", "route")], 5.0),
        ("realtime_request_duration_seconds_count", &[("command", "publish")], 5.0),
        ("realtime_request_duration_seconds_count", &[("command", "history")], 3.0),
    ];
    let after = wait_for_metrics(server.addr, "the traffic counted", |m| {
        expected.iter().all(|(name, labels, value)| m.get(name, labels) >= *value)
    });
    for (name, labels, value) in expected {
        assert_eq!(after.get(name, labels), value, "{name}{labels:?}");
    }
    assert!(after.get("realtime_connections_accepted_total", &[]) >= 4.0);
    assert!(after.get("realtime_sent_bytes_total", &[]) > 0.0);
    assert!(after.get("realtime_received_bytes_total", &[]) > 0.0);
    assert!(after.get("realtime_websocket_messages_sent_total", &[]) >= 1.0);
    assert_histogram(&after, "realtime_latency_seconds", &[("type", "route")], 5.0);
    assert_histogram(&after, "realtime_request_duration_seconds", &[("command", "publish")], 5.0);
    assert_histogram(&after, "realtime_request_duration_seconds", &[("command", "subscribe")], 1.0);
    assert_histogram(&after, "realtime_frames_per_message", &[], 1.0);
    let p99 = after.value("realtime_latency_recent_seconds", &[("type", "route"), ("quantile", "0.99")]);
    assert!(p99.is_some_and(|s| s >= 0.0), "no recent p99 in\n{}", after.text);

    // Leaving takes the subscription back and counts the close.
    subscriber.unsubscribe(sub.sub_id).await.unwrap();
    drop(subscriber);
    wait_for_metrics(server.addr, "the subscription gone", |m| {
        m.get("realtime_subscriptions", &[("type", "route")]) == 0.0
            && m.get("realtime_connections_closed_total", &[("reason", "peer")])
                + m.get("realtime_connections_closed_total", &[("reason", "normal")])
                >= 1.0
    });
}

#[compio::test]
async fn acknowledged_updates_are_timed_end_to_end() {
    let server = TestServer::start(1, &[]);
    let mut phone = server.client().await;
    let sub = phone
        .subscribe_with(pb::Subscribe { channel: "incident:acked".into(), ack: true, ..Default::default() })
        .await
        .unwrap();
    let mut publisher = server.client().await;
    for n in 1..=3 {
        publisher.publish("incident:acked", UpdateType::Incident, "k", payload(n)).await.unwrap();
    }
    for _ in 1..=3 {
        let update = within("update", phone.next_update()).await.unwrap();
        phone.ack(sub.sub_id, update.offset).await.unwrap();
    }
    let metrics = wait_for_metrics(server.addr, "the acknowledgements timed", |m| {
        m.get("realtime_delivery_acked_seconds_count", &[("type", "incident")]) >= 3.0
    });
    assert_histogram(&metrics, "realtime_delivery_acked_seconds", &[("type", "incident")], 3.0);
    assert_eq!(metrics.get("realtime_commands_total", &[("command", "ack")]), 3.0);
}

#[test]
fn the_metrics_address_serves_metrics_and_health_only() {
    let server = TestServer::start(2, &[("ROUTOPIA_METRICS_LISTEN", "127.0.0.1:0")]);
    let metrics_addr = server.metrics_addr.expect("the server names its metrics address");
    assert_ne!(metrics_addr, server.addr);
    let metrics = Metrics::fetch(metrics_addr);
    assert_eq!(metrics.get("realtime_shards", &[]), 2.0);
    let (status, body) = http_request(metrics_addr, "GET /health HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(status, 200, "{body}");
    let upgrade = "GET /ws HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                   Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";
    assert_eq!(http_request(metrics_addr, upgrade).0, 404);
    assert_eq!(http_request(metrics_addr, "POST /metrics HTTP/1.1\r\nHost: t\r\n\r\n").0, 405);
    // The main port serves them too.
    assert_eq!(Metrics::fetch(server.addr).get("realtime_shards", &[]), 2.0);
}

#[test]
fn a_metrics_address_equal_to_the_listen_address_is_refused() {
    let output = std::process::Command::new(common::BIN)
        .args(["serve", "--listen", "127.0.0.1:39111", "--metrics-listen", "127.0.0.1:39111"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("metrics_listen"));
}
