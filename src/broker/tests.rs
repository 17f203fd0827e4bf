//! The brokers' channel-owner logic, driven as a shard drives it, without sockets, runtimes or
//! a Redis: what each call tells which shard.

use std::sync::Arc;
use std::time::Instant;

use super::{Broker, BrokerEvent, BrokerNode, Outbound, OwnerMsg, SubscribeRequest, Tally};
use crate::config::Config;
use crate::core::{ConnId, Position, Publication, Recovery};
use crate::protocol::{pb, ErrorCode};

/// What a broker call sent where, in order.
#[derive(Default)]
struct Recorded {
    to_owner: Vec<(usize, OwnerMsg)>,
    to_shard: Vec<(usize, BrokerEvent)>,
    tallies: Vec<Tally>,
    far_behind: Vec<usize>,
}

impl Outbound for Recorded {
    fn to_owner(&mut self, owner: usize, msg: OwnerMsg) {
        self.to_owner.push((owner, msg));
    }

    fn to_shard(&mut self, shard: usize, event: BrokerEvent) {
        self.to_shard.push((shard, event));
    }

    fn far_behind(&self, shard: usize) -> bool {
        self.far_behind.contains(&shard)
    }

    fn count(&mut self, tally: Tally) {
        self.tallies.push(tally);
    }
}

const SHARDS: usize = 4;

fn conn(index: u32) -> ConnId {
    ConnId { index, generation: 1 }
}

/// A channel name that shard `owner` of `SHARDS` owns.
fn owned_by(owner: usize) -> String {
    (0..).map(|i| format!("route:{i}")).find(|name| super::owner_shard(name, SHARDS) == owner).unwrap()
}

fn update(payload: &'static [u8]) -> pb::Update {
    pb::Update { r#type: pb::UpdateType::Route as i32, payload: payload.into(), ..Default::default() }
}

fn subscribe(channel: &str, from: usize, conn_index: u32, since: Option<Position>) -> SubscribeRequest {
    let channel = Arc::from(channel);
    SubscribeRequest { channel, from, conn: conn(conn_index), sub_id: 1, req_id: 7, since, resume: None }
}

/// The embedded broker of every shard, so messages between shards can be carried by hand.
fn embedded_shards() -> Vec<Box<dyn Broker>> {
    let config = Config::default();
    (0..SHARDS).map(|shard| super::embedded::EmbeddedNode.for_shard(shard, SHARDS, &config)).collect()
}

#[test]
fn a_publish_on_a_channel_this_shard_owns_is_answered_and_fanned_out_in_the_call() {
    let mut shards = embedded_shards();
    let channel = owned_by(2);
    let now = Instant::now();
    let mut out = Recorded::default();
    shards[2].handle_owner(&mut out, now, OwnerMsg::Subscribe(subscribe(&channel, 3, 9, None)));
    let mut out = Recorded::default();
    assert!(shards[2].publish(&mut out, now, conn(1), 5, channel.clone(), update(b"a")), "answered at once");
    assert!(out.to_owner.is_empty());
    let [(3, BrokerEvent::Deliver(publication)), (2, BrokerEvent::Published { conn: c, req_id: 5, position: Ok(p) })] =
        &out.to_shard[..]
    else {
        panic!("a delivery to the subscriber's shard, then the answer: {:?}", out.to_shard)
    };
    assert_eq!((&*publication.channel, publication.offset, *c, p.offset), (&*channel, 1, conn(1), 1));
    assert_eq!(out.tallies, [Tally::Published { update_type: pb::UpdateType::Route as i32 }]);
}

#[test]
fn requests_for_another_shards_channel_go_to_its_owner_and_come_back_answered() {
    let mut shards = embedded_shards();
    let channel = owned_by(1);
    let now = Instant::now();
    let mut out = Recorded::default();
    assert!(!shards[0].publish(&mut out, now, conn(4), 8, channel.clone(), update(b"x")), "answered later");
    assert!(out.to_shard.is_empty());
    let Some((1, msg)) = out.to_owner.pop() else { panic!("to the owner, shard 1") };
    let mut at_owner = Recorded::default();
    shards[1].handle_owner(&mut at_owner, now, msg);
    let [(0, BrokerEvent::Published { conn: c, req_id: 8, position: Ok(position) })] = &at_owner.to_shard[..] else {
        panic!("the answer goes back to shard 0: {:?}", at_owner.to_shard)
    };
    assert_eq!((*c, position.offset), (conn(4), 1));
    // History and subscriptions take the same way.
    let mut out = Recorded::default();
    shards[0].history(&mut out, now, conn(4), 9, Arc::from(channel.as_str()), 0, 10);
    shards[0].subscribe(&mut out, now, subscribe(&channel, 0, 4, None));
    assert!(matches!(&out.to_owner[..], [(1, OwnerMsg::History { .. }), (1, OwnerMsg::Subscribe(_))]));
}

#[test]
fn a_publish_to_an_owner_far_behind_is_refused_without_queueing() {
    let mut shards = embedded_shards();
    let mut out = Recorded { far_behind: vec![3], ..Default::default() };
    assert!(shards[0].publish(&mut out, Instant::now(), conn(2), 3, owned_by(3), update(b"y")));
    assert!(out.to_owner.is_empty(), "nothing queued for the owner");
    let [(0, BrokerEvent::Published { position: Err(ErrorCode::Unavailable), .. })] = &out.to_shard[..] else {
        panic!("refused with 503: {:?}", out.to_shard)
    };
}

#[test]
fn a_recovering_subscriber_gets_what_it_missed_and_the_recovery_is_counted() {
    let mut shards = embedded_shards();
    let channel = owned_by(0);
    let now = Instant::now();
    let mut out = Recorded::default();
    for payload in [b"1", b"2", b"3"] {
        shards[0].publish(&mut out, now, conn(1), 1, channel.clone(), update(payload));
    }
    let Some((_, BrokerEvent::Published { position: Ok(first), .. })) = out.to_shard.first() else { panic!() };
    let since = Position { epoch: first.epoch.clone(), offset: 1 };
    let mut out = Recorded::default();
    shards[0].subscribe(&mut out, now, subscribe(&channel, 0, 2, Some(since)));
    let [(0, BrokerEvent::Subscribed { result: Ok((position, Some(Recovery::Recovered(missed)))), .. })] =
        &out.to_shard[..]
    else {
        panic!("recovered: {:?}", out.to_shard)
    };
    assert_eq!(position.offset, 3);
    assert_eq!(missed.iter().map(|p| p.offset).collect::<Vec<_>>(), [2, 3]);
    assert_eq!(out.tallies, [Tally::Recovery { served: true }]);
    // A position from another epoch is refused, and counted as such.
    let mut out = Recorded::default();
    let stale = Position { epoch: Arc::from("0000000000000000"), offset: 1 };
    shards[0].subscribe(&mut out, now, subscribe(&channel, 0, 3, Some(stale)));
    assert!(matches!(
        &out.to_shard[..],
        [(0, BrokerEvent::Subscribed { result: Ok((_, Some(Recovery::Refused(_)))), .. })]
    ));
    assert_eq!(out.tallies, [Tally::Recovery { served: false }]);
}

#[test]
fn after_its_last_subscriber_leaves_a_channel_no_longer_fans_out_to_that_shard() {
    let mut shards = embedded_shards();
    let channel = owned_by(1);
    let now = Instant::now();
    let mut out = Recorded::default();
    shards[1].handle_owner(&mut out, now, OwnerMsg::Subscribe(subscribe(&channel, 2, 1, None)));
    shards[2].unsubscribe(&mut out, now, Arc::from(channel.as_str()));
    let Some((1, msg)) = out.to_owner.pop() else { panic!("the leave goes to the owner") };
    shards[1].handle_owner(&mut out, now, msg);
    let mut out = Recorded::default();
    shards[1].publish(&mut out, now, conn(1), 1, channel, update(b"z"));
    assert!(
        !out.to_shard.iter().any(|(_, event)| matches!(event, BrokerEvent::Deliver(_))),
        "nobody to deliver to: {:?}",
        out.to_shard
    );
}

/// The Redis broker of shard `shard`, its bridge never started (Redis away).
fn redis_shard(shard: usize) -> Box<dyn Broker> {
    super::redis::RedisNode::new("redis://127.0.0.1:1").for_shard(shard, SHARDS, &Config::default())
}

#[test]
fn with_redis_away_requests_are_refused_in_the_call() {
    let mut broker = redis_shard(0);
    let now = Instant::now();
    let mut out = Recorded::default();
    assert!(broker.publish(&mut out, now, conn(1), 2, owned_by(3), update(b"p")), "answered: refused");
    broker.history(&mut out, now, conn(1), 3, Arc::from("route:1"), 0, 10);
    let channel = owned_by(0);
    broker.subscribe(&mut out, now, subscribe(&channel, 0, 1, None));
    let events: Vec<String> = out.to_shard.iter().map(|(shard, event)| format!("{shard} {event:?}")).collect();
    assert!(
        matches!(
            &out.to_shard[..],
            [
                (0, BrokerEvent::Published { position: Err(ErrorCode::Unavailable), .. }),
                (0, BrokerEvent::Failed { code: ErrorCode::Unavailable, .. }),
                (0, BrokerEvent::Subscribed { result: Err(ErrorCode::Unavailable), .. }),
            ]
        ),
        "{events:#?}"
    );
    assert!(out.to_owner.is_empty());
}

#[test]
fn with_redis_a_gap_in_what_redis_fans_out_makes_the_subscribers_resync() {
    let node = super::redis::RedisNode::new("redis://127.0.0.1:1");
    node.pretend_connected();
    let mut broker = node.for_shard(0, SHARDS, &Config::default());
    let channel = owned_by(0);
    let name: Arc<str> = Arc::from(channel.as_str());
    let epoch: Arc<str> = Arc::from("00000000000000e1");
    let now = Instant::now();
    let at = |offset| Arc::new(crate::protocol::push::publication(name.clone(), offset, 1, Default::default(), now));
    // Subscribers on shards 1 and 2; Redis placed the channel at offset 4.
    let mut out = Recorded::default();
    for from in [1, 2] {
        broker.handle_owner(&mut out, now, OwnerMsg::Subscribe(subscribe(&channel, from, 1, None)));
        let position = Position { epoch: epoch.clone(), offset: 4 };
        let request = subscribe(&channel, from, 1, None);
        broker.handle_owner(&mut out, now, OwnerMsg::Positioned { request, result: Ok((position, None)) });
    }
    assert!(
        matches!(
            &out.to_shard[..],
            [(1, BrokerEvent::Subscribed { result: Ok(_), .. }), (2, BrokerEvent::Subscribed { result: Ok(_), .. })]
        ),
        "{:?}",
        out.to_shard
    );
    let fanout = |publication: Arc<Publication>| OwnerMsg::Fanout { epoch: epoch.clone(), publication };
    let mut out = Recorded::default();
    broker.handle_owner(&mut out, now, fanout(at(5)));
    assert!(matches!(&out.to_shard[..], [(1, BrokerEvent::Deliver(_)), (2, BrokerEvent::Deliver(_))]));
    // 6 never came: 7 must not pass silently.
    let mut out = Recorded::default();
    broker.handle_owner(&mut out, now, fanout(at(7)));
    let told: Vec<usize> = out
        .to_shard
        .iter()
        .map(|(shard, event)| match event {
            BrokerEvent::Resubscribe { channel: c } if *c == name => *shard,
            other => panic!("only resyncs: {other:?}"),
        })
        .collect();
    assert_eq!(told, [1, 2]);
}

#[test]
fn owners_are_stable_and_spread() {
    let owners: Vec<usize> = (0..1000).map(|i| super::owner_shard(&format!("route:{i}"), 4)).collect();
    assert_eq!(owners, (0..1000).map(|i| super::owner_shard(&format!("route:{i}"), 4)).collect::<Vec<_>>());
    for shard in 0..4 {
        assert!(owners.iter().filter(|&&o| o == shard).count() > 150);
    }
}
