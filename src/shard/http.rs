//! Answers of the plain-HTTP routes served on the WebSocket port.

use std::sync::atomic::Ordering;

use super::Cluster;

/// `GET /health`: status, version, driver per shard, shard count, connections, uptime.
pub(super) fn health_json(cluster: &Cluster) -> String {
    let shards: Vec<serde_json::Value> = cluster
        .stats
        .iter()
        .enumerate()
        .map(|(id, stats)| {
            serde_json::json!({
                "id": id,
                "driver": stats.driver_name(),
                "connections": stats.connections.load(Ordering::Relaxed),
                "inbox_depth": cluster.inboxes[id].len(),
            })
        })
        .collect();
    let connections: u64 = cluster.stats.iter().map(|s| s.connections.load(Ordering::Relaxed)).sum();
    let total = |field: fn(&super::ShardStats) -> &std::sync::atomic::AtomicU64| -> u64 {
        cluster.stats.iter().map(|s| field(s).load(Ordering::Relaxed)).sum()
    };
    let delivery = serde_json::json!({
        "published": total(|s| &s.published),
        "delivered": total(|s| &s.delivered),
        "recoveries_served": total(|s| &s.recoveries_served),
        "recoveries_refused": total(|s| &s.recoveries_refused),
        "ack_failures": total(|s| &s.ack_failures),
        "inbox_dropped": total(|s| &s.inbox_dropped),
        "channels": total(|s| &s.channels),
        "history_size": total(|s| &s.history_size),
    });
    let mut drivers: Vec<&str> = cluster.stats.iter().map(|s| s.driver_name()).collect();
    drivers.dedup();
    let driver = if drivers.len() == 1 { drivers[0] } else { "mixed" };
    let redis_down = cluster.redis.as_ref().is_some_and(|r| !r.is_up());
    let status = if cluster.draining.load(Ordering::Relaxed) {
        "draining"
    } else if redis_down {
        "degraded"
    } else {
        "ok"
    };
    let broker = match &cluster.redis {
        Some(redis) => serde_json::json!({"kind": "redis", "connected": redis.is_up()}),
        None => serde_json::json!({"kind": "memory"}),
    };
    serde_json::json!({
        "status": status,
        "version": env!("CARGO_PKG_VERSION"),
        "driver": driver,
        "shards": cluster.stats.len(),
        "connections": connections,
        "uptime_seconds": cluster.started_at.elapsed().as_secs(),
        "per_shard": shards,
        "broker": broker,
        "delivery": delivery,
    })
    .to_string()
}
