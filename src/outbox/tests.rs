//! The queue under every mix of items, pressure and fan-out runs, checked on the bytes it writes.

use std::collections::HashMap;

use super::fanout_log::FANOUT_LOG_CAPACITY;
use super::*;
use crate::protocol::pb::{server_frame::Kind, ServerMessage, Update};
use crate::protocol::push::encode_update_body;
use crate::protocol::ws::{WsEndpoint, WsEvent};
use prost::Message;
use std::sync::Arc;
use std::time::Instant;

/// ROUTE and WEATHER first; conflate past `conflate_above`.
fn pressure(conflate_above: usize) -> Pressure {
    Pressure { priority_types: 1 << 1 | 1 << 2, conflate_above }
}

fn publication(offset: u64) -> Rc<Publication> {
    typed(offset, 1, "")
}

/// Shared batches that never compress.
fn plain_batches() -> SharedBatches {
    let settings = crate::compression::ZstdSettings { threshold: 0, level: 1, dictionaries: Vec::new() };
    SharedBatches::new(Arc::new(settings))
}

/// Encoding through `batches` for a client without zstd, latencies not recorded.
fn plain_encoding(batches: &mut SharedBatches) -> SharedEncoding<'_> {
    SharedEncoding { batches, zstd: false, held: 0, observed: None }
}

fn typed(offset: u64, update_type: i32, key: &str) -> Rc<Publication> {
    let update =
        Update { offset, r#type: update_type, key: key.into(), payload: vec![7; 40].into(), ..Default::default() };
    Rc::new(crate::protocol::push::publication(
        Arc::from("c"),
        offset,
        update_type,
        encode_update_body(&update),
        Instant::now(),
    ))
}

fn updates(wire: &[u8]) -> Vec<Update> {
    messages(wire)
        .into_iter()
        .flat_map(|m| m.frames)
        .filter_map(|f| match f.kind {
            Some(Kind::Update(u)) => Some(u),
            _ => None,
        })
        .collect()
}

const TRAFFIC: i32 = 3;
const ROUTE: i32 = 1;

#[test]
fn high_priority_leaves_first_but_never_ahead_of_its_own_subscription() {
    let mut outbox = Outbox::new(1 << 20, pressure(1 << 20));
    outbox.push(OutItem::Push { sub_id: 1, publication: typed(1, TRAFFIC, "") }).unwrap();
    outbox.push(OutItem::Push { sub_id: 1, publication: typed(2, TRAFFIC, "") }).unwrap();
    outbox.push(OutItem::Push { sub_id: 2, publication: typed(1, ROUTE, "") }).unwrap();
    outbox.push(OutItem::Push { sub_id: 1, publication: typed(3, ROUTE, "") }).unwrap();
    let mut wire = Vec::new();
    outbox.poll_transmit(&mut wire, 100, None);
    let order: Vec<(u32, u64)> = updates(&wire).iter().map(|u| (u.sub_id, u.offset)).collect();
    assert_eq!(order, vec![(2, 1), (1, 1), (1, 2), (1, 3)]);
}

#[test]
fn an_empty_outbox_gives_its_small_queues_back_and_keeps_what_is_queued() {
    let mut outbox = Outbox::new(1 << 20, pressure(1 << 20));
    outbox.push(OutItem::Push { sub_id: 1, publication: typed(1, TRAFFIC, "") }).unwrap();
    outbox.push(OutItem::Frame(vec![1, 2, 3])).unwrap();
    outbox.release_if_empty(usize::MAX);
    assert_eq!(outbox.len(), 2, "nothing queued is given up");
    let mut wire = Vec::new();
    outbox.poll_transmit(&mut wire, 100, None);
    assert!(outbox.high.capacity() > 0 && outbox.low.is_some());
    outbox.release_if_empty(0);
    assert!(outbox.high.capacity() > 0 && outbox.low.is_some(), "larger than asked: kept");
    outbox.release_if_empty(usize::MAX);
    assert_eq!(outbox.high.capacity(), 0);
    assert!(outbox.low.is_none());
    outbox.push(OutItem::Push { sub_id: 1, publication: typed(2, TRAFFIC, "") }).unwrap();
    assert_eq!(outbox.len(), 1, "a released outbox queues as before");
}

#[test]
fn a_lent_queue_serves_one_connection_after_another_and_never_takes_what_is_queued() {
    let mut spare = VecDeque::with_capacity(4);
    let lent = spare.capacity();
    let mut first = Outbox::new(1 << 20, pressure(1 << 20));
    first.borrow_queue(&mut spare);
    assert_eq!((first.high.capacity(), spare.capacity()), (lent, 0), "an empty outbox takes it");
    first.push(OutItem::Frame(vec![1, 2, 3])).unwrap();
    first.give_back_queue(&mut spare, 8);
    assert_eq!(first.len(), 1, "a queue holding an answer stays");
    assert_eq!(spare.capacity(), 0);
    let mut wire = Vec::new();
    first.poll_transmit(&mut wire, 100, None);
    first.give_back_queue(&mut spare, 8);
    assert_eq!((first.high.capacity(), spare.capacity()), (0, lent), "drained: back to the lender");

    // A second connection's answer goes into the same memory.
    let mut second = Outbox::new(1 << 20, pressure(1 << 20));
    second.borrow_queue(&mut spare);
    second.push(OutItem::Frame(vec![4, 5])).unwrap();
    assert_eq!(second.high.capacity(), lent);
    let mut again = Vec::new();
    second.poll_transmit(&mut again, 100, None);
    assert!(again.ends_with(&[4, 5]), "{again:?}");

    // Only a small queue comes back, and only to a lender with none.
    second.give_back_queue(&mut spare, 0);
    assert_eq!((second.high.capacity(), spare.capacity()), (lent, 0), "larger than asked: kept");
    let mut busy = Outbox::new(1 << 20, pressure(1 << 20));
    busy.push(OutItem::Frame(vec![6])).unwrap();
    let busy_capacity = busy.high.capacity();
    busy.borrow_queue(&mut spare);
    second.give_back_queue(&mut spare, 8);
    assert_eq!(busy.high.capacity(), busy_capacity, "an outbox with a queue takes none");
    assert_eq!(busy.len(), 1);
    assert_eq!(spare.capacity(), lent);
    let mut full = Outbox::new(1 << 20, pressure(1 << 20));
    full.push(OutItem::Frame(vec![7])).unwrap();
    full.poll_transmit(&mut Vec::new(), 100, None);
    full.give_back_queue(&mut spare, 8);
    assert!(full.high.capacity() > 0, "the lender already holds one");
}

#[test]
fn under_pressure_a_newer_update_with_the_same_key_replaces_the_queued_one() {
    let mut outbox = Outbox::new(1 << 20, pressure(0));
    outbox.push(OutItem::Push { sub_id: 1, publication: typed(1, TRAFFIC, "a1") }).unwrap();
    outbox.push(OutItem::Push { sub_id: 1, publication: typed(2, TRAFFIC, "b2") }).unwrap();
    outbox.push(OutItem::Push { sub_id: 1, publication: typed(3, TRAFFIC, "a1") }).unwrap();
    assert_eq!(outbox.poll_shed_counts(), ShedCounts { conflated: 1, dropped: 0 });
    let mut wire = Vec::new();
    outbox.poll_transmit(&mut wire, 100, None);
    let got: Vec<(u64, u32, String)> = updates(&wire).into_iter().map(|u| (u.offset, u.skipped, u.key)).collect();
    assert_eq!(got, vec![(2, 1, "b2".into()), (3, 0, "a1".into())]);
    assert_eq!(outbox.queued_bytes(), 0);
}

#[test]
fn a_full_queue_drops_lower_priority_updates_and_stays_bounded() {
    let one = push_len(1, typed(1, TRAFFIC, "").body.len());
    let max = one * 10;
    let mut outbox = Outbox::new(max, pressure(max));
    // A flood of keyless TRAFFIC on two subscriptions, with ROUTE updates among them.
    // The reader takes what is queued only every 25 updates.
    let mut offsets = [0u64; 3];
    let mut wire = Vec::new();
    for round in 0..200 {
        let sub_id = 1 + (round % 2) as u32;
        offsets[sub_id as usize] += 1;
        let kind = if round % 10 == 0 { ROUTE } else { TRAFFIC };
        outbox
            .push(OutItem::Push { sub_id, publication: typed(offsets[sub_id as usize], kind, "") })
            .unwrap_or_else(|_| panic!("round {round}: {outbox:?}"));
        assert!(outbox.queued_bytes() <= max, "round {round}: {} bytes", outbox.queued_bytes());
        if round % 25 == 24 {
            outbox.poll_transmit(&mut wire, 100, None);
        }
    }
    outbox.poll_transmit(&mut wire, 100, None);
    assert!(outbox.poll_shed_counts().dropped > 80);
    let received = updates(&wire);
    // Every ROUTE update made it, and per subscription the offsets add up exactly.
    assert_eq!(received.iter().filter(|u| u.r#type == ROUTE).count(), 20);
    let mut last = [0u64; 3];
    for u in &received {
        let sub = u.sub_id as usize;
        assert_eq!(u.offset, last[sub] + 1 + u64::from(u.skipped), "{u:?}");
        last[sub] = u.offset;
    }
}

#[test]
fn when_high_priority_updates_alone_do_not_fit_it_overflows() {
    let one = push_len(1, typed(1, ROUTE, "").body.len());
    let reply = OutItem::Frame(vec![0x0a, 0]);
    let mut outbox = Outbox::new(one * 3 + reply.len(), pressure(0));
    outbox.push(OutItem::Push { sub_id: 1, publication: typed(1, TRAFFIC, "k") }).unwrap();
    outbox.push(reply).unwrap();
    for offset in 2..=4 {
        outbox.push(OutItem::Push { sub_id: 1, publication: typed(offset, ROUTE, "") }).unwrap();
    }
    assert_eq!(outbox.poll_shed_counts().dropped, 1, "the TRAFFIC update made room");
    // A lower-priority update finds no room and gives way itself; the queue holds on.
    assert_eq!(outbox.push(OutItem::Push { sub_id: 1, publication: typed(5, TRAFFIC, "") }), Ok(()));
    assert_eq!(outbox.poll_shed_counts().dropped, 1);
    assert_eq!(outbox.push(OutItem::Push { sub_id: 1, publication: typed(6, ROUTE, "") }), Err(Overflow));
}

/// A lower-priority update too large for what giving way could free gives way itself,
/// leaving the older ones queued: dropping them would not have made it fit.
#[test]
fn an_update_that_could_not_fit_anyway_is_given_up_alone() {
    let small = push_len(1, sized(1, TRAFFIC, "", 100).body.len());
    let mut outbox = Outbox::new(small * 4, pressure(1 << 20));
    outbox.push(OutItem::Push { sub_id: 1, publication: sized(1, ROUTE, "", 100) }).unwrap();
    for offset in 2..=3 {
        outbox.push(OutItem::Push { sub_id: 1, publication: sized(offset, TRAFFIC, "", 100) }).unwrap();
    }
    assert_eq!(outbox.push(OutItem::Push { sub_id: 1, publication: sized(4, TRAFFIC, "", 400) }), Ok(()));
    outbox.push(OutItem::Push { sub_id: 1, publication: sized(5, TRAFFIC, "", 100) }).unwrap();
    assert_eq!(outbox.poll_shed_counts().dropped, 1);
    let mut wire = Vec::new();
    outbox.poll_transmit(&mut wire, 100, None);
    let got: Vec<(u64, u32)> = updates(&wire).iter().map(|u| (u.offset, u.skipped)).collect();
    assert_eq!(got, [(1, 0), (2, 0), (3, 0), (5, 1)]);
}

fn messages(wire: &[u8]) -> Vec<ServerMessage> {
    let mut client = WsEndpoint::client(1 << 20);
    client.feed(wire);
    let mut out = Vec::new();
    while let Some(event) = client.next_event().unwrap() {
        match event {
            WsEvent::Binary(data) => out.push(ServerMessage::decode(data).unwrap()),
            other => panic!("unexpected {other:?}"),
        }
    }
    out
}

/// What a shared take writes (`head`, then `parts`), as each message's (sub_id, offset)s.
fn shared_messages(mut head: Vec<u8>, parts: &[Bytes]) -> Vec<Vec<(u32, u64)>> {
    for part in parts {
        head.extend_from_slice(part);
    }
    let mut client = WsEndpoint::client(1 << 20);
    client.feed(&head);
    let mut out = Vec::new();
    while let Some(event) = client.next_event().unwrap() {
        let WsEvent::Binary(message) = event else { panic!("unexpected {event:?}") };
        let decoded =
            crate::protocol::envelope::decode::<ServerMessage>(message, 1 << 20, &Default::default()).unwrap();
        out.push(
            decoded
                .iter()
                .filter_map(|f| match &f.kind {
                    Some(Kind::Update(u)) => Some((u.sub_id, u.offset)),
                    _ => None,
                })
                .collect(),
        );
    }
    out
}

#[test]
fn one_subscriptions_updates_are_taken_shared_and_anything_else_is_not() {
    let shared = |items: Vec<OutItem>, batch_size| {
        let mut outbox = Outbox::new(1 << 20, pressure(1 << 18));
        for item in items {
            outbox.push(item).unwrap();
        }
        let mut batches = plain_batches();
        let mut head = Vec::new();
        let taken = outbox.poll_transmit_vectored(&mut head, batch_size, &mut batches, None);
        assert_eq!(taken.is_some(), outbox.is_empty() && outbox.queued_bytes() == 0);
        taken.map(|parts| shared_messages(head, &parts))
    };
    let push = |sub_id, offset| OutItem::Push { sub_id, publication: publication(offset) };
    let messages = shared((1..=3).map(|offset| push(9, offset)).collect(), 100).expect("one subscription's batch");
    assert_eq!(messages, [vec![(9, 1), (9, 2), (9, 3)]]);

    // More than a batch: several messages in one write, each a shared batch with its own head.
    let messages = shared((1..=250).map(|offset| push(300, offset)).collect(), 100).expect("shared batches");
    assert_eq!(messages.iter().map(Vec::len).collect::<Vec<_>>(), [100, 100, 50]);
    let offsets: Vec<(u32, u64)> = messages.into_iter().flatten().collect();
    assert_eq!(offsets, (1..=250).map(|offset| (300, offset)).collect::<Vec<_>>());
    let messages = shared((1..=3).map(|offset| push(1, offset)).collect(), 2).expect("shared batches");
    assert_eq!(messages, [vec![(1, 1), (1, 2)], vec![(1, 3)]]);

    // Two subscriptions, a reply or a single update: the full path.
    assert_eq!(shared(vec![push(1, 1), push(2, 1)], 100), None);
    assert_eq!(shared(vec![push(1, 1), OutItem::Frame(vec![1, 2]), push(1, 2)], 100), None);
    assert_eq!(shared(vec![push(1, 1)], 100), None);
}

/// Queues fed the same updates, one through `push` and one through `push_delivered` (runs),
/// with replies, lower-priority updates and a second subscription among them, hold the
/// same and write the same bytes, shared or not.
#[test]
fn a_run_of_delivered_updates_queues_and_writes_like_single_pushes() {
    let mut fanout = Rc::new(FanoutLog::default());
    let mut pushed = Outbox::new(1 << 20, pressure(1 << 20));
    let mut ran = Outbox::new(1 << 20, pressure(1 << 20));
    let (mut batches_pushed, mut batches_ran) = (plain_batches(), plain_batches());
    let mut offset = 0;
    let mut update = |sub_id: u32, update_type: i32, pushed: &mut Outbox, ran: &mut Outbox| {
        offset += 1;
        let publication = typed(offset, update_type, "");
        let index = FanoutLog::append(&mut fanout, &publication);
        pushed.push(OutItem::Push { sub_id, publication: publication.clone() }).unwrap();
        ran.push_delivered(sub_id, &publication, &fanout, index).unwrap();
        assert_eq!((pushed.len(), pushed.queued_bytes()), (ran.len(), ran.queued_bytes()));
    };
    // Rounds: a run alone; a run broken by a reply; lower-priority updates ahead of a run;
    // two subscriptions interleaved; a run longer than a batch.
    let rounds: [&[(u32, i32)]; 5] = [
        &[(1, ROUTE), (1, ROUTE), (1, ROUTE)],
        &[(1, ROUTE), (1, ROUTE), (0, 0), (1, ROUTE)],
        &[(1, TRAFFIC), (1, ROUTE), (2, ROUTE), (2, ROUTE)],
        &[(1, ROUTE), (2, ROUTE), (1, ROUTE), (2, ROUTE)],
        &[(1, ROUTE); 7],
    ];
    for (round, steps) in rounds.iter().enumerate() {
        for &(sub_id, update_type) in *steps {
            if sub_id == 0 {
                pushed.push(OutItem::Frame(vec![0x0a, 0])).unwrap();
                ran.push(OutItem::Frame(vec![0x0a, 0])).unwrap();
            } else {
                update(sub_id, update_type, &mut pushed, &mut ran);
            }
        }
        let (mut head_pushed, mut head_ran) = (Vec::new(), Vec::new());
        let taken_pushed = pushed.poll_transmit_vectored(&mut head_pushed, 3, &mut batches_pushed, None);
        let taken_ran = ran.poll_transmit_vectored(&mut head_ran, 3, &mut batches_ran, None);
        assert_eq!(taken_pushed.is_some(), taken_ran.is_some(), "round {round}");
        let wire = |outbox: &mut Outbox, mut head: Vec<u8>, taken: Option<Vec<Bytes>>, batches| {
            taken.iter().flatten().for_each(|part| head.extend_from_slice(part));
            outbox.poll_transmit(&mut head, 3, Some(plain_encoding(batches)));
            assert!(outbox.is_empty() && outbox.queued_bytes() == 0);
            head
        };
        assert_eq!(
            wire(&mut pushed, head_pushed, taken_pushed, &mut batches_pushed),
            wire(&mut ran, head_ran, taken_ran, &mut batches_ran),
            "round {round}"
        );
    }
}

/// A parked queue holds what the fan-out passed by, settles it when touched, and writes
/// the same bytes as single pushes; its mark goes when its run closes.
#[test]
fn a_parked_queue_holds_what_the_fan_out_passed_by() {
    let mut fanout = Rc::new(FanoutLog::default());
    let mut pushed = Outbox::new(1 << 20, pressure(1 << 20));
    let mut parked = Outbox::new(1 << 20, pressure(1 << 20));
    let mut publish = |offset: u64, update_type: i32, pushed: &mut Outbox| {
        let publication = typed(offset, update_type, "");
        let index = FanoutLog::append(&mut fanout, &publication);
        pushed.push(OutItem::Push { sub_id: 1, publication: publication.clone() }).unwrap();
        (publication, index, fanout.clone())
    };
    let (first, index, d) = publish(1, ROUTE, &mut pushed);
    parked.push_delivered(1, &first, &d, index).unwrap();
    assert!(!parked.park(2, &d, 0, 10, 1 << 18), "another subscription's run");
    assert!(parked.park(1, &d, 0, 10, 1 << 18));
    assert!(d.is_parked(0) && d.within_horizon());
    // Passed by: only the reference queue sees these.
    for offset in 2..=4 {
        let (_, _, d) = publish(offset, ROUTE, &mut pushed);
        assert!(d.within_horizon());
    }
    assert_eq!(parked.len(), pushed.len(), "an open run counts what was appended since");
    // A lower-priority update is brought to everyone: the run closes before it.
    let (traffic, index, d) = publish(5, TRAFFIC, &mut pushed);
    parked.push_delivered(1, &traffic, &d, index).unwrap();
    assert!(!d.is_parked(0));
    assert_eq!((parked.len(), parked.queued_bytes()), (pushed.len(), pushed.queued_bytes()));
    let (mut a, mut b) = (plain_batches(), plain_batches());
    let (mut wire_pushed, mut wire_parked) = (Vec::new(), Vec::new());
    pushed.poll_transmit(&mut wire_pushed, 100, Some(plain_encoding(&mut a)));
    parked.poll_transmit(&mut wire_parked, 100, Some(plain_encoding(&mut b)));
    assert_eq!(wire_parked, wire_pushed);
    let offsets: Vec<u64> = updates(&wire_parked).iter().map(|u| u.offset).collect();
    assert_eq!(offsets, [1, 2, 3, 4, 5]);
}

/// Any mix of two channels' updates (high and lower priority), replies, parking as a
/// paced connection's fan-out does it, and writes: the queue writes the same bytes as
/// one fed by single pushes.
#[test]
fn parking_in_any_mix_writes_what_single_pushes_write() {
    let mut seed = 0x2545_f491_4f6c_dd1d_u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for round in 0..200 {
        let mut channels = [Rc::new(FanoutLog::default()), Rc::new(FanoutLog::default())];
        let mut offsets = [0u64; 2];
        let mut pushed = Outbox::new(1 << 20, pressure(1 << 20));
        let mut parked = Outbox::new(1 << 20, pressure(1 << 20));
        let (mut batches_pushed, mut batches_parked) = (plain_batches(), plain_batches());
        let (mut wire_pushed, mut wire_parked) = (Vec::new(), Vec::new());
        for _ in 0..40 {
            let roll = next();
            match roll % 10 {
                0 => {
                    pushed.push(OutItem::Frame(vec![0x0a, 0])).unwrap();
                    parked.push(OutItem::Frame(vec![0x0a, 0])).unwrap();
                }
                1 => {
                    let batch_size = 1 + (roll >> 8) as usize % 4;
                    for (outbox, batches, wire) in [
                        (&mut pushed, &mut batches_pushed, &mut wire_pushed),
                        (&mut parked, &mut batches_parked, &mut wire_parked),
                    ] {
                        if let Some(parts) = outbox.poll_transmit_vectored(wire, batch_size, batches, None) {
                            parts.iter().for_each(|part| wire.extend_from_slice(part));
                        } else {
                            outbox.poll_transmit(wire, batch_size, Some(plain_encoding(batches)));
                        }
                    }
                    assert_eq!(wire_parked, wire_pushed, "round {round}");
                }
                _ => {
                    let channel = (roll >> 8) as usize % 2;
                    let update_type = if (roll >> 16) % 4 == 0 { TRAFFIC } else { ROUTE };
                    offsets[channel] += 1;
                    let publication = typed(offsets[channel], update_type, "");
                    let fanout = &mut channels[channel];
                    let index = FanoutLog::append(fanout, &publication);
                    let sub_id = channel as u32 + 1;
                    pushed.push(OutItem::Push { sub_id, publication: publication.clone() }).unwrap();
                    // The fan-out: a parked subscriber is passed by while it may be.
                    let passed = update_type == ROUTE && fanout.within_horizon() && fanout.is_parked(0);
                    if !passed {
                        fanout.reset_horizon();
                        parked.push_delivered(sub_id, &publication, fanout, index).unwrap();
                        if (roll >> 24) % 3 == 0 {
                            parked.unpark(sub_id);
                        } else {
                            parked.park(sub_id, fanout, 0, 6, 1 << 18);
                        }
                    }
                    assert_eq!(parked.len(), pushed.len(), "round {round}");
                }
            }
        }
        for (outbox, batches, wire) in
            [(&mut pushed, &mut batches_pushed, &mut wire_pushed), (&mut parked, &mut batches_parked, &mut wire_parked)]
        {
            outbox.poll_transmit(wire, 100, Some(plain_encoding(batches)));
        }
        assert_eq!(wire_parked, wire_pushed, "round {round}");
        assert!(parked.is_empty() && !channels.iter().any(|d| d.is_parked(0)), "round {round}");
    }
}

#[test]
fn a_parked_queue_sets_the_horizon_where_it_could_turn_urgent_and_unparks_on_other_items() {
    let mut fanout = Rc::new(FanoutLog::default());
    let mut outbox = Outbox::new(1 << 20, pressure(1 << 20));
    let first = publication(1);
    let index = FanoutLog::append(&mut fanout, &first);
    outbox.push_delivered(1, &first, &fanout, index).unwrap();
    assert!(outbox.park(1, &fanout, 3, 3, 1 << 18), "one queued, urgent at three");
    FanoutLog::append(&mut fanout, &publication(2));
    assert!(fanout.within_horizon(), "two queued");
    FanoutLog::append(&mut fanout, &publication(3));
    assert!(!fanout.within_horizon(), "three would be urgent: visit again");
    fanout.reset_horizon();
    assert_eq!(outbox.len(), 3);
    // A reply closes the run where it stands; the fan-out brings the rest again.
    outbox.push(OutItem::Frame(vec![0x0a, 0])).unwrap();
    assert!(!fanout.is_parked(3));
    FanoutLog::append(&mut fanout, &publication(4));
    assert_eq!(outbox.len(), 4, "nothing appended after the reply is held");
    // No room before urgency, or bytes near the quarter: it does not park.
    let mut full = Outbox::new(1 << 20, pressure(1 << 20));
    let next = publication(5);
    let index = FanoutLog::append(&mut fanout, &next);
    full.push_delivered(1, &next, &fanout, index).unwrap();
    assert!(!full.park(1, &fanout, 0, 1, 1 << 18));
    assert!(!full.park(1, &fanout, 0, 10, 100));
    assert!(!fanout.is_parked(0));
}

#[test]
fn a_fanout_log_starts_afresh_when_no_queue_refers_to_it() {
    let mut fanout = Rc::new(FanoutLog::default());
    assert_eq!(FanoutLog::append(&mut fanout, &publication(1)), 0);
    assert_eq!(FanoutLog::append(&mut fanout, &publication(2)), 0, "nobody refers to the first");
    let mut outbox = Outbox::new(1 << 20, pressure(1 << 20));
    outbox.push_delivered(1, &publication(2), &fanout, 0).unwrap();
    assert_eq!(FanoutLog::append(&mut fanout, &publication(3)), 1, "a queue refers to it");
    outbox.clear();
    assert_eq!(FanoutLog::append(&mut fanout, &publication(4)), 0);
    // Held, it grows to its capacity, then a fresh one starts.
    let held = fanout.clone();
    let indexes: Vec<u32> = (5..5 + FANOUT_LOG_CAPACITY as u64)
        .map(|offset| FanoutLog::append(&mut fanout, &publication(offset)))
        .collect();
    assert_eq!(indexes.last(), Some(&0));
    assert!(!Rc::ptr_eq(&held, &fanout) && held.publications.borrow().len() == FANOUT_LOG_CAPACITY);
}

#[test]
fn a_run_overflows_where_single_pushes_do() {
    let one = push_len(1, publication(1).body.len());
    let mut fanout = Rc::new(FanoutLog::default());
    let mut outbox = Outbox::new(one * 2, pressure(0));
    for offset in 1..=2 {
        let publication = publication(offset);
        let index = FanoutLog::append(&mut fanout, &publication);
        outbox.push_delivered(1, &publication, &fanout, index).unwrap();
    }
    let publication = publication(3);
    let index = FanoutLog::append(&mut fanout, &publication);
    assert_eq!(outbox.push_delivered(1, &publication, &fanout, index), Err(Overflow));
    assert_eq!(outbox.queued_bytes(), one * 2);
}

#[test]
fn a_lone_answer_is_a_message_of_one_frame_unless_it_is_to_be_compressed() {
    let answer = crate::protocol::push::publish_result(7, "9f1c2b7a44e0d311", 3);
    let mut outbox = Outbox::new(1 << 20, pressure(1 << 20));
    outbox.push(OutItem::Frame(answer.clone())).unwrap();
    let (mut batches, mut wire) = (plain_batches(), Vec::new());
    assert_eq!(outbox.poll_transmit(&mut wire, 100, Some(plain_encoding(&mut batches))), 1);
    assert!(outbox.is_empty() && outbox.queued_bytes() == 0);
    let written = messages(&wire);
    assert_eq!(written.len(), 1);
    assert_eq!(written[0].encode_to_vec(), answer, "the frame, as the only element of `frames`");
    // Above the threshold of a client that takes zstd it goes the batch writer's way.
    let settings = crate::compression::ZstdSettings { threshold: 16, level: 1, dictionaries: Vec::new() };
    let mut batches = SharedBatches::new(Arc::new(settings));
    let large = crate::protocol::push::publish_result(7, &"e".repeat(200), 3);
    outbox.push(OutItem::Frame(large.clone())).unwrap();
    let encoding = SharedEncoding { batches: &mut batches, zstd: true, held: 0, observed: None };
    let mut compressed = Vec::new();
    assert_eq!(outbox.poll_transmit(&mut compressed, 100, Some(encoding)), 1);
    let written = messages(&compressed);
    assert!(written[0].frames.is_empty() && !written[0].zstd.is_empty(), "{written:?}");
}

#[test]
fn frames_are_batched_up_to_batch_size() {
    let mut outbox = Outbox::new(1 << 20, pressure(1 << 20));
    for offset in 1..=250 {
        outbox.push(OutItem::Push { sub_id: 3, publication: publication(offset) }).unwrap();
    }
    let mut wire = Vec::new();
    assert_eq!(outbox.poll_transmit(&mut wire, 100, None), 250);
    assert!(outbox.is_empty());
    assert_eq!(outbox.queued_bytes(), 0);
    let batches = messages(&wire);
    assert_eq!(batches.iter().map(|m| m.frames.len()).collect::<Vec<_>>(), vec![100, 100, 50]);
    let offsets: Vec<u64> = batches
        .iter()
        .flat_map(|m| &m.frames)
        .map(|f| match &f.kind {
            Some(Kind::Update(u)) => {
                assert_eq!(u.sub_id, 3);
                u.offset
            }
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    assert_eq!(offsets, (1..=250).collect::<Vec<_>>());
}

#[test]
fn byte_limit_refuses_and_keeps_what_was_queued() {
    let one = push_len(1, publication(1).body.len());
    let mut outbox = Outbox::new(one * 2, pressure(0));
    outbox.push(OutItem::Push { sub_id: 1, publication: publication(1) }).unwrap();
    outbox.push(OutItem::Push { sub_id: 1, publication: publication(2) }).unwrap();
    assert_eq!(outbox.push(OutItem::Push { sub_id: 1, publication: publication(3) }), Err(Overflow));
    assert_eq!(outbox.queued_bytes(), one * 2);
}

/// Found by the `outbox` fuzz target (input `AFtMAgAAvRYAW0xN`): making room buried a
/// tiny update whose skip record did not fit, so its offset was never reported.
#[test]
fn a_tiny_update_given_up_near_the_limit_is_still_reported_as_skipped() {
    let mut outbox = Outbox::new(256, Pressure { priority_types: 1 << 1, conflate_above: 128 });
    let push = |outbox: &mut Outbox, sub_id: u32, offset: u64, key: &str, payload: usize| {
        let update =
            Update { offset, r#type: TRAFFIC, key: key.into(), payload: vec![0; payload].into(), ..Default::default() };
        let publication = Rc::new(crate::protocol::push::publication(
            Arc::from("c"),
            offset,
            TRAFFIC,
            encode_update_body(&update),
            Instant::now(),
        ));
        outbox.push(OutItem::Push { sub_id, publication })
    };
    push(&mut outbox, 4, 1, "", 76).unwrap();
    push(&mut outbox, 3, 1, "", 0).unwrap();
    push(&mut outbox, 1, 1, "k5", 189).unwrap();
    push(&mut outbox, 3, 2, "", 0).unwrap();
    push(&mut outbox, 4, 2, "", 76).unwrap();
    push(&mut outbox, 2, 1, "", 0).unwrap();
    assert!(outbox.queued_bytes() <= 256);
    let mut wire = Vec::new();
    outbox.poll_transmit(&mut wire, 100, None);
    let mut last = [0u64; 5];
    for u in updates(&wire) {
        let sub = u.sub_id as usize;
        assert_eq!(u.offset, last[sub] + 1 + u64::from(u.skipped), "{u:?}");
        last[sub] = u.offset;
    }
    assert_eq!(last[3], 2, "sub 3's second update arrived, reporting the first as skipped");
}

/// Found by the `outbox` fuzz target (input `AwhNNFsITTQAjSmNHy1bCE00`): the conflation index,
/// built late, took in a high-priority update queued in the low lane, which was then replaced.
#[test]
fn a_high_priority_update_in_the_low_lane_is_never_conflated() {
    let one = push_len(1, typed(1, TRAFFIC, "k").body.len());
    let mut outbox = Outbox::new(1 << 20, pressure(one * 2));
    outbox.push(OutItem::Push { sub_id: 1, publication: typed(1, TRAFFIC, "k") }).unwrap();
    outbox.push(OutItem::Push { sub_id: 1, publication: typed(2, ROUTE, "k") }).unwrap();
    outbox.push(OutItem::Push { sub_id: 1, publication: typed(3, TRAFFIC, "k") }).unwrap();
    assert_eq!(outbox.poll_shed_counts().conflated, 1);
    let mut wire = Vec::new();
    outbox.poll_transmit(&mut wire, 100, None);
    let got: Vec<(u64, i32, u32)> = updates(&wire).iter().map(|u| (u.offset, u.r#type, u.skipped)).collect();
    assert_eq!(got, vec![(2, ROUTE, 1), (3, TRAFFIC, 0)]);
}

/// An update of `update_type` under `key` with a payload of `payload` bytes.
fn sized(offset: u64, update_type: i32, key: &str, payload: usize) -> Rc<Publication> {
    let update =
        Update { offset, r#type: update_type, key: key.into(), payload: vec![7; payload].into(), ..Default::default() };
    Rc::new(crate::protocol::push::publication(
        Arc::from("c"),
        offset,
        update_type,
        encode_update_body(&update),
        Instant::now(),
    ))
}

/// Checks that every subscription's offsets add up with `skipped`; returns the last
/// offset received per subscription.
fn offsets_add_up(received: &[Update]) -> HashMap<u32, u64> {
    let mut last = HashMap::new();
    for u in received {
        let last = last.entry(u.sub_id).or_insert(0);
        assert_eq!(u.offset, *last + 1 + u64::from(u.skipped), "{u:?}");
        *last = u.offset;
    }
    last
}

/// Whether `kept` (ascending) are the newest of `all` (ascending): the oldest were dropped.
fn are_the_newest(kept: &[u64], all: impl DoubleEndedIterator<Item = u64>) -> bool {
    let newest: Vec<u64> = all.rev().take(kept.len()).collect::<Vec<_>>().into_iter().rev().collect();
    kept == newest
}

/// A reader that stalls on a channel where ROUTE is 1 % of the updates: the queue holds
/// far less ROUTE than its limit, so it never overflows; it keeps every ROUTE update and
/// fills the rest of its limit with the newest TRAFFIC, the oldest given up.
#[test]
fn a_stalled_reader_on_a_mixed_channel_keeps_every_route_and_the_newest_traffic() {
    const UPDATES: u64 = 60_000;
    let max = 1 << 20;
    let mut outbox = Outbox::new(max, pressure(1 << 18));
    for offset in 1..=UPDATES {
        let kind = if offset % 100 == 0 { ROUTE } else { TRAFFIC };
        let pushed = outbox.push(OutItem::Push { sub_id: 1, publication: sized(offset, kind, "", 1000) });
        assert_eq!(pushed, Ok(()), "offset {offset}: ROUTE alone is far under the limit");
        assert!(outbox.queued_bytes() <= max);
    }
    let mut wire = Vec::new();
    outbox.poll_transmit(&mut wire, 100, None);
    let received = updates(&wire);
    assert_every_route_and_the_newest_traffic(&received, UPDATES);
    // The limit holds updates, not the record of those given up.
    let one = push_len(1, sized(UPDATES, TRAFFIC, "", 1000).body.len());
    assert!(received.len() * one > max - one, "{} updates kept", received.len());
}

/// What a stalled reader of `updates` publications (every hundredth a ROUTE, the rest
/// TRAFFIC) gets once it reads: the newest, every ROUTE, and the newest TRAFFIC.
fn assert_every_route_and_the_newest_traffic(received: &[Update], updates: u64) {
    assert_eq!(offsets_add_up(received)[&1], updates, "the newest update is kept");
    assert_eq!(received.iter().filter(|u| u.r#type == ROUTE).count() as u64, updates / 100);
    let traffic: Vec<u64> = received.iter().filter(|u| u.r#type == TRAFFIC).map(|u| u.offset).collect();
    assert!(are_the_newest(&traffic, (1..=updates).filter(|o| o % 100 != 0)), "{:?}", &traffic[..10]);
}

/// The server's pings (and any control frame) queue after everything during a stall; the
/// updates before them must stay as droppable as before: the oldest TRAFFIC still gives
/// way, and a ROUTE update still finds room.
#[test]
fn a_control_frame_queued_during_a_stall_leaves_the_updates_before_it_droppable() {
    const UPDATES: u64 = 10_000;
    let max = 64 << 10;
    let mut outbox = Outbox::new(max, pressure(max));
    for offset in 1..=UPDATES {
        if offset % 1000 == 0 {
            outbox.push_unbounded(OutItem::Raw(vec![0x89, 0]));
        }
        let kind = if offset % 100 == 0 { ROUTE } else { TRAFFIC };
        let pushed = outbox.push(OutItem::Push { sub_id: 1, publication: sized(offset, kind, "", 200) });
        assert_eq!(pushed, Ok(()), "offset {offset}");
        assert!(outbox.queued_bytes() <= max + 20, "offset {offset}: {} bytes", outbox.queued_bytes());
    }
    let mut wire = Vec::new();
    outbox.poll_transmit(&mut wire, 100, None);
    let received = updates(&wire);
    assert_every_route_and_the_newest_traffic(&received, UPDATES);
}

/// A reader that never reads, on three subscriptions of lower-priority updates (keyed on
/// eight road segments, some keyless): the queue never overflows, keeps each
/// subscription's newest update, and its limit holds updates rather than the record of
/// what was given up (which stays small however long the stall).
#[test]
fn a_long_stall_on_lower_priority_updates_never_overflows_and_keeps_its_limit_for_updates() {
    let max = 64 << 10;
    let mut outbox = Outbox::new(max, pressure(16 << 10));
    let mut offsets = [0u64; 4];
    for n in 0..200_000u64 {
        let sub = 1 + (n % 3) as usize;
        offsets[sub] += 1;
        let key = if n % 5 == 0 { String::new() } else { format!("segment-{}", n % 8) };
        let publication = sized(offsets[sub], TRAFFIC, &key, 200);
        assert_eq!(outbox.push(OutItem::Push { sub_id: sub as u32, publication }), Ok(()), "update {n}");
        assert!(outbox.queued_bytes() <= max);
        let lane = outbox.low.as_deref().expect("a low lane");
        assert!(lane.marks() <= lane.len().max(64), "update {n}: {} marks for {} queued", lane.marks(), lane.len());
        assert!(lane.pending_subscriptions() <= 3);
    }
    let mut wire = Vec::new();
    outbox.poll_transmit(&mut wire, 100, None);
    let received = updates(&wire);
    let last = offsets_add_up(&received);
    for sub in 1..=3 {
        assert_eq!(last[&(sub as u32)], offsets[sub], "subscription {sub}'s newest update is kept");
    }
    let one = push_len(1, sized(offsets[1], TRAFFIC, "segment-1", 200).body.len());
    assert!(received.len() * one > max - 2 * one, "{} updates kept", received.len());
}

/// A client that subscribes and unsubscribes while it does not read: what each ended
/// subscription had queued behind lower-priority updates or given up goes with it.
#[test]
fn subscriptions_that_end_during_a_stall_leave_nothing_behind() {
    let max = 16 << 10;
    let mut outbox = Outbox::new(max, pressure(max));
    for sub_id in 1..=200 {
        for offset in 1..=200 {
            let kind = if offset % 10 == 0 { ROUTE } else { TRAFFIC };
            outbox.push(OutItem::Push { sub_id, publication: sized(offset, kind, "", 100) }).unwrap();
        }
        assert!(outbox.poll_shed_counts().dropped > 0, "subscription {sub_id} gave way");
        outbox.forget_subscription(sub_id);
        assert!(outbox.is_empty() && outbox.queued_bytes() == 0, "subscription {sub_id}");
        assert_eq!(outbox.low.as_deref().map_or(0, |lane| lane.pending_subscriptions()), 0);
    }
}

/// A pong queued during a stall waits after the updates queued (they keep giving way); the
/// answers after it follow it, so the peer sees answers in the order it asked.
#[test]
fn answers_after_a_control_frame_queued_behind_updates_keep_their_order() {
    let mut outbox = Outbox::new(1 << 20, pressure(1 << 20));
    outbox.push(OutItem::Push { sub_id: 1, publication: typed(1, TRAFFIC, "") }).unwrap();
    let pong = vec![0x8a, 0];
    outbox.push_unbounded(OutItem::Raw(pong.clone()));
    outbox.push(OutItem::Frame(vec![0x0a, 0])).unwrap();
    outbox.push(OutItem::Push { sub_id: 2, publication: typed(1, ROUTE, "") }).unwrap();
    let mut wire = Vec::new();
    assert_eq!(outbox.poll_transmit(&mut wire, 100, None), 3);
    let pong_at = wire.windows(2).position(|w| w == pong.as_slice()).expect("the pong");
    let mut after_pong = WsEndpoint::client(1 << 20);
    after_pong.feed(&wire[pong_at + 2..]);
    let Some(WsEvent::Binary(data)) = after_pong.next_event().unwrap() else { panic!("the reply after the pong") };
    assert_eq!(ServerMessage::decode(data).unwrap().frames.len(), 1, "only the reply follows the pong");
    let order: Vec<(u32, u64)> = updates(&wire[..pong_at]).iter().map(|u| (u.sub_id, u.offset)).collect();
    assert_eq!(order, [(2, 1), (1, 1)], "the ROUTE update first, then the TRAFFIC one, then the pong");
}

/// After a stall, a lane that drained but still has a count to report (its subscription has
/// sent nothing since) keeps only the count when idle memory is released; the count is still
/// reported by the subscription's next update.
#[test]
fn an_idle_lane_keeps_only_the_counts_it_has_to_report() {
    let one = push_len(1, typed(1, TRAFFIC, "").body.len());
    let mut outbox = Outbox::new(one * 2, pressure(1 << 20));
    outbox.push(OutItem::Push { sub_id: 1, publication: typed(1, ROUTE, "") }).unwrap();
    outbox.push(OutItem::Push { sub_id: 2, publication: typed(1, ROUTE, "") }).unwrap();
    outbox.push(OutItem::Push { sub_id: 3, publication: typed(1, TRAFFIC, "") }).unwrap();
    let mut wire = Vec::new();
    outbox.poll_transmit(&mut wire, 100, None);
    outbox.release_if_empty(usize::MAX);
    let lane = outbox.low.as_deref().expect("a count to report");
    assert_eq!((lane.capacity(), lane.pending_subscriptions()), (0, 1));
    outbox.push(OutItem::Push { sub_id: 3, publication: typed(2, TRAFFIC, "") }).unwrap();
    outbox.poll_transmit(&mut wire, 100, None);
    let got: Vec<(u32, u64, u32)> = updates(&wire).iter().map(|u| (u.sub_id, u.offset, u.skipped)).collect();
    assert_eq!(got, [(1, 1, 0), (2, 1, 0), (3, 2, 1)]);
    outbox.release_if_empty(usize::MAX);
    assert!(outbox.low.is_none(), "nothing left to report: the lane goes");
}
