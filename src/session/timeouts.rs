//! Time passing: the `Connect` deadline, heartbeats (pings, and closing a silent
//! connection), the token's expiry (a reminder, then closing), and resending acknowledged
//! updates that are overdue.

use std::time::Instant;

use bytes::Bytes;

use crate::outbox::OutItem;
use crate::protocol::pb::{self, server_frame::Kind};
use crate::protocol::CloseCode;

use super::{Phase, Session};

impl Session {
    /// Time passed: resend updates whose acknowledgement is overdue. Returns how many
    /// acknowledged updates failed for good. The shard calls this for every connection in
    /// turn, so a panic in it (a bug) must not stop the others: it closes this connection with
    /// 1011 instead, and is counted.
    pub fn handle_timeout(&mut self, now: Instant) -> u32 {
        self.unless_panicking(|session| session.check_timeouts(now))
    }

    /// Runs `work`; a panic out of it closes the session with 1011 (without a word when even
    /// that panics: the queues may be what is broken) and counts it.
    pub(super) fn unless_panicking(&mut self, work: impl FnOnce(&mut Self) -> u32) -> u32 {
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

    /// What `handle_timeout` does, unguarded.
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
    pub(super) fn token_expired(&self, now: Instant) -> bool {
        self.expires_at
            .and_then(|expires_at| now.checked_duration_since(expires_at))
            .is_some_and(|past| past >= self.limits.leeway)
    }
}
