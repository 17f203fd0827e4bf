//! `GET /metrics`: every shard's figures merged, in the Prometheus text format. Names start
//! with `realtime_`; docs/metrics.md lists them.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use super::supervise::Task;
use super::{Cluster, ShardStats};
use crate::auth::AuthFailure;
use crate::metrics::prometheus::{Exposition, Kind, MICROS_PER_SECOND};
use crate::metrics::{process, CommandKind, Timing, TimingWindows, UPDATE_TYPE_LABELS};
use crate::protocol::{CloseCode, ErrorCode};

const FRAMES_BOUNDS: [u64; 9] = [1, 2, 4, 8, 16, 32, 64, 128, 256];

fn sum(cluster: &Cluster, field: impl Fn(&ShardStats) -> &AtomicU64) -> u64 {
    cluster.stats.iter().map(|s| field(s).load(Ordering::Relaxed)).sum()
}

pub(super) fn metrics_text(cluster: &Cluster) -> String {
    let mut page = Exposition::default();
    let now = Instant::now();
    server(&mut page, cluster);
    connections(&mut page, cluster);
    delivery(&mut page, cluster);
    requests(&mut page, cluster);
    compression(&mut page, cluster);
    shards(&mut page, cluster);
    timings(&mut page, cluster, now);
    cluster.broker.write_metrics(&mut page, now);
    process_figures(&mut page);
    page.finish()
}

fn server(page: &mut Exposition, cluster: &Cluster) {
    page.family("realtime_build_info", Kind::Gauge, "The running version (value 1).");
    page.sample("realtime_build_info", &[("version", env!("CARGO_PKG_VERSION"))], 1);
    page.single(
        "realtime_uptime_seconds",
        Kind::Gauge,
        "Seconds since the server started.",
        cluster.started_at.elapsed().as_secs(),
    );
    page.single(
        "realtime_shards",
        Kind::Gauge,
        "Shards (threads with their own listener).",
        cluster.stats.len() as u64,
    );
    let draining = u64::from(cluster.draining.load(Ordering::Relaxed));
    page.single("realtime_draining", Kind::Gauge, "1 while the server shuts down and sends clients away.", draining);
}

fn connections(page: &mut Exposition, cluster: &Cluster) {
    page.family("realtime_connections", Kind::Gauge, "Open WebSocket connections, by shard.");
    for (id, stats) in cluster.stats.iter().enumerate() {
        page.sample("realtime_connections", &[("shard", &id.to_string())], stats.connections.load(Ordering::Relaxed));
    }
    let accepted = sum(cluster, |s| &s.accepted);
    page.single("realtime_connections_accepted_total", Kind::Counter, "WebSocket upgrades accepted.", accepted);
    page.family(
        "realtime_connections_closed_total",
        Kind::Counter,
        "Connections ended, by the close code's label (`peer`: the client left without one from us).",
    );
    for (index, code) in CloseCode::ALL.iter().enumerate() {
        let count = sum(cluster, |s| &s.closed[index]);
        page.sample("realtime_connections_closed_total", &[("reason", code.label())], count);
    }
    let by_peer = sum(cluster, |s| &s.metrics.closed_by_peer);
    page.sample("realtime_connections_closed_total", &[("reason", "peer")], by_peer);
    page.family("realtime_connections_refused_total", Kind::Counter, "Upgrades refused before the answer, by reason.");
    for (reason, count) in [
        ("attempts_per_ip", sum(cluster, |s| &s.refused_attempts_per_ip)),
        ("max_connections", sum(cluster, |s| &s.refused_max_connections)),
        ("max_connections_per_shard", sum(cluster, |s| &s.refused_per_shard)),
        ("max_connections_per_ip", sum(cluster, |s| &s.refused_per_ip)),
    ] {
        page.sample("realtime_connections_refused_total", &[("reason", reason)], count);
    }
    let slow_index = CloseCode::ALL.iter().position(|&c| c == CloseCode::SlowConsumer).unwrap_or(0);
    page.single(
        "realtime_slow_consumer_disconnects_total",
        Kind::Counter,
        "Connections closed because they did not read their updates (close code 4001).",
        sum(cluster, |s| &s.closed[slow_index]),
    );
    page.single(
        "realtime_http_bad_requests_total",
        Kind::Counter,
        "HTTP request heads refused (malformed, too large).",
        sum(cluster, |s| &s.bad_requests),
    );
    page.single(
        "realtime_tls_handshake_failures_total",
        Kind::Counter,
        "TLS handshakes that failed or did not finish in time.",
        sum(cluster, |s| &s.tls_handshake_failures),
    );
}

fn delivery(page: &mut Exposition, cluster: &Cluster) {
    page.family(
        "realtime_subscriptions",
        Kind::Gauge,
        "Current subscriptions, by the type their channel is named for.",
    );
    for (slot, label) in UPDATE_TYPE_LABELS.iter().enumerate() {
        page.sample("realtime_subscriptions", &[("type", label)], sum(cluster, |s| &s.metrics.subscriptions[slot]));
    }
    page.single(
        "realtime_channels",
        Kind::Gauge,
        "Channels with subscribers or history.",
        sum(cluster, |s| &s.channels),
    );
    // With an external broker history lives there, shared by every node; no figure of this
    // node's says how much.
    if cluster.broker.holds_history() {
        page.single(
            "realtime_history_size",
            Kind::Gauge,
            "Publications held in history (embedded broker).",
            sum(cluster, |s| &s.history_size),
        );
    }
    page.family("realtime_updates_published_total", Kind::Counter, "Publications accepted, by update type.");
    for (slot, label) in UPDATE_TYPE_LABELS.iter().enumerate() {
        let count = sum(cluster, |s| &s.metrics.published[slot]) + cluster.broker.published(slot);
        page.sample("realtime_updates_published_total", &[("type", label)], count);
    }
    page.family("realtime_updates_delivered_total", Kind::Counter, "Updates written to subscribers' sockets, by type.");
    for (slot, label) in UPDATE_TYPE_LABELS.iter().enumerate() {
        page.sample(
            "realtime_updates_delivered_total",
            &[("type", label)],
            sum(cluster, |s| &s.metrics.delivered[slot]),
        );
    }
    page.single(
        "realtime_updates_conflated_total",
        Kind::Counter,
        "Lower-priority updates of slow connections replaced by newer ones with the same key.",
        sum(cluster, |s| &s.conflated),
    );
    page.single(
        "realtime_updates_dropped_total",
        Kind::Counter,
        "Lower-priority updates of slow connections dropped to make room.",
        sum(cluster, |s| &s.dropped),
    );
    page.single(
        "realtime_inbox_dropped_total",
        Kind::Counter,
        "Deliveries dropped because another shard's inbox stayed full.",
        sum(cluster, |s| &s.inbox_dropped),
    );
    page.family("realtime_recoveries_total", Kind::Counter, "Recoveries after reconnect, by result.");
    page.sample("realtime_recoveries_total", &[("result", "served")], sum(cluster, |s| &s.recoveries_served));
    page.sample("realtime_recoveries_total", &[("result", "refused")], sum(cluster, |s| &s.recoveries_refused));
    page.single(
        "realtime_ack_failures_total",
        Kind::Counter,
        "Acknowledged updates given up on (redelivered too often, or pushed out by newer ones).",
        sum(cluster, |s| &s.ack_failures),
    );
    page.single(
        "realtime_received_bytes_total",
        Kind::Counter,
        "Bytes read from WebSocket connections.",
        sum(cluster, |s| &s.metrics.bytes_received),
    );
    page.single(
        "realtime_sent_bytes_total",
        Kind::Counter,
        "Bytes written to WebSocket connections.",
        sum(cluster, |s| &s.metrics.bytes_sent),
    );
    page.single(
        "realtime_websocket_messages_sent_total",
        Kind::Counter,
        "WebSocket messages of updates and replies written (each a batch of frames).",
        sum(cluster, |s| &s.metrics.messages_sent),
    );
}

fn requests(page: &mut Exposition, cluster: &Cluster) {
    page.family("realtime_commands_total", Kind::Counter, "Client commands received, by command.");
    for command in CommandKind::ALL {
        let count = sum(cluster, |s| &s.metrics.commands[command as usize]);
        page.sample("realtime_commands_total", &[("command", command.label())], count);
    }
    page.family("realtime_errors_total", Kind::Counter, "Error replies sent, by code.");
    for (index, code) in ErrorCode::ALL.iter().enumerate() {
        let count = sum(cluster, |s| &s.metrics.errors[index]);
        page.sample("realtime_errors_total", &[("code", &code.code().to_string())], count);
    }
    page.single(
        "realtime_rate_limited_total",
        Kind::Counter,
        "Requests refused by a rate limit (answered 429).",
        sum(cluster, |s| &s.rate_limited),
    );
    page.family(
        "realtime_api_requests_total",
        Kind::Counter,
        "Server API requests answered, by route and HTTP status (pairs seen so far).",
    );
    for (route, status, count) in cluster.api.request_counts() {
        page.sample("realtime_api_requests_total", &[("route", route), ("code", &status)], count);
    }
    let (published, refused) = cluster.api.publication_counts();
    page.family(
        "realtime_api_publications_total",
        Kind::Counter,
        "Publications sent through the server API (alone or in batches), by result.",
    );
    page.sample("realtime_api_publications_total", &[("result", "published")], published);
    page.sample("realtime_api_publications_total", &[("result", "refused")], refused);
    page.family("realtime_auth_failures_total", Kind::Counter, "Tokens refused, by reason.");
    for (index, failure) in AuthFailure::ALL.iter().enumerate() {
        page.sample(
            "realtime_auth_failures_total",
            &[("reason", failure.label())],
            sum(cluster, |s| &s.auth_failures[index]),
        );
    }
}

fn compression(page: &mut Exposition, cluster: &Cluster) {
    let plain = sum(cluster, |s| &s.compressed_plain_bytes);
    let compressed = sum(cluster, |s| &s.compressed_bytes);
    page.single(
        "realtime_compression_messages_total",
        Kind::Counter,
        "Messages sent zstd-compressed.",
        sum(cluster, |s| &s.compressed_messages),
    );
    page.single(
        "realtime_compression_plain_bytes_total",
        Kind::Counter,
        "Bytes of compressed messages before compression.",
        plain,
    );
    page.single(
        "realtime_compression_compressed_bytes_total",
        Kind::Counter,
        "Bytes of compressed messages as sent.",
        compressed,
    );
    page.single(
        "realtime_compression_saved_bytes_total",
        Kind::Counter,
        "Bytes zstd saved.",
        plain.saturating_sub(compressed),
    );
    page.family(
        "realtime_compression_ratio",
        Kind::Gauge,
        "Plain bytes per compressed byte since start (0: none yet).",
    );
    let ratio = if compressed == 0 { 0.0 } else { plain as f64 / compressed as f64 };
    page.sample_f64("realtime_compression_ratio", &[], ratio);
    page.single(
        "realtime_compressions_total",
        Kind::Counter,
        "Times zstd ran (a batch shared by many subscribers is compressed once).",
        sum(cluster, |s| &s.compressions),
    );
    page.single(
        "realtime_compression_with_dictionary_total",
        Kind::Counter,
        "Compressed messages that used a trained dictionary.",
        sum(cluster, |s| &s.compressed_with_dictionary),
    );
}

fn shards(page: &mut Exposition, cluster: &Cluster) {
    page.family("realtime_inbox_depth", Kind::Gauge, "Messages waiting in a shard's inbox.");
    for (id, inbox) in cluster.inboxes.iter().enumerate() {
        page.sample("realtime_inbox_depth", &[("shard", &id.to_string())], inbox.len() as u64);
    }
    page.family("realtime_inbox_backlog", Kind::Gauge, "Messages a shard holds for other shards' full inboxes.");
    for (id, stats) in cluster.stats.iter().enumerate() {
        page.sample(
            "realtime_inbox_backlog",
            &[("shard", &id.to_string())],
            stats.metrics.backlog.load(Ordering::Relaxed),
        );
    }
    page.family(
        "realtime_linger_seconds",
        Kind::Gauge,
        "How long a busy shard's writes wait for company (adaptive batching).",
    );
    for (id, stats) in cluster.stats.iter().enumerate() {
        let linger = stats.linger_us.load(Ordering::Relaxed) as f64 / MICROS_PER_SECOND;
        page.sample_f64("realtime_linger_seconds", &[("shard", &id.to_string())], linger);
    }
    page.family(
        "realtime_shard_panics_total",
        Kind::Counter,
        "Panics caught on a shard, by the task they came out of; the shard carried on.",
    );
    for (id, stats) in cluster.stats.iter().enumerate() {
        for task in Task::ALL {
            page.sample(
                "realtime_shard_panics_total",
                &[("shard", &id.to_string()), ("task", task.label())],
                stats.panic_count(task),
            );
        }
    }
}

/// Every shard's windows of one slot, merged: since start and recent.
fn merged<'a>(mut windows: impl Iterator<Item = &'a TimingWindows>, now: Instant) -> Option<(Timing, Timing)> {
    let first = windows.next()?;
    let (mut total, mut recent) = (first.total.clone(), first.recent(now));
    for w in windows {
        total.add(&w.total);
        recent.add(&w.recent(now));
    }
    Some((total, recent))
}

/// A latency histogram family and its recent quantiles, one series per label with data.
fn timings(page: &mut Exposition, cluster: &Cluster, now: Instant) {
    let guards: Vec<_> = cluster
        .stats
        .iter()
        .map(|s| s.metrics.timings.lock().unwrap_or_else(|poisoned| poisoned.into_inner()))
        .collect();
    let by_type = |pick: fn(&crate::metrics::SharedTimings, usize) -> Option<&TimingWindows>| -> Vec<(&str, Option<(Timing, Timing)>)> {
        UPDATE_TYPE_LABELS
            .iter()
            .enumerate()
            .map(|(slot, label)| (*label, merged(guards.iter().filter_map(|g| pick(g, slot)), now)))
            .collect()
    };
    let delivery = by_type(|t, slot| t.delivery[slot].as_deref());
    page.latency_family(
        "realtime_latency_seconds",
        "Publish to written to the subscriber's socket, by update type.",
        "type",
        &delivery,
    );
    let acked = by_type(|t, slot| t.acked[slot].as_deref());
    page.latency_family(
        "realtime_delivery_acked_seconds",
        "Publish to the subscriber's acknowledgement (end to end, acknowledged subscriptions), by type.",
        "type",
        &acked,
    );
    let requests: Vec<(&str, Option<(Timing, Timing)>)> = CommandKind::ALL
        .iter()
        .map(|&c| (c.label(), merged(guards.iter().filter_map(|g| g.requests[c as usize].as_deref()), now)))
        .collect();
    page.latency_family(
        "realtime_request_duration_seconds",
        "A command's arrival to its answer queued, by command.",
        "command",
        &requests,
    );
    page.family(
        "realtime_frames_per_message",
        Kind::Histogram,
        "Frames (updates, replies) per WebSocket message written.",
    );
    if let Some((total, _)) = merged(guards.iter().filter_map(|g| g.frames.as_deref()), now) {
        page.histogram("realtime_frames_per_message", &[], &total, &FRAMES_BOUNDS, 1.0);
    }
}

fn process_figures(page: &mut Exposition) {
    let figures = process::read();
    let gauges = [
        ("realtime_process_resident_memory_bytes", "Resident memory.", figures.resident_bytes),
        ("realtime_process_virtual_memory_bytes", "Virtual memory.", figures.virtual_bytes),
        ("realtime_process_open_fds", "Open file descriptors (sockets included).", figures.open_fds),
        ("realtime_process_max_fds", "The open file descriptor limit (ulimit -n).", figures.max_fds),
        ("realtime_process_threads", "Threads.", figures.threads),
    ];
    for (name, help, value) in gauges {
        if let Some(value) = value {
            page.single(name, Kind::Gauge, help, value);
        }
    }
    if let Some(seconds) = figures.cpu_seconds {
        page.family("realtime_process_cpu_seconds_total", Kind::Counter, "CPU time used, user and system.");
        page.sample_f64("realtime_process_cpu_seconds_total", &[], seconds);
    }
}
