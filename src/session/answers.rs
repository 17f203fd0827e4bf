//! The shard's answers to the session's events (see `SessionEvent`): a subscription
//! registered or refused, a publication accepted, a page of history, a request that failed.

use std::rc::Rc;
use std::time::Instant;

use crate::core::{HistoryPage, Position, Publication, Recovery, RecoveryFailure};
use crate::outbox::OutItem;
use crate::protocol::pb::{self, reply};
use crate::protocol::push::{history_result, publish_result};
use crate::protocol::ErrorCode;

use super::{frame_log, Session};

impl Session {
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

    /// The owner answered a `History` event.
    pub fn handle_history(&mut self, req_id: u32, page: &HistoryPage) {
        self.reply(req_id, reply::Result::History(history_result(page)));
    }

    /// A request failed with `code` somewhere past the session.
    pub fn handle_failed(&mut self, req_id: u32, code: ErrorCode) {
        self.error(req_id, code, "the request could not be served now; retry".into());
    }
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
