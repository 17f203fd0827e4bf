//! Server API requests waiting on their shard for answers from other shards (channel owners,
//! the Redis bridge, the shard of a named client). Each request waits under a token; owners
//! answer to `ConnId::api_request(token)` with `req_id` naming the part answered (a batch's
//! item, a shard of a gathering), and the request's task wakes once every part has come.

use std::collections::HashMap;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use crate::broker::memory::ChannelSummary;
use crate::core::ConnId;
use crate::core::{HistoryPage, Position};
use crate::protocol::{CloseCode, ErrorCode};

/// One part's answer.
#[derive(Debug)]
pub enum Answer {
    Published(Result<Position, ErrorCode>),
    History(HistoryPage),
    Failed(ErrorCode),
    /// One shard's channels for a listing.
    Channels(Vec<ChannelSummary>),
    /// A client's subscriptions (`sub_id`, channel, active); `None`: no such client.
    Subscriptions(Option<Vec<(u32, Arc<str>, bool)>>),
    /// Whether the client to disconnect was there.
    Disconnected(bool),
}

/// What a server API request asks of another shard, and that shard's answer.
#[derive(Debug)]
pub enum ApiMsg {
    /// To every shard: the channels it owns named `prefix…` after `after`, at most `limit`.
    ListChannels { from: usize, token: u32, shard: usize, prefix: Arc<str>, after: Arc<str>, limit: usize },
    /// To a client's shard: its subscriptions.
    Subscriptions { from: usize, token: u32, client: ConnId },
    /// To a client's shard: close it with `code`.
    Disconnect { from: usize, token: u32, client: ConnId, code: CloseCode, reason: String },
    /// Back to the asking shard: part `part` of request `token`.
    Answer { token: u32, part: u32, answer: Answer },
}

struct Waiting {
    answers: Vec<Option<Answer>>,
    missing: usize,
    waker: Option<Waker>,
}

/// The requests waiting on one shard.
#[derive(Default)]
pub struct Waiters {
    next_token: u32,
    waiting: HashMap<u32, Waiting>,
}

impl Waiters {
    /// A request that waits for `parts` answers; returns its token.
    pub fn register(&mut self, parts: usize) -> u32 {
        loop {
            self.next_token = self.next_token.wrapping_add(1);
            if let std::collections::hash_map::Entry::Vacant(entry) = self.waiting.entry(self.next_token) {
                entry.insert(Waiting { answers: (0..parts).map(|_| None).collect(), missing: parts, waker: None });
                return self.next_token;
            }
        }
    }

    /// An answer to part `part` of the request `conn` stands for. A request that stopped
    /// waiting (its client left, it timed out) is no longer here: the answer is dropped.
    pub fn answer(&mut self, conn: ConnId, part: u32, answer: Answer) {
        if let Some(token) = conn.api_token() {
            self.answer_token(token, part, answer);
        }
    }

    pub fn answer_token(&mut self, token: u32, part: u32, answer: Answer) {
        let Some(waiting) = self.waiting.get_mut(&token) else { return };
        let Some(slot) = waiting.answers.get_mut(part as usize) else { return };
        if slot.replace(answer).is_none() {
            waiting.missing -= 1;
        }
        if waiting.missing == 0 {
            if let Some(waker) = waiting.waker.take() {
                waker.wake();
            }
        }
    }

    /// Every answer, in part order, once all have come.
    pub fn poll(&mut self, token: u32, cx: &mut Context<'_>) -> Poll<Vec<Answer>> {
        let Some(waiting) = self.waiting.get_mut(&token) else { return Poll::Ready(Vec::new()) };
        if waiting.missing > 0 {
            waiting.waker = Some(cx.waker().clone());
            return Poll::Pending;
        }
        let answers = self.waiting.remove(&token).map(|w| w.answers).unwrap_or_default();
        Poll::Ready(answers.into_iter().flatten().collect())
    }

    /// The request stopped waiting.
    pub fn forget(&mut self, token: u32) {
        self.waiting.remove(&token);
    }

    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.waiting.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn published(offset: u64) -> Answer {
        Answer::Published(Ok(Position { epoch: Arc::from("e"), offset }))
    }

    #[test]
    fn a_request_wakes_when_every_part_is_answered_and_keeps_part_order() {
        let mut waiters = Waiters::default();
        let token = waiters.register(3);
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        assert!(waiters.poll(token, &mut cx).is_pending());
        waiters.answer(ConnId::api_request(token), 2, published(3));
        waiters.answer(ConnId::api_request(token), 0, published(1));
        assert!(waiters.poll(token, &mut cx).is_pending());
        waiters.answer(ConnId::api_request(token), 1, published(2));
        let Poll::Ready(answers) = waiters.poll(token, &mut cx) else { panic!("all answered") };
        let offsets: Vec<u64> = answers
            .iter()
            .map(|a| match a {
                Answer::Published(Ok(p)) => p.offset,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(offsets, [1, 2, 3]);
        assert!(waiters.is_empty());
    }

    #[test]
    fn answers_to_forgotten_or_unknown_requests_are_dropped() {
        let mut waiters = Waiters::default();
        let token = waiters.register(1);
        waiters.forget(token);
        waiters.answer(ConnId::api_request(token), 0, published(1));
        waiters.answer(ConnId { index: 3, generation: token }, 0, published(1));
        assert!(waiters.is_empty());
    }
}
