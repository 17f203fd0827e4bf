use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::prometheus::{Exposition, Kind};
use super::*;

fn publication(update_type: i32, accepted_at: Instant) -> Rc<Publication> {
    Rc::new(crate::protocol::push::publication(
        Arc::from("route:1"),
        1,
        update_type,
        Bytes::from_static(b"x"),
        accepted_at,
    ))
}

#[test]
fn channels_are_typed_by_their_prefix_and_anything_else_is_other() {
    assert_eq!(UPDATE_TYPE_LABELS[channel_slot("route:42")], "route");
    assert_eq!(UPDATE_TYPE_LABELS[channel_slot("WEATHER:oslo")], "weather");
    assert_eq!(UPDATE_TYPE_LABELS[channel_slot("poi")], "poi");
    assert_eq!(UPDATE_TYPE_LABELS[channel_slot("routes:1")], "other");
    assert_eq!(UPDATE_TYPE_LABELS[channel_slot("")], "other");
    assert_eq!(UPDATE_TYPE_LABELS[type_slot(5)], "poi");
    assert_eq!(UPDATE_TYPE_LABELS[type_slot(99)], "other");
    assert_eq!(UPDATE_TYPE_LABELS[type_slot(-1)], "other");
}

#[test]
fn timings_keep_sum_count_and_buckets_within_one_percent() {
    let mut timing = Timing::new(LATENCY_MAX_US);
    for value in [10, 100, 1_000, 10_000] {
        timing.record(value);
    }
    timing.record(u64::MAX);
    assert_eq!(timing.count(), 5);
    assert_eq!(timing.sum(), 11_110 + LATENCY_MAX_US);
    assert_eq!(timing.count_at_most(9), 0);
    assert_eq!(timing.count_at_most(100), 2);
    assert_eq!(timing.count_at_most(9_999), 3);
    assert_eq!(timing.count_at_most(LATENCY_MAX_US), 5);
    let median = timing.quantile(0.5);
    assert!((990..=1010).contains(&median), "{median}");
}

#[test]
fn recent_quantiles_forget_what_is_older_than_two_windows() {
    let start = Instant::now();
    let mut windows = TimingWindows::new(LATENCY_MAX_US, start);
    windows.record(1_000, start);
    assert_eq!(windows.recent(start).count(), 1);
    let later = start + histogram::WINDOW + Duration::from_secs(1);
    windows.record(5_000, later);
    assert_eq!(windows.recent(later).count(), 2, "the previous window still counts");
    let much_later = later + histogram::WINDOW * 2;
    assert_eq!(windows.recent(much_later).count(), 0);
    windows.record(7_000, much_later);
    assert_eq!(windows.recent(much_later).count(), 1);
    assert_eq!(windows.total.count(), 3, "the histogram since start keeps everything");
}

#[test]
fn local_tallies_move_to_the_shared_figures_and_start_again() {
    let local = LocalMetrics::default();
    let shared = SharedMetrics::default();
    let now = Instant::now();
    let published = now - Duration::from_millis(3);
    let route = publication(1, published);
    let poi = publication(5, published);
    local.record_deliveries(now, [&*route, &*route, &*poi].into_iter());
    local.record_acked(now, &poi);
    local.record_message(3);
    local.record_message(1);
    local.record_message(1);
    local.count_command(CommandKind::Ping);
    local.count_command(CommandKind::Publish);
    local.forwarded(CommandKind::Publish);
    local.finish_read(Duration::from_micros(40));
    local.count_error(ErrorCode::RateLimited);
    local.count_sent(100);
    local.flush_into(&shared, false, now);
    assert_eq!(shared.delivered[1].load(Ordering::Relaxed), 2);
    assert_eq!(shared.delivered[5].load(Ordering::Relaxed), 1);
    assert_eq!(shared.commands[CommandKind::Ping as usize].load(Ordering::Relaxed), 1);
    assert_eq!(shared.errors[6].load(Ordering::Relaxed), 1, "429 is the seventh code");
    assert_eq!(shared.bytes_sent.load(Ordering::Relaxed), 100);
    assert!(shared.timings.lock().unwrap().delivery[1].is_none(), "histograms move only when asked");
    local.flush_into(&shared, true, now);
    let timings = shared.timings.lock().unwrap();
    let route_latency = &timings.delivery[1].as_ref().unwrap().total;
    assert_eq!(route_latency.count(), 2);
    assert!((2_970..=3_030).contains(&route_latency.quantile(0.5)), "{}", route_latency.quantile(0.5));
    // Ping is answered within the read; publish waits for the owner and is timed there.
    let poi_acked = &timings.acked[5].as_ref().unwrap().total;
    assert_eq!(poi_acked.count(), 1);
    assert!((2_970..=3_030).contains(&poi_acked.quantile(0.5)), "{}", poi_acked.quantile(0.5));
    assert!(timings.acked[1].is_none(), "no route update was acknowledged");
    let ping = &timings.requests[CommandKind::Ping as usize].as_ref().unwrap().total;
    assert_eq!((ping.count(), ping.sum()), (1, 40));
    assert!(timings.requests[CommandKind::Publish as usize].is_none());
    // Frames per message are counted in buckets and join the histogram at the flush.
    let frames = &timings.frames.as_ref().unwrap().total;
    assert_eq!((frames.count(), frames.sum(), frames.count_at_most(1)), (3, 5, 2));
    drop(timings);
    local.flush_into(&shared, true, now);
    assert_eq!(shared.delivered[1].load(Ordering::Relaxed), 2, "a flush moves each tally once");
}

#[test]
fn requests_are_timed_from_start_to_answer_and_never_pile_up() {
    let mut clock = RequestClock::default();
    let conn = ConnId { index: 3, generation: 1 };
    let start = Instant::now();
    clock.start(conn, 7, CommandKind::Subscribe, start);
    clock.start(conn, 0, CommandKind::Publish, start);
    assert_eq!(clock.len(), 1, "fire-and-forget requests are not answered, so not timed");
    let answered = clock.finish(conn, 7, start + Duration::from_millis(2));
    assert_eq!(answered, Some((CommandKind::Subscribe, Duration::from_millis(2))));
    assert_eq!(clock.finish(conn, 7, start), None);
    clock.start(conn, 8, CommandKind::History, start);
    clock.sweep(start + FORGET_REQUEST_AFTER);
    assert!(clock.is_empty());
    for req_id in 1..=(MAX_TIMED_REQUESTS as u32 + 10) {
        clock.start(conn, req_id, CommandKind::Publish, start);
    }
    assert_eq!(clock.len(), MAX_TIMED_REQUESTS);
}

#[test]
fn the_exposition_escapes_labels_and_writes_cumulative_buckets() {
    let mut page = Exposition::default();
    page.single("realtime_x_total", Kind::Counter, "A counter.\nSecond line.", 3);
    page.family("realtime_y", Kind::Gauge, "A gauge.");
    page.sample("realtime_y", &[("reason", "a \"quoted\" \\ back\nslash")], 1);
    let mut timing = Timing::new(LATENCY_MAX_US);
    timing.record(50);
    timing.record(2_000);
    page.family("realtime_z_seconds", Kind::Histogram, "A histogram.");
    page.histogram("realtime_z_seconds", &[("type", "route")], &timing, &[100, 1_000, 10_000], 1e6);
    let text = page.finish();
    assert!(text.contains("# HELP realtime_x_total A counter.\\nSecond line.\n# TYPE realtime_x_total counter\n"));
    assert!(text.contains("realtime_x_total 3\n"));
    assert!(text.contains("realtime_y{reason=\"a \\\"quoted\\\" \\\\ back\\nslash\"} 1\n"), "{text}");
    assert!(text.contains("realtime_z_seconds_bucket{type=\"route\",le=\"0.0001\"} 1\n"), "{text}");
    assert!(text.contains("realtime_z_seconds_bucket{type=\"route\",le=\"0.001\"} 1\n"));
    assert!(text.contains("realtime_z_seconds_bucket{type=\"route\",le=\"0.01\"} 2\n"));
    assert!(text.contains("realtime_z_seconds_bucket{type=\"route\",le=\"+Inf\"} 2\n"));
    assert!(text.contains("realtime_z_seconds_count{type=\"route\"} 2\n"));
    let sum_line = text.lines().find(|l| l.starts_with("realtime_z_seconds_sum")).unwrap();
    let sum: f64 = sum_line.rsplit(' ').next().unwrap().parse().unwrap();
    assert!((sum - 0.00205).abs() < 1e-9, "{sum_line}");
}

#[test]
fn process_figures_are_read_from_proc() {
    let figures = process::read();
    assert!(figures.resident_bytes.is_some_and(|b| b > 0));
    assert!(figures.open_fds.is_some_and(|n| n >= 3));
    assert!(figures.cpu_seconds.is_some());
    assert!(figures.threads.is_some_and(|n| n >= 1));
}
