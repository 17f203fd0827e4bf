//! What goes out: publications delivered to the session's subscriptions, the answers and
//! control frames it queues, and the bytes the writer takes to send. Everything passes
//! through the outbox; a connection whose outbox overflows is closed as a slow consumer.

use std::rc::Rc;
use std::time::Instant;

use bytes::Bytes;

use crate::compression::SharedBatches;
use crate::core::Publication;
use crate::outbox::{FanoutLog, OutItem, Overflow, SharedEncoding, ShedCounts};
use crate::protocol::pb::{self, reply, server_frame::Kind};
use crate::protocol::push::encoded_frame;
use crate::protocol::{CloseCode, ErrorCode};

use super::frame_log::{self, FrameLog};
use super::Session;

/// Full batches a lingering connection may hold before it writes without waiting for the
/// tick. One would make a connection that fills a batch per tick write twice per tick (the
/// full batch, then the rest at the tick); several shared batches leave in one vectored write.
pub(super) const URGENT_BATCHES: usize = 4;

impl Session {
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

    /// `push_update`, from the fan-out's log `fanout` at an index when given.
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

    /// Gives back the queues of an empty outbox up to `keep_up_to` slots (`usize::MAX`: all),
    /// for a connection with nothing to send.
    pub fn release_idle_buffers(&mut self, keep_up_to: usize) {
        self.outbox.release_if_empty(keep_up_to);
    }

    /// Queues what the WebSocket layer wrote (pongs, pings, the close). These never give way,
    /// so a client that pings without reading would grow them without end: past
    /// `max_outbox_bytes` the connection is closed as a slow consumer.
    pub(super) fn collect_ws_output(&mut self) {
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

    /// Queues the reply to request `id`.
    pub(super) fn reply(&mut self, id: u32, result: reply::Result) {
        self.frame(pb::ServerFrame { kind: Some(Kind::Reply(pb::Reply { id, result: Some(result) })) });
    }

    /// Errors are always sent, also for `id` 0: a fire-and-forget command must not fail silently.
    pub(super) fn error(&mut self, id: u32, code: ErrorCode, message: String) {
        self.limits.metrics.count_error(code);
        let error = pb::Error { code: code.code(), message, retry_after_ms: 0 };
        self.reply(id, reply::Result::Error(error));
    }

    /// Queues `frame` (logged at debug), unless the session is closing.
    pub(super) fn frame(&mut self, frame: pb::ServerFrame) {
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
    pub(super) fn enqueue(&mut self, item: OutItem) {
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
