//! The fan-out log: a channel's publications as a shard delivers them to its subscribers,
//! which a queue may refer to instead of holding an item per delivery (see
//! `Outbox::push_delivered`).

use std::cell::{Cell, RefCell};
use std::rc::Rc;

use crate::core::Publication;

/// One channel's publications in the order a shard fans them out, shared by its local
/// subscribers' queues (the shard's router holds the current one per channel). A subscriber whose queue
/// ends with a stretch of them for one subscription refers to the stretch (`Run`) instead of
/// holding an item per delivery: a fan-out then writes nothing new per subscriber but a count.
/// A subscriber waiting for its next pacing tick with such a stretch is *parked*: its run is
/// left open to the end of the publications, and the fan-out passes it by without touching
/// its connection, until the horizon where its queue could need its writer woken.
#[derive(Debug)]
pub struct FanoutLog {
    pub(super) publications: RefCell<Vec<Rc<Publication>>>,
    /// Their bodies' bytes.
    pub(super) bytes: Cell<usize>,
    /// By position in the channel's list of local subscribers: parked.
    parked: RefCell<Vec<Cell<bool>>>,
    /// Publications and body bytes at which the fan-out visits parked subscribers again.
    horizon: Cell<(usize, usize)>,
}

impl Default for FanoutLog {
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

/// What a `FanoutLog` holds before a fresh one is started. Queues referring to the old one
/// turn their run into items at their next update of the channel, so a channel keeps about
/// this much alive beyond what its subscribers' queues hold.
pub(super) const FANOUT_LOG_CAPACITY: usize = 1024;
const FANOUT_LOG_BYTES: usize = 1 << 20;

impl FanoutLog {
    /// Appends `publication` to `fanout`, the shard's current log for its channel, starting a
    /// fresh one when no queue refers to it any more or it is full; returns its index.
    pub fn append(fanout: &mut Rc<FanoutLog>, publication: &Rc<Publication>) -> u32 {
        if Rc::strong_count(fanout) == 1 {
            fanout.publications.borrow_mut().clear();
            fanout.bytes.set(0);
            fanout.parked.borrow_mut().clear();
            fanout.horizon.set(NO_HORIZON);
        } else if fanout.publications.borrow().len() >= FANOUT_LOG_CAPACITY || fanout.bytes.get() >= FANOUT_LOG_BYTES {
            *fanout = Rc::default();
        }
        fanout.bytes.set(fanout.bytes.get() + publication.body.len());
        let mut publications = fanout.publications.borrow_mut();
        publications.push(publication.clone());
        (publications.len() - 1) as u32
    }

    pub(super) fn len(&self) -> usize {
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

    pub(super) fn mark(&self, slot: usize, horizon: (usize, usize)) {
        self.track(slot + 1);
        self.parked.borrow()[slot].set(true);
        let (publications, bytes) = self.horizon.get();
        self.horizon.set((publications.min(horizon.0), bytes.min(horizon.1)));
    }
}

/// Updates of one subscription queued after everything else: `len` publications of
/// `fanout` from `start`.
#[derive(Debug)]
pub(super) struct Run {
    pub(super) sub_id: u32,
    pub(super) fanout: Rc<FanoutLog>,
    pub(super) start: u32,
    pub(super) len: u32,
    /// Parked (see `FanoutLog`): the run also holds every publication appended to
    /// `fanout` since, counted in `len` when it is settled; `slot` is the subscriber's
    /// position in the channel's list, whose mark it clears when it closes.
    pub(super) open_slot: Option<u32>,
}

impl Run {
    /// Publications the run holds, counting those an open run has not settled yet.
    pub(super) fn current_len(&self) -> u32 {
        match self.open_slot {
            Some(_) => self.fanout.len() as u32 - self.start,
            None => self.len,
        }
    }
}
