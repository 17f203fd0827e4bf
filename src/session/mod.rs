//! One connection's protocol state machine, sans I/O: no sockets, no runtime, no clock (`now`
//! is passed in). The shard drives it the way quinn-proto's `Connection` is driven: inputs
//! are `handle_*`, outputs `poll_*`, and the rest are commands (`push_update`, `close`, ...)
//! and plain accessors. See [`Session`] for the call order.
//!
//! Files: this one holds the session, its events and its life cycle; `inbound` reads bytes
//! into messages and frames, `commands` serves each command a client sends, `answers` takes
//! the shard's answers to the session's events, `timeouts` the heartbeats, deadlines and
//! token expiry, `transmit` queues deliveries and answers and hands out the bytes to send;
//! `limits` the limits it enforces, `subscriptions` its subscriptions, `frame_log` what a
//! debug line shows of a frame.

use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use crate::acks::AckTracker;
use crate::auth::{AuthFailure, Grant};
use crate::config::Bucket;
use crate::core::{ConnLabel, Position};
use crate::outbox::{OutItem, Outbox, Pressure};
use crate::protocol::pb::{self, server_frame::Kind};
use crate::protocol::push::encoded_frame;
use crate::protocol::ws::WsEndpoint;
use crate::protocol::CloseCode;
use crate::ratelimit::TokenBucket;
use frame_log::FrameLog;
use subscriptions::Subscriptions;

use limits::RateClass;
pub use limits::{RatePolicy, SessionLimits};

/// Logs at debug about this session's connection: every such line names it (`conn`).
macro_rules! conn_debug {
    ($session:expr, $($rest:tt)+) => {
        tracing::debug!(conn = %$session.client_id, $($rest)+)
    };
}

/// Spare queues a shard lends the session whose read it handles, so that a request allocates
/// none of its own: the event queue, and a small outbox queue for the answers. Only empty
/// queues change hands, so nothing queued ever moves between sessions.
#[derive(Debug, Default)]
pub struct SpareQueues {
    events: VecDeque<SessionEvent>,
    outbox: VecDeque<OutItem>,
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

/// One connection's protocol state, driven by the shard in this order (quinn-proto's
/// `Connection` is the model; nothing here blocks, reads a clock or touches a socket):
///
/// 1. Bytes read from the socket go to [`Session::handle_bytes`] (around it the shard lends
///    its [`SpareQueues`] with [`Session::borrow_queues`] and takes them back with
///    [`Session::give_back_queues`]).
/// 2. Then [`Session::poll_event`] until `None`: each [`SessionEvent`] is work for the shard.
/// 3. The shard's answers to those events come back, whenever they are ready, through
///    [`Session::handle_subscribed`] (or [`Session::handle_subscribe_failed`]),
///    [`Session::handle_published`], [`Session::handle_history`] and
///    [`Session::handle_failed`].
/// 4. Publications for its subscriptions come through [`Session::push_update`], or from a
///    fan-out through [`Session::push_delivered`] (a paced connection may [`Session::park`]
///    there and be passed by until [`Session::unpark`]).
/// 5. On every tick, [`Session::handle_timeout`] (the `Connect` deadline, heartbeats, token
///    expiry, overdue acknowledgements), then [`Session::poll_shed_counts`] for the counters.
/// 6. Whenever [`Session::wants_write`] (at once when [`Session::has_urgent`], else at the
///    connection's pacing tick), the writer takes the bytes to send: all of them without a
///    copy from [`Session::poll_transmit_vectored`] when it can, else from
///    [`Session::poll_transmit_shared`] ([`Session::poll_transmit`] without the shard's
///    shared batches).
/// 7. Once [`Session::is_closing`] and its last bytes are written, the connection ends;
///    [`Session::close_reason`] says why and [`Session::subscriptions`] what to clean up.
///
/// Any input may queue bytes (and `handle_bytes` events): poll after each. The shard may
/// [`Session::close`] it at any time.
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

    /// Every subscription as (channel, sub_id, active), for cleanup when the connection ends.
    pub fn subscriptions(&self) -> impl Iterator<Item = (&Arc<str>, u32, bool)> {
        self.subs.iter().map(|(id, sub)| (&sub.channel, id, sub.active))
    }

    /// Its outbound queue, to read how much waits to be sent (queued items, bytes).
    pub fn outbox(&self) -> &Outbox {
        &self.outbox
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
}

mod answers;
mod commands;
mod frame_log;
mod inbound;
mod limits;
mod subscriptions;
mod timeouts;
mod transmit;

#[cfg(test)]
mod tests;
