//! A session's subscriptions in one vector sorted by `sub_id`: a client holds a handful, for
//! which this is a fraction of the memory two hash maps took (every idle connection pays it),
//! and a lookup by id is a binary search. Only subscribing looks up a channel, by a scan.

use super::Subscription;

#[derive(Debug, Default)]
pub(super) struct Subscriptions {
    entries: Vec<(u32, Subscription)>,
}

/// Below this many subscriptions the vector grows one slot at a time (no spare room on an idle
/// connection); from here on it doubles.
const EXACT_UP_TO: usize = 4;

impl Subscriptions {
    fn position(&self, sub_id: u32) -> Result<usize, usize> {
        self.entries.binary_search_by_key(&sub_id, |(id, _)| *id)
    }

    pub fn get_mut(&mut self, sub_id: u32) -> Option<&mut Subscription> {
        let index = self.position(sub_id).ok()?;
        Some(&mut self.entries[index].1)
    }

    pub fn contains(&self, sub_id: u32) -> bool {
        self.position(sub_id).is_ok()
    }

    pub fn has_channel(&self, channel: &str) -> bool {
        self.entries.iter().any(|(_, sub)| &*sub.channel == channel)
    }

    /// Adds `sub` under `sub_id` (replacing one with that id).
    pub fn insert(&mut self, sub_id: u32, sub: Subscription) {
        match self.position(sub_id) {
            Ok(index) => self.entries[index].1 = sub,
            Err(index) => {
                if self.entries.len() == self.entries.capacity() && self.entries.len() < EXACT_UP_TO {
                    self.entries.reserve_exact(1);
                }
                self.entries.insert(index, (sub_id, sub));
            }
        }
    }

    pub fn remove(&mut self, sub_id: u32) -> Option<Subscription> {
        let index = self.position(sub_id).ok()?;
        let (_, sub) = self.entries.remove(index);
        if self.entries.is_empty() {
            self.entries = Vec::new();
        }
        Some(sub)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn iter(&self) -> impl Iterator<Item = (u32, &Subscription)> {
        self.entries.iter().map(|(id, sub)| (*id, sub))
    }

    pub fn iter_mut(&mut self) -> impl Iterator<Item = (u32, &mut Subscription)> {
        self.entries.iter_mut().map(|(id, sub)| (*id, sub))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn sub(channel: &str) -> Subscription {
        Subscription { channel: Arc::from(channel), active: false, acks: None }
    }

    #[test]
    fn ids_stay_sorted_and_found_whatever_the_insert_order() {
        let mut subs = Subscriptions::default();
        for id in [5, 1, 9, 3, u32::MAX, 2] {
            subs.insert(id, sub(&format!("c:{id}")));
        }
        assert_eq!(subs.iter().map(|(id, _)| id).collect::<Vec<_>>(), vec![1, 2, 3, 5, 9, u32::MAX]);
        assert!(subs.contains(9) && !subs.contains(4));
        assert!(subs.has_channel("c:3") && !subs.has_channel("c:4"));
        subs.get_mut(3).unwrap().active = true;
        assert!(subs.iter().any(|(id, s)| id == 3 && s.active));
        assert_eq!(&*subs.remove(3).unwrap().channel, "c:3");
        assert!(subs.remove(3).is_none());
        assert_eq!(subs.len(), 5);
    }

    #[test]
    fn a_few_subscriptions_take_no_spare_room_and_none_take_nothing() {
        let mut subs = Subscriptions::default();
        subs.insert(1, sub("a"));
        assert_eq!(subs.entries.capacity(), 1);
        subs.insert(2, sub("b"));
        assert_eq!(subs.entries.capacity(), 2);
        subs.remove(1);
        subs.remove(2);
        assert_eq!(subs.entries.capacity(), 0);
    }
}
