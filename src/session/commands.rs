//! The commands a client sends: each frame is admitted (lifecycle, rate limits, token
//! expiry), then served by one handler; all answers go through the session's outbox and all
//! work for other shards through its events.

use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::acks::AckTracker;
use crate::auth::{AuthFailure, Grant};
use crate::broker::accept_publish;
use crate::core::{validate_channel, Now, Position};
use crate::metrics::CommandKind;
use crate::protocol::pb::{self, client_frame::Command, reply, server_frame::Kind};
use crate::protocol::{CloseCode, ErrorCode};

use super::frame_log::{self, FrameLog};
use super::{Phase, RateClass, Session, SessionEvent, Subscription};

/// Publications in a `History` reply when the client names no limit, and at most.
const HISTORY_DEFAULT_PAGE: usize = 100;
const HISTORY_MAX_PAGE: usize = 1000;

impl Session {
    /// Serves one frame of a client's message: admits it, then hands it to its command's
    /// handler.
    pub(super) fn handle_frame(&mut self, now: Now, frame: pb::ClientFrame) {
        if frame_log::enabled() {
            FrameLog::client(frame.id, frame.command.as_ref()).log(self.client_id, true);
        }
        let id = frame.id;
        self.limits.metrics.count_command(frame.command.as_ref().map_or(CommandKind::Unknown, command_kind));
        let Some(command) = frame.command else {
            return self.error(id, ErrorCode::UnknownCommand, "the frame names no command this server knows".into());
        };
        if self.phase == Phase::AwaitingConnect && !matches!(command, Command::Connect(_)) {
            return self.close(CloseCode::BadLifecycle, "the first command must be Connect".into());
        }
        let class = match command {
            Command::Connect(_) | Command::Ack(_) => None,
            Command::Publish(_) => Some(RateClass::Publish),
            _ => Some(RateClass::Command),
        };
        if let Some(class) = class {
            if !self.admit(id, class, now.instant) {
                return;
            }
        }
        let allowed_when_expired = matches!(
            command,
            Command::Connect(_) | Command::Refresh(_) | Command::Ack(_) | Command::Ping(_) | Command::Unsubscribe(_)
        );
        if !allowed_when_expired && self.token_expired(now.instant) {
            let expired_at = self.grant.expires_at_unix;
            let message = format!("the token expired at {expired_at}: send Refresh with a new one first");
            return self.error(id, ErrorCode::TokenRefused, message);
        }
        match command {
            Command::Connect(connect) => self.handle_connect_command(now, id, connect),
            Command::Subscribe(subscribe) => self.handle_subscribe_command(id, subscribe),
            Command::Unsubscribe(unsubscribe) => self.handle_unsubscribe_command(id, unsubscribe.sub_id),
            Command::Publish(publish) => self.handle_publish_command(now, id, publish),
            Command::Ping(ping) => {
                self.frame(pb::ServerFrame { kind: Some(Kind::Pong(pb::Pong { timestamp_us: ping.timestamp_us })) })
            }
            Command::Ack(ack) => self.handle_ack_command(now.instant, id, ack),
            Command::Refresh(refresh) => self.handle_refresh_command(now, id, refresh),
            Command::History(history) => self.handle_history_command(id, history),
        }
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

    fn handle_connect_command(&mut self, now: Now, id: u32, connect: pb::Connect) {
        if self.phase != Phase::AwaitingConnect {
            return self.error(id, ErrorCode::BadRequest, "already connected".into());
        }
        match self.limits.verifier.clone() {
            Some(verifier) => match verifier.verify(&connect.token, now.unix_us / 1_000_000) {
                Ok(grant) => {
                    self.identity = grant.subject.clone();
                    self.set_grant(now, grant);
                }
                Err(refusal) => {
                    self.events.push_back(SessionEvent::AuthFailed(refusal.failure));
                    return self.close(CloseCode::Unauthorized, refusal.to_string());
                }
            },
            // Without auth, the client's name is the best identity there is.
            None => self.identity = (!connect.name.is_empty()).then(|| Arc::from(connect.name)),
        }
        self.phase = Phase::Connected;
        conn_debug!(self, user = self.identity.as_deref(), accept_zstd = connect.accept_zstd, "connected");
        self.accepts_zstd = connect.accept_zstd;
        let zstd = &self.limits.zstd;
        self.zstd_dictionaries = if connect.accept_zstd { zstd.held_mask(&connect.zstd_dictionaries) } else { 0 };
        let zstd_dictionaries = zstd
            .dictionaries
            .iter()
            .enumerate()
            .map(|(i, d)| pb::ZstdDictionary {
                id: d.id,
                r#type: d.update_type,
                in_use: self.zstd_dictionaries & (1 << i) != 0,
            })
            .collect();
        let limits = &self.limits;
        let result = pb::ConnectResult {
            client_id: self.client_id.to_string(),
            server_version: env!("CARGO_PKG_VERSION").into(),
            max_message_size: limits.max_message_size as u32,
            max_frames_per_message: limits.max_frames_per_message as u32,
            max_subscriptions: limits.max_subscriptions as u32,
            expires_at_unix: self.grant.expires_at_unix,
            ping_interval_ms: limits.ping_interval.as_millis() as u32,
            heartbeat_timeout_ms: limits.heartbeat_timeout.as_millis() as u32,
            zstd_dictionaries,
        };
        self.reply(id, reply::Result::Connect(result));
    }

    /// A new token for the same subject: new expiry, new permissions, no reconnect.
    fn handle_refresh_command(&mut self, now: Now, id: u32, refresh: pb::Refresh) {
        let Some(verifier) = self.limits.verifier.clone() else {
            return self.reply(id, reply::Result::Refresh(pb::RefreshResult { expires_at_unix: 0 }));
        };
        let grant = match verifier.verify(&refresh.token, now.unix_us / 1_000_000) {
            Ok(grant) if grant.subject != self.grant.subject => {
                self.events.push_back(SessionEvent::AuthFailed(AuthFailure::SubjectChanged));
                let message = "the new token names another subject; reconnect to change users".into();
                return self.error(id, ErrorCode::Forbidden, message);
            }
            Ok(grant) => grant,
            Err(refusal) => {
                self.events.push_back(SessionEvent::AuthFailed(refusal.failure));
                // The current token stays in force until it expires.
                return self.error(id, ErrorCode::TokenRefused, refusal.to_string());
            }
        };
        self.set_grant(now, grant);
        let result = pb::RefreshResult { expires_at_unix: self.grant.expires_at_unix };
        self.reply(id, reply::Result::Refresh(result));
    }

    fn set_grant(&mut self, now: Now, grant: Grant) {
        let now_unix = now.unix_us / 1_000_000;
        let left = Duration::from_secs(grant.expires_at_unix.saturating_sub(now_unix));
        // The verifier keeps `exp` within `auth.max_token_lifetime`, so the sum fits; one the
        // monotonic clock could not hold would not come in this process's life.
        self.expires_at = if grant.expires_at_unix > 0 { now.instant.checked_add(left) } else { None };
        self.reminded = false;
        self.grant = grant;
    }

    /// Whether `channel` is a valid name the token may read (subscribe to, or read history
    /// of); if not, the client has been told why.
    fn may_read(&mut self, id: u32, channel: &str) -> bool {
        if let Err(err) = validate_channel(channel, self.limits.max_channel_length) {
            self.error(id, ErrorCode::BadRequest, err.to_string());
            return false;
        }
        if !self.grant.may_subscribe(channel) {
            self.error(id, ErrorCode::Forbidden, format!("the token does not allow reading {channel}"));
            return false;
        }
        true
    }

    fn handle_subscribe_command(&mut self, id: u32, subscribe: pb::Subscribe) {
        if !self.may_read(id, &subscribe.channel) {
            return;
        }
        if self.subs.has_channel(&subscribe.channel) {
            return self.error(
                id,
                ErrorCode::AlreadySubscribed,
                format!("already subscribed to {}", subscribe.channel),
            );
        }
        if self.subs.len() >= self.limits.max_subscriptions {
            let message = format!("at most {} subscriptions per connection", self.limits.max_subscriptions);
            return self.error(id, ErrorCode::TooLarge, message);
        }
        let sub_id = self.allocate_sub_id();
        let channel: Arc<str> = Arc::from(subscribe.channel);
        let since = subscribe.recover.then(|| Position { epoch: Arc::from(subscribe.epoch), offset: subscribe.offset });
        let acks = subscribe.ack.then(|| Box::new(AckTracker::new(self.limits.acks.clone())));
        // An acknowledged subscription without a position resumes from the last one acked.
        let resume = if subscribe.ack && !subscribe.recover { self.identity.clone() } else { None };
        self.acked_subs += usize::from(acks.is_some());
        self.subs.insert(sub_id, Subscription { channel: channel.clone(), active: false, acks });
        self.events.push_back(SessionEvent::Subscribe { channel, sub_id, req_id: id, since, resume });
    }

    fn handle_ack_command(&mut self, now: Instant, id: u32, ack: pb::Ack) {
        let Some(sub) = self.subs.get_mut(ack.sub_id) else {
            return self.error(id, ErrorCode::NotFound, format!("no subscription {}", ack.sub_id));
        };
        let Some(acks) = sub.acks.as_mut() else {
            return self.error(
                id,
                ErrorCode::BadRequest,
                "the subscription did not ask for acknowledged delivery".into(),
            );
        };
        let metrics = &self.limits.metrics;
        acks.ack(ack.offset, |settled| metrics.record_acked(now, settled));
        if let Some(identity) = self.identity.clone() {
            let (channel, epoch) = (sub.channel.clone(), acks.epoch.clone());
            self.events.push_back(SessionEvent::Acked { channel, identity, epoch, offset: ack.offset });
        }
    }

    fn handle_history_command(&mut self, id: u32, history: pb::History) {
        if !self.may_read(id, &history.channel) {
            return;
        }
        let limit = match history.limit {
            0 => HISTORY_DEFAULT_PAGE,
            n => (n as usize).min(HISTORY_MAX_PAGE),
        };
        let channel = Arc::from(history.channel);
        self.events.push_back(SessionEvent::History { channel, req_id: id, since: history.since, limit });
    }

    fn handle_unsubscribe_command(&mut self, id: u32, sub_id: u32) {
        let Some(sub) = self.subs.remove(sub_id) else {
            return self.error(id, ErrorCode::NotFound, format!("no subscription {sub_id}"));
        };
        self.acked_subs -= usize::from(sub.acks.is_some());
        self.outbox.forget_subscription(sub_id);
        self.events.push_back(SessionEvent::Unsubscribe { channel: sub.channel, sub_id, was_active: sub.active });
        if id != 0 {
            self.reply(id, reply::Result::Unsubscribe(pb::UnsubscribeResult { sub_id }));
        }
    }

    fn handle_publish_command(&mut self, now: Now, id: u32, publish: pb::Publish) {
        if !self.grant.may_publish(&publish.channel) {
            return self.error(
                id,
                ErrorCode::Forbidden,
                format!("the token does not allow publishing on {}", publish.channel),
            );
        }
        let limits = &self.limits;
        match accept_publish(publish, now.unix_us, limits.max_channel_length, limits.max_payload_size) {
            Ok((channel, update)) => self.events.push_back(SessionEvent::Publish { channel, req_id: id, update }),
            Err(refused) => self.error(id, refused.code, refused.message),
        }
    }

    /// The smallest free sub_id from a rolling counter (ids stay small for small varints).
    fn allocate_sub_id(&mut self) -> u32 {
        loop {
            let id = self.next_sub_id;
            self.next_sub_id = self.next_sub_id.checked_add(1).unwrap_or(1);
            if !self.subs.contains(id) {
                return id;
            }
        }
    }
}

fn command_kind(command: &Command) -> CommandKind {
    match command {
        Command::Connect(_) => CommandKind::Connect,
        Command::Subscribe(_) => CommandKind::Subscribe,
        Command::Unsubscribe(_) => CommandKind::Unsubscribe,
        Command::Publish(_) => CommandKind::Publish,
        Command::Ping(_) => CommandKind::Ping,
        Command::Ack(_) => CommandKind::Ack,
        Command::Refresh(_) => CommandKind::Refresh,
        Command::History(_) => CommandKind::History,
    }
}
