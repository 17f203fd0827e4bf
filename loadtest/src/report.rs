//! What a run measured, as text, as one JSON object, and as rows of a side-by-side table.

use std::fmt::Write as _;
use std::path::PathBuf;

use hdrhistogram::Histogram;
use serde_json::{json, Value};

use crate::run::{ErrorLog, PublisherStats};
use crate::RunArgs;

/// Generator CPU (percent of one core) from which a run says more about the generator than
/// about the server.
const GENERATOR_SATURATED_PCT: f64 = 95.0;

/// Share of the elapsed time from which waiting for a core says the machine was busy with
/// other work: figures from such a run measure the neighbours too.
const CONTENDED_FRACTION: f64 = 0.1;

pub fn cpu_contended(generator_wait: Option<f64>, server_wait: Option<f64>, elapsed: f64) -> bool {
    [generator_wait, server_wait].iter().flatten().any(|w| *w > CONTENDED_FRACTION * elapsed)
}

/// A run that could not measure anything (no connection, no publisher).
pub struct Fatal {
    pub message: String,
    pub setup_failures: usize,
}

impl Fatal {
    pub fn new(message: String, setup_failures: usize) -> Self {
        Self { message, setup_failures }
    }

    pub fn to_json(&self, args: &RunArgs) -> Value {
        json!({
            "label": label(args),
            "params": params(args),
            "fatal": self.message,
            "setup_failures": self.setup_failures,
            "verdict": "failed: no measurement",
        })
    }
}

pub fn label(args: &RunArgs) -> String {
    args.label.clone().unwrap_or_else(|| format!("{:?}", args.mode).to_lowercase())
}

pub fn params(args: &RunArgs) -> Value {
    json!({
        "scenario": args.scenario.map_or_else(|| "fanout".to_string(), |s| s.name()),
        "payload_kind": format!("{:?}", args.payload_kind).to_lowercase(),
        "accept_zstd": args.accept_zstd,
        "pin_generator": args.pin_generator,
        "mode": format!("{:?}", args.mode).to_lowercase(),
        "addr": args.addr.to_string(),
        "subscribers": args.subscribers,
        "channels": args.channels,
        "publishers": args.publishers,
        "rate": args.rate,
        "duration_s": args.duration,
        "payload_bytes": args.payload,
        "bound_ms": args.bound_ms,
        "server_pid": args.server_pid,
        "driver": format!("{:?}", args.driver).to_lowercase(),
        "event_interval": args.event_interval,
    })
}

pub struct Report {
    pub label: String,
    pub args: RunArgs,
    pub setup_seconds: f64,
    /// Subscribers that got through setup.
    pub subscribers_connected: usize,
    /// Of those, still open when publishing started, and when the window closed.
    pub subscribers_at_start: usize,
    pub subscribers_at_end: usize,
    /// Messages due in the window, and those written to the socket.
    pub scheduled: u64,
    /// Deliveries owed to the subscribers that got through setup, received in the window,
    /// missing (summed per subscriber), and beyond what was owed (duplicates).
    pub expected: u64,
    pub received: u64,
    pub lost: u64,
    pub extra: u64,
    /// Subscribers that received fewer deliveries than they were owed.
    pub short_subscribers: u64,
    /// Deliveries before the window or after it closed (not counted).
    pub outside_window: u64,
    /// Raw mode: broadcasts that came back to the publishers.
    pub echoes: u64,
    /// WebSocket messages the subscribers read in the window.
    pub messages: u64,
    /// Their bytes on the wire (WebSocket payload, compressed if it was, plus frame headers).
    pub wire_bytes: u64,
    /// Mean size of the payloads the publishers sent (timing header included).
    pub payload_bytes_mean: f64,
    pub seq_gaps: u64,
    pub seq_backwards: u64,
    pub window_seconds: f64,
    /// From the first due send until the last publisher finished.
    pub publish_seconds: f64,
    /// From the first due send until the last delivery, at least the window.
    pub measured_seconds: f64,
    /// From the first due send until the end of the drain (the CPU accounting window).
    pub elapsed_seconds: f64,
    /// End-to-end latency from the intended send time, microseconds.
    pub latency: Histogram<u64>,
    /// Messages sent, and when, by all publishers.
    pub publishers: PublisherStats,
    pub errors: ErrorLog,
    pub generator_cpu_seconds: Option<f64>,
    /// Seconds the generator's and the server's threads waited for a core (run-queue wait).
    pub generator_wait_seconds: Option<f64>,
    pub server_wait_seconds: Option<f64>,
    /// Server CPU seconds over the window and its thread count.
    pub server_cpu: Option<(f64, usize)>,
    pub server_rss_bytes: Option<u64>,
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

fn quantiles(h: &Histogram<u64>) -> Option<[f64; 4]> {
    (!h.is_empty()).then(|| {
        [ms(h.value_at_quantile(0.5)), ms(h.value_at_quantile(0.99)), ms(h.value_at_quantile(0.999)), ms(h.max())]
    })
}

impl Report {
    fn delivered_per_second(&self) -> f64 {
        self.received as f64 / self.measured_seconds.max(1e-9)
    }

    fn loss_fraction(&self) -> f64 {
        if self.expected == 0 {
            0.0
        } else {
            self.lost as f64 / self.expected as f64
        }
    }

    fn generator_cpu_pct(&self) -> Option<f64> {
        self.generator_cpu_seconds.map(|s| 100.0 * s / self.elapsed_seconds.max(1e-9))
    }

    fn unsent(&self) -> u64 {
        self.scheduled.saturating_sub(self.publishers.sent)
    }

    fn lag_p99_ms(&self) -> f64 {
        let lag = &self.publishers.lag;
        if lag.is_empty() {
            0.0
        } else {
            ms(lag.value_at_quantile(0.99))
        }
    }

    /// `held` when nothing was lost, nothing failed, the publisher kept its schedule and p99
    /// stayed within the bound; otherwise why not.
    pub fn verdict(&self) -> String {
        let bound = self.args.bound_ms;
        let mut why = Vec::new();
        if self.lost > 0 {
            why.push(format!("lost {}", self.lost));
        }
        if self.errors.total > 0 {
            why.push(format!("{} errors", self.errors.total));
        }
        if self.unsent() > 0 {
            why.push(format!("{} unsent", self.unsent()));
        }
        if self.lag_p99_ms() > bound {
            why.push(format!("publisher lag p99 {:.1} ms > {bound} ms", self.lag_p99_ms()));
        }
        match quantiles(&self.latency) {
            None => why.push("no delivery".into()),
            Some([_, p99, ..]) if p99 > bound => why.push(format!("p99 {p99:.1} ms > {bound} ms")),
            _ => {}
        }
        if why.is_empty() {
            "held".into()
        } else {
            format!("failed: {}", why.join(", "))
        }
    }

    /// Whether the generator or the server waited for a core more than a tenth of the time.
    pub fn cpu_contended(&self) -> bool {
        cpu_contended(self.generator_wait_seconds, self.server_wait_seconds, self.elapsed_seconds)
    }

    pub fn generator_saturated(&self) -> bool {
        self.generator_cpu_pct().is_some_and(|pct| pct >= GENERATOR_SATURATED_PCT)
    }

    pub fn to_json(&self) -> Value {
        let latency = quantiles(&self.latency);
        let lag = quantiles(&self.publishers.lag);
        let wake = quantiles(&self.publishers.wake);
        let write = quantiles(&self.publishers.write);
        let errors: serde_json::Map<String, Value> = self
            .errors
            .by_kind
            .iter()
            .map(|(kind, (count, examples))| (kind.to_string(), json!({ "count": count, "examples": examples })))
            .collect();
        let server_cpu_s = self.server_cpu.map(|(s, _)| s);
        json!({
            "label": self.label,
            "params": params(&self.args),
            "setup_s": self.setup_seconds,
            "subscribers": {
                "requested": self.args.subscribers,
                "connected": self.subscribers_connected,
                "open_at_start": self.subscribers_at_start,
                "open_at_end": self.subscribers_at_end,
                "short": self.short_subscribers,
            },
            "scheduled": self.scheduled,
            "sent": self.publishers.sent,
            "unsent": self.unsent(),
            "expected": self.expected,
            "received": self.received,
            "lost": self.lost,
            "loss_fraction": self.loss_fraction(),
            "extra": self.extra,
            "outside_window": self.outside_window,
            "echoes": self.echoes,
            "messages": self.messages,
            "updates_per_message": if self.messages > 0 { self.received as f64 / self.messages as f64 } else { 0.0 },
            "wire_bytes": self.wire_bytes,
            "wire_bytes_per_delivery": if self.received > 0 { self.wire_bytes as f64 / self.received as f64 } else { 0.0 },
            "payload_bytes_mean": self.payload_bytes_mean,
            "seq_gaps": self.seq_gaps,
            "seq_backwards": self.seq_backwards,
            "window_s": self.window_seconds,
            "publish_s": self.publish_seconds,
            "measured_s": self.measured_seconds,
            "elapsed_s": self.elapsed_seconds,
            "delivered_per_s": self.delivered_per_second(),
            "throughput_per_s": self.delivered_per_second(),
            "latency_ms": latency.map(|[p50, p99, p999, max]| json!({
                "p50": p50, "p99": p99, "p999": p999, "max": max,
                "mean": self.latency.mean() / 1000.0, "count": self.latency.len(),
            })),
            "publisher_lag_ms": lag.map(|[p50, p99, p999, max]| json!({
                "p50": p50, "p99": p99, "p999": p999, "max": max, "final": ms(self.publishers.final_lag_us),
            })),
            "publisher_wake_late_ms": wake.map(|[p50, p99, p999, max]| json!({
                "p50": p50, "p99": p99, "p999": p999, "max": max,
            })),
            "publisher_write_ms": write.map(|[p50, p99, p999, max]| json!({
                "p50": p50, "p99": p99, "p999": p999, "max": max,
            })),
            "errors": self.errors.total,
            "errors_by_kind": errors,
            "generator_cpu_s": self.generator_cpu_seconds,
            "generator_cpu_pct": self.generator_cpu_pct(),
            "generator_saturated": self.generator_saturated(),
            "generator_cpu_wait_s": self.generator_wait_seconds,
            "server_cpu_wait_s": self.server_wait_seconds,
            "cpu_contended": self.cpu_contended(),
            "server_cpu_s": server_cpu_s,
            "server_cpu_pct": server_cpu_s.map(|s| 100.0 * s / self.elapsed_seconds.max(1e-9)),
            "server_threads": self.server_cpu.map(|(_, t)| t),
            "deliveries_per_server_cpu_s": server_cpu_s.filter(|s| *s > 0.0).map(|s| self.received as f64 / s),
            "server_rss_bytes": self.server_rss_bytes,
            "verdict": self.verdict(),
        })
    }

    pub fn to_text(&self) -> String {
        let a = &self.args;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "routopia-loadtest [{}] mode {}, {}: N={} subscribers on C={} channel(s), P={} publisher(s), R={} msg/s for D={} s, S={} B",
            self.label,
            format!("{:?}", a.mode).to_lowercase(),
            a.addr,
            a.subscribers,
            a.channels,
            a.publishers,
            a.rate,
            a.duration,
            a.payload
        );
        if a.scenario.is_some() || a.payload_kind != crate::PayloadKind::Synthetic || a.accept_zstd {
            let _ = writeln!(
                out,
                "  scenario {}, payload {} (mean {:.0} B with header){}",
                a.scenario.map_or_else(|| "fanout".to_string(), |s| s.name()),
                format!("{:?}", a.payload_kind).to_lowercase(),
                self.payload_bytes_mean,
                if a.accept_zstd { ", zstd accepted" } else { "" }
            );
        }
        let mut line = |name: &str, value: String| {
            let _ = writeln!(out, "  {name:<18} {value}");
        };
        line(
            "setup",
            format!(
                "{} of {} subscribers connected in {:.2} s; open at start {}, at end {}",
                self.subscribers_connected,
                a.subscribers,
                self.setup_seconds,
                self.subscribers_at_start,
                self.subscribers_at_end
            ),
        );
        line(
            "window",
            format!(
                "{:.3} s publishing, {:.3} s until the last delivery, {:.3} s with drain",
                self.publish_seconds, self.measured_seconds, self.elapsed_seconds
            ),
        );
        line(
            "published",
            format!("{} of {} scheduled ({} unsent)", self.publishers.sent, self.scheduled, self.unsent()),
        );
        line(
            "deliveries",
            format!(
                "expected {}, received {}, lost {} ({:.4}%) on {} short subscribers, extra {}, outside window {}",
                self.expected,
                self.received,
                self.lost,
                100.0 * self.loss_fraction(),
                self.short_subscribers,
                self.extra,
                self.outside_window
            ),
        );
        line("delivered/s", format!("{:.0}", self.delivered_per_second()));
        line(
            "messages",
            format!(
                "{} WebSocket messages read by subscribers ({:.2} updates each); seq gaps {}, backwards {}{}",
                self.messages,
                if self.messages > 0 { self.received as f64 / self.messages as f64 } else { 0.0 },
                self.seq_gaps,
                self.seq_backwards,
                if self.echoes > 0 { format!("; {} echoes to publishers", self.echoes) } else { String::new() }
            ),
        );
        line(
            "wire bytes",
            format!(
                "{} read by subscribers ({:.1} per delivery, payload {:.0} B)",
                self.wire_bytes,
                if self.received > 0 { self.wire_bytes as f64 / self.received as f64 } else { 0.0 },
                self.payload_bytes_mean
            ),
        );
        line(
            "latency ms",
            match quantiles(&self.latency) {
                Some([p50, p99, p999, max]) => {
                    format!("p50 {p50:.2}  p99 {p99:.2}  p99.9 {p999:.2}  max {max:.2}  (from the intended send time)")
                }
                None => "no delivery".into(),
            },
        );
        line(
            "publisher lag ms",
            match quantiles(&self.publishers.lag) {
                Some([p50, p99, _, max]) => {
                    format!("p50 {p50:.2}  p99 {p99:.2}  max {max:.2}  final {:.2}", ms(self.publishers.final_lag_us))
                }
                None => "nothing sent".into(),
            },
        );
        let brief = |h: &Histogram<u64>| match quantiles(h) {
            Some([_, p99, _, max]) => format!("p99 {p99:.2} max {max:.2}"),
            None => "-".into(),
        };
        line(
            "  of which",
            format!(
                "woke late {} (generator busy); writes took {} (one runtime turn, or server backpressure)",
                brief(&self.publishers.wake),
                brief(&self.publishers.write)
            ),
        );
        line("errors", format!("{}", self.errors.total));
        for (kind, (count, examples)) in &self.errors.by_kind {
            let _ = writeln!(out, "    {kind}: {count} (e.g. {})", examples.join(" | "));
        }
        let mut line = |name: &str, value: String| {
            let _ = writeln!(out, "  {name:<18} {value}");
        };
        line(
            "generator CPU",
            match (self.generator_cpu_seconds, self.generator_cpu_pct()) {
                (Some(s), Some(pct)) => format!(
                    "{s:.2} s = {pct:.1}% of one core{}",
                    if self.generator_saturated() { "  (SATURATED: this run measures the generator)" } else { "" }
                ),
                _ => "unavailable".into(),
            },
        );
        line(
            "server CPU",
            match (self.server_cpu, a.server_pid) {
                (Some((s, threads)), Some(pid)) => format!(
                    "{s:.2} s = {:.1}% of one core (pid {pid}, {threads} threads){}{}",
                    100.0 * s / self.elapsed_seconds.max(1e-9),
                    if s > 0.0 {
                        format!(", {:.0} deliveries per CPU second", self.received as f64 / s)
                    } else {
                        String::new()
                    },
                    self.server_rss_bytes.map(|b| format!(", RSS {:.1} MB", b as f64 / 1e6)).unwrap_or_default()
                ),
                (None, Some(pid)) => {
                    format!("unavailable (pid {pid} not readable at both ends of the window, or it exited)")
                }
                (_, None) => "not measured (give --server-pid)".into(),
            },
        );
        line("CPU wait", contention_text(self.generator_wait_seconds, self.server_wait_seconds, self.elapsed_seconds));
        line("verdict", format!("{} (bound {} ms)", self.verdict(), a.bound_ms));
        out
    }
}

/// The text line about run-queue waits.
pub fn contention_text(generator_wait: Option<f64>, server_wait: Option<f64>, elapsed: f64) -> String {
    let fmt = |w: Option<f64>| w.map_or_else(|| "-".into(), |w| format!("{w:.2} s"));
    format!(
        "generator {}, server {} ready but not running{}",
        fmt(generator_wait),
        fmt(server_wait),
        if cpu_contended(generator_wait, server_wait, elapsed) {
            "  (CONTENDED: other work held the cores; the figures measure the neighbours too)"
        } else {
            ""
        }
    )
}

/// Prints a side-by-side table of the reports in `files` (one JSON object a line), then, when
/// a server ran more than once at a rate (`compare.sh --repeat`), the medians of those runs.
pub fn print_table(files: &[PathBuf]) -> Result<(), String> {
    let mut lines = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(file).map_err(|err| format!("{}: {err}", file.display()))?;
        lines.extend(text.lines().filter(|l| !l.trim().is_empty()).map(str::to_string));
    }
    let mut rows: Vec<Vec<String>> = vec![header()];
    rows.extend(lines.iter().map(|line| row(line)));
    print_aligned(&rows);
    let medians = medians(&lines);
    if medians.len() > 1 {
        println!();
        println!(
            "Medians over the repeated runs (alternated; the ratio is routopia-realtime's median to the best peer's):"
        );
        print_aligned(&medians);
    }
    Ok(())
}

/// Prints `rows` (the first is the header) as a Markdown table with aligned columns.
fn print_aligned(rows: &[Vec<String>]) {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| rows.iter().map(|r| r.get(c).map_or(0, |s| s.chars().count())).max().unwrap_or(0))
        .collect();
    for (i, row) in rows.iter().enumerate() {
        let cells: Vec<String> = row
            .iter()
            .enumerate()
            .map(|(c, cell)| {
                if c == 0 || c + 1 == row.len() {
                    format!("{cell:<w$}", w = widths[c])
                } else {
                    format!("{cell:>w$}", w = widths[c])
                }
            })
            .collect();
        println!("| {} |", cells.join(" | "));
        if i == 0 {
            let rule: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
            println!("| {} |", rule.join(" | "));
        }
    }
}

/// The figure servers are compared by: deliveries, replies or connects per server CPU-second.
const PER_CPU_KEYS: [&str; 3] =
    ["deliveries_per_server_cpu_s", "replies_per_server_cpu_s", "connects_per_server_cpu_s"];

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    }
}

/// One row per server and rate that ran more than once: runs, median per server CPU-second
/// with the range, median p99, and for routopia-realtime its ratio to the best peer's median.
/// Only the header when nothing ran twice.
fn medians(lines: &[String]) -> Vec<Vec<String>> {
    /// One server's runs at one rate, in the order first seen.
    struct Runs {
        label: String,
        rate: String,
        per_cpu: Vec<f64>,
        p99: Vec<f64>,
    }
    let mut groups: Vec<Runs> = Vec::new();
    for line in lines {
        let Ok(v) = serde_json::from_str::<Value>(line) else { continue };
        let Some(per_cpu) = PER_CPU_KEYS.iter().find_map(|key| v.get(key).and_then(Value::as_f64)) else {
            continue;
        };
        let label = v.get("label").and_then(Value::as_str).unwrap_or("?").to_string();
        let rate = rate_cell(&v);
        let index = match groups.iter().position(|g| g.label == label && g.rate == rate) {
            Some(index) => index,
            None => {
                groups.push(Runs { label, rate, per_cpu: Vec::new(), p99: Vec::new() });
                groups.len() - 1
            }
        };
        groups[index].per_cpu.push(per_cpu);
        if let Some(p99) = v.pointer("/latency_ms/p99").and_then(Value::as_f64) {
            groups[index].p99.push(p99);
        }
    }
    let mut rows = vec![[
        "server",
        "rate/s",
        "runs",
        "median per server CPU-s",
        "range",
        "median p99 ms",
        "ratio to the best peer",
    ]
    .map(String::from)
    .to_vec()];
    if groups.iter().all(|g| g.per_cpu.len() < 2) {
        return rows;
    }
    // Another build of our own (`compare.sh --baseline`) is what this build is held against.
    let ours = |g: &Runs| g.label.starts_with("routopia") && g.label != "routopia-baseline";
    let medians: Vec<f64> = groups.iter().map(|g| median(&mut g.per_cpu.clone())).collect();
    for (g, &own) in groups.iter().zip(&medians) {
        let (low, high) = g.per_cpu.iter().fold((f64::MAX, f64::MIN), |(lo, hi), &x| (lo.min(x), hi.max(x)));
        let best_peer = groups
            .iter()
            .zip(&medians)
            .filter(|(other, _)| other.rate == g.rate && !ours(other))
            .map(|(_, &m)| m)
            .fold(None, |best: Option<f64>, m| Some(best.map_or(m, |b| b.max(m))));
        let ratio = match best_peer {
            Some(peer) if ours(g) && peer > 0.0 => format!("{:.2}x", own / peer),
            _ => "-".into(),
        };
        let p99 = if g.p99.is_empty() { "-".into() } else { format!("{:.2}", median(&mut g.p99.clone())) };
        rows.push(vec![
            g.label.clone(),
            g.rate.clone(),
            g.per_cpu.len().to_string(),
            format!("{own:.0}"),
            format!("{low:.0}-{high:.0}"),
            p99,
            ratio,
        ]);
    }
    rows
}

/// The rate a report ran at, for the runs that offer one: the fan-outs, and request/reply in
/// open loop (whose rounds at different rates must not share a median).
fn rate_cell(v: &Value) -> String {
    let scenario = v.pointer("/params/scenario").and_then(Value::as_str).unwrap_or("fanout");
    let fan_out = scenario == "fanout" || scenario.starts_with("fanout-") || scenario == "many-channels";
    let open_loop = fan_out || v.get("open_loop").and_then(Value::as_bool) == Some(true);
    match v.pointer("/params/rate").and_then(Value::as_f64) {
        Some(rate) if open_loop => format!("{rate:.0}"),
        _ => "-".into(),
    }
}

fn header() -> Vec<String> {
    [
        "server",
        "N",
        "rate/s",
        "delivered/s (or replies, connects)",
        "loss",
        "gaps",
        "p50 ms",
        "p99 ms",
        "p99.9 ms",
        "max ms",
        "pub lag max ms",
        "errors",
        "server CPU s",
        "per server CPU-s",
        "gen CPU %",
        "verdict",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn row(line: &str) -> Vec<String> {
    let Ok(v) = serde_json::from_str::<Value>(line) else {
        let mut cells = vec!["(unparsable)".to_string()];
        cells.extend(std::iter::repeat_n("-".to_string(), 14));
        cells.push(line.chars().take(60).collect());
        return cells;
    };
    let num = |path: &[&str]| -> Option<f64> {
        let mut cur = &v;
        for key in path {
            cur = cur.get(key)?;
        }
        cur.as_f64()
    };
    let fmt = |value: Option<f64>, decimals: usize| -> String {
        value.map_or_else(|| "-".into(), |x| format!("{x:.decimals$}"))
    };
    let label = v.get("label").and_then(Value::as_str).unwrap_or("?").to_string();
    let n = fmt(num(&["params", "subscribers"]), 0);
    let rate = rate_cell(&v);
    if let Some(fatal) = v.get("fatal").and_then(Value::as_str) {
        let mut cells = vec![label, n, rate];
        cells.extend(std::iter::repeat_n("-".to_string(), 12));
        cells.push(format!("no measurement: {}", fatal.chars().take(80).collect::<String>()));
        return cells;
    }
    let loss = match (num(&["lost"]), num(&["loss_fraction"])) {
        (Some(lost), Some(frac)) if lost > 0.0 => format!("{lost:.0} ({:.2}%)", 100.0 * frac),
        (Some(_), _) => "0".into(),
        _ => "-".into(),
    };
    let mut verdict = v.get("verdict").and_then(Value::as_str).unwrap_or("?").to_string();
    if v.get("generator_saturated").and_then(Value::as_bool) == Some(true) {
        verdict.push_str(" [generator saturated]");
    }
    if v.get("cpu_contended").and_then(Value::as_bool) == Some(true) {
        verdict.push_str(" [cpu contended]");
    }
    // Other scenarios than the fan-out report their own throughput and per-CPU figures.
    if let Some(per_conn) = num(&["server_rss_per_connection_bytes"]) {
        verdict.push_str(&format!(" (server RSS {per_conn:.0} B per connection)"));
    }
    let throughput = num(&["delivered_per_s"]).or(num(&["throughput_per_s"]));
    let per_cpu = PER_CPU_KEYS.iter().find_map(|key| num(&[key]));
    vec![
        label,
        n,
        rate,
        fmt(throughput, 0),
        loss,
        fmt(num(&["seq_gaps"]), 0),
        fmt(num(&["latency_ms", "p50"]), 2),
        fmt(num(&["latency_ms", "p99"]), 2),
        fmt(num(&["latency_ms", "p999"]), 2),
        fmt(num(&["latency_ms", "max"]), 2),
        fmt(num(&["publisher_lag_ms", "max"]), 2),
        fmt(num(&["errors"]), 0),
        fmt(num(&["server_cpu_s"]), 2),
        fmt(per_cpu, 0),
        fmt(num(&["generator_cpu_pct"]), 1),
        verdict,
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_of_row_fills_every_column() {
        let width = header().len();
        let full = r#"{"label":"x","params":{"subscribers":10,"rate":5},"delivered_per_s":50.0,"lost":1,
            "loss_fraction":0.01,"seq_gaps":0,"latency_ms":{"p50":1.0,"p99":2.0,"p999":3.0,"max":4.0},
            "errors":0,"verdict":"held","generator_saturated":true}"#
            .replace('\n', " ");
        for line in [full.as_str(), r#"{"label":"y","fatal":"no server"}"#, "not json"] {
            assert_eq!(row(line).len(), width, "{line}");
        }
        assert!(row(&full).last().unwrap().contains("generator saturated"));
    }

    #[test]
    fn repeated_runs_become_medians_with_the_ratio_to_the_best_peer() {
        let run = |label: &str, rate: u32, per_cpu: f64, p99: f64| {
            format!(
                r#"{{"label":"{label}","params":{{"rate":{rate}}},"deliveries_per_server_cpu_s":{per_cpu},"latency_ms":{{"p99":{p99}}}}}"#
            )
        };
        let lines = vec![
            run("routopia-realtime", 2000, 4.0e6, 70.0),
            run("bun", 2000, 2.0e6, 400.0),
            run("tokio", 2000, 1.0e6, 300.0),
            run("routopia-realtime", 2000, 6.0e6, 90.0),
            run("bun", 2000, 1.0e6, 500.0),
            run("tokio", 2000, 3.0e6, 100.0),
            run("routopia-realtime", 2000, 5.0e6, 80.0),
            r#"{"label":"bun","fatal":"server did not start"}"#.to_string(),
        ];
        let rows = medians(&lines);
        assert_eq!(rows.len(), 4, "{rows:?}");
        assert_eq!(rows[1], ["routopia-realtime", "2000", "3", "5000000", "4000000-6000000", "80.00", "2.50x"]);
        // Bun's median is 1.5M, tokio's 2M: the best peer is tokio.
        assert_eq!(rows[2][3], "1500000");
        assert_eq!(rows[3][3], "2000000");
        assert_eq!(rows[3][6], "-");
        assert_eq!(medians(&lines[..3]).len(), 1, "one run each: no medians");
    }

    #[test]
    fn a_baseline_build_is_what_this_build_is_held_against() {
        let run = |label: &str, per_cpu: f64| {
            format!(
                r#"{{"label":"{label}","params":{{"rate":4000}},"deliveries_per_server_cpu_s":{per_cpu},"latency_ms":{{"p99":50}}}}"#
            )
        };
        let lines: Vec<String> = [
            ("routopia-realtime", 9.0e6),
            ("routopia-baseline", 10.0e6),
            ("routopia-realtime", 11.0e6),
            ("routopia-baseline", 10.0e6),
        ]
        .iter()
        .map(|&(label, per_cpu)| run(label, per_cpu))
        .collect();
        let rows = medians(&lines);
        assert_eq!(rows[1][0], "routopia-realtime");
        assert_eq!(rows[1][6], "1.00x", "10M over the baseline's 10M: {rows:?}");
        assert_eq!((rows[2][0].as_str(), rows[2][6].as_str()), ("routopia-baseline", "-"));
    }

    #[test]
    fn open_loop_request_reply_has_a_median_per_rate_and_closed_loop_one() {
        let run = |label: &str, open_loop: bool, rate: u32, per_cpu: f64| {
            format!(
                r#"{{"label":"{label}","open_loop":{open_loop},"params":{{"scenario":"request-reply","rate":{rate}}},"replies_per_server_cpu_s":{per_cpu},"latency_ms":{{"p99":1.0}}}}"#
            )
        };
        let mut lines = Vec::new();
        for (ours, theirs) in [(90.0, 100.0), (92.0, 101.0)] {
            lines.push(run("routopia-realtime", true, 50_000, ours * 1e3));
            lines.push(run("bun", true, 50_000, theirs * 1e3));
        }
        for (ours, theirs) in [(150.0, 140.0), (152.0, 141.0)] {
            lines.push(run("routopia-realtime", true, 100_000, ours * 1e3));
            lines.push(run("bun", true, 100_000, theirs * 1e3));
        }
        let rows = medians(&lines);
        assert_eq!(rows.len(), 5, "{rows:?}");
        assert_eq!(rows[1][..4], ["routopia-realtime", "50000", "2", "91000"]);
        assert_eq!(rows[2][..4], ["bun", "50000", "2", "100500"]);
        assert_eq!(rows[3][..4], ["routopia-realtime", "100000", "2", "151000"]);
        assert_eq!(rows[4][..4], ["bun", "100000", "2", "140500"]);
        // Closed loop: whatever rate the flags carried, the rounds form one group.
        let closed: Vec<String> =
            [(1, 170.0), (2, 175.0)].iter().map(|&(rate, per_cpu)| run("bun", false, rate, per_cpu * 1e3)).collect();
        let rows = medians(&closed);
        assert_eq!(rows.len(), 2, "{rows:?}");
        assert_eq!(rows[1][..4], ["bun", "-", "2", "172500"]);
    }
}
