//! A slow connection's queue under any mix of updates (pushed alone or as fan-out runs),
//! replies, control frames, ended subscriptions and drains: it never holds more than its
//! limit (beyond the control frames queued whatever the limit), never gives a lower-priority
//! update a reason to overflow, overflows only when high-priority updates, replies and
//! control frames alone exceed the limit, never drops a high-priority update, and every
//! subscription's offsets add up with `skipped` — also when batches are shared (between
//! drains, as between subscribers), go out zstd-compressed, and the queue is lent and given
//! back as a shard does around a read.
#![no_main]
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use libfuzzer_sys::fuzz_target;
use routopia_realtime::compression::{SharedBatches, ZstdSettings};
use routopia_realtime::outbox::{FanoutLog, OutItem, Outbox, Overflow, Pressure, SharedEncoding};
use routopia_realtime::protocol::envelope::{self, Dictionaries};
use routopia_realtime::protocol::pb::{server_frame::Kind, ServerMessage, Update};
use routopia_realtime::protocol::push::{encode_update_body, push_len};
use routopia_realtime::protocol::ws::{WsEndpoint, WsEvent};

/// An empty `ServerFrame` as an element of `ServerMessage.frames`: a reply.
const REPLY: [u8; 2] = [0x0a, 0];
/// A WebSocket ping from the server.
const PING: [u8; 2] = [0x89, 0];

fuzz_target!(|data: &[u8]| {
    let Some((&limit, ops)) = data.split_first() else { return };
    let max = 256 + usize::from(limit) * 32;
    let mut outbox = Outbox::new(max, Pressure { priority_types: 1 << 1, conflate_above: max / 2 });
    // Per slot: its current subscription (a slot's subscription ends and a new one takes it),
    // the channel's offsets, and what the shard delivered on it.
    let mut sub_ids = [1u32, 2, 3, 4];
    let mut offsets = [0u64; 4];
    let mut delivered: [Rc<FanoutLog>; 4] = Default::default();
    // High-priority updates queued, and those of subscriptions that ended (which may or may
    // not arrive).
    let mut routes: Vec<(u32, u64)> = Vec::new();
    let mut ended: Vec<u32> = Vec::new();
    // Bytes that never give way (high-priority updates, replies, control frames) queued
    // since the last drain, and control frames queued whatever the limit.
    let (mut unavoidable, mut unbounded) = (0usize, 0usize);
    let mut wire = Vec::new();
    let mut overflowed = false;
    let settings = Arc::new(ZstdSettings { threshold: 64, level: 1, dictionaries: Vec::new() });
    let mut batches = (limit & 1 == 1).then(|| SharedBatches::new(settings));
    let zstd = limit & 2 != 0;
    let metrics = routopia_realtime::metrics::LocalMetrics::default();
    let mut spare = std::collections::VecDeque::with_capacity(4);
    for op in ops.chunks(2) {
        let (a, b) = (op[0], op.get(1).copied().unwrap_or(0));
        let slot = usize::from(a & 3);
        if a & 0xC0 == 0x80 && b & 0xC0 == 0xC0 {
            if b & 1 == 0 {
                outbox.borrow_queue(&mut spare);
            } else {
                outbox.give_back_queue(&mut spare, usize::from(b >> 1 & 15));
            }
            assert!(spare.is_empty(), "the lender only ever holds an empty queue");
            continue;
        }
        if a & 0xC0 == 0x80 && b & 0xC0 == 0x80 {
            match b & 3 {
                0 | 3 => {
                    let queued = outbox.push(OutItem::Frame(REPLY.to_vec()));
                    if check_overflow(queued, unavoidable + REPLY.len(), max) {
                        overflowed = true;
                        break;
                    }
                    unavoidable += REPLY.len();
                }
                1 => {
                    outbox.push_unbounded(OutItem::Raw(PING.to_vec()));
                    unavoidable += PING.len();
                    unbounded += PING.len();
                }
                _ => {
                    outbox.forget_subscription(sub_ids[slot]);
                    ended.push(sub_ids[slot]);
                    sub_ids[slot] += 4;
                    offsets[slot] = 0;
                    delivered[slot] = Rc::default();
                }
            }
            assert!(outbox.queued_bytes() <= max + unbounded);
            continue;
        }
        if a & 0xC0 == 0xC0 {
            let batch_size = 1 + usize::from(b % 8);
            let mut taken = false;
            if let (true, Some(batches)) = (b & 0x40 != 0, batches.as_mut()) {
                let mut head = Vec::new();
                if let Some(parts) =
                    outbox.poll_transmit_vectored(&mut head, batch_size, batches, Some((&metrics, Instant::now())))
                {
                    wire.extend_from_slice(&head);
                    parts.iter().for_each(|part| wire.extend_from_slice(part));
                    taken = true;
                }
            }
            if !taken {
                let sharing = batches.as_mut().map(|batches| SharedEncoding {
                    batches,
                    zstd,
                    held: 0,
                    observed: Some((&metrics, Instant::now())),
                });
                outbox.poll_transmit(&mut wire, batch_size, sharing);
                if let (true, Some(batches)) = (b & 0x80 != 0, batches.as_mut()) {
                    batches.forget_shared();
                }
            }
            assert!(outbox.is_empty() && outbox.queued_bytes() == 0, "a drain takes everything");
            (unavoidable, unbounded) = (0, 0);
            continue;
        }
        offsets[slot] += 1;
        let sub_id = sub_ids[slot];
        let update_type = if a & 0x20 != 0 { 1 } else { 3 };
        let key = if b & 1 != 0 { format!("k{}", b >> 5) } else { String::new() };
        let update = Update {
            offset: offsets[slot],
            r#type: update_type,
            key,
            payload: vec![0; usize::from(b)].into(),
            ..Default::default()
        };
        let body = encode_update_body(&update);
        let len = push_len(sub_id, body.len());
        let publication = Rc::new(routopia_realtime::protocol::push::publication(
            Arc::from("c"),
            offsets[slot],
            update_type,
            body,
            Instant::now(),
        ));
        let queued = if a & 0x10 != 0 {
            let index = FanoutLog::append(&mut delivered[slot], &publication);
            outbox.push_delivered(sub_id, &publication, &delivered[slot], index)
        } else {
            outbox.push(OutItem::Push { sub_id, publication })
        };
        if update_type == 1 {
            if check_overflow(queued, unavoidable + len, max) {
                overflowed = true;
                break;
            }
            unavoidable += len;
            routes.push((sub_id, offsets[slot]));
        } else {
            assert_eq!(queued, Ok(()), "a lower-priority update never makes the queue overflow");
        }
        assert!(outbox.queued_bytes() <= max + unbounded);
    }
    if overflowed {
        return;
    }
    let sharing = batches.as_mut().map(|batches| SharedEncoding {
        batches,
        zstd,
        held: 0,
        observed: Some((&metrics, Instant::now())),
    });
    outbox.poll_transmit(&mut wire, 100, sharing);
    let mut client = WsEndpoint::client(1 << 24);
    client.feed(&wire);
    let mut last: HashMap<u32, u64> = HashMap::new();
    let mut routes_received = Vec::new();
    while let Ok(Some(WsEvent::Binary(message))) = client.next_event() {
        for frame in envelope::decode::<ServerMessage>(message, 1 << 24, &Dictionaries::default()).unwrap() {
            if let Some(Kind::Update(u)) = frame.kind {
                let last = last.entry(u.sub_id).or_insert(0);
                assert_eq!(u.offset, *last + 1 + u64::from(u.skipped), "{u:?}");
                *last = u.offset;
                if u.r#type == 1 {
                    routes_received.push((u.sub_id, u.offset));
                }
            }
        }
    }
    // Every high-priority update of a live subscription arrives; of an ended one, only
    // what was queued.
    routes_received.retain(|route| {
        assert!(routes.contains(route), "{route:?} was never queued");
        !ended.contains(&route.0)
    });
    routes.retain(|route| !ended.contains(&route.0));
    routes.sort_unstable();
    routes_received.sort_unstable();
    assert_eq!(routes, routes_received, "every high-priority update arrives");
});

/// Checks an item that never gives way, with `unavoidable` bytes of such items queued with
/// it: it overflows only when those alone exceed `max`. Returns whether it overflowed.
fn check_overflow(queued: Result<(), Overflow>, unavoidable: usize, max: usize) -> bool {
    match queued {
        Ok(()) => false,
        Err(Overflow) => {
            assert!(unavoidable > max, "overflowed with {unavoidable} bytes that never give way, limit {max}");
            true
        }
    }
}
