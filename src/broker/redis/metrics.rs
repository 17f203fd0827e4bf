//! What the Redis broker says in `/metrics`: whether it is connected, its queue, failures,
//! resyncs, the publish queue, and round-trip latencies.

use std::sync::atomic::Ordering;
use std::time::Instant;

use super::BridgeHandle;
use crate::metrics::prometheus::{Exposition, Kind};
use crate::metrics::{RedisMetrics, RedisOp, Resync, Timing};

/// The Redis broker's metric families.
pub(super) fn write(
    page: &mut Exposition,
    bridge: &BridgeHandle,
    metrics: &RedisMetrics,
    queue_consumer: bool,
    now: Instant,
) {
    page.single("realtime_redis_up", Kind::Gauge, "1 while the Redis broker is connected.", u64::from(bridge.is_up()));
    page.single(
        "realtime_redis_queue_length",
        Kind::Gauge,
        "Requests waiting for the Redis bridge.",
        bridge.queued() as u64,
    );
    page.single(
        "realtime_redis_queue_capacity",
        Kind::Gauge,
        "Requests the Redis bridge holds before shards answer 503.",
        bridge.capacity() as u64,
    );
    page.family("realtime_redis_failures_total", Kind::Counter, "Redis round trips that failed, by operation.");
    for op in RedisOp::ALL {
        let failures = metrics.failures[op as usize].load(Ordering::Relaxed);
        page.sample("realtime_redis_failures_total", &[("op", op.label())], failures);
    }
    page.family(
        "realtime_redis_resyncs_total",
        Kind::Counter,
        "Channels whose subscribers on this node were told to resync (4003), by what the node saw.",
    );
    for reason in Resync::ALL {
        let resyncs = metrics.resyncs[reason as usize].load(Ordering::Relaxed);
        page.sample("realtime_redis_resyncs_total", &[("reason", reason.label())], resyncs);
    }
    page.single(
        "realtime_redis_publish_queue_consumed_total",
        Kind::Counter,
        "Items of the Redis publish queue this node published.",
        metrics.queue_consumed.load(Ordering::Relaxed),
    );
    page.single(
        "realtime_redis_publish_queue_dead_total",
        Kind::Counter,
        "Items of the Redis publish queue moved to the dead list (not valid publications).",
        metrics.queue_dead.load(Ordering::Relaxed),
    );
    if queue_consumer {
        page.single(
            "realtime_redis_publish_queue_length",
            Kind::Gauge,
            "Items waiting in the Redis publish queue (read every 5 s).",
            metrics.queue_length.load(Ordering::Relaxed),
        );
        page.single(
            "realtime_redis_publish_queue_dead_length",
            Kind::Gauge,
            "Items in the publish queue's dead list (read every 5 s).",
            metrics.dead_length.load(Ordering::Relaxed),
        );
    }
    let round_trips = metrics.round_trips.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let series: Vec<(&str, Option<(Timing, Timing)>)> = RedisOp::ALL
        .iter()
        .map(|&op| (op.label(), round_trips[op as usize].as_deref().map(|w| (w.total.clone(), w.recent(now)))))
        .collect();
    drop(round_trips);
    page.latency_family("realtime_redis_roundtrip_seconds", "Redis round trips, by operation.", "op", &series);
}
