//! The low lane of a queue: lower-priority updates (and high-priority ones queued behind them
//! on their subscription), which give way under pressure, and the count of what each
//! subscription had given up, reported by its next update sent.
//!
//! An update given up leaves its slot as a mark saying how many of its subscription's
//! updates it stands for (itself and those given up before it that it was to report), so
//! giving way from anywhere in the lane is O(1). The marks are folded into the next update
//! of their subscription when they pile up (`compact`) and when the lane is written, so they
//! never outnumber the updates queued by more than a constant; what no queued update follows
//! waits per subscription (`pending`) for the next one queued. The record of what was given
//! up is thus O(updates queued + subscriptions), never O(updates given up), and it does not
//! count against the queue's byte limit: it cannot make a queue overflow.

use super::{OutItem, Pressure};
use crate::core::FastMap;
use crate::protocol::push::push_len;

/// Marks of updates given up that the lane keeps before folding them (besides one per
/// update queued): enough that folding is rare, few enough to stay small.
const MARKS_BEFORE_COMPACTING: usize = 64;

#[derive(Debug, Default)]
pub(super) struct LowLane {
    /// In order; an index stays an update's place until `compact` or `clear`.
    slots: Vec<Slot>,
    /// Slots that are marks of updates given up.
    marks: usize,
    /// Replies and control frames queued here (see `push_frame`).
    frames: usize,
    /// Bytes of the updates that may be given up (lower priority, queued).
    droppable_bytes: usize,
    /// No update before this index may be given up: the oldest are found without walking
    /// again past the high-priority ones that stay.
    droppable_from: usize,
    /// Slots (queued or marks) per subscription: a high-priority update of one of these
    /// queues here, behind them.
    per_sub: FastMap<u32, u32>,
    /// Index of the queued update per (subscription, key hash).
    /// Kept only under pressure (`keyed`): built from `slots` the first time conflation is
    /// needed, so pushes below the threshold pay no key bookkeeping.
    by_key: FastMap<(u32, u64), usize>,
    keyed: bool,
    /// Per subscription: updates given up after every one of it queued, reported by the next
    /// one queued.
    pending: FastMap<u32, u32>,
    /// Scratch of `compact`: counts being carried to the next update of their subscription.
    carry: FastMap<u32, u32>,
}

#[derive(Debug)]
enum Slot {
    /// An item, and how many updates of its subscription right before it were given up.
    Queued { item: OutItem, skipped: u32 },
    /// An update given up: it and those before it that it was to report.
    GivenUp { sub_id: u32, skipped: u32 },
}

impl LowLane {
    /// Whether no slot is queued (marks included).
    pub(super) fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Whether nothing is queued nor waiting to be reported.
    pub(super) fn is_idle(&self) -> bool {
        self.slots.is_empty() && self.pending.is_empty()
    }

    /// Whether an update of `sub_id` may be queued elsewhere than here: nothing is queued
    /// here and it has nothing given up to report.
    pub(super) fn is_clear_for(&self, sub_id: u32) -> bool {
        self.slots.is_empty() && (self.pending.is_empty() || !self.pending.contains_key(&sub_id))
    }

    /// Whether a high-priority update of `sub_id` must queue here: updates of its
    /// subscription are queued here, or were given up and are yet to be reported.
    pub(super) fn holds(&self, sub_id: u32) -> bool {
        (!self.slots.is_empty() && self.per_sub.contains_key(&sub_id))
            || (!self.pending.is_empty() && self.pending.contains_key(&sub_id))
    }

    /// Items queued (marks not counted).
    pub(super) fn len(&self) -> usize {
        self.slots.len() - self.marks
    }

    pub(super) fn capacity(&self) -> usize {
        self.slots.capacity()
    }

    /// Bytes that giving way could free.
    pub(super) fn droppable_bytes(&self) -> usize {
        self.droppable_bytes
    }

    /// Queues an update of `sub_id` after every slot; one that may give way (lower priority,
    /// `droppable` of its `len` bytes) is also indexed by its `key_hash` under pressure.
    pub(super) fn push_update(&mut self, sub_id: u32, item: OutItem, key_hash: u64, droppable: Option<usize>) {
        let index = self.slots.len();
        *self.per_sub.entry(sub_id).or_insert(0) += 1;
        if let Some(len) = droppable {
            self.droppable_bytes += len;
            if self.keyed && key_hash != 0 {
                self.by_key.insert((sub_id, key_hash), index);
            }
        }
        let skipped = self.take_pending(sub_id);
        self.slots.push(Slot::Queued { item, skipped });
    }

    /// Queues a reply or control frame after every slot (it never gives way): one that must
    /// follow everything queued, or an answer that must follow such a one.
    pub(super) fn push_frame(&mut self, item: OutItem) {
        self.frames += 1;
        self.slots.push(Slot::Queued { item, skipped: 0 });
    }

    /// Whether replies or control frames are queued here.
    pub(super) fn has_frames(&self) -> bool {
        self.frames != 0
    }

    /// An update of `sub_id` given up as it came: the next one queued reports it (and what it
    /// was to report).
    pub(super) fn give_up_arriving(&mut self, sub_id: u32) {
        let skipped = self.take_pending(sub_id).saturating_add(1);
        self.pending.insert(sub_id, skipped);
    }

    /// Gives up the queued update of `sub_id` with key `key_hash`, if any (a newer one with
    /// the key is coming); returns its bytes.
    pub(super) fn conflate(&mut self, sub_id: u32, key_hash: u64, pressure: &Pressure) -> Option<usize> {
        self.index_keys(pressure);
        let index = self.by_key.get(&(sub_id, key_hash)).copied()?;
        self.give_up(index, pressure)
    }

    /// Gives up the oldest update that may give way; returns its bytes (`None`: none left).
    pub(super) fn give_up_oldest(&mut self, pressure: &Pressure) -> Option<usize> {
        while let Some(slot) = self.slots.get(self.droppable_from) {
            if slot.is_droppable(pressure) {
                return self.give_up(self.droppable_from, pressure);
            }
            self.droppable_from += 1;
        }
        None
    }

    /// Folds the marks into the updates after them once they outnumber the updates queued
    /// (and a constant): amortized O(1) per update given up.
    pub(super) fn compact_if_due(&mut self, pressure: &Pressure) {
        if self.marks > self.len().max(MARKS_BEFORE_COMPACTING) {
            self.compact(pressure);
        }
    }

    /// Each queued item with how many updates right before it on its subscription were
    /// given up, in order (marks folded first). The caller writes them, then calls `clear`.
    pub(super) fn items(&mut self, pressure: &Pressure) -> impl Iterator<Item = (&OutItem, u32)> + Clone {
        self.compact(pressure);
        self.slots.iter().filter_map(|slot| match slot {
            Slot::Queued { item, skipped } => Some((item, *skipped)),
            Slot::GivenUp { .. } => None,
        })
    }

    /// Forgets everything queued; what is waiting to be reported stays.
    pub(super) fn clear(&mut self) {
        self.slots.clear();
        self.marks = 0;
        self.frames = 0;
        self.droppable_bytes = 0;
        self.droppable_from = 0;
        self.per_sub.clear();
        self.unindex_keys();
    }

    /// Frees the memory of an empty lane, keeping only what waits to be reported.
    pub(super) fn release_memory(&mut self) {
        *self = Self { pending: std::mem::take(&mut self.pending), ..Self::default() };
    }

    /// Forgets subscription `sub_id`, which ended: its updates queued here and what it had
    /// given up. Returns the bytes freed.
    pub(super) fn forget(&mut self, sub_id: u32, pressure: &Pressure) -> usize {
        let mut freed = 0;
        if !self.slots.is_empty() && self.per_sub.contains_key(&sub_id) {
            for slot in &mut self.slots {
                let Slot::Queued { item: OutItem::Push { sub_id: of, .. }, .. } = slot else { continue };
                if *of != sub_id {
                    continue;
                }
                let droppable = slot.is_droppable(pressure);
                let Slot::Queued { item, .. } = std::mem::replace(slot, Slot::GivenUp { sub_id, skipped: 0 }) else {
                    continue;
                };
                let len = item.len();
                if droppable {
                    self.droppable_bytes -= len;
                }
                self.marks += 1;
                freed += len;
            }
            self.compact(pressure);
        }
        self.pending.remove(&sub_id);
        freed
    }

    /// Turns the update at `index` into a mark; returns its bytes. Only an update that may
    /// give way (the conflation index holds no other).
    fn give_up(&mut self, index: usize, pressure: &Pressure) -> Option<usize> {
        let slot = self.slots.get_mut(index)?;
        if !slot.is_droppable(pressure) {
            return None;
        }
        let Slot::Queued { item: OutItem::Push { sub_id, publication }, skipped } = slot else { return None };
        let (sub_id, key_hash, len) = (*sub_id, publication.key_hash, push_len(*sub_id, publication.body.len()));
        *slot = Slot::GivenUp { sub_id, skipped: skipped.saturating_add(1) };
        // Only if it is the one indexed: a newer update with the key may be.
        if self.by_key.get(&(sub_id, key_hash)) == Some(&index) {
            self.by_key.remove(&(sub_id, key_hash));
        }
        self.marks += 1;
        self.droppable_bytes -= len;
        Some(len)
    }

    /// Folds each mark into the next update of its subscription queued after it, or into what
    /// waits for the next one queued; drops the marks.
    fn compact(&mut self, pressure: &Pressure) {
        if self.marks == 0 {
            return;
        }
        let droppable_from = self.droppable_from;
        let Self { slots, per_sub, carry, pending, .. } = self;
        let (mut index, mut kept_before) = (0, 0);
        per_sub.clear();
        slots.retain_mut(|slot| {
            let before = index < droppable_from;
            index += 1;
            match slot {
                Slot::GivenUp { sub_id, skipped } => {
                    let carried = carry.entry(*sub_id).or_insert(0);
                    *carried = carried.saturating_add(*skipped);
                    false
                }
                Slot::Queued { item, skipped } => {
                    if let OutItem::Push { sub_id, .. } = item {
                        if let Some(carried) = carry.remove(sub_id) {
                            *skipped = skipped.saturating_add(carried);
                        }
                        *per_sub.entry(*sub_id).or_insert(0) += 1;
                    }
                    kept_before += usize::from(before);
                    true
                }
            }
        });
        for (sub_id, carried) in carry.drain() {
            let waiting = pending.entry(sub_id).or_insert(0);
            *waiting = waiting.saturating_add(carried);
        }
        self.droppable_from = kept_before;
        self.marks = 0;
        if self.keyed {
            self.unindex_keys();
            self.index_keys(pressure);
        }
    }

    fn take_pending(&mut self, sub_id: u32) -> u32 {
        if self.pending.is_empty() {
            return 0;
        }
        self.pending.remove(&sub_id).unwrap_or(0)
    }

    /// Indexes the queued lower-priority updates by (subscription, key), latest index
    /// winning (high-priority ones queued here are never conflated).
    fn index_keys(&mut self, pressure: &Pressure) {
        if self.keyed {
            return;
        }
        self.keyed = true;
        for (index, slot) in self.slots.iter().enumerate() {
            if let Slot::Queued { item: OutItem::Push { sub_id, publication }, .. } = slot {
                if publication.key_hash != 0 && !pressure.is_priority(publication) {
                    self.by_key.insert((*sub_id, publication.key_hash), index);
                }
            }
        }
    }

    fn unindex_keys(&mut self) {
        self.by_key.clear();
        self.keyed = false;
    }

    /// Marks of updates given up (for tests of the lane's bounds).
    #[cfg(test)]
    pub(super) fn marks(&self) -> usize {
        self.marks
    }

    /// Subscriptions with updates given up waiting for the next one queued (for tests).
    #[cfg(test)]
    pub(super) fn pending_subscriptions(&self) -> usize {
        self.pending.len()
    }
}

impl Slot {
    /// A queued lower-priority update.
    fn is_droppable(&self, pressure: &Pressure) -> bool {
        matches!(self, Slot::Queued { item: OutItem::Push { publication, .. }, .. } if !pressure.is_priority(publication))
    }
}
