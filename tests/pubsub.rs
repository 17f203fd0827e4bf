//! Publish/subscribe through the real binary: across shards, multiplexed channels,
//! unsubscribe, offsets, and a thousand subscribers.

mod common;

use common::{payload, within, TestServer};
use routopia_realtime::client::Client;
use routopia_realtime::protocol::pb::UpdateType;

/// Opens connections until both shards of a 2-shard server hold some (the kernel spreads
/// them by hash), and returns them.
async fn clients_on_both_shards(server: &TestServer) -> Vec<Client> {
    let mut clients = Vec::new();
    loop {
        for _ in 0..8 {
            clients.push(server.client().await);
        }
        let health = server.health();
        let per_shard: Vec<u64> =
            health["per_shard"].as_array().unwrap().iter().map(|s| s["connections"].as_u64().unwrap()).collect();
        if per_shard.iter().all(|&n| n > 0) {
            return clients;
        }
        assert!(clients.len() < 400, "all connections landed on one shard: {per_shard:?}");
    }
}

#[compio::test]
async fn updates_cross_shards_in_order_without_gaps() {
    let server = TestServer::start(2, &[]);
    let mut subscribers = clients_on_both_shards(&server).await;
    let mut publisher = server.client().await;
    // Several channels, so owners differ from the subscribers' shards.
    let channels: Vec<String> = (0..4).map(|i| format!("route:{i}")).collect();
    for (i, client) in subscribers.iter_mut().enumerate() {
        let result = client.subscribe(&channels[i % channels.len()]).await.unwrap();
        assert_eq!(result.offset, 0);
        assert!(!result.epoch.is_empty());
    }
    for n in 1..=30u64 {
        for channel in &channels {
            let result = publisher.publish(channel, UpdateType::Route, "leg", payload(n)).await.unwrap();
            assert_eq!(result.offset, n, "offsets count up from 1 in each channel");
        }
    }
    for client in subscribers.iter_mut() {
        for n in 1..=30u64 {
            let update = within("an update", client.next_update()).await.unwrap();
            assert_eq!(update.offset, n, "no gap, no reordering");
            assert_eq!(update.payload.as_ref(), payload(n).as_slice());
            assert_eq!(update.r#type, UpdateType::Route as i32);
            assert!(update.timestamp_us > 0);
        }
    }
}

#[compio::test]
async fn hundred_channels_multiplexed_on_one_connection() {
    let server = TestServer::start(2, &[]);
    let mut subscriber = server.client().await;
    let mut publisher = server.client().await;
    let mut sub_ids = Vec::new();
    for i in 0..100 {
        sub_ids.push(subscriber.subscribe(&format!("poi:tile-{i}")).await.unwrap().sub_id);
    }
    let mut unique = sub_ids.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), 100, "every subscription has its own sub_id");
    for i in 0..100 {
        publisher.publish(&format!("poi:tile-{i}"), UpdateType::Poi, &format!("poi-{i}"), payload(i)).await.unwrap();
    }
    let mut seen = [false; 100];
    for _ in 0..100 {
        let update = within("an update", subscriber.next_update()).await.unwrap();
        let i = sub_ids.iter().position(|&id| id == update.sub_id).expect("a known sub_id");
        assert_eq!(update.key, format!("poi-{i}"), "update arrived on its channel's sub_id");
        assert_eq!(update.payload.as_ref(), payload(i as u64).as_slice());
        assert!(!seen[i], "one update per channel");
        seen[i] = true;
    }
}

#[compio::test]
async fn unsubscribe_stops_delivery() {
    let server = TestServer::start(2, &[]);
    let mut subscriber = server.client().await;
    let mut publisher = server.client().await;
    let weather = subscriber.subscribe("weather:paris").await.unwrap().sub_id;
    let traffic = subscriber.subscribe("traffic:a1").await.unwrap().sub_id;
    publisher.publish("weather:paris", UpdateType::Weather, "w", payload(1)).await.unwrap();
    assert_eq!(within("weather", subscriber.next_update()).await.unwrap().sub_id, weather);
    subscriber.unsubscribe(weather).await.unwrap();
    publisher.publish("weather:paris", UpdateType::Weather, "w", payload(2)).await.unwrap();
    publisher.publish("traffic:a1", UpdateType::Traffic, "t", payload(3)).await.unwrap();
    // Had the weather update still been delivered, it would come first.
    let next = within("traffic", subscriber.next_update()).await.unwrap();
    assert_eq!((next.sub_id, next.payload.as_ref()), (traffic, payload(3).as_slice()));
    // A second unsubscribe of the same id is refused.
    let err = subscriber.unsubscribe(weather).await.unwrap_err();
    assert!(err.to_string().contains("404"), "{err}");
}

#[compio::test]
async fn thousand_subscribers_get_every_update() {
    let server = TestServer::start(2, &[]);
    let mut subscribers = Vec::with_capacity(1000);
    for _ in 0..1000 {
        let mut client = server.client().await;
        client.subscribe("incident:city").await.unwrap();
        subscribers.push(client);
    }
    let mut publisher = server.client().await;
    for n in 1..=20u64 {
        publisher.publish("incident:city", UpdateType::Incident, "crash", payload(n)).await.unwrap();
    }
    // Health answers while a thousand connections are held and updates are queued.
    assert_eq!(server.health()["connections"].as_u64(), Some(1001));
    let mut handles = Vec::new();
    for mut client in subscribers {
        handles.push(compio::runtime::spawn(async move {
            let mut offsets = Vec::new();
            for _ in 0..20 {
                offsets.push(client.next_update().await.unwrap().offset);
            }
            offsets
        }));
    }
    for handle in handles {
        let offsets = within("twenty updates", handle).await.unwrap();
        assert_eq!(offsets, (1..=20).collect::<Vec<u64>>());
    }
}

#[compio::test]
async fn subscribing_twice_and_bad_names_are_refused_with_errors() {
    let server = TestServer::start(1, &[]);
    let mut client = server.client().await;
    client.subscribe("route:7").await.unwrap();
    let twice = client.subscribe("route:7").await.unwrap_err();
    assert!(twice.to_string().contains("409"), "{twice}");
    let bad = client.subscribe("route 7!").await.unwrap_err();
    assert!(bad.to_string().contains("400"), "{bad}");
    let too_long = client.subscribe(&"r".repeat(500)).await.unwrap_err();
    assert!(too_long.to_string().contains("400"), "{too_long}");
    // The connection is still usable.
    client.subscribe("route:8").await.unwrap();
}

#[compio::test]
async fn subscription_limit_is_enforced() {
    let server = TestServer::start(1, &[("ROUTOPIA_LIMITS__MAX_SUBSCRIPTIONS_PER_CONNECTION", "3")]);
    let mut client = server.client().await;
    for i in 0..3 {
        client.subscribe(&format!("poi:{i}")).await.unwrap();
    }
    let err = client.subscribe("poi:3").await.unwrap_err();
    assert!(err.to_string().contains("413"), "{err}");
}

#[compio::test]
async fn channel_cap_refuses_new_channels_with_503_and_serves_known_ones() {
    let server = TestServer::start(1, &[("ROUTOPIA_LIMITS__MAX_CHANNELS", "2")]);
    let mut client = server.client().await;
    client.subscribe("route:a").await.unwrap();
    client.publish("route:b", UpdateType::Route, "k", payload(1)).await.unwrap();
    let err = client.publish("route:c", UpdateType::Route, "k", payload(1)).await.unwrap_err();
    assert!(err.to_string().contains("503"), "{err}");
    let err = client.subscribe("route:d").await.unwrap_err();
    assert!(err.to_string().contains("503"), "{err}");
    // The refused subscription left nothing behind: the same channel can be tried again later.
    let err = client.subscribe("route:d").await.unwrap_err();
    assert!(err.to_string().contains("503"), "not 409: {err}");
    assert_eq!(client.publish("route:a", UpdateType::Route, "k", payload(2)).await.unwrap().offset, 1);
    assert_eq!(within("own update", client.next_update()).await.unwrap().offset, 1);
}

#[compio::test]
async fn a_burst_of_ten_thousand_publishes_in_one_write_is_taken_whole() {
    use routopia_realtime::protocol::envelope;
    use routopia_realtime::protocol::pb::{self, client_frame::Command};
    use routopia_realtime::protocol::ws::WsEndpoint;
    // One shard: owner, publisher and subscriber share it, so answers are synchronous.
    let server = TestServer::start(1, &[]);
    let mut subscriber = server.client().await;
    subscriber.subscribe("traffic:burst").await.unwrap();
    let mut publisher = server.client().await;
    let mut framing = WsEndpoint::client(1 << 20);
    let mut wire = Vec::new();
    for batch in 0..100u64 {
        let frames = (0..100u64)
            .map(|i| {
                let publish = pb::Publish {
                    channel: "traffic:burst".into(),
                    r#type: UpdateType::Traffic as i32,
                    payload: payload(batch * 100 + i + 1).into(),
                    ..Default::default()
                };
                pb::ClientFrame { id: 0, command: Some(Command::Publish(publish)) }
            })
            .collect();
        framing.send_binary(envelope::encode::<pb::ClientMessage>(frames, None).into()).unwrap();
        wire.extend(framing.take_output());
    }
    publisher.send_wire(wire).await.unwrap();
    let last = publisher.publish("traffic:burst", UpdateType::Traffic, "k", payload(10_001)).await.unwrap();
    assert_eq!(last.offset, 10_001);
    for n in 1..=10_001u64 {
        let update = within("burst update", subscriber.next_update()).await.unwrap();
        assert_eq!(update.offset, n);
    }
}
