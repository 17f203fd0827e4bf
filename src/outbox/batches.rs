//! How queued items leave: batches of frames per WebSocket message, shared between
//! subscribers and compressed where that pays. The bytes of each piece are `protocol`'s.

use std::rc::Rc;
use std::time::Instant;

use bytes::Bytes;

use super::OutItem;
use crate::compression::SharedBatches;
use crate::core::Publication;
use crate::metrics::LocalMetrics;
use crate::protocol::push::{push_len_skipped, write_push_skipped};
use crate::protocol::server_message::{write_shared_batch, write_shared_head, write_zstd_envelope};
use crate::protocol::ws::write_binary_header;

/// The shard's shared batches, and what this connection takes of them.
pub struct SharedEncoding<'a> {
    pub batches: &'a mut SharedBatches,
    /// The connection accepts zstd envelopes.
    pub zstd: bool,
    /// Bit `i`: the connection holds the server's dictionary `i`.
    pub held: u32,
    /// Where to tally the write and when it happens.
    pub observed: WriteTally<'a>,
}

impl SharedEncoding<'_> {
    /// Whether a message of `len` plain bytes goes out compressed.
    fn compresses(&self, len: usize) -> bool {
        let threshold = self.batches.threshold();
        self.zstd && threshold != 0 && len >= threshold
    }
}

/// Where a write is tallied (the shard's metrics) and when it is made; `None`: not tallied.
pub type WriteTally<'a> = Option<(&'a LocalMetrics, Instant)>;

/// Writes `items`, each with the number of updates before it on its subscription that were
/// given up (reported as `skipped`), as WebSocket messages of up to `batch_size` frames (raw
/// items go out as they are, between batches).
/// With `encoding`, a message of two or more updates of one subscription (and nothing per copy)
/// is the shard's shared batch, encoded once for every subscriber, with the `sub_id` in the
/// envelope; over the threshold, for a client that accepts it, a zstd envelope (shared, or the
/// connection's own when the message holds more than one subscription's updates or reports
/// skipped ones).
#[inline]
pub(super) fn write_batches<'a, I>(
    out: &mut Vec<u8>,
    mut items: I,
    batch_size: usize,
    mut encoding: Option<&mut SharedEncoding<'_>>,
) -> usize
where
    I: Iterator<Item = (&'a OutItem, u32)> + Clone,
{
    let mut frames = 0;
    loop {
        match items.clone().next() {
            None => return frames,
            Some((OutItem::Raw(bytes), _)) => {
                out.extend_from_slice(bytes);
                items.next();
                continue;
            }
            Some(_) => {}
        }
        let run = items.clone().take_while(|(item, _)| !matches!(item, OutItem::Raw(_))).take(batch_size);
        let (count, len) =
            run.clone().fold((0, 0), |(count, len), (item, skipped)| (count + 1, len + wire_len(item, skipped)));
        frames += count;
        if let Some((metrics, now)) = encoding.as_deref().and_then(|encoding| encoding.observed) {
            metrics.record_deliveries(now, publications(run.clone()).map(|p| &**p));
            metrics.record_message(count);
        }
        if let Some(encoding) = encoding.as_deref_mut() {
            let compress = encoding.compresses(len);
            // One update alone is as cheap to write as to look up, unless it is to be compressed.
            let worth_sharing = (count >= 2 || compress) && run.clone().all(|(_, skipped)| skipped == 0);
            let shared_sub = if worth_sharing { one_subscription(run.clone().map(|(item, _)| item)) } else { None };
            let written = match (shared_sub, compress) {
                (Some(sub_id), true) => {
                    match encoding.batches.shared_compressed(publications(run.clone()), encoding.held) {
                        Some(compressed) => write_zstd_envelope(out, &compressed, sub_id),
                        None => {
                            write_shared_batch(out, &encoding.batches.shared_plain(publications(run.clone())), sub_id)
                        }
                    }
                    true
                }
                (Some(sub_id), false) => {
                    write_shared_batch(out, &encoding.batches.shared_plain(publications(run.clone())), sub_id);
                    true
                }
                (None, true) => write_own_compressed(out, run.clone(), count, len, encoding),
                (None, false) => false,
            };
            if written {
                items.nth(count - 1);
                continue;
            }
        }
        out.reserve(len + 10);
        write_binary_header(out, len);
        write_run(out, &mut items, count);
    }
}

/// Bytes `item` adds to a `ServerMessage` when it reports `skipped` updates before it.
fn wire_len(item: &OutItem, skipped: u32) -> usize {
    match item {
        OutItem::Push { sub_id, publication } if skipped != 0 => {
            push_len_skipped(*sub_id, skipped, publication.body.len())
        }
        other => other.len(),
    }
}

/// The publications of the updates among `items`.
fn publications<'a>(
    items: impl Iterator<Item = (&'a OutItem, u32)> + Clone,
) -> impl Iterator<Item = &'a Rc<Publication>> + Clone {
    items.filter_map(|(item, _)| match item {
        OutItem::Push { publication, .. } => Some(publication),
        _ => None,
    })
}

/// The subscription of a run that holds only updates of one subscription.
pub(super) fn one_subscription<'a>(mut run: impl Iterator<Item = &'a OutItem>) -> Option<u32> {
    let Some(OutItem::Push { sub_id: first, .. }) = run.next() else { return None };
    run.all(|item| matches!(item, OutItem::Push { sub_id, .. } if sub_id == first)).then_some(*first)
}

/// Appends the next `count` items as elements of `ServerMessage.frames`.
fn write_run<'a>(out: &mut Vec<u8>, items: &mut impl Iterator<Item = (&'a OutItem, u32)>, count: usize) {
    for _ in 0..count {
        match items.next() {
            Some((OutItem::Push { sub_id, publication }, skipped)) => {
                write_push_skipped(out, *sub_id, skipped, &publication.body)
            }
            Some((OutItem::Frame(bytes), _)) => out.extend_from_slice(bytes),
            Some((OutItem::Raw(_), _)) | None => unreachable!("runs stop before raw items"),
        }
    }
}

/// Shared batches (`stretch`, one iterator per message) of subscription `sub_id`, tallied as
/// written at `observed`: the first message's head goes to `head`, and the parts to write
/// after it are returned (the first batch's frames, then each further message's head and
/// frames).
pub(super) fn shared_parts<'p, B>(
    head: &mut Vec<u8>,
    sub_id: u32,
    stretch: impl Iterator<Item = B>,
    batches: &mut SharedBatches,
    observed: WriteTally<'_>,
) -> Vec<Bytes>
where
    B: Iterator<Item = &'p Rc<Publication>> + Clone,
{
    let mut parts = Vec::new();
    for batch in stretch {
        if let Some((metrics, now)) = observed {
            metrics.record_deliveries(now, batch.clone().map(|p| &**p));
            metrics.record_message(batch.clone().count());
        }
        let frames = batches.shared_plain(batch);
        if parts.is_empty() {
            write_shared_head(head, frames.len(), sub_id);
        } else {
            let mut next_head = Vec::with_capacity(16);
            write_shared_head(&mut next_head, frames.len(), sub_id);
            parts.push(Bytes::from(next_head));
        }
        parts.push(frames);
    }
    parts
}

/// Writes `run` (of `len` bytes plain, several subscriptions' or with skip reports) as the
/// connection's own zstd envelope; false when compressing would not make it smaller (nothing
/// written then).
fn write_own_compressed<'a>(
    out: &mut Vec<u8>,
    run: impl Iterator<Item = (&'a OutItem, u32)> + Clone,
    count: usize,
    len: usize,
    encoding: &mut SharedEncoding<'_>,
) -> bool {
    let mut plain = Vec::with_capacity(len);
    write_run(&mut plain, &mut run.clone(), count);
    let mut types = run.map(|(item, _)| match item {
        OutItem::Push { publication, .. } => publication.update_type,
        _ => -1,
    });
    let first = types.next();
    let update_type = first.filter(|&t| t >= 0 && types.all(|other| other == t));
    let Some(compressed) = encoding.batches.own(&plain, update_type, encoding.held) else { return false };
    write_zstd_envelope(out, &compressed, 0);
    true
}
