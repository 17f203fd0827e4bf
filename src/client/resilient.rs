//! A client that survives the network: it tracks the last offset seen on every channel,
//! reconnects by itself with exponential backoff and jitter, resubscribes from those
//! positions, reports per channel whether recovery succeeded, and recovers a channel by
//! itself when it sees a gap in offsets.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use super::{Client, ClientError, ConnectOptions};
use crate::protocol::pb::{self, server_frame::Kind, RecoveryFailure, UpdateType};

/// Reconnect timing: the n-th retry waits `initial * factor^n`, capped at `max`, with jitter
/// (a random 50–100 % of that), so a fleet of phones does not return in lockstep.
#[derive(Debug, Clone)]
pub struct Backoff {
    pub initial: Duration,
    pub factor: f64,
    pub max: Duration,
    /// Give up after this many failed attempts in a row (`None`: never).
    pub max_retries: Option<u32>,
}

impl Default for Backoff {
    fn default() -> Self {
        Self { initial: Duration::from_secs(1), factor: 2.0, max: Duration::from_secs(30), max_retries: None }
    }
}

impl Backoff {
    /// The wait before retry `attempt` (0-based), given `jitter` in 0..=1.
    pub fn delay(&self, attempt: u32, jitter: f64) -> Duration {
        let exponential = self.initial.as_secs_f64() * self.factor.powi(attempt.min(64) as i32);
        let capped = exponential.min(self.max.as_secs_f64());
        Duration::from_secs_f64(capped * (0.5 + 0.5 * jitter.clamp(0.0, 1.0)))
    }
}

/// What became of one channel's subscription after a reconnect or a gap.
#[derive(Debug, Clone, PartialEq)]
pub struct ChannelRecovery {
    pub channel: Arc<str>,
    /// Every missed update follows, in order. When false, resync from the source of truth:
    /// updates continue after `offset`.
    pub recovered: bool,
    pub failure: RecoveryFailure,
    pub epoch: String,
    pub offset: u64,
}

/// What the application sees.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// The next update of `channel`, in offset order, never twice.
    Update { channel: Arc<str>, update: pb::Update },
    /// The connection came back after `attempts` tries; how each channel fared.
    Reconnected { attempts: u32, channels: Vec<ChannelRecovery> },
    /// A gap in offsets was seen on a channel and recovery was attempted.
    GapRecovered(ChannelRecovery),
    /// The token was replaced in-band; it now expires at this Unix time.
    TokenRefreshed { expires_at_unix: u64 },
}

/// Counters for the application's own metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResilienceStats {
    pub reconnects: u64,
    pub gaps_detected: u64,
    pub recoveries_succeeded: u64,
    pub recoveries_failed: u64,
    pub refreshes: u64,
    pub refresh_failures: u64,
}

/// Where an arriving offset stands relative to the last one seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sequence {
    Next,
    Duplicate,
    Gap,
}

/// Classifies `offset` after `last` (offsets of a channel are consecutive within an epoch),
/// given that the server said it `skipped` that many lower-priority updates before this one.
pub fn sequence(last: u64, offset: u64, skipped: u32) -> Sequence {
    if offset <= last {
        Sequence::Duplicate
    } else if offset == last + 1 + u64::from(skipped) {
        Sequence::Next
    } else {
        Sequence::Gap
    }
}

#[derive(Debug)]
struct Tracked {
    epoch: String,
    offset: u64,
    sub_id: u32,
}

pub struct ResilientClient {
    /// The nodes to use, tried in turn from `next_node` whenever a connection fails.
    nodes: Vec<SocketAddr>,
    next_node: usize,
    options: ConnectOptions,
    backoff: Backoff,
    client: Option<Client>,
    channels: BTreeMap<Arc<str>, Tracked>,
    by_sub: HashMap<u32, Arc<str>>,
    events: VecDeque<Event>,
    stats: ResilienceStats,
    ever_connected: bool,
    /// When the current token expires (Unix seconds; 0 = never).
    expires_at_unix: u64,
    /// No refresh is tried before this Unix time (after a failed one).
    refresh_not_before: u64,
}

impl ResilientClient {
    /// Connects (retrying with `backoff`) to `addr`.
    pub async fn connect(addr: SocketAddr, options: ConnectOptions, backoff: Backoff) -> Result<Self, ClientError> {
        Self::connect_any(vec![addr], options, backoff).await
    }

    /// Connects to the first of `nodes` that answers (nodes sharing one Redis); a lost
    /// connection moves on to the next node, so recovery happens wherever the client lands.
    pub async fn connect_any(
        nodes: Vec<SocketAddr>,
        options: ConnectOptions,
        backoff: Backoff,
    ) -> Result<Self, ClientError> {
        if nodes.is_empty() {
            return Err(ClientError::Handshake("no node to connect to".into()));
        }
        let mut this = Self {
            nodes,
            next_node: 0,
            options,
            backoff,
            client: None,
            channels: BTreeMap::new(),
            by_sub: HashMap::new(),
            events: VecDeque::new(),
            stats: ResilienceStats::default(),
            ever_connected: false,
            expires_at_unix: 0,
            refresh_not_before: 0,
        };
        this.reconnect().await?;
        Ok(this)
    }

    pub fn stats(&self) -> &ResilienceStats {
        &self.stats
    }

    /// The epoch and last offset seen on `channel`.
    pub fn position(&self, channel: &str) -> Option<(&str, u64)> {
        self.channels.get(channel).map(|t| (t.epoch.as_str(), t.offset))
    }

    /// Subscribes to `channel`; updates start after the offset in the returned result.
    pub async fn subscribe(&mut self, channel: &str) -> Result<pb::SubscribeResult, ClientError> {
        let result = self.connected()?.subscribe(channel).await?;
        self.track(Arc::from(channel), &result);
        Ok(result)
    }

    /// Publishes on the current connection.
    pub async fn publish(
        &mut self,
        channel: &str,
        update_type: UpdateType,
        key: &str,
        payload: Vec<u8>,
    ) -> Result<pb::PublishResult, ClientError> {
        self.connected()?.publish(channel, update_type, key, payload).await
    }

    /// Drops the current connection as a network failure would; the next `next_event`
    /// reconnects and recovers.
    pub fn interrupt(&mut self) {
        self.client = None;
    }

    /// The node the current (or last) connection went to.
    pub fn node(&self) -> SocketAddr {
        self.nodes[self.next_node % self.nodes.len()]
    }

    /// The next event. Connection failures are handled inside; an error means the server
    /// said not to reconnect, or `max_retries` ran out.
    pub async fn next_event(&mut self) -> Result<Event, ClientError> {
        loop {
            if let Some(event) = self.events.pop_front() {
                return Ok(event);
            }
            let Some(client) = self.client.as_mut() else {
                self.reconnect().await?;
                continue;
            };
            let frame = match client.next_frame().await {
                Ok(frame) => frame,
                Err(_) => {
                    self.client = None;
                    continue;
                }
            };
            let reminded = matches!(frame.kind, Some(Kind::TokenExpiring(_)));
            if let Some(event) = self.refresh_if_due(reminded).await {
                self.events.push_back(event);
            }
            match frame.kind {
                Some(Kind::Update(update)) => {
                    if let Some(event) = self.on_update(update).await? {
                        return Ok(event);
                    }
                }
                Some(Kind::Disconnect(disconnect)) if !disconnect.reconnect => {
                    return Err(ClientError::Disconnected(disconnect));
                }
                Some(Kind::Disconnect(_)) => {
                    // Told to go elsewhere (a draining node): start with the next one.
                    self.next_node = self.next_node.wrapping_add(1);
                    self.client = None;
                }
                _ => {}
            }
        }
    }

    /// Refreshes the token in-band when it is within the threshold of expiring (or the server
    /// reminded), if the options give a token source.
    async fn refresh_if_due(&mut self, reminded: bool) -> Option<Event> {
        let source = self.options.token_source.clone()?;
        if self.expires_at_unix == 0 {
            return None;
        }
        let now = unix_now();
        let due = now.saturating_add(self.options.refresh_threshold.as_secs()) >= self.expires_at_unix;
        if !(due || reminded) || now < self.refresh_not_before {
            return None;
        }
        let refreshed = match source.fetch().await {
            Ok(token) => match self.client.as_mut()?.refresh(token).await {
                Ok(result) => Some(result.expires_at_unix),
                Err(_) => None,
            },
            Err(_) => None,
        };
        match refreshed {
            Some(expires_at_unix) => {
                self.stats.refreshes += 1;
                self.expires_at_unix = expires_at_unix;
                Some(Event::TokenRefreshed { expires_at_unix })
            }
            None => {
                self.stats.refresh_failures += 1;
                self.refresh_not_before = now + 5;
                None
            }
        }
    }

    async fn on_update(&mut self, update: pb::Update) -> Result<Option<Event>, ClientError> {
        let Some(channel) = self.by_sub.get(&update.sub_id).cloned() else { return Ok(None) };
        let Some(tracked) = self.channels.get_mut(&channel) else { return Ok(None) };
        match sequence(tracked.offset, update.offset, update.skipped) {
            Sequence::Next => {
                tracked.offset = update.offset;
                Ok(Some(Event::Update { channel, update }))
            }
            Sequence::Duplicate => Ok(None),
            Sequence::Gap => {
                self.stats.gaps_detected += 1;
                let old_sub = tracked.sub_id;
                self.by_sub.remove(&old_sub);
                let client = self.connected()?;
                // Updates still queued on the old subscription are ignored from here on.
                let _ = client.unsubscribe(old_sub).await;
                match self.resubscribe(&channel).await {
                    Ok(recovery) => Ok(Some(Event::GapRecovered(recovery))),
                    Err(_) => {
                        self.client = None;
                        Ok(None)
                    }
                }
            }
        }
    }

    fn connected(&mut self) -> Result<&mut Client, ClientError> {
        self.client.as_mut().ok_or(ClientError::Closed(None))
    }

    fn track(&mut self, channel: Arc<str>, result: &pb::SubscribeResult) {
        self.by_sub.insert(result.sub_id, channel.clone());
        self.channels
            .insert(channel, Tracked { epoch: result.epoch.clone(), offset: result.offset, sub_id: result.sub_id });
    }

    /// Subscribes `channel` again from its last position and records the outcome.
    async fn resubscribe(&mut self, channel: &Arc<str>) -> Result<ChannelRecovery, ClientError> {
        let (epoch, offset) = match self.channels.get(channel) {
            Some(t) => (t.epoch.clone(), t.offset),
            None => (String::new(), 0),
        };
        let result = self.connected()?.subscribe_from(channel, &epoch, offset).await?;
        let recovered = result.recovered;
        if recovered {
            self.stats.recoveries_succeeded += 1;
            // Recovered updates follow and advance the offset one by one.
            self.by_sub.insert(result.sub_id, channel.clone());
            if let Some(t) = self.channels.get_mut(channel) {
                t.sub_id = result.sub_id;
            }
        } else {
            self.stats.recoveries_failed += 1;
            self.track(channel.clone(), &result);
        }
        Ok(ChannelRecovery {
            channel: channel.clone(),
            recovered,
            failure: RecoveryFailure::try_from(result.recovery_failure).unwrap_or(RecoveryFailure::None),
            epoch: result.epoch,
            offset: result.offset,
        })
    }

    /// Connects again (with backoff) and resubscribes every channel from its position.
    async fn reconnect(&mut self) -> Result<(), ClientError> {
        let mut attempt = 0u32;
        loop {
            // A first connection tries at once; a lost one waits first, so a fleet spreads out.
            if attempt > 0 || self.ever_connected {
                let retry = if self.ever_connected { attempt } else { attempt - 1 };
                compio::time::sleep(self.backoff.delay(retry, rand::random::<f64>())).await;
            }
            attempt += 1;
            match self.try_reconnect().await {
                Ok(channels) => {
                    if self.ever_connected {
                        self.stats.reconnects += 1;
                        self.events.push_back(Event::Reconnected { attempts: attempt, channels });
                    }
                    self.ever_connected = true;
                    return Ok(());
                }
                Err(err @ ClientError::Disconnected(pb::Disconnect { reconnect: false, .. })) => return Err(err),
                Err(err) => {
                    self.client = None;
                    if self.backoff.max_retries.is_some_and(|max| attempt >= max) {
                        return Err(err);
                    }
                }
            }
        }
    }

    async fn try_reconnect(&mut self) -> Result<Vec<ChannelRecovery>, ClientError> {
        let node = self.nodes[self.next_node % self.nodes.len()];
        if let Some(source) = &self.options.token_source {
            self.options.token = source.fetch().await.map_err(ClientError::Handshake)?;
        }
        let (client, info) = match Client::connect(node, self.options.clone()).await {
            Ok(connected) => connected,
            Err(err) => {
                self.next_node = self.next_node.wrapping_add(1);
                return Err(err);
            }
        };
        self.expires_at_unix = info.expires_at_unix;
        self.refresh_not_before = 0;
        self.client = Some(client);
        self.by_sub.clear();
        let channels: Vec<Arc<str>> = self.channels.keys().cloned().collect();
        let mut outcomes = Vec::with_capacity(channels.len());
        for channel in channels {
            outcomes.push(self.resubscribe(&channel).await?);
        }
        Ok(outcomes)
    }
}

fn unix_now() -> u64 {
    crate::core::unix_us() / 1_000_000
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_by_factor_caps_and_jitters_within_half() {
        let backoff = Backoff::default();
        assert_eq!(backoff.delay(0, 1.0), Duration::from_secs(1));
        assert_eq!(backoff.delay(3, 1.0), Duration::from_secs(8));
        assert_eq!(backoff.delay(10, 1.0), Duration::from_secs(30));
        assert_eq!(backoff.delay(3, 0.0), Duration::from_secs(4));
        assert!(backoff.delay(2, 0.3) > Duration::from_secs(2) && backoff.delay(2, 0.3) < Duration::from_secs(4));
    }

    #[test]
    fn offsets_classify_as_next_duplicate_or_gap() {
        assert_eq!(sequence(10, 11, 0), Sequence::Next);
        assert_eq!(sequence(10, 10, 0), Sequence::Duplicate);
        assert_eq!(sequence(10, 3, 0), Sequence::Duplicate);
        assert_eq!(sequence(10, 12, 0), Sequence::Gap);
        assert_eq!(sequence(0, 1, 0), Sequence::Next);
        // Updates the server skipped for a slow connection are not a gap.
        assert_eq!(sequence(10, 14, 3), Sequence::Next);
        assert_eq!(sequence(10, 14, 2), Sequence::Gap);
    }
}
