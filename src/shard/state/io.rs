//! A shard's reads and writes: input handed to sessions, and what they queue sent on the
//! socket directly or by the connection's writer.

use std::os::fd::RawFd;
use std::sync::atomic::Ordering;
use std::time::Instant;

use bytes::Bytes;

use super::super::transport::{send_now, unsent_after};
use super::{live_conn, ShardState, KEEP_WRITE_BUFFER, SMALL_QUEUE_SLOTS};
use crate::compression::CompressionCounters;
use crate::core::ConnId;

impl ShardState {
    /// Bytes arrived on `id`: let the session handle them, then act on what it asks. The
    /// answers go out on `direct` (the socket) at once when the writer is idle, else through
    /// the writer.
    pub fn on_bytes(&mut self, id: ConnId, bytes: &[u8], direct: Option<RawFd>) {
        self.metrics.count_received(bytes.len());
        let now = self.wall_clock.at(Instant::now());
        // The table alone (not `conn`), as the shard's queues are borrowed beside it.
        let Some(conn) = live_conn(&mut self.conns, id) else { return };
        conn.session.borrow_queues(&mut self.spare_queues);
        conn.session.handle_bytes(now, bytes);
        // Answers this shard gives at once (it owns the channel) join the direct send.
        self.reading = Some(id);
        self.read_step_at = Some(now.instant);
        self.handle_events(id);
        self.reading = None;
        let handled_at = Instant::now();
        self.metrics.finish_read(handled_at.saturating_duration_since(now.instant));
        self.read_step_at = Some(handled_at);
        self.send_or_wake(id, direct);
        self.read_step_at = None;
        if let Some(conn) = live_conn(&mut self.conns, id) {
            conn.session.give_back_queues(&mut self.spare_queues, SMALL_QUEUE_SLOTS);
        }
    }

    /// What `id` has queued leaves on `direct` (its socket) at once when its writer is idle
    /// (`send_directly`), else its writer is woken for it.
    pub(super) fn send_or_wake(&mut self, id: ConnId, direct: Option<RawFd>) {
        if direct.is_none_or(|fd| !self.send_directly(id, fd)) {
            self.wake_writer(id);
        }
    }

    /// Takes the session's events and wakes its writer when it has something to send (input
    /// from the socket, see `on_bytes`, and a shutdown's close). Answers from owners (which may
    /// be this shard, answering synchronously) only wake the writer, so handling a large batch
    /// of commands never recurses.
    pub fn drive(&mut self, id: ConnId) {
        self.handle_events(id);
        if let Some(conn) = self.conn(id) {
            conn.session.release_event_queue();
        }
        self.wake_writer(id);
    }

    pub(super) fn handle_events(&mut self, id: ConnId) {
        while let Some(event) = self.conn(id).and_then(|c| c.session.poll_event()) {
            self.handle_event(id, event);
        }
    }

    /// Sends what `id` has queued as its writer would, from the reader that just handled its
    /// input or from a pacing tick, so an answer or a batch leaves without waking the writer
    /// task or a submission of its own (like an epoll server's `send` from the handler). Only
    /// when the writer is parked with nothing left over (so no write is in flight) and pacing
    /// lets the connection write now; what the socket does not take goes to the writer,
    /// first. Returns whether the writer has nothing to do.
    pub(super) fn send_directly(&mut self, id: ConnId, fd: RawFd) -> bool {
        let gate = self.pacing.gate();
        let left_over = !self.unsent.is_empty() && self.unsent.contains_key(&id.index);
        let Some(conn) = self.conn(id) else { return true };
        if left_over || conn.writer.is_none() || conn.session.is_closing() || !conn.session.wants_write() {
            return false;
        }
        if gate.holds(conn.last_write_epoch, conn.is_urgent()) {
            return false;
        }
        conn.last_write_epoch = gate.stamp(id.index);
        let mut out = std::mem::take(&mut self.direct_buffer);
        let parts = self.transmit(id, &mut out).unwrap_or_default();
        let total = out.len() + parts.iter().map(Bytes::len).sum::<usize>();
        // A failed send leaves it all to the writer, whose write then fails and ends the
        // connection as any failed write does.
        let sent = send_now(fd, &out, &parts).unwrap_or(0);
        self.metrics.count_sent(sent);
        if sent < total {
            self.unsent.insert(id.index, unsent_after(sent, &out, &parts));
        }
        out.clear();
        if out.capacity() <= KEEP_WRITE_BUFFER {
            self.direct_buffer = out;
        }
        if sent == total && self.went_idle(id) {
            return true;
        }
        let Some(conn) = self.conn(id) else { return true };
        if let Some(waker) = conn.writer.take() {
            waker.wake();
        }
        true
    }

    /// After a write: whether `id` has nothing more to send (or is gone). A connection going
    /// idle gives its small queues back at once (a connect's replies: the next connection
    /// reuses them); a busy one's large queues go on the shard's next tick if still idle, as
    /// it often is only between two writes.
    pub fn went_idle(&mut self, id: ConnId) -> bool {
        match live_conn(&mut self.conns, id) {
            Some(conn) if conn.session.wants_write() => false,
            Some(conn) => {
                conn.session.give_back_queues(&mut self.spare_queues, SMALL_QUEUE_SLOTS);
                conn.session.release_idle_buffers(SMALL_QUEUE_SLOTS);
                true
            }
            None => true,
        }
    }

    /// What a direct send left for the writer, which sends it before anything else.
    pub fn take_unsent(&mut self, id: ConnId) -> Option<Vec<u8>> {
        if self.unsent.is_empty() {
            return None;
        }
        self.unsent.remove(&id.index)
    }

    /// Wakes the connection's writer if there is something to send or it is closing; not
    /// the one whose input is being handled, which `on_bytes` sees to when done.
    pub(super) fn wake_writer(&mut self, id: ConnId) {
        if self.reading == Some(id) {
            return;
        }
        if let Some(conn) = self.conn(id) {
            if conn.session.wants_write() || conn.session.is_closing() {
                if let Some(waker) = conn.writer.take() {
                    waker.wake();
                }
            }
        }
    }

    /// Moves what connection `id` has queued into `out` as wire bytes (batches shared between
    /// subscribers, compressed where the client accepts it). When it is all one subscription's
    /// shared batches, `out` gets only the first one's head and the rest is returned (shared
    /// frames and later heads), to be sent after `out` without a copy.
    pub fn transmit(&mut self, id: ConnId, out: &mut Vec<u8>) -> Option<Vec<Bytes>> {
        let now = self.clock();
        let conn = live_conn(&mut self.conns, id)?;
        // One line per write, not per update: fan-out stays readable at debug.
        let log_write = tracing::enabled!(tracing::Level::DEBUG);
        let queued = if log_write { conn.session.outbox().len() } else { 0 };
        if let Some(parts) = conn.session.poll_transmit_vectored(out, &mut self.batches, now) {
            if log_write {
                let bytes = out.len() + parts.iter().map(Bytes::len).sum::<usize>();
                tracing::debug!(conn = %conn.session.client_id(), frames = queued, bytes, "write");
            }
            return Some(parts);
        }
        let written = conn.session.poll_transmit_shared(out, &mut self.batches, now);
        if log_write {
            tracing::debug!(conn = %conn.session.client_id(), frames = written, bytes = out.len(), "write");
        }
        let counters = self.batches.take_counters();
        if counters != CompressionCounters::default() {
            let stats = &self.cluster.stats[self.id];
            stats.compressed_messages.fetch_add(counters.messages, Ordering::Relaxed);
            stats.compressed_plain_bytes.fetch_add(counters.plain_bytes, Ordering::Relaxed);
            stats.compressed_bytes.fetch_add(counters.compressed_bytes, Ordering::Relaxed);
            stats.compressions.fetch_add(counters.compressions, Ordering::Relaxed);
            stats.compressed_with_dictionary.fetch_add(counters.with_dictionary, Ordering::Relaxed);
        }
        None
    }
}
