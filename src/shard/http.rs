//! Answers of the plain-HTTP routes (the pages of `routes.rs`), served on the WebSocket port
//! and, `/metrics` and `/health`, on the metrics address.

use std::cell::RefCell;
use std::sync::atomic::Ordering;
use std::time::Duration;

use serde::Serialize;

use super::routes::Page;
use super::state::ShardState;
use super::supervise::Task;
use super::Cluster;
use crate::config::{AuthMode, Config};
use crate::protocol::http::{self, RequestHead};
use crate::protocol::pb;

/// The answer to a request for `page`; `method` is the one the page takes, `target` what its
/// path holds past the route's (`/zstd/dictionaries…`).
pub(super) fn page(
    state: &RefCell<ShardState>,
    head: &RequestHead,
    page: Page,
    method: Option<&str>,
    target: &str,
) -> Vec<u8> {
    if let Some(method) = method.filter(|&method| head.method != method) {
        return http::error_response(405, &format!("use {method}"));
    }
    match page {
        Page::Health => {
            let body = health_json(&state.borrow().cluster);
            http::response(200, "application/json", body.as_bytes())
        }
        Page::Metrics => {
            let body = super::exposition::metrics_text(&state.borrow().cluster);
            http::response(200, crate::metrics::prometheus::CONTENT_TYPE, body.as_bytes())
        }
        Page::ConfigLimits => {
            let body = limits_json(&state.borrow_mut().config());
            http::response(200, "application/json", body.as_bytes())
        }
        Page::ZstdDictionaries => zstd_dictionaries(&state.borrow().cluster, target),
    }
}

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
                "linger_us": stats.linger_us.load(Ordering::Relaxed),
                "panics": stats.panic_total(),
            })
        })
        .collect();
    let connections: u64 = cluster.stats.iter().map(|s| s.connections.load(Ordering::Relaxed)).sum();
    let total = |field: fn(&super::ShardStats) -> &std::sync::atomic::AtomicU64| -> u64 {
        cluster.stats.iter().map(|s| field(s).load(Ordering::Relaxed)).sum()
    };
    // Publications an external broker counted itself, as `/metrics` counts them.
    let through_broker: u64 = (0..crate::metrics::UPDATE_TYPES).map(|slot| cluster.broker.published(slot)).sum();
    let mut delivery = serde_json::json!({
        "published": total(|s| &s.published) + through_broker,
        "delivered": total(|s| &s.delivered),
        "recoveries_served": total(|s| &s.recoveries_served),
        "recoveries_refused": total(|s| &s.recoveries_refused),
        "ack_failures": total(|s| &s.ack_failures),
        "inbox_dropped": total(|s| &s.inbox_dropped),
        "channels": total(|s| &s.channels),
    });
    // With an external broker history lives there, shared by every node: no figure of this
    // node's says how much, so none is shown.
    if cluster.broker.holds_history() {
        delivery["history_size"] = total(|s| &s.history_size).into();
    }
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
    let compression = serde_json::json!({
        "threshold_bytes": cluster.zstd.threshold,
        "level": cluster.zstd.level,
        "messages": total(|s| &s.compressed_messages),
        "plain_bytes": total(|s| &s.compressed_plain_bytes),
        "compressed_bytes": total(|s| &s.compressed_bytes),
        "compressions": total(|s| &s.compressions),
        "with_dictionary": total(|s| &s.compressed_with_dictionary),
        "dictionaries": cluster.zstd.dictionaries.len(),
    });
    let refused = serde_json::json!({
        "attempts_per_ip": total(|s| &s.refused_attempts_per_ip),
        "max_connections": total(|s| &s.refused_max_connections),
        "per_shard": total(|s| &s.refused_per_shard),
        "per_ip": total(|s| &s.refused_per_ip),
    });
    let admission = serde_json::json!({
        "connections": cluster.admission.connections(),
        "addresses": cluster.admission.addresses(),
        "attempt_buckets": cluster.admission.attempt_buckets(),
    });
    let tls = match &cluster.tls {
        Some(tls) => serde_json::json!({
            "enabled": true,
            "reloads": tls.reloads(),
            "reload_failures": tls.reload_failures(),
            "handshake_failures": total(|s| &s.tls_handshake_failures),
        }),
        None => serde_json::json!({"enabled": false}),
    };
    let mut drivers: Vec<&str> = cluster.stats.iter().map(|s| s.driver_name()).collect();
    drivers.dedup();
    let driver = if drivers.len() == 1 { drivers[0] } else { "mixed" };
    let broker_down = !cluster.broker.is_up();
    let mut panics = serde_json::Map::new();
    for task in Task::ALL {
        let count: u64 = cluster.stats.iter().map(|s| s.panic_count(task)).sum();
        panics.insert(task.label().to_owned(), count.into());
    }
    let panicked = cluster.stats.iter().any(|s| s.panic_total() > 0);
    // A caught panic is a bug met: the shard carries on, but its state may be off until a
    // restart, which the operator can do when it suits (`per_shard` says where).
    let status = if cluster.draining.load(Ordering::Relaxed) {
        "draining"
    } else if broker_down || panicked {
        "degraded"
    } else {
        "ok"
    };
    let broker = cluster.broker.health();
    serde_json::json!({
        "status": status,
        "version": env!("CARGO_PKG_VERSION"),
        "driver": driver,
        "shards": cluster.stats.len(),
        "connections": connections,
        "uptime_seconds": cluster.started_at.elapsed().as_secs(),
        "per_shard": shards,
        "panics": panics,
        "broker": broker,
        "delivery": delivery,
        "compression": compression,
        "protection": protection,
        "refused_connections": refused,
        "admission": admission,
        "tls": tls,
    })
    .to_string()
}

/// The authentication settings a client may know; the secret and key files stay out.
#[derive(Serialize)]
struct PublicAuth<'a> {
    mode: AuthMode,
    #[serde(with = "humantime_serde")]
    leeway: Duration,
    #[serde(with = "humantime_serde")]
    max_token_lifetime: Duration,
    #[serde(with = "humantime_serde")]
    refresh_reminder: Duration,
    #[serde(with = "humantime_serde")]
    expiry_grace: Duration,
    default_subscribe: &'a [String],
    default_publish: &'a [String],
}

/// `GET /config/limits`: the limits in force, durations written as in the config (`"1m"`).
/// Only named settings are copied, so a secret added to the config later cannot leak here.
pub(super) fn limits_json(config: &Config) -> String {
    let auth = &config.auth;
    let public_auth = PublicAuth {
        mode: auth.mode,
        leeway: auth.leeway,
        max_token_lifetime: auth.max_token_lifetime,
        refresh_reminder: auth.refresh_reminder,
        expiry_grace: auth.expiry_grace,
        default_subscribe: &auth.default_subscribe,
        default_publish: &auth.default_publish,
    };
    serde_json::json!({
        "limits": config.limits,
        "rate_limits": config.rate_limits,
        "heartbeat": config.heartbeat,
        "delivery": {
            "priority_types": config.delivery.priority_types,
            "conflate_above_bytes": config.delivery.conflate_above_bytes,
            "batch_size": config.delivery.batch_size,
            "batch_interval": format!("{}ms", config.delivery.batch_interval.as_millis()),
            "overload_interval": format!("{}ms", config.delivery.overload_interval.as_millis()),
            "compression_threshold": config.delivery.compression_threshold,
            "compression_level": config.delivery.compression_level,
        },
        "auth": public_auth,
    })
    .to_string()
}

/// `GET /zstd/dictionaries`: the dictionaries (id, update type, size);
/// `GET /zstd/dictionaries/{id}`: one, as the bytes a client decompresses with. `rest` is what
/// follows `/zstd/dictionaries`.
fn zstd_dictionaries(cluster: &Cluster, rest: &str) -> Vec<u8> {
    let dictionaries = &cluster.zstd.dictionaries;
    match rest {
        "" | "/" => {
            let list: Vec<serde_json::Value> = dictionaries
                .iter()
                .map(|d| {
                    let name = pb::UpdateType::try_from(d.update_type).map_or("UNKNOWN", |t| t.as_str_name());
                    serde_json::json!({"id": d.id, "type": name, "bytes": d.bytes.len()})
                })
                .collect();
            let body = serde_json::json!({"dictionaries": list}).to_string();
            http::response(200, "application/json", body.as_bytes())
        }
        rest => match rest.strip_prefix('/').and_then(|id| id.parse::<u32>().ok()) {
            Some(id) => match dictionaries.iter().find(|d| d.id == id) {
                Some(d) => http::response(200, "application/zstd-dictionary", &d.bytes),
                None => http::error_response(404, "no zstd dictionary with that id"),
            },
            None => http::error_response(404, "no such path; try /zstd/dictionaries"),
        },
    }
}
