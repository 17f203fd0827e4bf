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

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::rc::Rc;
use std::time::Instant;

use bytes::Bytes;
use prost::encoding::encoded_len_varint;

use crate::broker::Publication;
use crate::compression::SharedBatches;
use crate::metrics::LocalMetrics;
use crate::protocol::push::{append_varint, push_len, push_len_skipped, write_push_skipped};
use crate::protocol::ws::write_binary_header;

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

/// One channel's publications in the order a shard delivers them. A subscriber whose queue
/// ends with a stretch of them for one subscription refers to the stretch (`Run`) instead of
/// holding an item per delivery: a fan-out then writes nothing new per subscriber but a count.
/// A subscriber waiting for its next pacing tick with such a stretch is *parked*: its run is
/// left open to the end of the publications, and the fan-out passes it by without touching
/// its connection, until the horizon where its queue could need its writer woken.
#[derive(Debug)]
pub struct Delivered {
    publications: RefCell<Vec<Rc<Publication>>>,
    /// Their bodies' bytes.
    bytes: Cell<usize>,
    /// By position in the channel's list of local subscribers: parked.
    parked: RefCell<Vec<Cell<bool>>>,
    /// Publications and body bytes at which the fan-out visits parked subscribers again.
    horizon: Cell<(usize, usize)>,
}

impl Default for Delivered {
    fn default() -> Self {
        Self {
            publications: RefCell::default(),
            bytes: Cell::new(0),
            parked: RefCell::default(),
            horizon: Cell::new(NO_HORIZON),
        }
    }
}

const NO_HORIZON: (usize, usize) = (usize::MAX, usize::MAX);

/// Most bytes a push adds to a queue beyond its body (`push_len` less the body).
const PUSH_OVERHEAD_MAX: usize = 24;

/// What a `Delivered` holds before a fresh one is started. Queues referring to the old one
/// turn their run into items at their next update of the channel, so a channel keeps about
/// this much alive beyond what its subscribers' queues hold.
const DELIVERED_CAPACITY: usize = 1024;
const DELIVERED_BYTES: usize = 1 << 20;

impl Delivered {
    /// Appends `publication` to the shard's current `delivered` for its channel, starting a
    /// fresh one when no queue refers to it any more or it is full; returns its index.
    pub fn append(delivered: &mut Rc<Delivered>, publication: &Rc<Publication>) -> u32 {
        if Rc::strong_count(delivered) == 1 {
            delivered.publications.borrow_mut().clear();
            delivered.bytes.set(0);
            delivered.parked.borrow_mut().clear();
            delivered.horizon.set(NO_HORIZON);
        } else if delivered.publications.borrow().len() >= DELIVERED_CAPACITY
            || delivered.bytes.get() >= DELIVERED_BYTES
        {
            *delivered = Rc::default();
        }
        delivered.bytes.set(delivered.bytes.get() + publication.body.len());
        let mut publications = delivered.publications.borrow_mut();
        publications.push(publication.clone());
        (publications.len() - 1) as u32
    }

    fn len(&self) -> usize {
        self.publications.borrow().len()
    }

    /// Whether the fan-out may pass parked subscribers by: the last publication appended kept
    /// every parked queue short of urgent. When not, the caller visits them all and calls
    /// `reset_horizon` first (those that park again set it anew).
    pub fn within_horizon(&self) -> bool {
        let (publications, bytes) = self.horizon.get();
        self.len() < publications && self.bytes.get() < bytes
    }

    pub fn reset_horizon(&self) {
        self.horizon.set(NO_HORIZON);
    }

    /// Makes room for a mark per subscriber (`subscribers` of them).
    pub fn track(&self, subscribers: usize) {
        let mut parked = self.parked.borrow_mut();
        if parked.len() < subscribers {
            parked.resize_with(subscribers, Cell::default);
        }
    }

    /// Whether the subscriber at `slot` is parked (see `track`).
    pub fn is_parked(&self, slot: usize) -> bool {
        self.parked.borrow().get(slot).is_some_and(Cell::get)
    }

    /// Forgets the mark at `slot`. Always safe: an unmarked subscriber is visited, and a
    /// visit settles its open run and parks it again if it may.
    pub fn unmark(&self, slot: usize) {
        if let Some(mark) = self.parked.borrow().get(slot) {
            mark.set(false);
        }
    }

    fn mark(&self, slot: usize, horizon: (usize, usize)) {
        self.track(slot + 1);
        self.parked.borrow()[slot].set(true);
        let (publications, bytes) = self.horizon.get();
        self.horizon.set((publications.min(horizon.0), bytes.min(horizon.1)));
    }
}

/// Updates of one subscription queued after everything else: `len` publications of
/// `delivered` from `start`.
#[derive(Debug)]
struct Run {
    sub_id: u32,
    delivered: Rc<Delivered>,
    start: u32,
    len: u32,
    /// Parked (see `Delivered`): the run also holds every publication appended to
    /// `delivered` since, counted in `len` when it is settled; `slot` is the subscriber's
    /// position in the channel's list, whose mark it clears when it closes.
    open_slot: Option<u32>,
}

impl Run {
    /// Publications the run holds, counting those an open run has not settled yet.
    fn current_len(&self) -> u32 {
        match self.open_slot {
            Some(_) => self.delivered.len() as u32 - self.start,
            None => self.len,
        }
    }
}

/// What a slot of the low lane the queue keeps accounts for, besides its item: a conflated
/// or dropped slot stays as a tombstone until drained, and each skipped offset is remembered
/// until reported. Both count against the byte limit, so memory stays bounded.
const TOMBSTONE_BYTES: usize = 8;
const SKIPPED_BYTES: usize = 16;

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

/// Updates that did not go out as themselves, for the shard's counters.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct GaveWay {
    pub conflated: u64,
    pub dropped: u64,
}

// Declaration order: the fields every push and drain touch come first.
#[derive(Debug)]
#[repr(C)]
pub struct Outbox {
    /// Replies, control frames and high-priority updates.
    high: VecDeque<OutItem>,
    /// Lower-priority updates and the state giving way needs; made when the first one comes,
    /// so connections that only get high-priority updates stay small and fast.
    low: Option<Box<LowLane>>,
    bytes: usize,
    max_bytes: usize,
    pressure: Pressure,
    gave_way: GaveWay,
    /// Replies and control frames queued (not updates).
    frames: u32,
    /// High-priority updates of one subscription after everything in both lanes (see `Run`).
    run: Option<Run>,
}

#[derive(Debug, Default)]
struct LowLane {
    /// `None`: a tombstone of a conflated or dropped update.
    items: VecDeque<Option<OutItem>>,
    /// Sequence number of `items.front()`, so positions survive pops.
    head: u64,
    /// Live items per subscription (a high-priority update behind them queues here).
    per_sub: HashMap<u32, u32>,
    /// Position of the queued update per (subscription, key hash).
    /// Kept only under pressure (`keyed`): built from `items` the first time conflation is
    /// needed, so pushes below the threshold pay no key bookkeeping.
    by_key: HashMap<(u32, u64), u64>,
    keyed: bool,
    /// Offsets not sent, as inclusive ranges per subscription, until the next update sent on
    /// it reports them. (No queued offset ever lies inside a range: every offset in it was
    /// skipped.)
    skipped: HashMap<u32, Vec<(u64, u64)>>,
}

impl Outbox {
    pub fn new(max_bytes: usize, pressure: Pressure) -> Self {
        Self {
            high: VecDeque::new(),
            low: None,
            bytes: 0,
            max_bytes,
            pressure,
            gave_way: GaveWay::default(),
            frames: 0,
            run: None,
        }
    }

    /// Queues `publication`, index `index` of `delivered`, for `sub_id` like `push`; when it
    /// continues the queue's run of that subscription (or may start one), only as a count.
    pub fn push_delivered(
        &mut self,
        sub_id: u32,
        publication: &Rc<Publication>,
        delivered: &Rc<Delivered>,
        index: u32,
    ) -> Result<(), Overflow> {
        if let Some(run) = self.run.as_ref().filter(|run| run.open_slot.is_some()) {
            if run.sub_id == sub_id && Rc::ptr_eq(&run.delivered, delivered) && self.is_high_priority(publication) {
                // The open run already holds it.
                self.settle_run(index + 1);
                return Ok(());
            }
            // Whatever comes next must follow the run as it stands without it.
            let before = if Rc::ptr_eq(&run.delivered, delivered) { index } else { u32::MAX };
            self.close_run(before);
        }
        let len = push_len(sub_id, publication.body.len());
        // A high-priority update would go to the end of the high lane unless lower ones of its
        // subscription wait in the low lane; a run stands for exactly that end.
        let low_empty = self.low.as_deref().is_none_or(|lane| lane.items.is_empty());
        if low_empty && self.is_high_priority(publication) && self.bytes + len <= self.max_bytes {
            match &mut self.run {
                Some(run)
                    if run.sub_id == sub_id
                        && run.start + run.len == index
                        && Rc::ptr_eq(&run.delivered, delivered) =>
                {
                    run.len += 1;
                    self.bytes += len;
                    return Ok(());
                }
                Some(_) => {}
                None => {
                    let run = Run { sub_id, delivered: delivered.clone(), start: index, len: 1, open_slot: None };
                    self.run = Some(run);
                    self.bytes += len;
                    return Ok(());
                }
            }
        }
        self.push(OutItem::Push { sub_id, publication: publication.clone() })
    }

    /// Counts into the open run the publications of its `delivered` before index `end`.
    fn settle_run(&mut self, end: u32) {
        let Self { run: Some(run), bytes, .. } = self else { return };
        if run.open_slot.is_none() {
            return;
        }
        let publications = run.delivered.publications.borrow();
        let settled = (run.start + run.len) as usize;
        let end = (end as usize).min(publications.len()).max(settled);
        *bytes += publications[settled..end].iter().map(|p| push_len(run.sub_id, p.body.len())).sum::<usize>();
        run.len = end as u32 - run.start;
    }

    /// Settles an open run up to index `end` of its `delivered` and closes it: the fan-out
    /// brings the rest again.
    fn close_run(&mut self, end: u32) {
        self.settle_run(end);
        if let Some(run) = &mut self.run {
            if let Some(slot) = run.open_slot.take() {
                run.delivered.unmark(slot as usize);
            }
        }
    }

    /// Closes an open run with all it holds so far.
    fn close_open_run(&mut self) {
        self.close_run(u32::MAX);
    }

    /// Parks the queue (see `Delivered`) when it ends with a run of `delivered` for `sub_id`
    /// holding its latest publication and nothing would make it urgent soon: fewer than
    /// `urgent_len` items and `urgent_bytes` bytes stay queued until the horizon it sets.
    /// `slot` is the subscriber's position in the channel's list.
    pub fn park(
        &mut self,
        sub_id: u32,
        delivered: &Rc<Delivered>,
        slot: usize,
        urgent_len: usize,
        urgent_bytes: usize,
    ) -> bool {
        let low_empty = self.low.as_deref().is_none_or(|lane| lane.items.is_empty() && lane.skipped.is_empty());
        let queued = self.len();
        let Some(run) = &mut self.run else { return false };
        let at_end = delivered.len();
        if !low_empty
            || run.sub_id != sub_id
            || !Rc::ptr_eq(&run.delivered, delivered)
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
                delivered.unmark(old as usize);
            }
        }
        delivered.mark(slot, (at_end + room, delivered.bytes.get() + room_bytes));
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
        let publications = run.delivered.publications.borrow();
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
                self.high.push_back(item);
                return Ok(());
            }
        };
        if self.is_high_priority(publication) {
            self.make_room(len)?;
            self.bytes += len;
            match self.low.as_deref_mut() {
                Some(lane) if !lane.items.is_empty() && lane.per_sub.contains_key(&sub_id) => {
                    lane.push(sub_id, 0, item)
                }
                _ => self.high.push_back(item),
            }
            return Ok(());
        }
        let (offset, key_hash) = (publication.offset, publication.key_hash);
        let lane = self.low.get_or_insert_with(Box::default);
        if key_hash != 0 && self.bytes + len > self.pressure.conflate_above {
            lane.index_keys(&self.pressure);
            if let Some((freed, added)) = lane.by_key.get(&(sub_id, key_hash)).copied().and_then(|p| lane.bury(p)) {
                self.bytes = self.bytes - freed + added;
                self.gave_way.conflated += 1;
            }
        }
        // The newest information matters most: older lower-priority updates give way first;
        // only when none is left does this one.
        if self.make_room(len).is_err() {
            self.gave_way.dropped += 1;
            let lane = self.low.get_or_insert_with(Box::default);
            self.bytes += lane.skip(sub_id, offset);
            return if self.bytes > self.max_bytes { Err(Overflow) } else { Ok(()) };
        }
        self.bytes += len;
        self.low.get_or_insert_with(Box::default).push(sub_id, key_hash, item);
        Ok(())
    }

    /// Queues `item` whatever the limit (the last words of a closing connection), after
    /// everything queued, in both lanes.
    pub fn push_unbounded(&mut self, item: OutItem) {
        self.end_run();
        self.bytes += item.len();
        self.frames += 1;
        if let Some(lane) = self.low.as_deref_mut() {
            self.high.extend(lane.items.drain(..).flatten());
            lane.per_sub.clear();
            lane.unindex_keys();
        }
        self.high.push_back(item);
    }

    /// When all that is queued is one subscription's updates (at least two, nothing else),
    /// takes them as shared batches of up to `batch_size` updates without copying: the first
    /// message's head (WebSocket header and the `sub_id` field, which protobuf allows before
    /// the frames) is appended to `head`, and the parts to write after it are returned: the
    /// first batch's shared frames, then each further message's head and shared frames.
    pub fn take_shared(
        &mut self,
        head: &mut Vec<u8>,
        batch_size: usize,
        batches: &mut SharedBatches,
        observed: Observed<'_>,
    ) -> Option<Vec<Bytes>> {
        let low_empty = self.low.as_deref().is_none_or(|lane| lane.items.is_empty() && lane.skipped.is_empty());
        if !low_empty {
            return None;
        }
        self.close_open_run();
        if self.high.is_empty() {
            let run = self.run.take_if(|run| run.len >= 2)?;
            let publications = run.delivered.publications.borrow();
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

    /// Items queued (tombstones included).
    pub fn len(&self) -> usize {
        let run = self.run.as_ref().map_or(0, |run| run.current_len() as usize);
        self.high.len() + self.low.as_ref().map_or(0, |lane| lane.items.len()) + run
    }

    /// Whether replies or control frames (not only updates) are queued.
    pub fn has_frames(&self) -> bool {
        self.frames != 0
    }

    pub fn is_empty(&self) -> bool {
        self.high.is_empty() && self.low.as_ref().is_none_or(|lane| lane.items.is_empty()) && self.run.is_none()
    }

    /// Bytes queued (and accounted for tombstones and skipped offsets).
    pub fn queued_bytes(&self) -> usize {
        self.bytes
    }

    /// Updates conflated and dropped since the last call.
    pub fn take_gave_way(&mut self) -> GaveWay {
        std::mem::take(&mut self.gave_way)
    }

    /// Takes `spare` as its high-priority queue when it has none (no slots, nothing queued)
    /// and `spare` is empty: a queue lent for the span of one read (see `give_back_queue`).
    pub fn borrow_queue(&mut self, spare: &mut VecDeque<OutItem>) {
        crate::borrow_queue(&mut self.high, spare);
    }

    /// Hands an empty high-priority queue of at most `up_to` slots to `spare` when `spare`
    /// has none, so the next connection's answer reuses it instead of allocating its own.
    pub fn give_back_queue(&mut self, spare: &mut VecDeque<OutItem>, up_to: usize) {
        crate::give_back_queue(&mut self.high, spare, up_to);
    }

    /// Frees the memory of each lane that holds nothing (nor remembers skipped offsets) and
    /// has room for at most `up_to` items.
    pub fn release_if_empty(&mut self, up_to: usize) {
        if self.high.is_empty() && self.high.capacity() <= up_to {
            self.high = VecDeque::new();
        }
        let idle_lane =
            |lane: &LowLane| lane.items.is_empty() && lane.skipped.is_empty() && lane.items.capacity() <= up_to;
        if self.low.as_deref().is_some_and(idle_lane) {
            self.low = None;
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

    /// Forgets what was skipped on a subscription that ended.
    pub fn forget_subscription(&mut self, sub_id: u32) {
        if let Some(ranges) = self.low.as_mut().and_then(|lane| lane.skipped.remove(&sub_id)) {
            self.bytes -= ranges.len() * SKIPPED_BYTES;
        }
    }

    /// Moves everything queued into `out` as wire bytes, packing up to `batch_size` frames per
    /// WebSocket message: the high lane first, then the low one. Returns the number of frames.
    /// With `sharing`, batches are shared between subscribers and large messages go out
    /// zstd-compressed to clients that accept it.
    pub fn drain_into(&mut self, out: &mut Vec<u8>, batch_size: usize, mut sharing: Option<Sharing<'_>>) -> usize {
        self.end_run();
        self.frames = 0;
        let Some(lane) = self.low.as_deref_mut() else {
            let frames = write_batches(out, self.high.iter(), batch_size, None, sharing.as_mut());
            self.high.clear();
            self.bytes = 0;
            return frames;
        };
        let mut frames = write_batches(out, self.high.iter(), batch_size, Some(&mut lane.skipped), sharing.as_mut());
        self.high.clear();
        frames +=
            write_batches(out, lane.items.iter().flatten(), batch_size, Some(&mut lane.skipped), sharing.as_mut());
        lane.items.clear();
        lane.head = 0;
        lane.per_sub.clear();
        lane.unindex_keys();
        self.bytes = lane.skipped.values().map(|ranges| ranges.len() * SKIPPED_BYTES).sum();
        frames
    }

    fn is_high_priority(&self, publication: &Publication) -> bool {
        self.pressure.is_priority(publication)
    }

    /// Drops lower-priority updates, oldest first, until `len` more bytes fit.
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
        let mut index: usize = 0;
        while self.bytes + len > self.max_bytes {
            while lane.items.front().is_some_and(Option::is_none) {
                lane.items.pop_front();
                lane.head += 1;
                self.bytes -= TOMBSTONE_BYTES;
                index = index.saturating_sub(1);
            }
            let Some(slot) = lane.items.get(index) else { return Err(Overflow) };
            let droppable = matches!(slot, Some(OutItem::Push { publication, .. })
                if !pressure.is_priority(publication));
            if droppable {
                if let Some((freed, added)) = lane.bury(lane.head + index as u64) {
                    self.bytes = self.bytes - freed + added;
                    self.gave_way.dropped += 1;
                }
            }
            index += 1;
        }
        Ok(())
    }
}

impl LowLane {
    fn push(&mut self, sub_id: u32, key_hash: u64, item: OutItem) {
        let position = self.head + self.items.len() as u64;
        *self.per_sub.entry(sub_id).or_insert(0) += 1;
        if self.keyed && key_hash != 0 {
            self.by_key.insert((sub_id, key_hash), position);
        }
        self.items.push_back(Some(item));
    }

    /// Indexes the queued lower-priority updates by (subscription, key), latest position
    /// winning (high-priority ones queued here are never conflated).
    fn index_keys(&mut self, pressure: &Pressure) {
        if self.keyed {
            return;
        }
        self.keyed = true;
        for (position, slot) in (self.head..).zip(&self.items) {
            if let Some(OutItem::Push { sub_id, publication }) = slot {
                if publication.key_hash != 0 && !pressure.is_priority(publication) {
                    self.by_key.insert((*sub_id, publication.key_hash), position);
                }
            }
        }
    }

    fn unindex_keys(&mut self) {
        self.by_key.clear();
        self.keyed = false;
    }

    /// Turns the update at `position` into a tombstone and remembers its offset. Returns the
    /// bytes freed and the bytes the tombstone and skip record add (a tiny update may free
    /// less than that; callers go on making room, or overflow).
    fn bury(&mut self, position: u64) -> Option<(usize, usize)> {
        let index = (position - self.head) as usize;
        let Some(OutItem::Push { sub_id, publication }) = self.items.get_mut(index).and_then(Option::take) else {
            return None;
        };
        // Only if it is the one indexed: a newer update with the key may be.
        if self.by_key.get(&(sub_id, publication.key_hash)) == Some(&position) {
            self.by_key.remove(&(sub_id, publication.key_hash));
        }
        if let Some(count) = self.per_sub.get_mut(&sub_id) {
            *count -= 1;
            if *count == 0 {
                self.per_sub.remove(&sub_id);
            }
        }
        let freed = push_len(sub_id, publication.body.len());
        Some((freed, TOMBSTONE_BYTES + self.skip(sub_id, publication.offset)))
    }

    /// Remembers that `offset` on `sub_id` was not sent, merging with the latest range;
    /// returns the bytes a new range costs.
    fn skip(&mut self, sub_id: u32, offset: u64) -> usize {
        let ranges = self.skipped.entry(sub_id).or_default();
        if let Some(last) = ranges.last_mut() {
            if offset == last.1 + 1 {
                last.1 = offset;
                return 0;
            }
            if offset + 1 == last.0 {
                last.0 = offset;
                return 0;
            }
        }
        ranges.push((offset, offset));
        SKIPPED_BYTES
    }
}

/// How many skipped offsets `item` reports (those below its own, on its subscription).
fn take_skipped(skipped: &mut HashMap<u32, Vec<(u64, u64)>>, item: &OutItem) -> u32 {
    let OutItem::Push { sub_id, publication } = item else { return 0 };
    let Some(ranges) = skipped.get_mut(sub_id) else { return 0 };
    let mut reported = 0;
    ranges.retain(|&(first, last)| {
        let below = last < publication.offset;
        if below {
            reported += last - first + 1;
        }
        !below
    });
    if ranges.is_empty() {
        skipped.remove(sub_id);
    }
    reported.min(u64::from(u32::MAX)) as u32
}

/// The shard's shared batches, and what this connection takes of them.
pub struct Sharing<'a> {
    pub batches: &'a mut SharedBatches,
    /// The connection accepts zstd envelopes.
    pub zstd: bool,
    /// Bit `i`: the connection holds the server's dictionary `i`.
    pub held: u32,
    /// Where to tally the write and when it happens.
    pub observed: Observed<'a>,
}

impl Sharing<'_> {
    /// Whether a message of `len` plain bytes goes out compressed.
    fn compresses(&self, len: usize) -> bool {
        let threshold = self.batches.threshold();
        self.zstd && threshold != 0 && len >= threshold
    }
}

/// The shard's tallies and the time of the write being made, when it is observed.
pub type Observed<'a> = Option<(&'a LocalMetrics, Instant)>;

/// Writes `items` as WebSocket messages of up to `batch_size` frames (raw items go out as
/// they are, between batches). Updates on subscriptions with skipped offsets report them.
/// With `sharing`, a message of two or more updates of one subscription (and nothing per copy)
/// is the shard's shared batch, encoded once for every subscriber, with the `sub_id` in the
/// envelope; over the threshold, for a client that accepts it, a zstd envelope (shared, or the
/// connection's own when the message holds more than one subscription's updates).
#[inline]
fn write_batches<'a, I>(
    out: &mut Vec<u8>,
    mut items: I,
    batch_size: usize,
    mut skipped: Option<&mut HashMap<u32, Vec<(u64, u64)>>>,
    mut sharing: Option<&mut Sharing<'_>>,
) -> usize
where
    I: Iterator<Item = &'a OutItem> + Clone,
{
    let mut frames = 0;
    let mut skips = Vec::new();
    loop {
        match items.clone().next() {
            None => return frames,
            Some(OutItem::Raw(bytes)) => {
                out.extend_from_slice(bytes);
                items.next();
                continue;
            }
            Some(_) => {}
        }
        let run = items.clone().take_while(|item| !matches!(item, OutItem::Raw(_))).take(batch_size);
        // Only a connection that fell behind has skips to report.
        skips.clear();
        let (count, len) = match skipped.as_deref_mut().filter(|s| !s.is_empty()) {
            None => run.clone().fold((0, 0), |(count, len), item| (count + 1, len + item.len())),
            Some(skipped) => {
                skips.extend(run.clone().map(|item| take_skipped(skipped, item)));
                let len = run
                    .clone()
                    .zip(&skips)
                    .map(|(item, &n)| match item {
                        OutItem::Push { sub_id, publication } => push_len_skipped(*sub_id, n, publication.body.len()),
                        other => other.len(),
                    })
                    .sum();
                (skips.len(), len)
            }
        };
        frames += count;
        if let Some((metrics, now)) = sharing.as_deref().and_then(|sharing| sharing.observed) {
            let publications = run.clone().filter_map(|item| match item {
                OutItem::Push { publication, .. } => Some(&**publication),
                _ => None,
            });
            metrics.record_deliveries(now, publications);
            metrics.record_message(count);
        }
        if let Some(sharing) = sharing.as_deref_mut() {
            let compress = sharing.compresses(len);
            // One update alone is as cheap to write as to look up, unless it is to be compressed.
            let worth_sharing = (count >= 2 || compress) && skips.iter().all(|&n| n == 0);
            let shared_sub = if worth_sharing { one_subscription(run.clone()) } else { None };
            let publications = run.clone().filter_map(|item| match item {
                OutItem::Push { publication, .. } => Some(publication),
                _ => None,
            });
            let written = match (shared_sub, compress) {
                (Some(sub_id), true) => {
                    match sharing.batches.shared_compressed(publications.clone(), sharing.held) {
                        Some(compressed) => write_envelope(out, &compressed, sub_id),
                        None => write_shared_plain(out, sharing.batches.shared_plain(publications), sub_id),
                    }
                    true
                }
                (Some(sub_id), false) => {
                    write_shared_plain(out, sharing.batches.shared_plain(publications), sub_id);
                    true
                }
                (None, true) => write_own_compressed(out, run.clone(), count, &skips, len, sharing),
                (None, false) => false,
            };
            if written {
                items.nth(count - 1);
                continue;
            }
        }
        out.reserve(len + 10);
        write_binary_header(out, len);
        write_run(out, &mut items, count, &skips);
    }
}

/// The subscription of a run that holds only updates of one subscription.
fn one_subscription<'a>(mut run: impl Iterator<Item = &'a OutItem>) -> Option<u32> {
    let Some(OutItem::Push { sub_id: first, .. }) = run.next() else { return None };
    run.all(|item| matches!(item, OutItem::Push { sub_id, .. } if sub_id == first)).then_some(*first)
}

/// Appends the next `count` items as elements of `ServerMessage.frames`.
fn write_run<'a>(out: &mut Vec<u8>, items: &mut impl Iterator<Item = &'a OutItem>, count: usize, skips: &[u32]) {
    for i in 0..count {
        let skipped = skips.get(i).copied().unwrap_or(0);
        match items.next() {
            Some(OutItem::Push { sub_id, publication }) => write_push_skipped(out, *sub_id, skipped, &publication.body),
            Some(OutItem::Frame(bytes)) => out.extend_from_slice(bytes),
            Some(OutItem::Raw(_)) | None => unreachable!("runs stop before raw items"),
        }
    }
}

/// Key of `ServerMessage.zstd` (field 2, length-delimited) and `ServerMessage.sub_id` (field 3).
const SERVER_MESSAGE_ZSTD_KEY: u8 = 0x12;
const SERVER_MESSAGE_SUB_ID_KEY: u8 = 0x18;

/// A shared plain batch: its head, then its frames as they are.
fn write_shared_plain(out: &mut Vec<u8>, frames: Bytes, sub_id: u32) {
    out.reserve(frames.len() + 16);
    write_shared_head(out, frames.len(), sub_id);
    out.extend_from_slice(&frames);
}

/// Shared batches (`stretch`, one iterator per message) of subscription `sub_id`, tallied as
/// written at `observed`: the first message's head goes to `head`, and the parts to write
/// after it are returned (the first batch's frames, then each further message's head and
/// frames).
fn shared_parts<'p, B>(
    head: &mut Vec<u8>,
    sub_id: u32,
    stretch: impl Iterator<Item = B>,
    batches: &mut SharedBatches,
    observed: Observed<'_>,
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

/// What one connection's copy of a shared batch of `frames_len` bytes starts with: the
/// WebSocket header and `ServerMessage.sub_id` (protobuf allows it before the frames), so the
/// shared bytes can follow untouched, copied or by a vectored write.
fn write_shared_head(out: &mut Vec<u8>, frames_len: usize, sub_id: u32) {
    write_binary_header(out, 1 + encoded_len_varint(u64::from(sub_id)) + frames_len);
    out.push(SERVER_MESSAGE_SUB_ID_KEY);
    append_varint(out, u64::from(sub_id));
}

/// Writes `run` (of `len` bytes plain, several subscriptions' or with skip reports) as the
/// connection's own zstd envelope; false when compressing would not make it smaller (nothing
/// written then).
fn write_own_compressed<'a>(
    out: &mut Vec<u8>,
    run: impl Iterator<Item = &'a OutItem> + Clone,
    count: usize,
    skips: &[u32],
    len: usize,
    sharing: &mut Sharing<'_>,
) -> bool {
    let mut plain = Vec::with_capacity(len);
    write_run(&mut plain, &mut run.clone(), count, skips);
    let mut types = run.map(|item| match item {
        OutItem::Push { publication, .. } => publication.update_type,
        _ => -1,
    });
    let first = types.next();
    let update_type = first.filter(|&t| t >= 0 && types.all(|other| other == t));
    let Some(compressed) = sharing.batches.own(&plain, update_type, sharing.held) else { return false };
    write_envelope(out, &compressed, 0);
    true
}

/// A `ServerMessage` holding only `zstd` (and the `sub_id` its updates lack, if shared).
fn write_envelope(out: &mut Vec<u8>, compressed: &[u8], sub_id: u32) {
    let sub_id_len = if sub_id == 0 { 0 } else { 1 + encoded_len_varint(u64::from(sub_id)) };
    let len = 1 + encoded_len_varint(compressed.len() as u64) + compressed.len() + sub_id_len;
    out.reserve(len + 10);
    write_binary_header(out, len);
    out.push(SERVER_MESSAGE_ZSTD_KEY);
    append_varint(out, compressed.len() as u64);
    out.extend_from_slice(compressed);
    if sub_id != 0 {
        out.push(SERVER_MESSAGE_SUB_ID_KEY);
        append_varint(out, u64::from(sub_id));
    }
}

#[cfg(test)]
mod tests {
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

    /// Sharing through `batches` for a client without zstd, latencies not recorded.
    fn plain_sharing(batches: &mut SharedBatches) -> Sharing<'_> {
        Sharing { batches, zstd: false, held: 0, observed: None }
    }

    fn typed(offset: u64, update_type: i32, key: &str) -> Rc<Publication> {
        let update =
            Update { offset, r#type: update_type, key: key.into(), payload: vec![7; 40].into(), ..Default::default() };
        Rc::new(Publication::new(Arc::from("c"), offset, update_type, encode_update_body(&update), Instant::now()))
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
        outbox.drain_into(&mut wire, 100, None);
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
        outbox.drain_into(&mut wire, 100, None);
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
        first.drain_into(&mut wire, 100, None);
        first.give_back_queue(&mut spare, 8);
        assert_eq!((first.high.capacity(), spare.capacity()), (0, lent), "drained: back to the lender");

        // A second connection's answer goes into the same memory.
        let mut second = Outbox::new(1 << 20, pressure(1 << 20));
        second.borrow_queue(&mut spare);
        second.push(OutItem::Frame(vec![4, 5])).unwrap();
        assert_eq!(second.high.capacity(), lent);
        let mut again = Vec::new();
        second.drain_into(&mut again, 100, None);
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
        full.drain_into(&mut Vec::new(), 100, None);
        full.give_back_queue(&mut spare, 8);
        assert!(full.high.capacity() > 0, "the lender already holds one");
    }

    #[test]
    fn under_pressure_a_newer_update_with_the_same_key_replaces_the_queued_one() {
        let mut outbox = Outbox::new(1 << 20, pressure(0));
        outbox.push(OutItem::Push { sub_id: 1, publication: typed(1, TRAFFIC, "a1") }).unwrap();
        outbox.push(OutItem::Push { sub_id: 1, publication: typed(2, TRAFFIC, "b2") }).unwrap();
        outbox.push(OutItem::Push { sub_id: 1, publication: typed(3, TRAFFIC, "a1") }).unwrap();
        assert_eq!(outbox.take_gave_way(), GaveWay { conflated: 1, dropped: 0 });
        let mut wire = Vec::new();
        outbox.drain_into(&mut wire, 100, None);
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
                outbox.drain_into(&mut wire, 100, None);
            }
        }
        outbox.drain_into(&mut wire, 100, None);
        assert!(outbox.take_gave_way().dropped > 80);
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
        let mut outbox = Outbox::new(one * 3 + TOMBSTONE_BYTES + SKIPPED_BYTES, pressure(0));
        outbox.push(OutItem::Push { sub_id: 1, publication: typed(1, TRAFFIC, "k") }).unwrap();
        for offset in 2..=4 {
            outbox.push(OutItem::Push { sub_id: 1, publication: typed(offset, ROUTE, "") }).unwrap();
        }
        assert_eq!(outbox.push(OutItem::Push { sub_id: 1, publication: typed(5, ROUTE, "") }), Err(Overflow));
    }

    #[test]
    fn a_reader_that_never_reads_overflows_even_on_lower_priority_updates() {
        let mut outbox = Outbox::new(4096, pressure(0));
        let mut overflowed = false;
        // Offsets every other one, so the skipped offsets never merge into ranges.
        for offset in (1..100_000).step_by(2) {
            if outbox.push(OutItem::Push { sub_id: 1, publication: typed(offset, TRAFFIC, "") }).is_err() {
                overflowed = true;
                break;
            }
            assert!(outbox.queued_bytes() <= 4096);
        }
        assert!(overflowed);
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
            let taken = outbox.take_shared(&mut head, batch_size, &mut batches, None);
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
        let mut delivered = Rc::new(Delivered::default());
        let mut pushed = Outbox::new(1 << 20, pressure(1 << 20));
        let mut ran = Outbox::new(1 << 20, pressure(1 << 20));
        let (mut batches_pushed, mut batches_ran) = (plain_batches(), plain_batches());
        let mut offset = 0;
        let mut update = |sub_id: u32, update_type: i32, pushed: &mut Outbox, ran: &mut Outbox| {
            offset += 1;
            let publication = typed(offset, update_type, "");
            let index = Delivered::append(&mut delivered, &publication);
            pushed.push(OutItem::Push { sub_id, publication: publication.clone() }).unwrap();
            ran.push_delivered(sub_id, &publication, &delivered, index).unwrap();
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
            let taken_pushed = pushed.take_shared(&mut head_pushed, 3, &mut batches_pushed, None);
            let taken_ran = ran.take_shared(&mut head_ran, 3, &mut batches_ran, None);
            assert_eq!(taken_pushed.is_some(), taken_ran.is_some(), "round {round}");
            let wire = |outbox: &mut Outbox, mut head: Vec<u8>, taken: Option<Vec<Bytes>>, batches| {
                taken.iter().flatten().for_each(|part| head.extend_from_slice(part));
                outbox.drain_into(&mut head, 3, Some(plain_sharing(batches)));
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
        let mut delivered = Rc::new(Delivered::default());
        let mut pushed = Outbox::new(1 << 20, pressure(1 << 20));
        let mut parked = Outbox::new(1 << 20, pressure(1 << 20));
        let mut publish = |offset: u64, update_type: i32, pushed: &mut Outbox| {
            let publication = typed(offset, update_type, "");
            let index = Delivered::append(&mut delivered, &publication);
            pushed.push(OutItem::Push { sub_id: 1, publication: publication.clone() }).unwrap();
            (publication, index, delivered.clone())
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
        pushed.drain_into(&mut wire_pushed, 100, Some(plain_sharing(&mut a)));
        parked.drain_into(&mut wire_parked, 100, Some(plain_sharing(&mut b)));
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
            let mut channels = [Rc::new(Delivered::default()), Rc::new(Delivered::default())];
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
                            if let Some(parts) = outbox.take_shared(wire, batch_size, batches, None) {
                                parts.iter().for_each(|part| wire.extend_from_slice(part));
                            } else {
                                outbox.drain_into(wire, batch_size, Some(plain_sharing(batches)));
                            }
                        }
                        assert_eq!(wire_parked, wire_pushed, "round {round}");
                    }
                    _ => {
                        let channel = (roll >> 8) as usize % 2;
                        let update_type = if (roll >> 16) % 4 == 0 { TRAFFIC } else { ROUTE };
                        offsets[channel] += 1;
                        let publication = typed(offsets[channel], update_type, "");
                        let delivered = &mut channels[channel];
                        let index = Delivered::append(delivered, &publication);
                        let sub_id = channel as u32 + 1;
                        pushed.push(OutItem::Push { sub_id, publication: publication.clone() }).unwrap();
                        // The fan-out: a parked subscriber is passed by while it may be.
                        let passed = update_type == ROUTE && delivered.within_horizon() && delivered.is_parked(0);
                        if !passed {
                            delivered.reset_horizon();
                            parked.push_delivered(sub_id, &publication, delivered, index).unwrap();
                            if (roll >> 24) % 3 == 0 {
                                parked.unpark(sub_id);
                            } else {
                                parked.park(sub_id, delivered, 0, 6, 1 << 18);
                            }
                        }
                        assert_eq!(parked.len(), pushed.len(), "round {round}");
                    }
                }
            }
            for (outbox, batches, wire) in [
                (&mut pushed, &mut batches_pushed, &mut wire_pushed),
                (&mut parked, &mut batches_parked, &mut wire_parked),
            ] {
                outbox.drain_into(wire, 100, Some(plain_sharing(batches)));
            }
            assert_eq!(wire_parked, wire_pushed, "round {round}");
            assert!(parked.is_empty() && !channels.iter().any(|d| d.is_parked(0)), "round {round}");
        }
    }

    #[test]
    fn a_parked_queue_sets_the_horizon_where_it_could_turn_urgent_and_unparks_on_other_items() {
        let mut delivered = Rc::new(Delivered::default());
        let mut outbox = Outbox::new(1 << 20, pressure(1 << 20));
        let first = publication(1);
        let index = Delivered::append(&mut delivered, &first);
        outbox.push_delivered(1, &first, &delivered, index).unwrap();
        assert!(outbox.park(1, &delivered, 3, 3, 1 << 18), "one queued, urgent at three");
        Delivered::append(&mut delivered, &publication(2));
        assert!(delivered.within_horizon(), "two queued");
        Delivered::append(&mut delivered, &publication(3));
        assert!(!delivered.within_horizon(), "three would be urgent: visit again");
        delivered.reset_horizon();
        assert_eq!(outbox.len(), 3);
        // A reply closes the run where it stands; the fan-out brings the rest again.
        outbox.push(OutItem::Frame(vec![0x0a, 0])).unwrap();
        assert!(!delivered.is_parked(3));
        Delivered::append(&mut delivered, &publication(4));
        assert_eq!(outbox.len(), 4, "nothing appended after the reply is held");
        // No room before urgency, or bytes near the quarter: it does not park.
        let mut full = Outbox::new(1 << 20, pressure(1 << 20));
        let next = publication(5);
        let index = Delivered::append(&mut delivered, &next);
        full.push_delivered(1, &next, &delivered, index).unwrap();
        assert!(!full.park(1, &delivered, 0, 1, 1 << 18));
        assert!(!full.park(1, &delivered, 0, 10, 100));
        assert!(!delivered.is_parked(0));
    }

    #[test]
    fn delivered_starts_afresh_when_no_queue_refers_to_it() {
        let mut delivered = Rc::new(Delivered::default());
        assert_eq!(Delivered::append(&mut delivered, &publication(1)), 0);
        assert_eq!(Delivered::append(&mut delivered, &publication(2)), 0, "nobody refers to the first");
        let mut outbox = Outbox::new(1 << 20, pressure(1 << 20));
        outbox.push_delivered(1, &publication(2), &delivered, 0).unwrap();
        assert_eq!(Delivered::append(&mut delivered, &publication(3)), 1, "a queue refers to it");
        outbox.clear();
        assert_eq!(Delivered::append(&mut delivered, &publication(4)), 0);
        // Held, it grows to its capacity, then a fresh one starts.
        let held = delivered.clone();
        let indexes: Vec<u32> = (5..5 + DELIVERED_CAPACITY as u64)
            .map(|offset| Delivered::append(&mut delivered, &publication(offset)))
            .collect();
        assert_eq!(indexes.last(), Some(&0));
        assert!(!Rc::ptr_eq(&held, &delivered) && held.publications.borrow().len() == DELIVERED_CAPACITY);
    }

    #[test]
    fn a_run_overflows_where_single_pushes_do() {
        let one = push_len(1, publication(1).body.len());
        let mut delivered = Rc::new(Delivered::default());
        let mut outbox = Outbox::new(one * 2, pressure(0));
        for offset in 1..=2 {
            let publication = publication(offset);
            let index = Delivered::append(&mut delivered, &publication);
            outbox.push_delivered(1, &publication, &delivered, index).unwrap();
        }
        let publication = publication(3);
        let index = Delivered::append(&mut delivered, &publication);
        assert_eq!(outbox.push_delivered(1, &publication, &delivered, index), Err(Overflow));
        assert_eq!(outbox.queued_bytes(), one * 2);
    }

    #[test]
    fn a_lone_answer_is_a_message_of_one_frame_unless_it_is_to_be_compressed() {
        let answer = crate::protocol::push::publish_result(7, "9f1c2b7a44e0d311", 3);
        let mut outbox = Outbox::new(1 << 20, pressure(1 << 20));
        outbox.push(OutItem::Frame(answer.clone())).unwrap();
        let (mut batches, mut wire) = (plain_batches(), Vec::new());
        assert_eq!(outbox.drain_into(&mut wire, 100, Some(plain_sharing(&mut batches))), 1);
        assert!(outbox.is_empty() && outbox.queued_bytes() == 0);
        let written = messages(&wire);
        assert_eq!(written.len(), 1);
        assert_eq!(written[0].encode_to_vec(), answer, "the frame, as the only element of `frames`");
        // Above the threshold of a client that takes zstd it goes the batch writer's way.
        let settings = crate::compression::ZstdSettings { threshold: 16, level: 1, dictionaries: Vec::new() };
        let mut batches = SharedBatches::new(Arc::new(settings));
        let large = crate::protocol::push::publish_result(7, &"e".repeat(200), 3);
        outbox.push(OutItem::Frame(large.clone())).unwrap();
        let sharing = Sharing { batches: &mut batches, zstd: true, held: 0, observed: None };
        let mut compressed = Vec::new();
        assert_eq!(outbox.drain_into(&mut compressed, 100, Some(sharing)), 1);
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
        assert_eq!(outbox.drain_into(&mut wire, 100, None), 250);
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
            let update = Update {
                offset,
                r#type: TRAFFIC,
                key: key.into(),
                payload: vec![0; payload].into(),
                ..Default::default()
            };
            let publication =
                Rc::new(Publication::new(Arc::from("c"), offset, TRAFFIC, encode_update_body(&update), Instant::now()));
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
        outbox.drain_into(&mut wire, 100, None);
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
        assert_eq!(outbox.take_gave_way().conflated, 1);
        let mut wire = Vec::new();
        outbox.drain_into(&mut wire, 100, None);
        let got: Vec<(u64, i32, u32)> = updates(&wire).iter().map(|u| (u.offset, u.r#type, u.skipped)).collect();
        assert_eq!(got, vec![(2, ROUTE, 1), (3, TRAFFIC, 0)]);
    }
}
