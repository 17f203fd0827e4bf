//! History and recovery through the real binary: a reconnecting client gets every update it
//! missed, in order, or is told plainly why it cannot.

mod common;

use common::{payload, within, TestServer};
use routopia_realtime::client::Client;
use routopia_realtime::protocol::pb::{RecoveryFailure, UpdateType};

async fn publish_n(publisher: &mut Client, channel: &str, range: std::ops::RangeInclusive<u64>) {
    for n in range {
        let result = publisher.publish(channel, UpdateType::Route, "leg", payload(n)).await.unwrap();
        assert_eq!(result.offset, n);
    }
}

#[compio::test]
async fn reconnect_after_missing_500_recovers_all_in_order_then_live_without_duplicates() {
    let server = TestServer::start(2, &[]);
    let mut publisher = server.client().await;
    let mut phone = server.client().await;
    let first = phone.subscribe("route:tunnel").await.unwrap();
    publish_n(&mut publisher, "route:tunnel", 1..=10).await;
    let mut last_seen = 0;
    for _ in 0..10 {
        last_seen = within("update", phone.next_update()).await.unwrap().offset;
    }
    assert_eq!(last_seen, 10);
    drop(phone); // into the tunnel
    publish_n(&mut publisher, "route:tunnel", 11..=510).await;

    let mut phone = server.client().await;
    let result = phone.subscribe_from("route:tunnel", &first.epoch, last_seen).await.unwrap();
    assert!(result.recovered, "{result:?}");
    assert_eq!(result.recovery_failure, RecoveryFailure::None as i32);
    assert_eq!((result.epoch.as_str(), result.offset), (first.epoch.as_str(), 510));
    publish_n(&mut publisher, "route:tunnel", 511..=520).await;
    for expected in 11..=520u64 {
        let update = within("recovered or live update", phone.next_update()).await.unwrap();
        assert_eq!(update.offset, expected, "every update once, in order");
        assert_eq!(update.sub_id, result.sub_id);
        assert_eq!(update.payload.as_ref(), payload(expected).as_slice());
    }
}

#[compio::test]
async fn gap_older_than_history_is_refused_with_the_reason() {
    let server = TestServer::start(1, &[("ROUTOPIA_HISTORY__SIZE", "100")]);
    let mut publisher = server.client().await;
    let mut phone = server.client().await;
    let first = phone.subscribe("incident:a7").await.unwrap();
    publish_n(&mut publisher, "incident:a7", 1..=300).await;
    let result = phone.subscribe_from("incident:a7", &first.epoch, 0).await.unwrap_err();
    // Already subscribed on this connection: a second subscription is refused first.
    assert!(result.to_string().contains("409"), "{result}");
    let mut phone = server.client().await;
    let result = phone.subscribe_from("incident:a7", &first.epoch, 5).await.unwrap();
    assert!(!result.recovered);
    assert_eq!(result.recovery_failure, RecoveryFailure::GapTooOld as i32);
    assert_eq!(result.offset, 300, "the client learns where to resync to");
    // Nothing recovered arrives: the next update is the next live one.
    publisher.publish("incident:a7", UpdateType::Incident, "k", payload(301)).await.unwrap();
    assert_eq!(within("live update", phone.next_update()).await.unwrap().offset, 301);
}

#[compio::test]
async fn too_many_missed_is_refused_not_partially_recovered() {
    let server = TestServer::start(1, &[("ROUTOPIA_HISTORY__MAX_RECOVERY_MESSAGES", "50")]);
    let mut publisher = server.client().await;
    let epoch = publisher.subscribe("traffic:ring").await.unwrap().epoch;
    publish_n(&mut publisher, "traffic:ring", 1..=80).await;
    let mut phone = server.client().await;
    let result = phone.subscribe_from("traffic:ring", &epoch, 10).await.unwrap();
    assert!(!result.recovered);
    assert_eq!(result.recovery_failure, RecoveryFailure::TooMany as i32);
    let result = server.client().await.subscribe_from("traffic:ring", &epoch, 40).await.unwrap();
    assert!(result.recovered, "40 missed is within the cap");
    let delivery = &server.health()["delivery"];
    assert_eq!((delivery["recoveries_served"].as_u64(), delivery["recoveries_refused"].as_u64()), (Some(1), Some(1)));
}

#[compio::test]
async fn restarted_memory_broker_means_a_new_epoch_and_the_client_is_told() {
    let server = TestServer::start(2, &[]);
    let mut client = server.client().await;
    let before = client.subscribe("weather:berlin").await.unwrap();
    client.publish("weather:berlin", UpdateType::Weather, "w", payload(1)).await.unwrap();
    drop(client);
    drop(server);
    let server = TestServer::start(2, &[]);
    let mut client = server.client().await;
    let after = client.subscribe_from("weather:berlin", &before.epoch, 1).await.unwrap();
    assert_ne!(after.epoch, before.epoch);
    assert!(!after.recovered);
    assert_eq!(after.recovery_failure, RecoveryFailure::EpochChanged as i32);
}

#[compio::test]
async fn history_pages_exactly() {
    let server = TestServer::start(2, &[("ROUTOPIA_HISTORY__SIZE", "50")]);
    let mut client = server.client().await;
    publish_n(&mut client, "poi:u09tv", 1..=70).await;
    let page = client.history("poi:u09tv", 30, 15).await.unwrap();
    let offsets: Vec<u64> = page.publications.iter().map(|p| p.offset).collect();
    assert_eq!(offsets, (31..=45).collect::<Vec<u64>>());
    assert!(!page.truncated);
    assert_eq!(page.offset, 70);
    assert_eq!(page.publications[0].payload.as_ref(), payload(31).as_slice());
    assert_eq!(page.publications[0].r#type, UpdateType::Route as i32);
    let page = client.history("poi:u09tv", 0, 1000).await.unwrap();
    assert_eq!(page.publications.first().map(|p| p.offset), Some(21), "size 50 keeps 21..=70");
    assert_eq!(page.publications.len(), 50);
    assert!(page.truncated, "1..=20 are gone");
    let page = client.history("poi:u09tv", 70, 10).await.unwrap();
    assert!(page.publications.is_empty() && !page.truncated);
    let unknown = client.history("poi:nothing-here", 0, 10).await.unwrap();
    assert!(unknown.epoch.is_empty() && unknown.publications.is_empty());
}
