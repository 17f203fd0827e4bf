//! Time passing on a shard: pacing ticks, timeout ticks, metrics moved where a scrape reads
//! them, and the broker's sweep.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::{ShardState, OVERLOAD_WARNING_EVERY, TIMINGS_FLUSH_INTERVAL};
use crate::core::WallClock;

impl ShardState {
    /// A pacing tick: writers that waited for it may write now.
    pub fn on_pacing_tick(&mut self, now: Instant, thread_cpu: Duration) {
        let was_overloaded = self.pacing.overloaded();
        let waiting = self.pacing.tick(now, thread_cpu);
        let overloaded = self.pacing.overloaded();
        // At most one warning a minute: a load at the edge can cross the mark every few ticks.
        if overloaded && !was_overloaded && self.overload_warned_at.is_none_or(|at| now - at >= OVERLOAD_WARNING_EVERY)
        {
            self.overload_warned_at = Some(now);
            tracing::warn!(
                shard = self.id,
                "shard overloaded at delivery.batch_interval; its writes linger longer, up to delivery.overload_interval (see realtime_linger_seconds)"
            );
        }
        // A plain socket's batch leaves from here, as an answer leaves from its reader: no
        // wake-up, submission and completion of the writer task per write, which at 10,000
        // lingering connections is most of what a write costs the shard outside the kernel.
        for (id, direct) in waiting {
            let Some(conn) = self.conn(id) else { continue };
            conn.paced = false;
            self.send_or_wake(id, direct);
        }
        let linger = self.pacing.linger().as_micros() as u64;
        self.stats().linger_us.store(linger, Ordering::Relaxed);
    }

    /// Time passed: sessions resend overdue acknowledged updates.
    pub fn on_tick(&mut self, now: Instant) {
        self.wall_clock = WallClock::anchored_now();
        self.batches.forget_shared();
        let mut failures = 0u64;
        let (mut conflated, mut dropped) = (0, 0);
        for (_, conn) in self.conns.iter_mut() {
            failures += u64::from(conn.session.handle_timeout(now));
            let shed = conn.session.poll_shed_counts();
            conflated += shed.conflated;
            dropped += shed.dropped;
            if conn.session.wants_write() {
                // A paced writer goes at its pacing tick, unless time made its queue urgent
                // (a resend, a ping, a close).
                if !conn.paced || conn.is_urgent() {
                    if let Some(waker) = conn.writer.take() {
                        waker.wake();
                    }
                }
            } else {
                conn.session.release_idle_buffers(usize::MAX);
            }
        }
        if failures > 0 {
            self.stats().ack_failures.fetch_add(failures, Ordering::Relaxed);
        }
        self.stats().conflated.fetch_add(conflated, Ordering::Relaxed);
        self.stats().dropped.fetch_add(dropped, Ordering::Relaxed);
        self.publish_metrics(now);
    }

    /// Moves this shard's tallies where a scrape reads them, and sets its gauges.
    pub(super) fn publish_metrics(&mut self, now: Instant) {
        let with_timings = now.saturating_duration_since(self.timings_flushed_at) >= TIMINGS_FLUSH_INTERVAL;
        if with_timings {
            self.timings_flushed_at = now;
            self.requests.sweep(now);
        }
        let shared = &self.cluster.stats[self.id].metrics;
        self.metrics.flush_into(shared, with_timings, now);
        for (gauge, &count) in shared.subscriptions.iter().zip(&self.subscriptions) {
            gauge.store(count, Ordering::Relaxed);
        }
        shared.backlog.store(self.links.backlog_len() as u64, Ordering::Relaxed);
        self.stats().channels.store(self.broker.channel_count() as u64, Ordering::Relaxed);
    }

    /// Expires history and forgets idle owned channels.
    pub fn sweep(&mut self) {
        self.broker.sweep(Instant::now());
        self.stats().channels.store(self.broker.channel_count() as u64, Ordering::Relaxed);
        self.stats().history_size.store(self.broker.history_len() as u64, Ordering::Relaxed);
    }
}
