//! One connection's protocol state machine, sans I/O.
//!
//! Call order (quinn-proto style): feed received bytes with [`Session::handle_bytes`]; then
//! take [`Session::poll_event`] until `None` and hand each event to the shard; answers from
//! the shard come back through [`Session::handle_subscribed`] and [`Session::handle_published`];
//! deliveries through [`Session::push_update`]. Whenever [`Session::wants_write`] is true, the
//! I/O driver takes the bytes to send with [`Session::poll_transmit`]. The session never reads
//! the clock: `now` is passed in.

use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::acks::{AckPolicy, AckTracker};
use crate::auth::{AuthFailure, Grant, Verifier};
use crate::compression::{SharedBatches, ZstdSettings};
use crate::config::{Bucket, Config};
use crate::core::ConnLabel;
use crate::core::{validate_channel, HistoryPage, Now, Position, Publication, Recovery, RecoveryFailure};
use crate::metrics::LocalMetrics;
use crate::outbox::{FanoutLog, OutItem, Outbox, Overflow, Pressure, SharedEncoding, ShedCounts};
use crate::protocol::client_frames;
use crate::protocol::envelope::{self, Dictionaries, EnvelopeError};
use crate::protocol::pb::{self, client_frame::Command, reply, server_frame::Kind, ClientMessage};
use crate::protocol::push::{encoded_frame, publish_result};
use crate::protocol::ws::{binary_header_len, write_data_header, WsEndpoint, WsEvent};
use crate::protocol::{CloseCode, ErrorCode};
use crate::ratelimit::{KeyedBuckets, TokenBucket};
use frame_log::FrameLog;
use subscriptions::Subscriptions;

/// Logs at debug about this session's connection: every such line names it (`conn`).
macro_rules! conn_debug {
    ($session:expr, $($rest:tt)+) => {
        tracing::debug!(conn = %$session.client_id, $($rest)+)
    };
}

/// Publications in a `History` reply when the client names no limit, and at most.
const HISTORY_DEFAULT_PAGE: usize = 100;
const HISTORY_MAX_PAGE: usize = 1000;
/// Full batches a lingering connection may hold before it writes without waiting for the
/// tick. One would make a connection that fills a batch per tick write twice per tick (the
/// full batch, then the rest at the tick); several shared batches leave in one vectored write.
const URGENT_BATCHES: usize = 4;

thread_local! {
    /// The frames of the message being handled: one vector per shard thread, not one per
    /// message.
    static DECODED_FRAMES: std::cell::Cell<Vec<pb::ClientFrame>> = const { std::cell::Cell::new(Vec::new()) };
}

/// Frames' room `DECODED_FRAMES` keeps between messages; a larger message's is given back.
const DECODED_FRAMES_KEEP: usize = 64;

/// Spare queues a shard lends the session whose read it handles, so that a request allocates none
/// of its own: the event queue, and a small outbox queue for the answers. Only empty queues
/// change hands, so nothing queued ever moves between sessions.
#[derive(Debug, Default)]
pub struct SpareQueues {
    events: VecDeque<SessionEvent>,
    outbox: VecDeque<OutItem>,
}

/// The wire form of a refusal reason.
fn recovery_failure(reason: RecoveryFailure) -> pb::RecoveryFailure {
    match reason {
        RecoveryFailure::EpochChanged => pb::RecoveryFailure::EpochChanged,
        RecoveryFailure::GapTooOld => pb::RecoveryFailure::GapTooOld,
        RecoveryFailure::WindowExceeded => pb::RecoveryFailure::WindowExceeded,
        RecoveryFailure::TooMany => pb::RecoveryFailure::TooMany,
        RecoveryFailure::OffsetAhead => pb::RecoveryFailure::OffsetAhead,
    }
}

/// Something the shard must do for this session.
#[derive(Debug, Clone, PartialEq)]
pub enum SessionEvent {
    /// Register a subscription with the channel's owner (recovering from `since` when given,
    /// or from the last position `resume` acknowledged); answer with `handle_subscribed`.
    Subscribe { channel: Arc<str>, sub_id: u32, req_id: u32, since: Option<Position>, resume: Option<Arc<str>> },
    /// Remember that `identity` processed `channel` up to `offset` (acknowledged delivery).
    Acked { channel: Arc<str>, identity: Arc<str>, epoch: Arc<str>, offset: u64 },
    /// Read the channel's history from its owner; answer with `handle_history`.
    History { channel: Arc<str>, req_id: u32, since: u64, limit: usize },
    /// Drop a subscription (from the router when it was active, and from the owner's count).
    Unsubscribe { channel: Arc<str>, sub_id: u32, was_active: bool },
    /// Publish through the channel's owner; answer with `handle_published`.
    Publish { channel: String, req_id: u32, update: pb::Update },
    /// Count a refused token (the shard keeps the figures).
    AuthFailed(AuthFailure),
    /// Count a request refused by a rate limit.
    RateLimited,
}

/// Where the connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Upgraded; waiting for `Connect`.
    AwaitingConnect,
    Connected,
    /// Upgraded on the echo endpoint (`testing.echo_endpoint`): every text and binary message
    /// goes back as it came; no protocol session, no `Connect` (nor its timeout; heartbeats
    /// and limits apply as on `/ws`).
    Echo,
    /// Closing with this code: the last bytes are queued, nothing more is read or queued.
    Closing(CloseCode),
}

#[derive(Debug)]
struct Subscription {
    channel: Arc<str>,
    active: bool,
    /// Present for subscriptions with acknowledged delivery; boxed, so the map of an idle
    /// connection's plain subscriptions stays small.
    acks: Option<Box<AckTracker>>,
}

/// The limits a session enforces, copied from the config.
#[derive(Debug, Clone)]
pub struct SessionLimits {
    pub max_message_size: usize,
    pub max_frames_per_message: usize,
    pub max_subscriptions: usize,
    pub max_outbox_bytes: usize,
    pub max_channel_length: usize,
    pub max_payload_size: usize,
    pub batch_size: usize,
    pub acks: Rc<AckPolicy>,
    pub connect_timeout: Duration,
    /// `None`: auth is disabled and every client may do everything.
    pub verifier: Option<Arc<Verifier>>,
    pub refresh_reminder: Duration,
    pub expiry_grace: Duration,
    /// Clock skew allowed around `exp` (`auth.leeway`): a token counts as expired from
    /// `exp + leeway`, as at `Connect`.
    pub leeway: Duration,
    pub ping_interval: Duration,
    pub heartbeat_timeout: Duration,
    /// `None`: rate limits are off.
    pub rate_limits: Option<RatePolicy>,
    /// Bit `t` set: update type `t` is high priority.
    pub priority_types: u32,
    pub conflate_above_bytes: usize,
    /// Compression of large messages for clients that accept zstd.
    pub zstd: Arc<ZstdSettings>,
    /// The shard's tallies (shared by its sessions, read by nothing else).
    pub metrics: Rc<LocalMetrics>,
}

/// Which buckets a session takes tokens from.
#[derive(Clone)]
pub struct RatePolicy {
    pub commands: Bucket,
    pub publishes: Bucket,
    /// Per-user buckets shared by every shard: `[commands, publishes]`.
    pub users: Arc<KeyedBuckets<Arc<str>, 2>>,
    pub max_refusals: u32,
}

impl std::fmt::Debug for RatePolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RatePolicy").field("commands", &self.commands).field("publishes", &self.publishes).finish()
    }
}

/// Which bucket a command draws from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RateClass {
    Command = 0,
    Publish = 1,
}

impl SessionLimits {
    /// The limits of `config`; `verifier` and `users` are shared by every shard.
    pub fn from_config(
        config: &Config,
        verifier: Option<Arc<Verifier>>,
        users: Arc<KeyedBuckets<Arc<str>, 2>>,
    ) -> Self {
        let l = &config.limits;
        let r = &config.rate_limits;
        let priority_types = config
            .delivery
            .priority_types
            .iter()
            .filter_map(|name| pb::UpdateType::from_str_name(name))
            .fold(0u32, |bits, t| bits | 1 << (t as u32 & 31));
        Self {
            max_message_size: l.max_message_size,
            max_frames_per_message: l.max_frames_per_message,
            max_subscriptions: l.max_subscriptions_per_connection,
            max_outbox_bytes: l.max_outbox_bytes,
            max_channel_length: l.max_channel_length,
            max_payload_size: l.max_payload_size,
            batch_size: config.delivery.batch_size,
            acks: Rc::new(crate::acks::AckPolicy::from_config(config)),
            connect_timeout: l.connect_timeout,
            verifier,
            refresh_reminder: config.auth.refresh_reminder,
            expiry_grace: config.auth.expiry_grace,
            leeway: config.auth.leeway,
            ping_interval: config.heartbeat.interval,
            heartbeat_timeout: config.heartbeat.timeout,
            rate_limits: r.enabled.then_some(RatePolicy {
                commands: r.connection_commands,
                publishes: r.connection_publishes,
                users,
                max_refusals: r.max_refusals,
            }),
            priority_types,
            conflate_above_bytes: config.delivery.conflate_above_bytes,
            // Dictionaries are files: the server loads them once and sets them here.
            zstd: Arc::new(ZstdSettings {
                threshold: config.delivery.compression_threshold,
                level: config.delivery.compression_level,
                dictionaries: Vec::new(),
            }),
            // The shard sets its own, shared by its sessions.
            metrics: Rc::default(),
        }
    }
}

// Laid out in declaration order: what every delivery touches comes first, so a fan-out to
// many sessions reads one or two cache lines of each.
#[repr(C)]
pub struct Session {
    outbox: Outbox,
    /// Subscriptions with acknowledged delivery; deliveries skip the lookup while it is 0.
    acked_subs: usize,
    phase: Phase,
    accepts_zstd: bool,
    /// Bit `i`: the client holds the server's zstd dictionary `i`.
    zstd_dictionaries: u32,
    /// `TokenExpiring` was sent for the current token.
    reminded: bool,
    /// Requests refused by a rate limit since the last one accepted.
    refusals_in_a_row: u32,
    next_sub_id: u32,
    limits: Rc<SessionLimits>,
    /// When the connection was upgraded: `Connect` must come within `connect_timeout`.
    opened_at: Instant,
    /// Printed on demand: an idle connection keeps no string for it.
    client_id: ConnLabel,
    ws: WsEndpoint,
    subs: Subscriptions,
    events: VecDeque<SessionEvent>,
    /// Who the client is, for positions kept across connections: the token's subject (the
    /// `Connect` name with auth disabled).
    identity: Option<Arc<str>>,
    /// Why the session closed, once it has: for logs and metrics.
    close_detail: Option<String>,
    /// What the token allows (everything until `Connect`, which nothing precedes).
    grant: Grant,
    /// When the token expires, on the monotonic clock.
    expires_at: Option<Instant>,
    /// Last time anything arrived from the client, and the last ping sent.
    last_heard: Instant,
    last_ping: Instant,
    /// Per-connection buckets: `[commands, publishes]`.
    buckets: [TokenBucket; 2],
}

impl Session {
    /// A session for a connection upgraded at `opened_at`.
    pub fn new(client_id: ConnLabel, limits: Rc<SessionLimits>, opened_at: Instant) -> Self {
        let buckets = match &limits.rate_limits {
            Some(rates) => {
                [TokenBucket::new(&rates.commands, opened_at), TokenBucket::new(&rates.publishes, opened_at)]
            }
            None => [TokenBucket::new(&Bucket::new(0, 1, 0), opened_at); 2],
        };
        Self {
            opened_at,
            client_id,
            ws: WsEndpoint::server(limits.max_message_size),
            outbox: Outbox::new(
                limits.max_outbox_bytes,
                Pressure { priority_types: limits.priority_types, conflate_above: limits.conflate_above_bytes },
            ),
            limits,
            phase: Phase::AwaitingConnect,
            subs: Subscriptions::default(),
            next_sub_id: 1,
            events: VecDeque::new(),
            accepts_zstd: false,
            zstd_dictionaries: 0,
            identity: None,
            acked_subs: 0,
            close_detail: None,
            grant: Grant::unrestricted(),
            expires_at: None,
            reminded: false,
            last_heard: opened_at,
            last_ping: opened_at,
            buckets,
            refusals_in_a_row: 0,
        }
    }

    /// A session for a connection upgraded on the echo endpoint at `opened_at`.
    pub fn new_echo(client_id: ConnLabel, limits: Rc<SessionLimits>, opened_at: Instant) -> Self {
        Self { phase: Phase::Echo, ..Self::new(client_id, limits, opened_at) }
    }

    pub fn client_id(&self) -> ConnLabel {
        self.client_id
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    pub fn is_closing(&self) -> bool {
        matches!(self.phase, Phase::Closing(_))
    }

    /// The close code and its detail, once the session is closing.
    pub fn close_reason(&self) -> Option<(CloseCode, &str)> {
        match self.phase {
            Phase::Closing(code) => Some((code, self.close_detail.as_deref().unwrap_or(""))),
            _ => None,
        }
    }

    /// Whether the client said it decodes zstd envelopes.
    pub fn accepts_zstd(&self) -> bool {
        self.accepts_zstd
    }

    /// Feeds bytes read from the socket and processes every complete message in them.
    pub fn handle_bytes(&mut self, now: Now, bytes: &[u8]) {
        if self.is_closing() {
            return;
        }
        self.last_heard = now.instant;
        if let Some(messages) = self.ws.whole_binary_messages(bytes) {
            messages.unmask_each(|data| {
                self.handle_binary(now, data);
                !self.is_closing()
            });
            return;
        }
        self.ws.feed(bytes);
        while !self.is_closing() {
            let event = self.ws.next_event();
            // Pongs (and close replies) tungstenite wrote while reading go out ahead of what
            // the message makes the session send: the peer sees answers in the order it asked.
            self.collect_ws_output();
            match event {
                Ok(None) => break,
                Ok(Some(WsEvent::Binary(data))) => self.handle_binary(now, &data),
                Ok(Some(WsEvent::Text(text))) if self.phase == Phase::Echo => self.send_back(true, &text),
                Ok(Some(WsEvent::Text(_))) => self
                    .close(CloseCode::UnsupportedData, "text messages are not supported: send binary protobuf".into()),
                Ok(Some(WsEvent::Closed(_))) => {
                    // Answer the client's close; nothing else follows.
                    self.ws.flush();
                    self.phase = Phase::Closing(CloseCode::Normal);
                    self.close_detail = Some("closed by client".into());
                }
                Err(tungstenite::Error::Capacity(err)) => self.close(CloseCode::MessageTooBig, err.to_string()),
                Err(tungstenite::Error::Protocol(err)) => self.close(CloseCode::ProtocolError, err.to_string()),
                Err(tungstenite::Error::Utf8(err)) => {
                    self.close(CloseCode::InvalidPayload, format!("text that is not UTF-8: {err}"))
                }
                Err(err) => self.close(CloseCode::ProtocolError, err.to_string()),
            }
        }
        self.collect_ws_output();
        // Given back at once, not later: the next connection's messages reuse the memory, so
        // a burst of connects does not leave every connection's buffers resident.
        self.ws.release_if_idle();
    }

    fn handle_binary(&mut self, now: Now, data: &[u8]) {
        if self.phase == Phase::Echo {
            self.send_back(false, data)
        } else {
            self.handle_message(now, data)
        }
    }

    /// The next thing the shard must do, if any.
    pub fn poll_event(&mut self) -> Option<SessionEvent> {
        self.events.pop_front()
    }

    /// Takes the queues the shard lends for a read that it has none of (see `SpareQueues`).
    pub fn borrow_queues(&mut self, spare: &mut SpareQueues) {
        crate::core::borrow_queue(&mut self.events, &mut spare.events);
        self.outbox.borrow_queue(&mut spare.outbox);
    }

    /// Hands back what it borrowed, once empty (an outbox queue only up to `up_to` slots),
    /// and frees an empty event queue of its own: between bursts of commands an idle session
    /// keeps no queue.
    pub fn give_back_queues(&mut self, spare: &mut SpareQueues, up_to: usize) {
        crate::core::give_back_queue(&mut self.events, &mut spare.events, usize::MAX);
        self.release_event_queue();
        self.outbox.give_back_queue(&mut spare.outbox, up_to);
    }

    /// Frees an empty event queue's memory.
    pub fn release_event_queue(&mut self) {
        if self.events.is_empty() && self.events.capacity() > 0 {
            self.events = VecDeque::new();
        }
    }

    /// Gives back the queues of an empty outbox up to `keep_up_to` slots (`usize::MAX`: all),
    /// for a connection with nothing to send.
    pub fn release_idle_buffers(&mut self, keep_up_to: usize) {
        self.outbox.release_if_empty(keep_up_to);
    }

    /// Whether there are bytes to send.
    pub fn wants_write(&self) -> bool {
        !self.outbox.is_empty()
    }

    /// Whether what is queued should leave now rather than wait for company: replies or
    /// control frames, `URGENT_BATCHES` full batches, or a quarter of the outbox (waiting
    /// must never turn a healthy connection into a slow consumer).
    pub fn has_urgent(&self) -> bool {
        let (urgent_len, urgent_bytes) = self.urgent_marks();
        self.outbox.has_frames() || self.outbox.len() >= urgent_len || self.outbox.queued_bytes() >= urgent_bytes
    }

    /// Queued items and bytes from which updates are urgent (see `has_urgent`).
    fn urgent_marks(&self) -> (usize, usize) {
        (self.limits.batch_size.saturating_mul(URGENT_BATCHES), self.limits.max_outbox_bytes / 4)
    }

    /// Appends everything queued to `out` as wire bytes; returns the number of frames.
    pub fn poll_transmit(&mut self, out: &mut Vec<u8>) -> usize {
        self.outbox.poll_transmit(out, self.limits.batch_size, None)
    }

    /// When all that is queued is one subscription's updates, takes them as shared batches
    /// without copying, for a vectored write (see `Outbox::poll_transmit_vectored`): `head`
    /// gets the first message's head, the parts to write after it are returned.
    /// The write happens at `now` (updates in it are timed from their publication).
    pub fn poll_transmit_vectored(
        &mut self,
        head: &mut Vec<u8>,
        batches: &mut SharedBatches,
        now: Instant,
    ) -> Option<Vec<Bytes>> {
        // A client that accepts zstd may need the batch compressed: the full path decides.
        if self.accepts_zstd || self.is_closing() {
            return None;
        }
        self.outbox.poll_transmit_vectored(head, self.limits.batch_size, batches, Some((&self.limits.metrics, now)))
    }

    /// `poll_transmit`, encoding batches through the shard's `batches` (and compressing large
    /// messages if the client accepts zstd), for a write at `now`.
    pub fn poll_transmit_shared(&mut self, out: &mut Vec<u8>, batches: &mut SharedBatches, now: Instant) -> usize {
        let encoding = SharedEncoding {
            batches,
            zstd: self.accepts_zstd,
            held: self.zstd_dictionaries,
            observed: Some((&self.limits.metrics, now)),
        };
        self.outbox.poll_transmit(out, self.limits.batch_size, Some(encoding))
    }

    /// Updates conflated or dropped for this slow connection since the last call.
    pub fn poll_shed_counts(&mut self) -> ShedCounts {
        self.outbox.poll_shed_counts()
    }

    /// Frames and updates waiting to be sent.
    pub fn queued_items(&self) -> usize {
        self.outbox.len()
    }

    /// Bytes waiting to be sent.
    pub fn queued_bytes(&self) -> usize {
        self.outbox.queued_bytes()
    }

    /// The owner answered a `Subscribe` event: reply, then the recovered publications (if
    /// any) ahead of every live one. Returns false when the subscription is gone meanwhile
    /// (the shard must then take back the owner's count).
    pub fn handle_subscribed(
        &mut self,
        sub_id: u32,
        req_id: u32,
        position: &Position,
        recovery: Option<Recovery>,
        now: Instant,
    ) -> bool {
        if self.is_closing() {
            return false;
        }
        let Some(sub) = self.subs.get_mut(sub_id) else { return false };
        sub.active = true;
        if let Some(acks) = sub.acks.as_mut() {
            acks.epoch = position.epoch.clone();
        }
        let (recovered, failure, missed) = match recovery {
            Some(Recovery::Recovered(missed)) => (true, pb::RecoveryFailure::None, missed),
            Some(Recovery::Refused(reason)) => (false, recovery_failure(reason), Vec::new()),
            None => (false, pb::RecoveryFailure::None, Vec::new()),
        };
        let result = pb::SubscribeResult {
            sub_id,
            epoch: position.epoch.to_string(),
            offset: position.offset,
            recovered,
            recovery_failure: failure as i32,
        };
        self.reply(req_id, reply::Result::Subscribe(result));
        for publication in missed {
            self.push_update(sub_id, &Rc::new(Publication::clone(&publication)), now);
        }
        true
    }

    /// A request failed with `code` somewhere past the session.
    pub fn handle_failed(&mut self, req_id: u32, code: ErrorCode) {
        self.error(req_id, code, "the request could not be served now; retry".into());
    }

    /// The owner answered a `History` event.
    pub fn handle_history(&mut self, req_id: u32, page: &HistoryPage) {
        self.reply(req_id, reply::Result::History(crate::protocol::push::history_result(page)));
    }

    /// The owner could not take the subscription: forget it and tell the client.
    pub fn handle_subscribe_failed(&mut self, sub_id: u32, req_id: u32, code: ErrorCode, message: String) {
        if let Some(sub) = self.subs.remove(sub_id) {
            self.acked_subs -= usize::from(sub.acks.is_some());
            self.error(req_id, code, message);
        }
    }

    /// The owner answered a `Publish` event.
    pub fn handle_published(&mut self, req_id: u32, result: Result<Position, ErrorCode>) {
        match result {
            Ok(position) if req_id != 0 && !frame_log::enabled() && !self.is_closing() => {
                self.enqueue(OutItem::Frame(publish_result(req_id, &position.epoch, position.offset)));
            }
            Ok(position) if req_id != 0 => {
                let result = pb::PublishResult { epoch: position.epoch.to_string(), offset: position.offset };
                self.reply(req_id, reply::Result::Publish(result))
            }
            Ok(_) => {}
            Err(code) => self.error(req_id, code, "the server cannot take this publication now; retry".into()),
        }
    }

    /// Queues an update for subscription `sub_id`. Returns how many acknowledged updates
    /// failed to make room (see `AckPolicy::max_unacked`).
    pub fn push_update(&mut self, sub_id: u32, publication: &Rc<Publication>, now: Instant) -> u32 {
        self.push_update_at(sub_id, publication, None, now)
    }

    /// `push_update` of a fan-out: `publication` is index `index` of its channel's fan-out log
    /// `fanout`, which the queue may refer to instead of holding it (see `Outbox::push_delivered`).
    pub fn push_delivered(
        &mut self,
        sub_id: u32,
        publication: &Rc<Publication>,
        fanout: &Rc<FanoutLog>,
        index: u32,
        now: Instant,
    ) -> u32 {
        self.push_update_at(sub_id, publication, Some((fanout, index)), now)
    }

    /// Lets the fan-out pass subscription `sub_id` by while this connection waits for
    /// its next pacing tick (see `outbox::FanoutLog`); `slot` is its place among the channel's
    /// subscribers. Only while nothing is near urgent and no acknowledgement is tracked.
    pub fn park(&mut self, sub_id: u32, fanout: &Rc<FanoutLog>, slot: usize) -> bool {
        if self.is_closing() || self.acked_subs > 0 {
            return false;
        }
        let (urgent_len, urgent_bytes) = self.urgent_marks();
        self.outbox.park(sub_id, fanout, slot, urgent_len, urgent_bytes)
    }

    /// The fan-out visits subscription `sub_id` on every publication again.
    pub fn unpark(&mut self, sub_id: u32) {
        self.outbox.unpark(sub_id);
    }

    fn push_update_at(
        &mut self,
        sub_id: u32,
        publication: &Rc<Publication>,
        fanout: Option<(&Rc<FanoutLog>, u32)>,
        now: Instant,
    ) -> u32 {
        if self.is_closing() {
            return 0;
        }
        let mut failed = 0;
        if self.acked_subs > 0 {
            if let Some(acks) = self.subs.get_mut(sub_id).and_then(|s| s.acks.as_mut()) {
                failed = acks.sent(publication, now);
            }
        }
        let queued = match fanout {
            Some((fanout, index)) => self.outbox.push_delivered(sub_id, publication, fanout, index),
            None => self.outbox.push(OutItem::Push { sub_id, publication: publication.clone() }),
        };
        self.close_if_overflowed(queued);
        failed
    }

    /// Time passed: resend updates whose acknowledgement is overdue. Returns how many
    /// acknowledged updates failed for good. The shard calls this for every connection in
    /// turn, so a panic in it (a bug) must not stop the others: it closes this connection with
    /// 1011 instead, and is counted.
    pub fn handle_timeout(&mut self, now: Instant) -> u32 {
        self.unless_panicking(|session| session.check_timeouts(now))
    }

    /// Runs `work`; a panic out of it closes the session with 1011 (without a word when even
    /// that panics: the queues may be what is broken) and counts it.
    fn unless_panicking(&mut self, work: impl FnOnce(&mut Self) -> u32) -> u32 {
        let payload = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| work(&mut *self))) {
            Ok(result) => return result,
            Err(payload) => payload,
        };
        self.limits.metrics.count_timeout_panic();
        let panic = crate::core::panic_message(&*payload);
        tracing::error!(conn = %self.client_id, panic, "a panic in the connection's timeouts was caught; it is closed with 1011");
        let detail = "internal server error".to_owned();
        let closed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.close(CloseCode::InternalError, detail.clone())
        }));
        if closed.is_err() || !self.is_closing() {
            self.phase = Phase::Closing(CloseCode::InternalError);
            self.close_detail = Some(detail);
        }
        0
    }

    fn check_timeouts(&mut self, now: Instant) -> u32 {
        if self.phase == Phase::AwaitingConnect
            && now.saturating_duration_since(self.opened_at) >= self.limits.connect_timeout
        {
            let detail = format!("no Connect within {:?}", self.limits.connect_timeout);
            self.close(CloseCode::ConnectTimeout, detail);
        }
        self.check_heartbeat(now);
        self.check_expiry(now);
        if self.acked_subs == 0 || self.is_closing() {
            return 0;
        }
        let mut failed = 0;
        let mut resend = Vec::new();
        for (sub_id, sub) in self.subs.iter_mut() {
            if let Some(acks) = sub.acks.as_mut() {
                let due = acks.due(now);
                failed += due.failed;
                resend.extend(due.resend.into_iter().map(|p| (sub_id, p)));
            }
        }
        for (sub_id, publication) in resend {
            self.enqueue(OutItem::Push { sub_id, publication });
        }
        failed
    }

    /// Pings when the interval passed; closes a connection silent for too long.
    fn check_heartbeat(&mut self, now: Instant) {
        if self.is_closing() {
            return;
        }
        let silent = now.saturating_duration_since(self.last_heard);
        if silent >= self.limits.heartbeat_timeout {
            let detail = format!("nothing heard for {:?}", self.limits.heartbeat_timeout);
            return self.close(CloseCode::HeartbeatTimeout, detail);
        }
        if now.saturating_duration_since(self.last_ping) >= self.limits.ping_interval {
            self.last_ping = now;
            self.ws.ping(Bytes::new());
            self.collect_ws_output();
        }
    }

    /// Reminds ahead of the token's expiry; after the grace period, closes with 4006.
    fn check_expiry(&mut self, now: Instant) {
        let Some(expires_at) = self.expires_at else { return };
        if self.is_closing() {
            return;
        }
        // Differences of instants, never sums: no setting or claim can overflow the clock.
        if now.checked_duration_since(expires_at).is_some_and(|past| past >= self.limits.expiry_grace) {
            return self.close(CloseCode::TokenExpired, "the token expired and was not refreshed".into());
        }
        if !self.reminded && expires_at.saturating_duration_since(now) <= self.limits.refresh_reminder {
            self.reminded = true;
            let expiring = pb::TokenExpiring { expires_at_unix: self.grant.expires_at_unix };
            self.frame(pb::ServerFrame { kind: Some(Kind::TokenExpiring(expiring)) });
        }
    }

    /// Whether the token expired (beyond the leeway): in its grace period, the connection may
    /// only refresh it, acknowledge, ping and unsubscribe.
    fn token_expired(&self, now: Instant) -> bool {
        self.expires_at
            .and_then(|expires_at| now.checked_duration_since(expires_at))
            .is_some_and(|past| past >= self.limits.leeway)
    }

    /// Closes the session with `code`: a `Disconnect` frame (not on the echo endpoint, which
    /// speaks no protocol), then the WebSocket close frame.
    pub fn close(&mut self, code: CloseCode, detail: String) {
        if self.is_closing() {
            return;
        }
        if self.phase != Phase::Echo {
            self.queue_disconnect(code, &detail);
        }
        self.ws.close(code.code(), code.label());
        // Closing before the close frame is queued: past the limit, queueing it closes nothing again.
        self.phase = Phase::Closing(code);
        self.close_detail = Some(detail);
        self.collect_ws_output();
    }

    fn queue_disconnect(&mut self, code: CloseCode, detail: &str) {
        let frame = pb::ServerFrame {
            kind: Some(Kind::Disconnect(pb::Disconnect {
                code: code.code() as u32,
                reason: detail.to_owned(),
                reconnect: code.reconnect(),
            })),
        };
        if frame_log::enabled() {
            FrameLog::server(&frame).log(self.client_id, false);
        }
        let bytes = encoded_frame(&frame);
        self.outbox.push_unbounded(OutItem::Frame(bytes));
    }

    /// Sends a message of the echo endpoint back, unchanged (limited by the outbox like any
    /// other queued bytes).
    fn send_back(&mut self, text: bool, data: &[u8]) {
        let mut frame = Vec::with_capacity(binary_header_len(data.len()) + data.len());
        write_data_header(&mut frame, text, data.len());
        frame.extend_from_slice(data);
        self.enqueue(OutItem::Raw(frame));
    }

    /// Every subscription as (channel, sub_id, active), for cleanup when the connection ends.
    pub fn subscriptions(&self) -> impl Iterator<Item = (&Arc<str>, u32, bool)> {
        self.subs.iter().map(|(id, sub)| (&sub.channel, id, sub.active))
    }

    /// Queues what the WebSocket layer wrote (pongs, pings, the close). These never give way,
    /// so a client that pings without reading would grow them without end: past
    /// `max_outbox_bytes` the connection is closed as a slow consumer.
    fn collect_ws_output(&mut self) {
        if self.ws.has_output() {
            let bytes = self.ws.take_output();
            self.outbox.push_unbounded(OutItem::Raw(bytes));
            if self.outbox.queued_bytes() > self.limits.max_outbox_bytes && !self.is_closing() {
                let limit = self.limits.max_outbox_bytes;
                self.close(
                    CloseCode::SlowConsumer,
                    format!("more than {limit} bytes waiting to be sent, pongs the client does not read"),
                );
            }
        }
    }

    fn handle_message(&mut self, now: Now, data: &[u8]) {
        crate::core::with_scratch(&DECODED_FRAMES, DECODED_FRAMES_KEEP, |frames| {
            let decoded = if client_frames::decode_common(data, frames) {
                Ok(())
            } else {
                envelope::decode_into::<ClientMessage>(
                    frames,
                    data,
                    self.limits.max_message_size,
                    &Dictionaries::default(),
                )
            };
            match decoded {
                Ok(()) if frames.len() > self.limits.max_frames_per_message => {
                    let limit = self.limits.max_frames_per_message;
                    self.close(
                        CloseCode::TooManyFrames,
                        format!("{} frames in one message, the limit is {limit}", frames.len()),
                    )
                }
                Ok(()) => {
                    for frame in frames.drain(..) {
                        if self.is_closing() {
                            break;
                        }
                        self.handle_frame(now, frame);
                    }
                }
                Err(err @ EnvelopeError::TooLarge { .. }) => self.close(CloseCode::MessageTooBig, err.to_string()),
                Err(err) => self.close(CloseCode::BadMessage, err.to_string()),
            }
        })
    }

    /// Takes a token for a request of `class`; refused, answers 429 (and after too many
    /// refusals in a row closes the connection). Returns whether the request may go on.
    fn admit(&mut self, id: u32, class: RateClass, now: Instant) -> bool {
        let limits = Rc::clone(&self.limits);
        let Some(rates) = &limits.rate_limits else { return true };
        let index = class as usize;
        let limit = if class == RateClass::Command { rates.commands } else { rates.publishes };
        let mut result = self.buckets[index].take(&limit, now);
        if result.is_ok() {
            if let Some(user) = &self.grant.subject {
                result = rates.users.take(user, index, now);
            }
        }
        let Err(wait) = result else {
            self.refusals_in_a_row = 0;
            return true;
        };
        self.refusals_in_a_row += 1;
        self.events.push_back(SessionEvent::RateLimited);
        if self.refusals_in_a_row > rates.max_refusals {
            let detail = format!("{} requests in a row over the rate limit", self.refusals_in_a_row);
            self.close(CloseCode::RateLimitAbuse, detail);
            return false;
        }
        // Rounded up: a client that waits this long finds a token back.
        let retry_after_ms = (wait.as_nanos().div_ceil(1_000_000) as u64).max(1);
        self.limits.metrics.count_error(ErrorCode::RateLimited);
        let error = pb::Error {
            code: ErrorCode::RateLimited.code(),
            message: format!("rate limited; retry in {retry_after_ms} ms"),
            retry_after_ms,
        };
        self.reply(id, reply::Result::Error(error));
        false
    }

    fn reply(&mut self, id: u32, result: reply::Result) {
        self.frame(pb::ServerFrame { kind: Some(Kind::Reply(pb::Reply { id, result: Some(result) })) });
    }

    /// Errors are always sent, also for `id` 0: a fire-and-forget command must not fail silently.
    fn error(&mut self, id: u32, code: ErrorCode, message: String) {
        self.limits.metrics.count_error(code);
        let error = pb::Error { code: code.code(), message, retry_after_ms: 0 };
        self.reply(id, reply::Result::Error(error));
    }

    fn frame(&mut self, frame: pb::ServerFrame) {
        if self.is_closing() {
            return;
        }
        if frame_log::enabled() {
            FrameLog::server(&frame).log(self.client_id, false);
        }
        let bytes = encoded_frame(&frame);
        self.enqueue(OutItem::Frame(bytes));
    }

    /// Queues `item`; a connection whose outbox is full even after lower-priority updates gave
    /// way is closed as a slow consumer (what it had queued is dropped: it could not take it).
    fn enqueue(&mut self, item: OutItem) {
        let queued = self.outbox.push(item);
        self.close_if_overflowed(queued);
    }

    fn close_if_overflowed(&mut self, queued: Result<(), Overflow>) {
        if queued.is_err() {
            self.outbox.clear();
            let detail = format!("more than {} bytes waiting to be sent", self.limits.max_outbox_bytes);
            self.close(CloseCode::SlowConsumer, detail);
        }
    }
}

mod commands;
mod frame_log;
mod subscriptions;

#[cfg(test)]
mod tests;
