//! One fault at a time, each a case that once broke the delivery contract.

use std::time::Duration;

use compio::time::sleep;
use routopia_realtime::client::{Client, ClientError};
use routopia_realtime::protocol::pb::{self, server_frame::Kind, RecoveryFailure, UpdateType};

use super::redis_process::Persistence;
use super::workload::Clients;
use super::{finish, Cluster};
use crate::common::{expect_disconnect, options, payload, within, Metrics};

/// Publishes `n` updates on `channel` through `client`, retrying while Redis is away (503);
/// returns the (epoch, offset) of each.
async fn publish_all(client: &mut Client, channel: &str, first: u64, n: u64) -> Vec<(String, u64)> {
    let mut acks = Vec::new();
    for i in first..first + n {
        loop {
            match within("publish", client.publish(channel, UpdateType::Route, "k", payload(i))).await {
                Ok(result) => break acks.push((result.epoch, result.offset)),
                Err(ClientError::Server(error)) if error.code == 503 => sleep(Duration::from_millis(20)).await,
                Err(err) => panic!("publish {i}: {err}"),
            }
        }
    }
    acks
}

/// Redis comes back from a snapshot taken at offset 10 after 15 were acknowledged: the
/// offsets 11 to 15 must never be acknowledged again in the same epoch, and a subscriber who
/// saw them is told (4003, then `EPOCH_CHANGED`), whether the node relies on Redis's restart
/// (`trust_restarts` false) or only on what it knows (true).
async fn back_from_an_older_snapshot(trust_restarts: bool) {
    let mut cluster = Cluster::start(Persistence::Snapshots, 2, trust_restarts);
    let channel = "route:snapshot";
    let mut subscriber = within("connect", Client::connect(cluster.addrs[1], options("driver"))).await.unwrap().0;
    let subscribed = within("subscribe", subscriber.subscribe(channel)).await.unwrap();
    let mut publisher = within("connect", Client::connect(cluster.addrs[0], options("backend"))).await.unwrap().0;
    let mut acks = publish_all(&mut publisher, channel, 1, 10).await;
    cluster.redis.snapshot();
    acks.extend(publish_all(&mut publisher, channel, 11, 5).await);
    for n in 1..=15 {
        let update = within("update", subscriber.next_update()).await.unwrap();
        assert_eq!(update.offset, n);
    }
    let epoch = subscribed.epoch;
    assert!(acks.iter().all(|(e, _)| *e == epoch));
    cluster.redis.restart_from_disk();
    acks.extend(publish_all(&mut publisher, channel, 16, 5).await);
    let mut distinct = acks.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), acks.len(), "an (epoch, offset) acknowledged twice: {acks:?}");
    let after: Vec<&(String, u64)> = acks[15..].iter().collect();
    assert!(after.iter().all(|(e, _)| *e != epoch), "publications after the rollback start a new epoch: {after:?}");
    // The subscriber is told, and its recovery says why.
    let disconnect = expect_disconnect(&mut subscriber, 4003).await;
    assert!(disconnect.reconnect, "{disconnect:?}");
    let mut again = within("connect", Client::connect(cluster.addrs[1], options("driver"))).await.unwrap().0;
    let recovery = within("subscribe", again.subscribe_from(channel, &epoch, 15)).await.unwrap();
    assert!(!recovery.recovered);
    assert_eq!(recovery.recovery_failure, RecoveryFailure::EpochChanged as i32, "{recovery:?}");
    assert_eq!((recovery.epoch.as_str(), recovery.offset), (after[4].0.as_str(), after[4].1));
    let metrics = Metrics::fetch(cluster.addrs[1]);
    assert!(metrics.get("realtime_redis_resyncs_total", &[("reason", "epoch_changed")]) >= 1.0);
}

#[compio::test]
async fn redis_back_from_an_older_snapshot_never_hands_out_an_offset_twice() {
    back_from_an_older_snapshot(false).await;
}

#[compio::test]
async fn with_trusted_restarts_what_a_node_knows_still_catches_redis_going_back() {
    back_from_an_older_snapshot(true).await;
}

/// With every write on disk before it is answered and restarts trusted, a Redis restart
/// loses nothing and changes nothing: the same epoch, the next offsets, no disconnect.
#[compio::test]
async fn trusted_restarts_from_an_append_only_file_keep_the_epoch_and_lose_nothing() {
    let mut cluster = Cluster::start(Persistence::AppendOnly, 2, true);
    let channel = "route:aof";
    let mut subscriber = within("connect", Client::connect(cluster.addrs[1], options("driver"))).await.unwrap().0;
    let epoch = within("subscribe", subscriber.subscribe(channel)).await.unwrap().epoch;
    let mut publisher = within("connect", Client::connect(cluster.addrs[0], options("backend"))).await.unwrap().0;
    let mut acks = publish_all(&mut publisher, channel, 1, 10).await;
    cluster.redis.restart_from_disk();
    acks.extend(publish_all(&mut publisher, channel, 11, 10).await);
    let expected: Vec<(String, u64)> = (1..=20).map(|n| (epoch.clone(), n)).collect();
    assert_eq!(acks, expected);
    for n in 1..=20 {
        let update = within("update", subscriber.next_update()).await.unwrap();
        assert_eq!((update.offset, update.payload.to_vec()), (n, payload(n)));
    }
}

/// One node loses Redis again and again while the other keeps publishing; its subscribers
/// either get every publication in order or are told to resync, never a silent jump.
#[compio::test]
async fn a_node_cut_off_redis_while_another_publishes_never_skips_silently() {
    let cluster = Cluster::start(Persistence::Snapshots, 2, false);
    let channels: Vec<String> = (1..=4).map(|n| format!("traffic:cut-{n}")).collect();
    let clients = Clients::with_roles(vec![cluster.addrs[0]], vec![cluster.addrs[1]], channels);
    let publishers = vec![compio::runtime::spawn(clients.clone().publisher(0, Duration::from_millis(2)))];
    let subscribers = (0..3).map(|id| compio::runtime::spawn(clients.clone().subscriber(id))).collect();
    for _ in 0..20 {
        sleep(Duration::from_millis(200)).await;
        cluster.proxies[1].cut();
        sleep(Duration::from_millis(300)).await;
        cluster.proxies[1].delay(Duration::from_millis(3));
        cluster.proxies[1].heal();
        sleep(Duration::from_millis(100)).await;
        cluster.proxies[1].delay(Duration::ZERO);
    }
    sleep(Duration::from_millis(400)).await;
    let tally = finish(&cluster, &clients, publishers, subscribers, "cut one node").await;
    assert!(tally.told_to_resync > 0, "the cut node's subscribers were told to resync: {tally:?}");
    let metrics = Metrics::fetch(cluster.addrs[1]);
    assert!(metrics.get("realtime_redis_resyncs_total", &[("reason", "gap")]) >= 1.0);
}

/// Subscribing over and over on one node while another publishes fast: each subscription's
/// first update is the one after its reply's offset, never one the reply already counted.
#[compio::test]
async fn subscribing_while_publications_flow_never_delivers_one_twice() {
    let cluster = Cluster::start(Persistence::Snapshots, 2, false);
    let channel = "traffic:flow";
    let clients = Clients::with_roles(vec![cluster.addrs[0]], vec![], vec![channel.to_string()]);
    let publisher = compio::runtime::spawn(clients.clone().publisher(0, Duration::from_micros(500)));
    let mut subscriber = within("connect", Client::connect(cluster.addrs[1], options("driver"))).await.unwrap().0;
    let mut checked = 0;
    for _ in 0..300 {
        let subscribed = within("subscribe", subscriber.subscribe(channel)).await.unwrap();
        let mut last = subscribed.offset;
        let mut seen = 0;
        // Reads until a few updates of this subscription arrived, then lets it go.
        while seen < 3 {
            let frame = within("update", subscriber.next_frame()).await.unwrap();
            if let pb::ServerFrame { kind: Some(Kind::Update(update)) } = frame {
                if update.sub_id != subscribed.sub_id {
                    continue;
                }
                assert_eq!(update.offset, last + 1, "after the reply's {} came {}", subscribed.offset, update.offset);
                last = update.offset;
                seen += 1;
            }
        }
        within("unsubscribe", subscriber.unsubscribe(subscribed.sub_id)).await.unwrap();
        checked += 1;
    }
    clients.stop_publishing.set(true);
    within("the publisher stopping", publisher).await.unwrap();
    assert_eq!(checked, 300);
}

/// Redis loses a channel's epoch but keeps its acknowledged positions (the meta key expired
/// or was evicted under `maxmemory`, or an ack of the old epoch arrives late): an identity's
/// position in the old epoch must never place it in the new one, where it would skip the
/// new epoch's first publications as if already processed.
#[compio::test]
async fn an_acknowledged_position_never_resumes_into_another_epoch() {
    let cluster = Cluster::start(Persistence::Snapshots, 2, false);
    let channel = "route:acked";
    let acked = pb::Subscribe { channel: channel.into(), ack: true, ..Default::default() };
    let mut truck = within("connect", Client::connect(cluster.addrs[1], options("truck-7"))).await.unwrap().0;
    let sub = within("subscribe", truck.subscribe_with(acked.clone())).await.unwrap();
    let mut publisher = within("connect", Client::connect(cluster.addrs[0], options("backend"))).await.unwrap().0;
    publish_all(&mut publisher, channel, 1, 5).await;
    for n in 1..=5 {
        assert_eq!(within("update", truck.next_update()).await.unwrap().offset, n);
    }
    // The epoch is gone; the truck's ack of offset 5 of the old epoch still comes in.
    cluster.redis.command(&[b"DEL", b"realtime:{route:acked}:meta"]);
    within("ack", truck.ack(sub.sub_id, 5)).await.unwrap();
    // The bridge handles one node's requests in order: once this answer is back, so is the ack.
    within("history", truck.history(channel, 0, 1)).await.unwrap();
    drop(truck);
    let acks = publish_all(&mut publisher, channel, 6, 8).await;
    let epoch = &acks[0].0;
    assert!(acks.iter().enumerate().all(|(i, (e, o))| (e, *o) == (epoch, i as u64 + 1)), "a new epoch: {acks:?}");
    let mut truck = within("connect", Client::connect(cluster.addrs[0], options("truck-7"))).await.unwrap().0;
    let resumed = within("subscribe", truck.subscribe_with(acked)).await.unwrap();
    assert_eq!(&resumed.epoch, epoch);
    assert!(!resumed.recovered, "an old epoch's position resumed into the new one: {resumed:?}");
    assert_eq!(resumed.offset, 8);
}
