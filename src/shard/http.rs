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
    let by_reason = |counters: fn(&super::ShardStats) -> &[std::sync::atomic::AtomicU64], labels: &[&str]| {
        let mut map = serde_json::Map::new();
        for (index, label) in labels.iter().enumerate() {
            let count: u64 = cluster.stats.iter().map(|s| counters(s)[index].load(Ordering::Relaxed)).sum();
            map.insert((*label).to_owned(), count.into());
        }
        serde_json::Value::Object(map)
    };
    let auth_labels: Vec<&str> = crate::auth::AuthFailure::ALL.iter().map(|f| f.label()).collect();
    let close_labels: Vec<&str> = crate::protocol::CloseCode::ALL.iter().map(|c| c.label()).collect();
    let protection = serde_json::json!({
        "auth": if cluster.verifier.is_some() { "jwt" } else { "disabled" },
        "auth_failures": by_reason(|s| &s.auth_failures, &auth_labels),
        "rate_limited": total(|s| &s.rate_limited),
        "closed": by_reason(|s| &s.closed, &close_labels),
        "conflated": total(|s| &s.conflated),
        "dropped": total(|s| &s.dropped),
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
        "protection": protection,
    })
    .to_string()
}
