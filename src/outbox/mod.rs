//! A connection's bounded outbound queue. Items wait here while a write is in flight and
//! leave together: runs of frames are packed into one WebSocket message (up to `batch_size`
//! frames each), so a busy connection pays one syscall and one WebSocket header per batch.
//!
//! Two lanes: replies, control frames and high-priority updates (ROUTE, WEATHER by default)
//! leave first; lower-priority updates follow. A high-priority update queues behind lower ones
//! of its own subscription, so each subscription's updates keep their order. Under pressure
//! the low lane gives way: past `conflate_above` bytes an update replaces a queued one with
//! the same subscription and key; when full, lower-priority updates are dropped, oldest first.
//! The next update sent on such a subscription says how many before it were skipped.
//! High-priority updates never give way: only when they (with replies and control frames)
//! alone exceed the limit does the queue overflow.
//!
//! `fanout_log`: a channel's publications a queue may refer to instead of holding them;
//! `low_lane`: what gives way and what was given up; `batches`: how it all leaves, in batches
//! shared between subscribers and compressed where that pays (`protocol` writes the bytes).

mod batches;
mod fanout_log;
mod low_lane;

use std::collections::VecDeque;
use std::rc::Rc;

use bytes::Bytes;

use crate::compression::SharedBatches;
use crate::core::Publication;
use crate::protocol::push::push_len;
use batches::{one_subscription, shared_parts, write_batches};
pub use batches::{SharedEncoding, WriteTally};
pub use fanout_log::FanoutLog;
use fanout_log::Run;
use low_lane::LowLane;

/// One thing to send.
#[derive(Debug)]
pub enum OutItem {
    /// An update, shared by every local subscriber of its publication.
    Push { sub_id: u32, publication: Rc<Publication> },
    /// An encoded element of `ServerMessage.frames` (reply, pong, disconnect).
    Frame(Vec<u8>),
    /// Complete WebSocket bytes (control frames written by the WebSocket layer).
    Raw(Vec<u8>),
}

impl OutItem {
    /// Bytes this item adds to a `ServerMessage` (or to the wire, for `Raw`).
    fn len(&self) -> usize {
        match self {
            OutItem::Push { sub_id, publication } => push_len(*sub_id, publication.body.len()),
            OutItem::Frame(bytes) | OutItem::Raw(bytes) => bytes.len(),
        }
    }
}

/// Most bytes a push adds to a queue beyond its body (`push_len` less the body).
const PUSH_OVERHEAD_MAX: usize = 24;

/// The queue would exceed its byte limit even after giving way: the connection is a slow
/// consumer.
#[derive(Debug, PartialEq, Eq)]
pub struct Overflow;

/// How the queue gives way under pressure.
#[derive(Debug, Clone, Copy)]
pub struct Pressure {
    /// Bit `t` set: update type `t` is high priority.
    pub priority_types: u32,
    pub conflate_above: usize,
}

impl Pressure {
    fn is_priority(&self, publication: &Publication) -> bool {
        publication.is_priority(self.priority_types)
    }
}

/// What a slow connection's queue shed under pressure instead of sending (see the module
/// doc), for the shard's counters: updates conflated into a newer one with the same key, and
/// updates dropped.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ShedCounts {
    pub conflated: u64,
    pub dropped: u64,
}

/// A connection's outbound queue (see the module doc). What comes in is pushed (`push`,
/// `push_delivered` from a fan-out, `push_unbounded`); what goes out is polled, as the
/// session's outputs are: the bytes to send (`poll_transmit`, or without a copy
/// `poll_transmit_vectored`) and what it shed under pressure (`poll_shed_counts`).
// Declaration order: the fields every push and transmit touch come first.
#[derive(Debug)]
#[repr(C)]
pub struct Outbox {
    /// Replies, control frames and high-priority updates.
    high: VecDeque<OutItem>,
    /// Lower-priority updates (and high-priority ones behind them on their subscription) and
    /// the state giving way needs; made when the first one comes, so connections that only
    /// get high-priority updates stay small and fast.
    low: Option<Box<LowLane>>,
    bytes: usize,
    max_bytes: usize,
    pressure: Pressure,
    shed: ShedCounts,
    /// Replies and control frames queued (not updates).
    frames: u32,
    /// High-priority updates of one subscription after everything in both lanes (see `Run`).
    run: Option<Run>,
}

impl Outbox {
    pub fn new(max_bytes: usize, pressure: Pressure) -> Self {
        Self {
            high: VecDeque::new(),
            low: None,
            bytes: 0,
            max_bytes,
            pressure,
            shed: ShedCounts::default(),
            frames: 0,
            run: None,
        }
    }

    /// Queues `publication`, index `index` of `fanout`, for `sub_id` like `push`; when it
    /// continues the queue's run of that subscription (or may start one), only as a count.
    pub fn push_delivered(
        &mut self,
        sub_id: u32,
        publication: &Rc<Publication>,
        fanout: &Rc<FanoutLog>,
        index: u32,
    ) -> Result<(), Overflow> {
        if let Some(run) = self.run.as_ref().filter(|run| run.open_slot.is_some()) {
            if run.sub_id == sub_id && Rc::ptr_eq(&run.fanout, fanout) && self.is_high_priority(publication) {
                // The open run already holds it.
                self.settle_run(index + 1);
                return Ok(());
            }
            // Whatever comes next must follow the run as it stands without it.
            let before = if Rc::ptr_eq(&run.fanout, fanout) { index } else { u32::MAX };
            self.close_run(before);
        }
        let len = push_len(sub_id, publication.body.len());
        // A high-priority update would go to the end of the high lane unless lower ones of its
        // subscription wait in the low lane; a run stands for exactly that end.
        let low_clear = self.low.as_deref().is_none_or(|lane| lane.is_clear_for(sub_id));
        if low_clear && self.is_high_priority(publication) && self.bytes + len <= self.max_bytes {
            match &mut self.run {
                Some(run)
                    if run.sub_id == sub_id && run.start + run.len == index && Rc::ptr_eq(&run.fanout, fanout) =>
                {
                    run.len += 1;
                    self.bytes += len;
                    return Ok(());
                }
                Some(_) => {}
                None => {
                    let run = Run { sub_id, fanout: fanout.clone(), start: index, len: 1, open_slot: None };
                    self.run = Some(run);
                    self.bytes += len;
                    return Ok(());
                }
            }
        }
        self.push(OutItem::Push { sub_id, publication: publication.clone() })
    }

    /// Counts into the open run the publications of its `fanout` before index `end`.
    fn settle_run(&mut self, end: u32) {
        let Self { run: Some(run), bytes, .. } = self else { return };
        if run.open_slot.is_none() {
            return;
        }
        let publications = run.fanout.publications.borrow();
        let settled = (run.start + run.len) as usize;
        let end = (end as usize).min(publications.len()).max(settled);
        *bytes += publications[settled..end].iter().map(|p| push_len(run.sub_id, p.body.len())).sum::<usize>();
        run.len = end as u32 - run.start;
    }

    /// Settles an open run up to index `end` of its `fanout` and closes it: the fan-out
    /// brings the rest again.
    fn close_run(&mut self, end: u32) {
        self.settle_run(end);
        if let Some(run) = &mut self.run {
            if let Some(slot) = run.open_slot.take() {
                run.fanout.unmark(slot as usize);
            }
        }
    }

    /// Closes an open run with all it holds so far.
    fn close_open_run(&mut self) {
        self.close_run(u32::MAX);
    }

    /// Parks the queue (see `FanoutLog`) when it ends with a run of `fanout` for `sub_id`
    /// holding its latest publication and nothing would make it urgent soon: fewer than
    /// `urgent_len` items and `urgent_bytes` bytes stay queued until the horizon it sets.
    /// `slot` is the subscriber's position in the channel's list.
    pub fn park(
        &mut self,
        sub_id: u32,
        fanout: &Rc<FanoutLog>,
        slot: usize,
        urgent_len: usize,
        urgent_bytes: usize,
    ) -> bool {
        let low_clear = self.low.as_deref().is_none_or(|lane| lane.is_clear_for(sub_id));
        let queued = self.len();
        let Some(run) = &mut self.run else { return false };
        let at_end = fanout.len();
        if !low_clear
            || run.sub_id != sub_id
            || !Rc::ptr_eq(&run.fanout, fanout)
            || (run.start + run.current_len()) as usize != at_end
        {
            return false;
        }
        let room = urgent_len.saturating_sub(queued);
        let room_bytes =
            urgent_bytes.saturating_sub(self.bytes).saturating_sub(urgent_len.saturating_mul(PUSH_OVERHEAD_MAX));
        if room == 0 || room_bytes == 0 {
            return false;
        }
        if let Some(old) = run.open_slot.replace(slot as u32) {
            if old as usize != slot {
                fanout.unmark(old as usize);
            }
        }
        fanout.mark(slot, (at_end + room, fanout.bytes.get() + room_bytes));
        true
    }

    /// The fan-out stopped passing subscription `sub_id` by (it ended here).
    pub fn unpark(&mut self, sub_id: u32) {
        if self.run.as_ref().is_some_and(|run| run.sub_id == sub_id) {
            self.close_open_run();
        }
    }

    /// Turns the run into items at the end of the high lane, where it stands.
    fn end_run(&mut self) {
        self.close_open_run();
        let Some(run) = self.run.take() else { return };
        let publications = run.fanout.publications.borrow();
        let stretch = &publications[run.start as usize..(run.start + run.len) as usize];
        self.high.extend(
            stretch.iter().map(|publication| OutItem::Push { sub_id: run.sub_id, publication: publication.clone() }),
        );
    }

    /// Queues `item`, giving way as described above; `Overflow` when even that is not enough.
    pub fn push(&mut self, item: OutItem) -> Result<(), Overflow> {
        self.end_run();
        let len = item.len();
        let (sub_id, publication) = match &item {
            OutItem::Push { sub_id, publication } => (*sub_id, publication),
            _ => {
                self.make_room(len)?;
                self.bytes += len;
                self.frames += 1;
                // Answers keep their order: behind a control frame waiting in the low lane.
                match self.low.as_deref_mut() {
                    Some(lane) if lane.has_frames() => lane.push_frame(item),
                    _ => self.high.push_back(item),
                }
                return Ok(());
            }
        };
        if self.is_high_priority(publication) {
            self.make_room(len)?;
            self.bytes += len;
            match self.low.as_deref_mut() {
                Some(lane) if lane.holds(sub_id) => lane.push_update(sub_id, item, 0, None),
                _ => self.high.push_back(item),
            }
            return Ok(());
        }
        let key_hash = publication.key_hash;
        let pressure = self.pressure;
        let lane = self.low.get_or_insert_with(Box::default);
        // The newest information matters most: older lower-priority updates give way first;
        // only one that would not fit even then gives way itself as it comes.
        if self.bytes - lane.droppable_bytes() + len > self.max_bytes {
            self.shed.dropped += 1;
            lane.give_up_arriving(sub_id);
            return Ok(());
        }
        if key_hash != 0 && self.bytes + len > pressure.conflate_above {
            if let Some(freed) = lane.conflate(sub_id, key_hash, &pressure) {
                self.bytes -= freed;
                self.shed.conflated += 1;
            }
        }
        self.make_room(len)?;
        self.bytes += len;
        let lane = self.low.get_or_insert_with(Box::default);
        lane.push_update(sub_id, item, key_hash, Some(len));
        lane.compact_if_due(&pressure);
        Ok(())
    }

    /// Queues `item` whatever the limit (the last words of a closing connection, control
    /// frames), after everything queued, in both lanes. What is queued stays where it is, so
    /// lower-priority updates before it still give way.
    pub fn push_unbounded(&mut self, item: OutItem) {
        self.end_run();
        self.bytes += item.len();
        self.frames += 1;
        match self.low.as_deref_mut() {
            Some(lane) if !lane.is_empty() => lane.push_frame(item),
            _ => self.high.push_back(item),
        }
    }

    /// When all that is queued is one subscription's updates (at least two, nothing else),
    /// takes them as shared batches of up to `batch_size` updates without copying: the first
    /// message's head (WebSocket header and the `sub_id` field, which protobuf allows before
    /// the frames) is appended to `head`, and the parts to write after it are returned: the
    /// first batch's shared frames, then each further message's head and shared frames.
    pub fn poll_transmit_vectored(
        &mut self,
        head: &mut Vec<u8>,
        batch_size: usize,
        batches: &mut SharedBatches,
        observed: WriteTally<'_>,
    ) -> Option<Vec<Bytes>> {
        // Updates in the high lane and the run never report skipped ones (see `LowLane`).
        if self.low.as_deref().is_some_and(|lane| !lane.is_empty()) {
            return None;
        }
        self.close_open_run();
        if self.high.is_empty() {
            let run = self.run.take_if(|run| run.len >= 2)?;
            let publications = run.fanout.publications.borrow();
            let stretch = &publications[run.start as usize..(run.start + run.len) as usize];
            let stretch = stretch.chunks(batch_size).map(|batch| batch.iter());
            self.bytes = 0;
            return Some(shared_parts(head, run.sub_id, stretch, batches, observed));
        }
        self.end_run();
        if self.high.len() < 2 {
            return None;
        }
        let sub_id = one_subscription(self.high.iter())?;
        let stretch = self.high.make_contiguous().chunks(batch_size).map(|batch| {
            batch.iter().filter_map(|item| match item {
                OutItem::Push { publication, .. } => Some(publication),
                _ => None,
            })
        });
        let parts = shared_parts(head, sub_id, stretch, batches, observed);
        self.high.clear();
        self.bytes = 0;
        self.frames = 0;
        Some(parts)
    }

    /// Items queued.
    pub fn len(&self) -> usize {
        let run = self.run.as_ref().map_or(0, |run| run.current_len() as usize);
        self.high.len() + self.low.as_ref().map_or(0, |lane| lane.len()) + run
    }

    /// Whether replies or control frames (not only updates) are queued.
    pub fn has_frames(&self) -> bool {
        self.frames != 0
    }

    pub fn is_empty(&self) -> bool {
        self.high.is_empty() && self.low.as_ref().is_none_or(|lane| lane.is_empty()) && self.run.is_none()
    }

    /// Bytes queued.
    pub fn queued_bytes(&self) -> usize {
        self.bytes
    }

    /// Updates conflated and dropped since the last call.
    pub fn poll_shed_counts(&mut self) -> ShedCounts {
        std::mem::take(&mut self.shed)
    }

    /// Takes `spare` as its high-priority queue when it has none (no slots, nothing queued)
    /// and `spare` is empty: a queue lent for the span of one read (see `give_back_queue`).
    pub fn borrow_queue(&mut self, spare: &mut VecDeque<OutItem>) {
        crate::core::borrow_queue(&mut self.high, spare);
    }

    /// Hands an empty high-priority queue of at most `up_to` slots to `spare` when `spare`
    /// has none, so the next connection's answer reuses it instead of allocating its own.
    pub fn give_back_queue(&mut self, spare: &mut VecDeque<OutItem>, up_to: usize) {
        crate::core::give_back_queue(&mut self.high, spare, up_to);
    }

    /// Frees the memory of each lane that holds nothing and has room for at most `up_to`
    /// items (of the low lane, all but the counts of updates given up yet to be reported).
    pub fn release_if_empty(&mut self, up_to: usize) {
        if self.high.is_empty() && self.high.capacity() <= up_to {
            self.high = VecDeque::new();
        }
        match self.low.as_deref_mut() {
            Some(lane) if lane.is_empty() && lane.capacity() <= up_to => match lane.is_idle() {
                true => self.low = None,
                false => lane.release_memory(),
            },
            _ => {}
        }
    }

    /// Drops everything queued.
    pub fn clear(&mut self) {
        self.frames = 0;
        self.close_open_run();
        self.run = None;
        self.high.clear();
        self.low = None;
        self.bytes = 0;
    }

    /// Forgets a subscription that ended: its updates waiting behind lower-priority ones and
    /// what it gave up.
    pub fn forget_subscription(&mut self, sub_id: u32) {
        let pressure = self.pressure;
        if let Some(lane) = self.low.as_deref_mut() {
            self.bytes -= lane.forget(sub_id, &pressure);
        }
    }

    /// Moves everything queued into `out` as wire bytes, packing up to `batch_size` frames per
    /// WebSocket message: the high lane first, then the low one. Returns the number of frames.
    /// With `encoding`, batches are shared between subscribers and large messages go out
    /// zstd-compressed to clients that accept it.
    pub fn poll_transmit(
        &mut self,
        out: &mut Vec<u8>,
        batch_size: usize,
        mut encoding: Option<SharedEncoding<'_>>,
    ) -> usize {
        self.end_run();
        self.frames = 0;
        self.bytes = 0;
        let mut frames = write_batches(out, self.high.iter().map(unskipped), batch_size, encoding.as_mut());
        self.high.clear();
        if let Some(lane) = self.low.as_deref_mut().filter(|lane| !lane.is_empty()) {
            frames += write_batches(out, lane.items(&self.pressure), batch_size, encoding.as_mut());
            lane.clear();
        }
        frames
    }

    fn is_high_priority(&self, publication: &Publication) -> bool {
        self.pressure.is_priority(publication)
    }

    /// Gives up lower-priority updates, oldest first, until `len` more bytes fit; `Overflow`
    /// (giving up nothing) when they would not fit even without any.
    #[inline]
    fn make_room(&mut self, len: usize) -> Result<(), Overflow> {
        if self.bytes + len <= self.max_bytes {
            return Ok(());
        }
        self.give_way(len)
    }

    #[cold]
    fn give_way(&mut self, len: usize) -> Result<(), Overflow> {
        let pressure = self.pressure;
        let Some(lane) = self.low.as_deref_mut() else { return Err(Overflow) };
        if self.bytes - lane.droppable_bytes() + len > self.max_bytes {
            return Err(Overflow);
        }
        while self.bytes + len > self.max_bytes {
            let Some(freed) = lane.give_up_oldest(&pressure) else { return Err(Overflow) };
            self.bytes -= freed;
            self.shed.dropped += 1;
        }
        lane.compact_if_due(&pressure);
        Ok(())
    }
}

/// A high-lane item: it reports no updates given up before it (see `LowLane`).
fn unskipped(item: &OutItem) -> (&OutItem, u32) {
    (item, 0)
}

#[cfg(test)]
mod tests;
