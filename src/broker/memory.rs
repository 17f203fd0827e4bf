//! The embedded broker: the channels one shard owns, each with its epoch, its latest offset
//! and how many subscribers each shard has. Pure state; the shard moves the messages.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// State of one owned channel.
#[derive(Debug)]
struct Channel {
    epoch: Arc<str>,
    offset: u64,
    /// Subscribers per shard; the owner fans out to the shards with a non-zero count.
    subscribers: Vec<u32>,
    last_used: Instant,
}

/// The channels a shard owns. Created on first use, forgotten after `idle_ttl` without
/// subscribers or publications (a later use starts a new epoch, so clients see the loss).
#[derive(Debug)]
pub struct ChannelTable {
    shards: usize,
    max_channels: usize,
    channels: HashMap<Arc<str>, Channel>,
}

/// The table holds `max_channels` channels and may not create another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TableFull;

/// Where a channel stands: its epoch and the offset of its latest publication (0 = none).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    pub epoch: Arc<str>,
    pub offset: u64,
}

impl ChannelTable {
    pub fn new(shards: usize, max_channels: usize) -> Self {
        Self { shards, max_channels, channels: HashMap::new() }
    }

    fn channel(&mut self, name: &Arc<str>, now: Instant) -> Result<&mut Channel, TableFull> {
        let shards = self.shards;
        if self.channels.len() >= self.max_channels && !self.channels.contains_key(name) {
            return Err(TableFull);
        }
        let channel = self.channels.entry(name.clone()).or_insert_with(|| Channel {
            epoch: new_epoch(),
            offset: 0,
            subscribers: vec![0; shards],
            last_used: now,
        });
        channel.last_used = now;
        Ok(channel)
    }

    /// Counts one more subscriber on `shard` and says where the channel stands.
    pub fn subscribe(&mut self, name: &Arc<str>, shard: usize, now: Instant) -> Result<Position, TableFull> {
        let channel = self.channel(name, now)?;
        channel.subscribers[shard] += 1;
        Ok(Position { epoch: channel.epoch.clone(), offset: channel.offset })
    }

    /// Counts one subscriber fewer on `shard`.
    pub fn unsubscribe(&mut self, name: &str, shard: usize, now: Instant) {
        if let Some(channel) = self.channels.get_mut(name) {
            channel.subscribers[shard] = channel.subscribers[shard].saturating_sub(1);
            channel.last_used = now;
        }
    }

    /// Assigns the next offset and returns it with the shards that have subscribers.
    pub fn publish(&mut self, name: &Arc<str>, now: Instant, targets: &mut Vec<usize>) -> Result<Position, TableFull> {
        let channel = self.channel(name, now)?;
        channel.offset += 1;
        targets.clear();
        targets.extend(channel.subscribers.iter().enumerate().filter(|(_, &n)| n > 0).map(|(shard, _)| shard));
        Ok(Position { epoch: channel.epoch.clone(), offset: channel.offset })
    }

    /// Forgets channels with no subscribers that were unused for `idle_ttl`. Returns how many.
    pub fn sweep(&mut self, now: Instant, idle_ttl: Duration) -> usize {
        let before = self.channels.len();
        self.channels.retain(|_, c| c.subscribers.iter().any(|&n| n > 0) || now.duration_since(c.last_used) < idle_ttl);
        before - self.channels.len()
    }

    pub fn len(&self) -> usize {
        self.channels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.channels.is_empty()
    }
}

/// A fresh random epoch: 16 hex digits.
fn new_epoch() -> Arc<str> {
    Arc::from(format!("{:016x}", rand::random::<u64>()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_increase_by_one_and_fan_out_follows_subscribers() {
        let now = Instant::now();
        let mut table = ChannelTable::new(3, 100);
        let name: Arc<str> = Arc::from("route:1");
        let start = table.subscribe(&name, 2, now).unwrap();
        assert_eq!(start.offset, 0);
        let mut targets = Vec::new();
        for expected in 1..=5 {
            let pos = table.publish(&name, now, &mut targets).unwrap();
            assert_eq!(pos, Position { epoch: start.epoch.clone(), offset: expected });
            assert_eq!(targets, vec![2]);
        }
        table.subscribe(&name, 0, now).unwrap();
        table.publish(&name, now, &mut targets).unwrap();
        assert_eq!(targets, vec![0, 2]);
        table.unsubscribe(&name, 2, now);
        table.publish(&name, now, &mut targets).unwrap();
        assert_eq!(targets, vec![0]);
    }

    #[test]
    fn idle_channels_are_forgotten_and_come_back_with_a_new_epoch() {
        let t0 = Instant::now();
        let mut table = ChannelTable::new(1, 100);
        let idle: Arc<str> = Arc::from("poi:idle");
        let held: Arc<str> = Arc::from("poi:held");
        let first = table.publish(&idle, t0, &mut Vec::new()).unwrap();
        table.subscribe(&held, 0, t0).unwrap();
        let later = t0 + Duration::from_secs(600);
        assert_eq!(table.sweep(later, Duration::from_secs(300)), 1);
        assert_eq!(table.len(), 1);
        let again = table.publish(&idle, later, &mut Vec::new()).unwrap();
        assert_eq!(again.offset, 1);
        assert_ne!(again.epoch, first.epoch);
    }

    #[test]
    fn a_full_table_refuses_new_channels_but_serves_known_ones() {
        let now = Instant::now();
        let mut table = ChannelTable::new(1, 2);
        let (a, b, c): (Arc<str>, Arc<str>, Arc<str>) = (Arc::from("a"), Arc::from("b"), Arc::from("c"));
        table.publish(&a, now, &mut Vec::new()).unwrap();
        table.subscribe(&b, 0, now).unwrap();
        assert_eq!(table.publish(&c, now, &mut Vec::new()), Err(TableFull));
        assert_eq!(table.subscribe(&c, 0, now), Err(TableFull));
        assert_eq!(table.publish(&a, now, &mut Vec::new()).unwrap().offset, 2);
    }
}
