//! The resilient client against the real binary: it reconnects with backoff, resubscribes
//! from its last positions and says per channel whether recovery succeeded.

mod common;

use std::time::Duration;

use common::{payload, within, TestServer};
use routopia_realtime::client::resilient::{Backoff, Event, ResilientClient};
use routopia_realtime::client::ClientError;
use routopia_realtime::protocol::pb::{RecoveryFailure, UpdateType};

fn quick_backoff(max_retries: Option<u32>) -> Backoff {
    Backoff { initial: Duration::from_millis(20), factor: 2.0, max: Duration::from_millis(200), max_retries }
}

async fn next_update(client: &mut ResilientClient) -> (String, u64) {
    match within("event", client.next_event()).await.unwrap() {
        Event::Update { channel, update } => (channel.to_string(), update.offset),
        other => panic!("expected an update, got {other:?}"),
    }
}

#[compio::test]
async fn interrupted_client_reconnects_and_recovers_everything_missed() {
    let server = TestServer::start(2, &[]);
    let mut publisher = server.client().await;
    let mut phone = ResilientClient::connect(server.addr, common::options("phone"), quick_backoff(None)).await.unwrap();
    for channel in ["route:r1", "traffic:t1"] {
        phone.subscribe(channel).await.unwrap();
        for n in 1..=5 {
            publisher.publish(channel, UpdateType::Route, "k", payload(n)).await.unwrap();
        }
    }
    for _ in 0..10 {
        next_update(&mut phone).await;
    }
    assert_eq!(phone.position("route:r1").map(|(_, o)| o), Some(5));
    phone.interrupt();
    for n in 6..=105 {
        for channel in ["route:r1", "traffic:t1"] {
            publisher.publish(channel, UpdateType::Route, "k", payload(n)).await.unwrap();
        }
    }
    match within("reconnect", phone.next_event()).await.unwrap() {
        Event::Reconnected { channels, .. } => {
            assert_eq!(channels.len(), 2);
            for outcome in channels {
                assert!(outcome.recovered, "{outcome:?}");
                assert_eq!(outcome.offset, 105);
            }
        }
        other => panic!("expected Reconnected, got {other:?}"),
    }
    let mut last = std::collections::HashMap::from([("route:r1".to_string(), 5), ("traffic:t1".to_string(), 5)]);
    for _ in 0..200 {
        let (channel, offset) = next_update(&mut phone).await;
        let previous = last.insert(channel.clone(), offset).unwrap();
        assert_eq!(offset, previous + 1, "{channel}: in order, no gap, no duplicate");
    }
    publisher.publish("route:r1", UpdateType::Route, "k", payload(106)).await.unwrap();
    assert_eq!(next_update(&mut phone).await, ("route:r1".to_string(), 106));
    assert_eq!(phone.stats().reconnects, 1);
    assert_eq!(phone.stats().recoveries_succeeded, 2);
}

#[compio::test]
async fn restarted_server_is_reached_again_and_the_epoch_change_is_reported() {
    let server = TestServer::start(1, &[]);
    let addr = server.addr;
    let mut phone = ResilientClient::connect(addr, common::options("phone"), quick_backoff(None)).await.unwrap();
    phone.subscribe("weather:rome").await.unwrap();
    server.client().await.publish("weather:rome", UpdateType::Weather, "w", payload(1)).await.unwrap();
    assert_eq!(next_update(&mut phone).await.1, 1);
    let (old_epoch, _) = phone.position("weather:rome").map(|(e, o)| (e.to_string(), o)).unwrap();
    assert!(server.terminate().success());
    let server = TestServer::start_at(&addr.to_string(), 1, &[]);
    match within("reconnect", phone.next_event()).await.unwrap() {
        Event::Reconnected { channels, .. } => {
            assert_eq!(channels.len(), 1);
            assert!(!channels[0].recovered);
            assert_eq!(channels[0].failure, RecoveryFailure::EpochChanged);
            assert_ne!(channels[0].epoch, old_epoch);
        }
        other => panic!("expected Reconnected, got {other:?}"),
    }
    server.client().await.publish("weather:rome", UpdateType::Weather, "w", payload(2)).await.unwrap();
    assert_eq!(next_update(&mut phone).await, ("weather:rome".to_string(), 1), "the new epoch starts at 1");
    assert_eq!(phone.stats().recoveries_failed, 1);
}

#[compio::test]
async fn gives_up_after_max_retries_when_the_server_stays_away() {
    let server = TestServer::start(1, &[]);
    let mut phone =
        ResilientClient::connect(server.addr, common::options("phone"), quick_backoff(Some(3))).await.unwrap();
    phone.subscribe("poi:gone").await.unwrap();
    drop(server);
    let err = within("giving up", phone.next_event()).await.unwrap_err();
    assert!(matches!(err, ClientError::Io(_) | ClientError::Handshake(_)), "{err}");
}
