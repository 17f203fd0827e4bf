//! Several nodes on one real Redis behave as one server: shared offsets and epochs, fan-out
//! across nodes, history and recovery from Redis, and survival when Redis goes away.

mod common;

use common::{payload, wait_for_health, wait_for_metrics, within, RedisServer, TestServer};
use routopia_realtime::protocol::pb::{self, RecoveryFailure, UpdateType};

fn node(redis: &RedisServer) -> TestServer {
    let server = TestServer::start(2, &[("ROUTOPIA_BROKER", &redis.url())]);
    wait_for_health(&server, "Redis connected", |h| h["broker"]["connected"] == true);
    server
}

#[compio::test]
async fn publish_on_one_node_reaches_subscribers_on_both_with_identical_offsets() {
    let redis = RedisServer::start();
    let (a, b) = (node(&redis), node(&redis));
    let mut on_a = a.client().await;
    let mut on_b = b.client().await;
    let sub_a = on_a.subscribe("route:shared").await.unwrap();
    let sub_b = on_b.subscribe("route:shared").await.unwrap();
    assert_eq!(sub_a.epoch, sub_b.epoch, "one epoch for the channel, whichever node");
    let mut publisher_a = a.client().await;
    let mut publisher_b = b.client().await;
    for n in 1..=20u64 {
        let publisher = if n % 2 == 0 { &mut publisher_a } else { &mut publisher_b };
        let result = publisher.publish("route:shared", UpdateType::Route, "k", payload(n)).await.unwrap();
        assert_eq!((result.offset, result.epoch.as_str()), (n, sub_a.epoch.as_str()));
    }
    for client in [&mut on_a, &mut on_b] {
        for n in 1..=20u64 {
            let update = within("update", client.next_update()).await.unwrap();
            assert_eq!(update.offset, n);
            assert_eq!(update.payload.as_ref(), payload(n).as_slice());
        }
    }
}

#[compio::test]
async fn a_client_recovers_on_another_node_everything_it_missed() {
    let redis = RedisServer::start();
    let (a, b) = (node(&redis), node(&redis));
    let mut phone = a.client().await;
    let first = phone.subscribe("incident:a1").await.unwrap();
    let mut publisher = b.client().await;
    for n in 1..=5 {
        publisher.publish("incident:a1", UpdateType::Incident, "k", payload(n)).await.unwrap();
    }
    for n in 1..=5 {
        assert_eq!(within("update", phone.next_update()).await.unwrap().offset, n);
    }
    drop(phone);
    drop(a); // the node goes away; the phone moves to b
    for n in 6..=300 {
        publisher.publish("incident:a1", UpdateType::Incident, "k", payload(n)).await.unwrap();
    }
    let mut phone = b.client().await;
    let result = phone.subscribe_from("incident:a1", &first.epoch, 5).await.unwrap();
    assert!(result.recovered, "{result:?}");
    assert_eq!(result.offset, 300);
    publisher.publish("incident:a1", UpdateType::Incident, "k", payload(301)).await.unwrap();
    for n in 6..=301u64 {
        let update = within("recovered or live update", phone.next_update()).await.unwrap();
        assert_eq!(update.offset, n, "in order, no gap, no duplicate");
        assert_eq!(update.payload.as_ref(), payload(n).as_slice());
    }
}

#[compio::test]
async fn history_comes_from_redis_and_gaps_beyond_it_are_refused() {
    let redis = RedisServer::start();
    let server = TestServer::start(1, &[("ROUTOPIA_BROKER", &redis.url()), ("ROUTOPIA_HISTORY__SIZE", "50")]);
    wait_for_health(&server, "Redis connected", |h| h["broker"]["connected"] == true);
    let mut client = server.client().await;
    let epoch = client.subscribe("poi:z").await.unwrap().epoch;
    for n in 1..=80 {
        client.publish("poi:z", UpdateType::Poi, "k", payload(n)).await.unwrap();
    }
    let page = client.history("poi:z", 40, 10).await.unwrap();
    assert_eq!(page.publications.iter().map(|p| p.offset).collect::<Vec<_>>(), (41..=50).collect::<Vec<u64>>());
    assert_eq!(page.publications[0].payload.as_ref(), payload(41).as_slice());
    assert_eq!(page.offset, 80);
    let page = client.history("poi:z", 0, 1000).await.unwrap();
    assert_eq!(page.publications.len(), 50);
    assert!(page.truncated);
    let late = server.client().await.subscribe_from("poi:z", &epoch, 10).await.unwrap();
    assert!(!late.recovered);
    assert_eq!(late.recovery_failure, RecoveryFailure::GapTooOld as i32);
}

#[compio::test]
async fn redis_going_away_degrades_then_recovers_and_subscribers_resync_after_data_loss() {
    use routopia_realtime::client::ClientError;
    let redis = RedisServer::start();
    let server = node(&redis);
    let mut subscriber = server.client().await;
    let before = subscriber.subscribe("weather:storm").await.unwrap();
    let mut publisher = server.client().await;
    publisher.publish("weather:storm", UpdateType::Weather, "w", payload(1)).await.unwrap();
    assert_eq!(within("update", subscriber.next_update()).await.unwrap().offset, 1);
    let port = redis.stop();
    wait_for_health(&server, "degraded", |h| h["status"] == "degraded");
    let err = publisher.publish("weather:storm", UpdateType::Weather, "w", payload(2)).await.unwrap_err();
    assert!(err.to_string().contains("503"), "{err}");
    // A Redis without persistence comes back empty: the channel's history is gone.
    let _redis = RedisServer::start_on(port);
    wait_for_health(&server, "ok again", |h| h["status"] == "ok");
    match within("resubscribe", subscriber.next_update()).await {
        Err(ClientError::Disconnected(d)) => {
            assert_eq!(d.code, 4003, "{d:?}");
            assert!(d.reconnect);
        }
        other => panic!("expected Disconnect 4003, got {other:?}"),
    }
    // Connections without subscriptions stayed up throughout.
    let result = publisher.publish("weather:storm", UpdateType::Weather, "w", payload(3)).await.unwrap();
    assert_ne!(result.epoch, before.epoch, "new history, new epoch");
    let mut again = server.client().await;
    let recovery = again.subscribe_from("weather:storm", &before.epoch, 1).await.unwrap();
    assert!(!recovery.recovered);
    assert_eq!(recovery.recovery_failure, RecoveryFailure::EpochChanged as i32);
}

#[compio::test]
async fn backend_items_queued_while_the_server_was_down_are_all_published() {
    use prost::Message;
    use routopia_realtime::protocol::pb;
    let redis = RedisServer::start();
    for n in 1..=30u64 {
        let publish = pb::Publish {
            channel: "poi:catalogue".into(),
            r#type: UpdateType::Poi as i32,
            key: format!("poi-{n}"),
            confidence: 1.0,
            payload: payload(n).into(),
        };
        redis.command(&[b"RPUSH", b"realtime:queue", &publish.encode_to_vec()]);
    }
    redis.command(&[b"RPUSH", b"realtime:queue", b"not a publication"]);
    // An item a previous life of this node had in flight is published too.
    let left = pb::Publish { channel: "poi:left".into(), r#type: UpdateType::Poi as i32, ..Default::default() };
    redis.command(&[b"RPUSH", b"realtime:queue:processing:node-7", &left.encode_to_vec()]);
    let server = TestServer::start(1, &[("ROUTOPIA_BROKER", &redis.url()), ("ROUTOPIA_REDIS__NODE_ID", "node-7")]);
    wait_for_health(&server, "Redis connected", |h| h["broker"]["connected"] == true);
    let mut client = server.client().await;
    let mut page = client.history("poi:catalogue", 0, 100).await.unwrap();
    for _ in 0..10_000 {
        if page.publications.len() == 30 {
            break;
        }
        page = within("history", client.history("poi:catalogue", 0, 100)).await.unwrap();
    }
    let offsets: Vec<u64> = page.publications.iter().map(|p| p.offset).collect();
    assert_eq!(offsets, (1..=30).collect::<Vec<u64>>(), "one publication per item, in list order");
    assert_eq!(page.publications[29].key, "poi-30");
    // The bad item ends in the dead list; nothing stays queued or in flight.
    let settled = || {
        redis.command(&[b"LLEN", b"realtime:queue"]) == ":0"
            && redis.command(&[b"LLEN", b"realtime:queue:dead"]) == ":1"
            && redis.command(&[b"LLEN", b"realtime:queue:processing:node-7"]) == ":0"
    };
    let mut waited = 0;
    while !settled() {
        waited += 1;
        assert!(waited < 30_000, "the bad item was not moved to the dead list");
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    assert_eq!(client.history("poi:left", 0, 10).await.unwrap().offset, 1);
    let metrics = wait_for_metrics(server.addr, "the queue counted", |m| {
        m.get("realtime_redis_publish_queue_consumed_total", &[]) >= 31.0
            && m.get("realtime_redis_publish_queue_dead_length", &[]) == 1.0
    });
    assert_eq!(metrics.get("realtime_redis_publish_queue_consumed_total", &[]), 31.0);
    assert_eq!(metrics.get("realtime_redis_publish_queue_dead_total", &[]), 1.0);
    assert_eq!(metrics.get("realtime_updates_published_total", &[("type", "poi")]), 31.0);
    assert_eq!(metrics.get("realtime_redis_publish_queue_length", &[]), 0.0);
}

#[compio::test]
async fn a_node_killed_mid_stream_the_client_moves_to_the_other_and_recovers_everything() {
    use routopia_realtime::client::resilient::{Backoff, Event, ResilientClient};

    use std::time::Duration;
    let redis = RedisServer::start();
    let (a, b) = (node(&redis), node(&redis));
    let backoff =
        Backoff { initial: Duration::from_millis(20), factor: 2.0, max: Duration::from_millis(200), max_retries: None };
    let mut phone =
        ResilientClient::connect_any(vec![a.addr, b.addr], common::options("phone"), backoff).await.unwrap();
    assert_eq!(phone.node(), a.addr);
    phone.subscribe("route:failover").await.unwrap();
    let mut publisher = b.client().await;
    for n in 1..=20 {
        publisher.publish("route:failover", UpdateType::Route, "k", payload(n)).await.unwrap();
    }
    for n in 1..=20u64 {
        match within("update", phone.next_event()).await.unwrap() {
            Event::Update { update, .. } => assert_eq!(update.offset, n),
            other => panic!("expected an update, got {other:?}"),
        }
    }
    drop(a); // killed mid-stream
    for n in 21..=120 {
        publisher.publish("route:failover", UpdateType::Route, "k", payload(n)).await.unwrap();
    }
    match within("failover", phone.next_event()).await.unwrap() {
        Event::Reconnected { channels, .. } => {
            assert!(channels[0].recovered, "{channels:?}");
            assert_eq!(channels[0].offset, 120);
        }
        other => panic!("expected Reconnected, got {other:?}"),
    }
    assert_eq!(phone.node(), b.addr);
    for n in 21..=120u64 {
        match within("recovered update", phone.next_event()).await.unwrap() {
            Event::Update { update, .. } => {
                assert_eq!(update.offset, n, "in order, nothing lost, nothing twice");
                assert_eq!(update.payload.as_ref(), payload(n).as_slice());
            }
            other => panic!("expected an update, got {other:?}"),
        }
    }
}

#[compio::test]
async fn an_acked_position_kept_in_redis_resumes_a_client_on_another_node() {
    use routopia_realtime::client::Client;
    use routopia_realtime::protocol::pb;
    let redis = RedisServer::start();
    let (a, b) = (node(&redis), node(&redis));
    let named = common::options("truck-12");
    let acked = pb::Subscribe { channel: "route:truck-12".into(), ack: true, ..Default::default() };
    let (mut truck, _) = Client::connect(a.addr, named.clone()).await.unwrap();
    let sub = truck.subscribe_with(acked.clone()).await.unwrap();
    let mut publisher = b.client().await;
    for n in 1..=4 {
        publisher.publish("route:truck-12", UpdateType::Route, "k", payload(n)).await.unwrap();
    }
    for n in 1..=4 {
        assert_eq!(within("update", truck.next_update()).await.unwrap().offset, n);
    }
    truck.ack(sub.sub_id, 4).await.unwrap();
    // The bridge handles one node's requests in order: once this answer is back, so is the ack.
    truck.history("route:truck-12", 4, 1).await.unwrap();
    drop(truck);
    for n in 5..=7 {
        publisher.publish("route:truck-12", UpdateType::Route, "k", payload(n)).await.unwrap();
    }
    let (mut truck, _) = Client::connect(b.addr, named).await.unwrap();
    let resumed = truck.subscribe_with(acked).await.unwrap();
    assert!(resumed.recovered, "{resumed:?}");
    for n in 5..=7 {
        assert_eq!(within("resumed update", truck.next_update()).await.unwrap().offset, n);
    }
}

#[compio::test]
async fn a_fan_out_lost_on_the_way_makes_subscribers_resync_and_recover_it() {
    use routopia_realtime::client::resilient::{Backoff, Event, ResilientClient};
    use routopia_realtime::protocol::push::encode_update_body;

    let redis = RedisServer::start();
    let server = node(&redis);
    let mut phone = ResilientClient::connect(server.addr, common::options("phone"), Backoff::default()).await.unwrap();
    phone.subscribe("traffic:gap").await.unwrap();
    let mut publisher = server.client().await;
    for n in 1..=3 {
        publisher.publish("traffic:gap", UpdateType::Traffic, "k", payload(n)).await.unwrap();
    }
    for n in 1..=3 {
        match within("update", phone.next_event()).await.unwrap() {
            Event::Update { update, .. } => assert_eq!(update.offset, n),
            other => panic!("expected update {n}, got {other:?}"),
        }
    }
    // Publication 4 is in Redis (offset and history) but its fan-out never reached the node,
    // as when the node's link to Redis dropped while another node published.
    let body = encode_update_body(&pb::Update {
        r#type: 3,
        key: "k".into(),
        payload: payload(4).into(),
        ..Default::default()
    });
    redis.command(&[b"HINCRBY", b"realtime:{traffic:gap}:meta", b"offset", b"1"]);
    let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis();
    let id = format!("{now_ms}-4");
    let added = redis.command(&[b"XADD", b"realtime:{traffic:gap}:history", id.as_bytes(), b"b", &body]);
    assert!(!added.starts_with('-'), "{added}");
    publisher.publish("traffic:gap", UpdateType::Traffic, "k", payload(5)).await.unwrap();
    // The node sees 5 after 3: never delivered as if nothing were missing; its subscribers
    // resync (4003) and recover 4 and 5 from Redis.
    match within("resync", phone.next_event()).await.unwrap() {
        Event::Reconnected { channels, .. } => {
            assert_eq!(channels.len(), 1);
            assert!(channels[0].recovered, "Redis holds everything up to its offset: {channels:?}");
        }
        other => panic!("expected Reconnected after a 4003, got {other:?}"),
    }
    for n in 4..=5 {
        match within("recovered update", phone.next_event()).await.unwrap() {
            Event::Update { update, .. } => assert_eq!((update.offset, update.payload), (n, payload(n).into())),
            other => panic!("expected update {n}, got {other:?}"),
        }
    }
    assert_eq!(phone.stats().gaps_detected, 0, "the server never let the gap through");
}

#[compio::test]
async fn redis_round_trips_publications_and_outages_show_in_metrics() {
    let redis = RedisServer::start();
    let a = node(&redis);
    let mut subscriber = a.client().await;
    subscriber.subscribe("weather:metrics").await.unwrap();
    let mut publisher = a.client().await;
    for n in 1..=3 {
        publisher.publish("weather:metrics", UpdateType::Weather, "k", payload(n)).await.unwrap();
    }
    for n in 1..=3 {
        assert_eq!(within("update", subscriber.next_update()).await.unwrap().offset, n);
    }
    let metrics = wait_for_metrics(a.addr, "the Redis round trips and deliveries", |m| {
        m.get("realtime_redis_roundtrip_seconds_count", &[("op", "publish")]) >= 3.0
            && m.get("realtime_updates_delivered_total", &[("type", "weather")]) >= 3.0
    });
    assert_eq!(metrics.get("realtime_redis_up", &[]), 1.0);
    assert_eq!(metrics.get("realtime_updates_published_total", &[("type", "weather")]), 3.0);
    assert_eq!(metrics.get("realtime_updates_delivered_total", &[("type", "weather")]), 3.0);
    assert!(metrics.get("realtime_redis_roundtrip_seconds_count", &[("op", "position")]) >= 1.0);
    assert!(metrics.get("realtime_redis_roundtrip_seconds_count", &[("op", "subscribe")]) >= 1.0);
    assert_eq!(metrics.get("realtime_redis_failures_total", &[("op", "publish")]), 0.0);
    assert!(metrics.value("realtime_redis_queue_length", &[]).is_some());
    // Every series the Grafana dashboard plots is one this server exports.
    let dashboard = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/systemd/grafana-dashboard.json"))
        .expect("the dashboard beside the unit");
    let dashboard: serde_json::Value = serde_json::from_str(&dashboard).expect("the dashboard is JSON");
    let mut plotted = 0;
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().expect("targets") {
            let expr = target["expr"].as_str().expect("expr");
            for name in
                expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).filter(|w| w.starts_with("realtime_"))
            {
                let family =
                    ["_bucket", "_count", "_sum"].iter().fold(name, |n, suffix| n.strip_suffix(suffix).unwrap_or(n));
                assert!(
                    metrics.text.contains(&format!("# TYPE {family} ")),
                    "the dashboard plots {name}, not exported"
                );
                plotted += 1;
            }
        }
    }
    assert!(plotted >= 20, "{plotted} series plotted");
    drop(redis);
    wait_for_metrics(a.addr, "Redis down", |m| m.get("realtime_redis_up", &[]) == 0.0);
}

#[compio::test]
async fn health_counts_publications_through_redis_as_metrics_do_and_shows_no_local_history_size() {
    let redis = RedisServer::start();
    let a = node(&redis);
    let mut publisher = a.client().await;
    for n in 1..=4 {
        publisher.publish("poi:health", UpdateType::Poi, "k", payload(n)).await.unwrap();
    }
    let health = a.health();
    assert_eq!(health["delivery"]["published"], 4, "{health}");
    assert!(health["delivery"].get("history_size").is_none(), "history is in Redis: {health}");
    let metrics = common::Metrics::fetch(a.addr);
    assert_eq!(metrics.get("realtime_updates_published_total", &[("type", "poi")]), 4.0);
    assert!(!metrics.text.contains("realtime_history_size"), "history is in Redis");
}
