//! A slow connection's queue under any mix of updates, replies and drains: it never holds
//! more than its limit, never drops a high-priority update (it overflows instead), and every
//! subscription's offsets add up with `skipped` — also when batches are shared (between
//! drains, as between subscribers), go out zstd-compressed, and the queue is lent and given
//! back as a shard does around a read.
#![no_main]
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use libfuzzer_sys::fuzz_target;
use routopia_realtime::broker::Publication;
use routopia_realtime::compression::{SharedBatches, ZstdSettings};
use routopia_realtime::outbox::{OutItem, Outbox, Pressure, Sharing};
use routopia_realtime::protocol::envelope::{self, Dictionaries};
use routopia_realtime::protocol::pb::{server_frame::Kind, ServerMessage, Update};
use routopia_realtime::protocol::push::encode_update_body;
use routopia_realtime::protocol::ws::{WsEndpoint, WsEvent};

fuzz_target!(|data: &[u8]| {
    let Some((&limit, ops)) = data.split_first() else { return };
    let max = 256 + usize::from(limit) * 32;
    let mut outbox = Outbox::new(max, Pressure { priority_types: 1 << 1, conflate_above: max / 2 });
    let mut offsets = [0u64; 4];
    let mut routes: Vec<(u32, u64)> = Vec::new();
    let mut wire = Vec::new();
    let mut overflowed = false;
    let settings = Arc::new(ZstdSettings { threshold: 64, level: 1, dictionaries: Vec::new() });
    let mut batches = (limit & 1 == 1).then(|| SharedBatches::new(settings));
    let zstd = limit & 2 != 0;
    let metrics = routopia_realtime::metrics::LocalMetrics::default();
    let mut spare = std::collections::VecDeque::with_capacity(4);
    for op in ops.chunks(2) {
        let (a, b) = (op[0], op.get(1).copied().unwrap_or(0));
        let sub = usize::from(a & 3);
        if a & 0xC0 == 0x80 && b & 0xC0 == 0xC0 {
            if b & 1 == 0 {
                outbox.borrow_queue(&mut spare);
            } else {
                outbox.give_back_queue(&mut spare, usize::from(b >> 1 & 15));
            }
            assert!(spare.is_empty(), "the lender only ever holds an empty queue");
            continue;
        }
        if a & 0xC0 == 0xC0 {
            let batch_size = 1 + usize::from(b % 8);
            if let (true, Some(batches)) = (b & 0x40 != 0, batches.as_mut()) {
                let mut head = Vec::new();
                if let Some(parts) =
                    outbox.take_shared(&mut head, batch_size, batches, Some((&metrics, Instant::now())))
                {
                    wire.extend_from_slice(&head);
                    parts.iter().for_each(|part| wire.extend_from_slice(part));
                    continue;
                }
            }
            let sharing = batches.as_mut().map(|batches| Sharing {
                batches,
                zstd,
                held: 0,
                observed: Some((&metrics, Instant::now())),
            });
            outbox.drain_into(&mut wire, batch_size, sharing);
            if let (true, Some(batches)) = (b & 0x80 != 0, batches.as_mut()) {
                batches.forget_shared();
            }
            continue;
        }
        offsets[sub] += 1;
        let update_type = if a & 0x20 != 0 { 1 } else { 3 };
        if update_type == 1 {
            routes.push((sub as u32 + 1, offsets[sub]));
        }
        let key = if b & 1 != 0 { format!("k{}", b >> 5) } else { String::new() };
        let update = Update {
            offset: offsets[sub],
            r#type: update_type,
            key,
            payload: vec![0; usize::from(b)].into(),
            ..Default::default()
        };
        let body = encode_update_body(&update);
        let publication = Rc::new(Publication::new(Arc::from("c"), offsets[sub], update_type, body, Instant::now()));
        if outbox.push(OutItem::Push { sub_id: sub as u32 + 1, publication }).is_err() {
            overflowed = true;
            break;
        }
        assert!(outbox.queued_bytes() <= max);
    }
    if overflowed {
        return;
    }
    let sharing =
        batches.as_mut().map(|batches| Sharing { batches, zstd, held: 0, observed: Some((&metrics, Instant::now())) });
    outbox.drain_into(&mut wire, 100, sharing);
    let mut client = WsEndpoint::client(1 << 24);
    client.feed(&wire);
    let mut last = [0u64; 5];
    let mut routes_received = Vec::new();
    while let Ok(Some(WsEvent::Binary(message))) = client.next_event() {
        for frame in envelope::decode::<ServerMessage>(message, 1 << 24, &Dictionaries::default()).unwrap() {
            if let Some(Kind::Update(u)) = frame.kind {
                let sub = u.sub_id as usize;
                assert_eq!(u.offset, last[sub] + 1 + u64::from(u.skipped), "{u:?}");
                last[sub] = u.offset;
                if u.r#type == 1 {
                    routes_received.push((u.sub_id, u.offset));
                }
            }
        }
    }
    routes.sort_unstable();
    routes_received.sort_unstable();
    assert_eq!(routes, routes_received, "every high-priority update arrives");
});
