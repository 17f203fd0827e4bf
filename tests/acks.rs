//! Acknowledged delivery through the real binary: unacknowledged updates come again, an
//! acknowledgement stops them, and a client without state resumes from its last ack.

mod common;

use common::{payload, within, TestServer};
use routopia_realtime::client::Client;
use routopia_realtime::protocol::pb::{self, UpdateType};

async fn subscribe_acked(client: &mut Client, channel: &str) -> pb::SubscribeResult {
    client.subscribe_with(pb::Subscribe { channel: channel.into(), ack: true, ..Default::default() }).await.unwrap()
}

async fn next_offset(client: &mut Client) -> u64 {
    within("update", client.next_update()).await.unwrap().offset
}

#[compio::test]
async fn unacked_update_is_redelivered_and_stops_after_the_ack() {
    let server =
        TestServer::start(2, &[("ROUTOPIA_ACKS__TIMEOUT", "100ms"), ("ROUTOPIA_ACKS__MAX_REDELIVERIES", "50")]);
    let mut publisher = server.client().await;
    let mut phone = server.client().await;
    let sub = subscribe_acked(&mut phone, "route:acked").await;
    publisher.publish("route:acked", UpdateType::Route, "k", payload(1)).await.unwrap();
    assert_eq!(next_offset(&mut phone).await, 1);
    assert_eq!(next_offset(&mut phone).await, 1, "not acknowledged: sent again");
    phone.ack(sub.sub_id, 1).await.unwrap();
    publisher.publish("route:acked", UpdateType::Route, "k", payload(2)).await.unwrap();
    // Offset 1 is settled; with it still pending, its earlier deadline would bring it first.
    // A resend of 1 already on its way before the ack landed would arrive before 2; skip it.
    let mut first = next_offset(&mut phone).await;
    while first == 1 {
        first = next_offset(&mut phone).await;
    }
    let mut after_ack = vec![first];
    while after_ack.len() < 3 {
        after_ack.push(next_offset(&mut phone).await);
    }
    assert_eq!(after_ack, vec![2, 2, 2], "only the unacknowledged update comes again");
    phone.ack(sub.sub_id, 2).await.unwrap();
    publisher.publish("route:acked", UpdateType::Route, "k", payload(3)).await.unwrap();
    assert_eq!(next_offset(&mut phone).await, 3);
}

#[compio::test]
async fn an_update_is_given_up_after_max_redeliveries() {
    let server = TestServer::start(1, &[("ROUTOPIA_ACKS__TIMEOUT", "50ms"), ("ROUTOPIA_ACKS__MAX_REDELIVERIES", "2")]);
    let mut publisher = server.client().await;
    let mut phone = server.client().await;
    subscribe_acked(&mut phone, "incident:never-acked").await;
    publisher.publish("incident:never-acked", UpdateType::Incident, "k", payload(1)).await.unwrap();
    for _ in 0..3 {
        assert_eq!(next_offset(&mut phone).await, 1, "first send and two redeliveries");
    }
    publisher.publish("incident:never-acked", UpdateType::Incident, "k", payload(2)).await.unwrap();
    // Had offset 1 a fourth send, its earlier deadline would put it before 2's redelivery.
    let seen = [next_offset(&mut phone).await, next_offset(&mut phone).await];
    assert_eq!(seen, [2, 2]);
}

#[compio::test]
async fn a_client_without_state_resumes_from_its_last_ack() {
    let server = TestServer::start(2, &[]);
    let mut publisher = server.client().await;
    let named = common::options("phone-7");
    let (mut phone, _) = Client::connect(server.addr, named.clone()).await.unwrap();
    let sub = subscribe_acked(&mut phone, "route:u7").await;
    assert!(!sub.recovered, "nothing acknowledged yet");
    for n in 1..=3 {
        publisher.publish("route:u7", UpdateType::Route, "k", payload(n)).await.unwrap();
    }
    for n in 1..=3 {
        assert_eq!(next_offset(&mut phone).await, n);
    }
    phone.ack(sub.sub_id, 3).await.unwrap();
    // A request through the same owner after the ack: once answered, the ack is recorded.
    phone.history("route:u7", 3, 1).await.unwrap();
    drop(phone);
    for n in 4..=6 {
        publisher.publish("route:u7", UpdateType::Route, "k", payload(n)).await.unwrap();
    }
    let (mut phone, _) = Client::connect(server.addr, named).await.unwrap();
    let resumed = subscribe_acked(&mut phone, "route:u7").await;
    assert!(resumed.recovered, "{resumed:?}");
    for n in 4..=6 {
        assert_eq!(next_offset(&mut phone).await, n);
    }
}

#[compio::test]
async fn acking_a_plain_subscription_is_an_error() {
    let server = TestServer::start(1, &[]);
    let mut client = server.client().await;
    let sub = client.subscribe("poi:plain").await.unwrap();
    client.ack(sub.sub_id, 1).await.unwrap();
    match within("error", client.next_frame()).await.unwrap().kind {
        Some(pb::server_frame::Kind::Reply(pb::Reply { result: Some(pb::reply::Result::Error(e)), .. })) => {
            assert_eq!(e.code, 400)
        }
        other => panic!("expected error 400, got {other:?}"),
    }
}
