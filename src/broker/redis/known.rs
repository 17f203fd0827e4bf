//! What this node has seen of each channel's position in Redis, to catch Redis coming back
//! older than it was: a script is told the latest offset the node knows, and hands out a new
//! epoch instead of an offset it already acknowledged; a fan-out that repeats an offset
//! proves the same. Pure state, no I/O.

use std::sync::Arc;

use crate::core::FastMap;

/// The latest position seen per channel, bounded.
#[derive(Debug)]
pub struct KnownPositions {
    channels: FastMap<Arc<str>, Known>,
    capacity: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Known {
    epoch: Arc<str>,
    /// The highest offset of `epoch` any answer or fan-out showed.
    offset: u64,
    /// The offset of the last fan-out of `epoch` (0: none yet). Fan-outs of one channel come
    /// in order on one connection, each offset once.
    fanned_out: u64,
}

/// What a fan-out says of Redis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FanoutCheck {
    /// The next one, or the first seen, or a new epoch.
    InOrder,
    /// An offset of this epoch that was already fanned out: Redis went back in time and
    /// hands out offsets again. The channel needs a new epoch.
    Repeated,
}

impl KnownPositions {
    /// Remembers at most `capacity` channels; past it, new ones are not remembered until
    /// `retain` makes room.
    pub fn new(capacity: usize) -> Self {
        Self { channels: FastMap::default(), capacity }
    }

    /// The latest position known of `channel`.
    pub fn get(&self, channel: &str) -> Option<(Arc<str>, u64)> {
        self.channels.get(channel).map(|known| (known.epoch.clone(), known.offset))
    }

    /// Redis answered with `channel` at `offset` of `epoch`. Another epoch replaces what was
    /// known (answers may arrive out of order; a stale one only weakens the check).
    pub fn saw(&mut self, channel: &Arc<str>, epoch: &Arc<str>, offset: u64) {
        if let Some(known) = self.entry(channel, epoch) {
            known.offset = known.offset.max(offset);
        }
    }

    /// A fan-out of `offset` in `epoch` arrived (0: a new epoch was announced).
    pub fn fanned_out(&mut self, channel: &Arc<str>, epoch: &Arc<str>, offset: u64) -> FanoutCheck {
        let Some(known) = self.entry(channel, epoch) else { return FanoutCheck::InOrder };
        if offset != 0 && offset <= known.fanned_out {
            return FanoutCheck::Repeated;
        }
        known.fanned_out = offset;
        known.offset = known.offset.max(offset);
        FanoutCheck::InOrder
    }

    /// Forgets every channel for which `keep` says false.
    pub fn retain(&mut self, mut keep: impl FnMut(&str) -> bool) {
        self.channels.retain(|channel, _| keep(channel));
    }

    pub fn is_full(&self) -> bool {
        self.channels.len() >= self.capacity
    }

    pub fn len(&self) -> usize {
        self.channels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.channels.is_empty()
    }

    /// The entry of `channel` in `epoch` (reset when the epoch differs), unless the table is
    /// full and the channel new.
    fn entry(&mut self, channel: &Arc<str>, epoch: &Arc<str>) -> Option<&mut Known> {
        if !self.channels.contains_key(channel) {
            if self.is_full() {
                return None;
            }
            self.channels.insert(channel.clone(), Known { epoch: epoch.clone(), offset: 0, fanned_out: 0 });
        }
        let known = self.channels.get_mut(channel)?;
        if known.epoch != *epoch {
            *known = Known { epoch: epoch.clone(), offset: 0, fanned_out: 0 };
        }
        Some(known)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn arc(s: &str) -> Arc<str> {
        Arc::from(s)
    }

    #[test]
    fn the_highest_offset_of_the_latest_epoch_is_known() {
        let mut known = KnownPositions::new(10);
        let (channel, e1, e2) = (arc("route:1"), arc("e1"), arc("e2"));
        assert_eq!(known.get("route:1"), None);
        known.saw(&channel, &e1, 15);
        known.saw(&channel, &e1, 11);
        assert_eq!(known.get("route:1"), Some((e1.clone(), 15)), "a late answer never lowers it");
        known.saw(&channel, &e2, 3);
        assert_eq!(known.get("route:1"), Some((e2, 3)), "another epoch replaces it");
    }

    #[test]
    fn a_fan_out_that_repeats_an_offset_of_its_epoch_is_caught() {
        let mut known = KnownPositions::new(10);
        let (channel, e1, e2) = (arc("route:1"), arc("e1"), arc("e2"));
        for offset in 1..=15 {
            assert_eq!(known.fanned_out(&channel, &e1, offset), FanoutCheck::InOrder);
        }
        // Redis reloaded a snapshot at offset 10 and hands out 11 again.
        assert_eq!(known.fanned_out(&channel, &e1, 11), FanoutCheck::Repeated);
        assert_eq!(known.get("route:1"), Some((e1.clone(), 15)), "the repeat does not lower what is known");
        // A jump ahead is not this check's concern (the owner resyncs on gaps).
        assert_eq!(known.fanned_out(&channel, &e1, 40), FanoutCheck::InOrder);
        // A new epoch is announced with offset 0 and starts again.
        assert_eq!(known.fanned_out(&channel, &e2, 0), FanoutCheck::InOrder);
        assert_eq!(known.fanned_out(&channel, &e2, 1), FanoutCheck::InOrder);
        assert_eq!(known.fanned_out(&channel, &e2, 1), FanoutCheck::Repeated);
    }

    #[test]
    fn it_stays_within_its_capacity() {
        let mut known = KnownPositions::new(2);
        let e = arc("e");
        for i in 0..5 {
            known.saw(&arc(&format!("c{i}")), &e, 1);
        }
        assert_eq!(known.len(), 2);
        assert!(known.get("c4").is_none());
        known.retain(|channel| channel == "c0");
        known.saw(&arc("c4"), &e, 7);
        assert_eq!(known.get("c4"), Some((e, 7)));
    }
}
