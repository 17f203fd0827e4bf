//! The embedded broker: the channels one shard owns, each with its epoch, its latest offset,
//! its recent publications (history) and how many subscribers each shard has. Pure state with
//! `now` passed in; the shard moves the messages.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::core::FastMap;
use crate::core::{HistoryPage, Position, Publication, Recovery, RecoveryFailure};
use hashbrown::hash_map::RawEntryMut;

/// How much history each channel keeps, and what a recovery may ask of it.
#[derive(Debug, Clone)]
pub struct HistoryPolicy {
    /// Publications kept per channel.
    pub size: usize,
    /// How long a publication stays in history.
    pub ttl: Duration,
    /// A recovery whose first missed publication is older than this is refused.
    pub recovery_window: Duration,
    /// A recovery of more publications than this is refused.
    pub max_recovery_messages: usize,
    /// A recovery of more payload bytes than this is refused (it must fit the outbox).
    pub max_recovery_bytes: usize,
    /// A channel without subscribers and history is forgotten after this long unused.
    pub idle_ttl: Duration,
    /// Identities whose acknowledged position a channel remembers.
    pub max_positions: usize,
    /// An identity's position not acknowledged for this long is forgotten.
    pub position_ttl: Duration,
}

/// What became of a publication an external broker fanned out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FanoutOutcome {
    /// New: deliver it.
    Fresh,
    /// Already delivered (or older): skip it.
    Seen,
    /// From a new epoch: local subscribers must resync.
    EpochChanged,
    /// Offsets between the last one fanned out here and this one never arrived (the node
    /// lost Redis for a while): local subscribers must resync.
    Gap,
}

/// A channel as an operator lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelSummary {
    pub name: Arc<str>,
    pub subscribers: u64,
    pub position: Position,
}

impl HistoryPolicy {
    /// The history policy every owner shard applies under `config`.
    pub fn from_config(config: &crate::config::Config) -> Self {
        let h = &config.history;
        Self {
            size: h.size,
            ttl: h.ttl,
            recovery_window: h.recovery_window,
            max_recovery_messages: h.max_recovery_messages,
            // A recovery must fit the outbox with room to spare for live updates.
            max_recovery_bytes: config.limits.max_outbox_bytes / 2,
            idle_ttl: h.channel_idle_ttl,
            max_positions: config.acks.max_positions_per_channel,
            position_ttl: config.cleanup.max_inactive,
        }
    }
}

/// The table holds its most channels and may not create another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TableFull;

/// State of one owned channel.
#[derive(Debug)]
struct Channel {
    epoch: Arc<str>,
    offset: u64,
    /// Subscribers per shard; the owner fans out to the shards with a non-zero count.
    subscribers: Vec<u32>,
    /// The latest publications, oldest first, offsets consecutive and ending at `offset`.
    history: VecDeque<Arc<Publication>>,
    /// The last offset each identity acknowledged, for resuming without client state.
    /// Per identity: the highest acknowledged offset and when it was last acknowledged.
    acked: HashMap<Arc<str>, (u64, Instant)>,
    /// With an external broker: whether `epoch` and `offset` follow the broker's from a
    /// position it gave since the node began listening (`learn`, `observe`), so that a jump
    /// or another epoch in its fan-out means something was missed. Fan-outs before that
    /// (some from before the node last stopped listening) only say where it has got to.
    mirrored: bool,
    last_used: Instant,
}

impl Channel {
    fn position(&self) -> Position {
        Position { epoch: self.epoch.clone(), offset: self.offset }
    }

    fn expire(&mut self, now: Instant, ttl: Duration) {
        while self.history.front().is_some_and(|p| now.saturating_duration_since(p.accepted_at) > ttl) {
            self.history.pop_front();
        }
    }

    /// Appends `publication` to a history of at most `size` (at least 1), the oldest giving way.
    fn keep(&mut self, publication: Arc<Publication>, size: usize) {
        if self.history.len() >= size {
            self.history.pop_front();
        }
        self.history.push_back(publication);
        // Freeing the oldest publication, written a whole history ago, was a cache miss on
        // every publish of a full history. Loads start a publish ahead: the lines of the one
        // after next, and the body of the next one (whose lines the last publish loaded).
        #[cfg(target_arch = "x86_64")]
        if self.history.len() >= size {
            use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
            let lines = |publication: &Arc<Publication>| {
                // Its counts (two words before) to its last byte: at most three lines.
                let at = Arc::as_ptr(publication).cast::<i8>();
                [at.wrapping_sub(16), at.wrapping_add(48), at.wrapping_add(size_of::<Publication>() - 1)]
            };
            let next_body = self.history.front().map(|next| next.body.as_ptr().cast::<i8>());
            let after_next = self.history.get(1).map(lines);
            for at in next_body.into_iter().chain(after_next.into_iter().flatten()) {
                // SAFETY: SSE is part of x86_64; a prefetch is a hint, never a read, so any
                // address will do.
                unsafe { _mm_prefetch::<_MM_HINT_T0>(at) };
            }
        }
    }

    /// With an external broker: follows the broker's fan-out from `offset` of `epoch`, a
    /// position it gave after the node began listening. Fan-outs that came first and went
    /// past it stay (a joining subscriber catches up on them).
    fn follow_from(&mut self, epoch: &Arc<str>, offset: u64) {
        if self.epoch == *epoch {
            self.offset = self.offset.max(offset);
        } else {
            self.epoch = epoch.clone();
            self.offset = offset;
            self.history.clear();
        }
        self.mirrored = true;
    }

    /// Index in `history` of the publication with `offset`, if still held.
    fn index_of(&self, offset: u64) -> Option<usize> {
        let first = self.history.front()?.offset;
        (offset >= first && offset <= self.offset).then(|| (offset - first) as usize)
    }
}

/// The channels a shard owns. Created on first use; forgotten once they have no subscribers
/// and no history and were unused for `idle_ttl` (a later use starts a new epoch).
#[derive(Debug)]
pub struct ChannelTable {
    shards: usize,
    max_channels: usize,
    policy: HistoryPolicy,
    channels: FastMap<Arc<str>, Channel>,
}

impl ChannelTable {
    pub fn new(shards: usize, max_channels: usize, policy: HistoryPolicy) -> Self {
        Self { shards, max_channels, policy, channels: FastMap::default() }
    }

    fn channel(&mut self, name: &str, now: Instant) -> Result<&mut Channel, TableFull> {
        self.named_channel(name, now).map(|(_, channel)| channel)
    }

    /// The channel `name` (created if new and there is room) and the table's name for it.
    fn named_channel(&mut self, name: &str, now: Instant) -> Result<(&Arc<str>, &mut Channel), TableFull> {
        let full = self.channels.len() >= self.max_channels;
        let (name, channel) = match self.channels.raw_entry_mut().from_key(name) {
            RawEntryMut::Occupied(entry) => entry.into_key_value(),
            RawEntryMut::Vacant(_) if full => return Err(TableFull),
            RawEntryMut::Vacant(entry) => entry.insert(
                Arc::from(name),
                Channel {
                    epoch: new_epoch(),
                    offset: 0,
                    subscribers: vec![0; self.shards],
                    history: VecDeque::new(),
                    acked: HashMap::new(),
                    mirrored: false,
                    last_used: now,
                },
            ),
        };
        channel.last_used = now;
        Ok((name, channel))
    }

    /// Counts one more subscriber on `shard`. With `since` (the epoch and offset of the last
    /// publication the client saw), or else the position `resume` last acknowledged, also says
    /// which publications it missed, or why it cannot.
    pub fn subscribe(
        &mut self,
        name: &Arc<str>,
        shard: usize,
        now: Instant,
        since: Option<&Position>,
        resume: Option<&str>,
    ) -> Result<(Position, Option<Recovery>), TableFull> {
        let policy = self.policy.clone();
        let channel = self.channel(name, now)?;
        // Expired publications go where they are read (here, `history`) and at the sweep; a
        // publish leaves them, as reaching the oldest one costs a cache miss each time.
        channel.expire(now, policy.ttl);
        channel.subscribers[shard] += 1;
        let acked = resume.and_then(|identity| channel.acked.get(identity)).map(|&(offset, _)| offset);
        let resumed = acked.map(|offset| Position { epoch: channel.epoch.clone(), offset });
        let recovery = since
            .or(resumed.as_ref())
            .map(|since| recover(&channel.epoch, channel.offset, &channel.history, since, now, &policy));
        Ok((channel.position(), recovery))
    }

    /// Remembers that `identity` processed `name` up to `offset` of `epoch` (the highest
    /// wins); an acknowledgement of another epoch than the channel's is ignored.
    pub fn ack(&mut self, name: &str, identity: &Arc<str>, epoch: &str, offset: u64, now: Instant) {
        let Some(channel) = self.channels.get_mut(name) else { return };
        if *channel.epoch != *epoch {
            return;
        }
        let offset = offset.min(channel.offset);
        let room = channel.acked.len() < self.policy.max_positions;
        match channel.acked.get_mut(identity) {
            Some(acked) => *acked = (acked.0.max(offset), now),
            None if room => {
                channel.acked.insert(identity.clone(), (offset, now));
            }
            None => {}
        }
    }

    /// Counts one subscriber fewer on `shard`; returns whether the node has none left. With
    /// an external broker the node stops hearing the channel then, so what it knew of it no
    /// longer holds: the next subscriber starts from the broker's position.
    pub fn unsubscribe(&mut self, name: &str, shard: usize, now: Instant) -> bool {
        let Some(channel) = self.channels.get_mut(name) else { return false };
        channel.subscribers[shard] = channel.subscribers[shard].saturating_sub(1);
        channel.last_used = now;
        let none_left = channel.subscribers.iter().all(|&n| n == 0);
        if none_left && channel.mirrored {
            channel.mirrored = false;
            channel.history.clear();
        }
        none_left
    }

    /// With an external broker: counts one more subscriber on `shard`; returns whether it is
    /// the node's first for the channel (time to listen to it).
    pub fn add_subscriber(&mut self, name: &Arc<str>, shard: usize, now: Instant) -> Result<bool, TableFull> {
        let channel = self.channel(name, now)?;
        let first = channel.subscribers.iter().all(|&n| n == 0);
        channel.subscribers[shard] += 1;
        Ok(first)
    }

    /// With an external broker: a publication it fanned out to this node. Keeps it (for
    /// subscribers that join while it travels) and fills `targets` with the shards to deliver
    /// to (none for one already seen). A different epoch means the broker lost the channel's
    /// history, and an offset past the next one means publications never reached this node:
    /// either way the local subscribers must resync, as nothing may be skipped silently.
    pub fn mirror(
        &mut self,
        epoch: &Arc<str>,
        publication: &Arc<Publication>,
        now: Instant,
        targets: &mut Vec<usize>,
    ) -> FanoutOutcome {
        let size = self.policy.size.max(1);
        targets.clear();
        let Some(channel) = self.channels.get_mut(&publication.channel) else { return FanoutOutcome::Seen };
        channel.last_used = now;
        let mut outcome = FanoutOutcome::Fresh;
        if channel.epoch != *epoch {
            if channel.mirrored {
                outcome = FanoutOutcome::EpochChanged;
            }
            channel.epoch = epoch.clone();
            channel.history.clear();
            channel.offset = 0;
        } else if channel.mirrored && publication.offset > channel.offset.saturating_add(1) {
            outcome = FanoutOutcome::Gap;
            channel.history.clear();
        }
        if publication.offset <= channel.offset {
            return FanoutOutcome::Seen;
        }
        if channel.history.back().is_some_and(|last| last.offset + 1 != publication.offset) {
            channel.history.clear();
        }
        channel.keep(publication.clone(), size);
        channel.offset = publication.offset;
        targets.extend(channel.subscribers.iter().enumerate().filter(|(_, &n)| n > 0).map(|(shard, _)| shard));
        outcome
    }

    /// With an external broker: the epoch and offset a subscriber's position came with, kept
    /// when nothing was fanned out here yet (later publications tell the rest). A position in
    /// another epoch than the one fanned out here means one of them is gone: the table takes
    /// the position's, and the local subscribers (on the shards put in `targets`, the joining
    /// one not yet among them) must resync; returns whether they must. Should the position be
    /// the stale one, the next publication's epoch tells, and everyone resyncs then.
    pub fn learn(&mut self, name: &str, epoch: &Arc<str>, offset: u64, targets: &mut Vec<usize>) -> bool {
        targets.clear();
        let Some(channel) = self.channels.get_mut(name) else { return false };
        if channel.mirrored && channel.epoch == *epoch {
            return false;
        }
        let changed = channel.mirrored;
        if changed {
            channel.mirrored = false;
            channel.history.clear();
        }
        channel.follow_from(epoch, offset);
        if changed {
            targets.extend(channel.subscribers.iter().enumerate().filter(|(_, &n)| n > 0).map(|(shard, _)| shard));
        }
        changed
    }

    /// With an external broker: where the broker says the channel stands (offset 0: only that
    /// a new epoch began). Says whether local subscribers may have missed publications and
    /// must resync: `EpochChanged`, or `Gap` (offsets past what was fanned out here); `Seen`
    /// when nothing changed. Fills `targets` with their shards when they must.
    pub fn observe(&mut self, name: &str, epoch: &Arc<str>, offset: u64, targets: &mut Vec<usize>) -> FanoutOutcome {
        targets.clear();
        let Some(channel) = self.channels.get_mut(name) else { return FanoutOutcome::Seen };
        if !channel.mirrored {
            // A new epoch's announcement says nothing of where it stands: the joining
            // subscriber's position will.
            if offset > 0 {
                channel.follow_from(epoch, offset);
            }
            return FanoutOutcome::Seen;
        }
        // An offset below what was fanned out here is no news: fan-outs that came after the
        // position was read (Redis behind this node is caught by the scripts, see `known`).
        if channel.epoch == *epoch && offset <= channel.offset {
            return FanoutOutcome::Seen;
        }
        let outcome = if channel.epoch == *epoch { FanoutOutcome::Gap } else { FanoutOutcome::EpochChanged };
        channel.epoch = epoch.clone();
        channel.offset = offset;
        channel.history.clear();
        targets.extend(channel.subscribers.iter().enumerate().filter(|(_, &n)| n > 0).map(|(shard, _)| shard));
        outcome
    }

    /// With an external broker: publications this node already fanned out after `offset` in
    /// `epoch` (a joining subscriber's position may predate them), every one of them; `None`
    /// when this node did not hear them all (it lost Redis meanwhile), so the subscriber would
    /// start with a gap: it must ask again.
    pub fn fanned_out_after(&self, name: &str, epoch: &str, offset: u64) -> Option<Vec<Arc<Publication>>> {
        let channel = match self.channels.get(name) {
            Some(channel) if *channel.epoch == *epoch => channel,
            _ => return Some(Vec::new()),
        };
        if channel.offset <= offset {
            return Some(Vec::new());
        }
        let continues = channel.history.front().is_some_and(|first| first.offset <= offset + 1)
            && channel.history.back().is_some_and(|last| last.offset == channel.offset);
        continues.then(|| channel.history.iter().filter(|p| p.offset > offset).cloned().collect())
    }

    /// Assigns the next offset, builds the publication with `make(name, offset)` (`name`
    /// shared with the table), keeps it in history, and fills `targets` with the shards that
    /// have subscribers.
    pub fn publish(
        &mut self,
        name: &str,
        now: Instant,
        targets: &mut Vec<usize>,
        make: impl FnOnce(&Arc<str>, u64) -> Publication,
    ) -> Result<(Position, Arc<Publication>), TableFull> {
        let size = self.policy.size;
        let (name, channel) = self.named_channel(name, now)?;
        channel.offset += 1;
        let publication = Arc::new(make(name, channel.offset));
        if size > 0 {
            channel.keep(publication.clone(), size);
        }
        targets.clear();
        targets.extend(channel.subscribers.iter().enumerate().filter(|(_, &n)| n > 0).map(|(shard, _)| shard));
        Ok((channel.position(), publication))
    }

    /// Up to `limit` publications with offsets above `since`, oldest first. Unknown channels
    /// are not created: they answer an empty page with an empty epoch.
    pub fn history(&mut self, name: &str, since: u64, limit: usize, now: Instant) -> HistoryPage {
        let ttl = self.policy.ttl;
        let Some(channel) = self.channels.get_mut(name) else {
            return HistoryPage {
                position: Position { epoch: Arc::from(""), offset: 0 },
                publications: Vec::new(),
                truncated: false,
            };
        };
        channel.expire(now, ttl);
        let start = match channel.history.front() {
            Some(first) if since < first.offset => 0,
            Some(_) => channel.index_of(since).map_or(channel.history.len(), |i| i + 1),
            None => 0,
        };
        let first_wanted = since.saturating_add(1);
        let truncated = since < channel.offset && channel.history.front().is_none_or(|p| p.offset > first_wanted);
        let publications = channel.history.iter().skip(start).take(limit).cloned().collect();
        HistoryPage { position: channel.position(), publications, truncated }
    }

    /// Drops expired history and forgets idle channels. Returns how many were forgotten.
    pub fn sweep(&mut self, now: Instant) -> usize {
        let before = self.channels.len();
        let (ttl, idle_ttl, position_ttl) = (self.policy.ttl, self.policy.idle_ttl, self.policy.position_ttl);
        self.channels.retain(|_, c| {
            c.expire(now, ttl);
            c.acked.retain(|_, &mut (_, at)| now.saturating_duration_since(at) < position_ttl);
            c.subscribers.iter().any(|&n| n > 0)
                || !c.history.is_empty()
                || now.saturating_duration_since(c.last_used) < idle_ttl
        });
        before - self.channels.len()
    }

    /// Up to `limit` channels named `prefix…` and sorting after `after`, in name order, with
    /// their subscribers (all shards of this node) and position.
    pub fn list(&self, prefix: &str, after: &str, limit: usize) -> Vec<ChannelSummary> {
        let mut names: Vec<&Arc<str>> =
            self.channels.keys().filter(|name| name.starts_with(prefix) && &***name > after).collect();
        if names.len() > limit {
            names.select_nth_unstable(limit);
            names.truncate(limit);
        }
        names.sort_unstable();
        names
            .into_iter()
            .map(|name| {
                let channel = &self.channels[name];
                ChannelSummary {
                    name: name.clone(),
                    subscribers: channel.subscribers.iter().map(|&n| u64::from(n)).sum(),
                    position: channel.position(),
                }
            })
            .collect()
    }

    pub fn len(&self) -> usize {
        self.channels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.channels.is_empty()
    }

    /// Publications held in history over all channels.
    pub fn history_len(&self) -> usize {
        self.channels.values().map(|c| c.history.len()).sum()
    }
}

/// Every publication after `since`, or why they cannot all be given. Never partial.
/// `history` holds the channel's latest publications, oldest first, consecutive and ending
/// at `offset` (the embedded broker's own, or what Redis returned).
pub fn recover(
    epoch: &str,
    offset: u64,
    history: &VecDeque<Arc<Publication>>,
    since: &Position,
    now: Instant,
    policy: &HistoryPolicy,
) -> Recovery {
    if *since.epoch != *epoch {
        return Recovery::Refused(RecoveryFailure::EpochChanged);
    }
    if since.offset > offset {
        return Recovery::Refused(RecoveryFailure::OffsetAhead);
    }
    let missed = (offset - since.offset) as usize;
    if missed == 0 {
        return Recovery::Recovered(Vec::new());
    }
    if missed > policy.max_recovery_messages {
        return Recovery::Refused(RecoveryFailure::TooMany);
    }
    // Only a consecutive run ending at `offset` can be trusted (Redis streams may have holes).
    let first_held = match history.front() {
        Some(first)
            if history.back().is_some_and(|last| last.offset == offset)
                && offset.checked_sub(first.offset).is_some_and(|span| span + 1 == history.len() as u64) =>
        {
            first.offset
        }
        _ => return Recovery::Refused(RecoveryFailure::GapTooOld),
    };
    if since.offset + 1 < first_held {
        return Recovery::Refused(RecoveryFailure::GapTooOld);
    }
    let first = (since.offset + 1 - first_held) as usize;
    if now.saturating_duration_since(history[first].accepted_at) > policy.recovery_window {
        return Recovery::Refused(RecoveryFailure::WindowExceeded);
    }
    let bytes: usize = history.range(first..).map(|p| p.body.len()).sum();
    if bytes > policy.max_recovery_bytes {
        return Recovery::Refused(RecoveryFailure::TooMany);
    }
    Recovery::Recovered(history.range(first..).cloned().collect())
}

/// A fresh random epoch: 16 hex digits.
fn new_epoch() -> Arc<str> {
    Arc::from(format!("{:016x}", rand::random::<u64>()))
}

#[cfg(test)]
mod tests;
