//! The scenarios that are not a fan-out: request/reply round trips, a connection storm and
//! idle memory. Each returns one JSON object and its text rendering.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::fmt::Write as _;
use std::rc::Rc;
use std::time::{Duration, Instant};

use compio::time::{sleep, sleep_until, timeout, timeout_at};
use hdrhistogram::Histogram;
use routopia_realtime::client::{Client, ClientError, Receiver, Sender};
use routopia_realtime::protocol::pb::{self, client_frame::Command, reply, server_frame::Kind};
use serde_json::{json, Value};

use crate::report::{self, label, params, Fatal};
use crate::run::{self, ErrorLog};
use crate::{procstat, Mode, Request, RunArgs};

/// Bound on one connection's setup.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on one request's round trip.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

pub type Outcome = Result<(Value, String), Fatal>;

fn latency_json(h: &Histogram<u64>) -> Value {
    if h.is_empty() {
        return Value::Null;
    }
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    json!({
        "p50": ms(0.5), "p90": ms(0.9), "p99": ms(0.99), "p999": ms(0.999),
        "max": h.max() as f64 / 1000.0, "mean": h.mean() / 1000.0, "count": h.len(),
    })
}

fn latency_text(h: &Histogram<u64>) -> String {
    if h.is_empty() {
        return "none".into();
    }
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    format!(
        "p50 {:.2}  p90 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2}",
        ms(0.5),
        ms(0.9),
        ms(0.99),
        ms(0.999),
        h.max() as f64 / 1000.0
    )
}

fn errors_json(errors: &ErrorLog) -> Value {
    let by_kind: serde_json::Map<String, Value> = errors
        .by_kind
        .iter()
        .map(|(kind, (count, examples))| (kind.to_string(), json!({ "count": count, "examples": examples })))
        .collect();
    Value::Object(by_kind)
}

fn errors_text(out: &mut String, errors: &ErrorLog) {
    let _ = writeln!(out, "  {:<18} {}", "errors", errors.total);
    for (kind, (count, examples)) in &errors.by_kind {
        let _ = writeln!(out, "    {kind}: {count} (e.g. {})", examples.join(" | "));
    }
}

/// CPU seconds of this process and of the server between two points.
struct CpuMark {
    own: Option<f64>,
    server: Option<(f64, usize)>,
    own_wait: Option<f64>,
    server_wait: Option<f64>,
    at: Instant,
}

impl CpuMark {
    fn now(args: &RunArgs) -> Self {
        Self {
            own: procstat::self_cpu_seconds(),
            server: args.server_pid.and_then(procstat::process_cpu_seconds),
            own_wait: procstat::wait_seconds(None),
            server_wait: args.server_pid.and_then(|pid| procstat::wait_seconds(Some(pid))),
            at: Instant::now(),
        }
    }

    /// JSON fields for the CPU used since `self`, and `per_cpu_s` (what happened per server
    /// CPU second) under the name `per_name`.
    fn since(&self, args: &RunArgs, count: u64, per_name: &str) -> (serde_json::Map<String, Value>, String) {
        let end = CpuMark::now(args);
        let elapsed = end.at.duration_since(self.at).as_secs_f64().max(1e-9);
        let own = self.own.zip(end.own).map(|(a, b)| b - a);
        let server = self.server.zip(end.server).filter(|(a, b)| b.0 >= a.0).map(|(a, b)| (b.0 - a.0, b.1));
        let own_pct = own.map(|s| 100.0 * s / elapsed);
        let saturated = own_pct.is_some_and(|pct| pct >= 95.0);
        let mut fields = serde_json::Map::new();
        fields.insert("generator_cpu_s".into(), json!(own));
        fields.insert("generator_cpu_pct".into(), json!(own_pct));
        fields.insert("generator_saturated".into(), json!(saturated));
        fields.insert("server_cpu_s".into(), json!(server.map(|s| s.0)));
        fields.insert("server_cpu_pct".into(), json!(server.map(|s| 100.0 * s.0 / elapsed)));
        fields.insert("server_threads".into(), json!(server.map(|s| s.1)));
        let per = server.filter(|s| s.0 > 0.0).map(|s| count as f64 / s.0);
        fields.insert(per_name.into(), json!(per));
        let own_wait = self.own_wait.zip(end.own_wait).map(|(a, b)| (b - a).max(0.0));
        let server_wait = self.server_wait.zip(end.server_wait).map(|(a, b)| (b - a).max(0.0));
        fields.insert("generator_cpu_wait_s".into(), json!(own_wait));
        fields.insert("server_cpu_wait_s".into(), json!(server_wait));
        fields.insert("cpu_contended".into(), json!(report::cpu_contended(own_wait, server_wait, elapsed)));
        let mut text = String::new();
        let _ = writeln!(
            text,
            "  {:<18} {}",
            "generator CPU",
            match (own, own_pct) {
                (Some(s), Some(pct)) => format!(
                    "{s:.2} s = {pct:.1}% of one core{}",
                    if saturated { "  (SATURATED: this run measures the generator)" } else { "" }
                ),
                _ => "unavailable".into(),
            }
        );
        let _ = writeln!(
            text,
            "  {:<18} {}",
            "server CPU",
            match (server, args.server_pid) {
                (Some((s, threads)), Some(pid)) => format!(
                    "{s:.2} s = {:.1}% of one core (pid {pid}, {threads} threads){}",
                    100.0 * s / elapsed,
                    per.map(|p| format!(", {p:.0} {} per CPU second", per_name.trim_end_matches("_per_server_cpu_s")))
                        .unwrap_or_default()
                ),
                (None, Some(pid)) => format!("unavailable (pid {pid} not readable, or it exited)"),
                (_, None) => "not measured (give --server-pid)".into(),
            }
        );
        let _ = writeln!(text, "  {:<18} {}", "CPU wait", report::contention_text(own_wait, server_wait, elapsed));
        (fields, text)
    }
}

/// What opening many connections did.
struct Opened {
    clients: Vec<Client>,
    /// Time to open each connection that succeeded, microseconds.
    latency: Histogram<u64>,
    errors: ErrorLog,
    attempted: usize,
    seconds: f64,
}

/// Opens `count` connections with at most `in_flight` at once, until `deadline`.
/// Connection i subscribes to `subscribe(i)` (routopia mode).
async fn open_many(
    args: Rc<RunArgs>,
    count: usize,
    in_flight: usize,
    deadline: Instant,
    subscribe: Rc<dyn Fn(usize) -> Option<String>>,
) -> Opened {
    let next = Rc::new(Cell::new(0usize));
    let clients = Rc::new(RefCell::new(Vec::with_capacity(count)));
    let latency = Rc::new(RefCell::new(run::histogram()));
    let errors = Rc::new(RefCell::new(ErrorLog::default()));
    let start = Instant::now();
    let workers: Vec<_> = (0..in_flight.clamp(1, count.max(1)))
        .map(|_| {
            let (args, next, clients, latency, errors, subscribe) =
                (args.clone(), next.clone(), clients.clone(), latency.clone(), errors.clone(), subscribe.clone());
            compio::runtime::spawn(async move {
                loop {
                    let i = next.get();
                    if i >= count || Instant::now() >= deadline {
                        break;
                    }
                    next.set(i + 1);
                    let channel = subscribe(i);
                    let began = Instant::now();
                    match timeout(CONNECT_TIMEOUT, run::open(&args, channel.as_deref())).await {
                        Ok(Ok(client)) => {
                            run::record(&mut latency.borrow_mut(), began.elapsed().as_micros() as u64);
                            clients.borrow_mut().push(client);
                        }
                        Ok(Err(err)) => {
                            errors.borrow_mut().add(run::error_kind(&err), format!("connection {i}: {err}"))
                        }
                        Err(_) => errors
                            .borrow_mut()
                            .add("timeout", format!("connection {i}: not set up within {CONNECT_TIMEOUT:?}")),
                    }
                }
            })
        })
        .collect();
    for worker in workers {
        if timeout_at(deadline + CONNECT_TIMEOUT + Duration::from_secs(1), worker).await.is_err() {
            errors.borrow_mut().add("setup_task", "a connecting task outlived its deadline".into());
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    let attempted = next.get();
    if attempted < count {
        errors
            .borrow_mut()
            .add("deadline", format!("setup deadline passed with {attempted} of {count} connections attempted"));
    }
    let clients = std::mem::take(&mut *clients.borrow_mut());
    let latency = latency.borrow().clone();
    let errors = std::mem::take(&mut *errors.borrow_mut());
    Opened { clients, latency, errors, attempted, seconds }
}

fn header(args: &RunArgs, what: &str) -> String {
    format!(
        "routopia-loadtest [{}] scenario {}, mode {}, {}: {what}\n",
        label(args),
        args.scenario.map(|s| s.name()).unwrap_or_default(),
        format!("{:?}", args.mode).to_lowercase(),
        args.addr
    )
}

// ---------------------------------------------------------------- connect storm

/// `--subscribers` K connects as fast as the server takes them (`--connect-batch` in flight):
/// routopia: upgrade + Connect + Subscribe; raw: upgrade only.
pub async fn connect_storm(args: RunArgs) -> Outcome {
    let args = Rc::new(args);
    let k = args.subscribers;
    let deadline = Instant::now() + Duration::from_secs_f64(args.setup_timeout);
    let prefix = args.channel_prefix.clone();
    let channels = args.channels;
    let subscribe: Rc<dyn Fn(usize) -> Option<String>> = Rc::new(move |i| Some(format!("{prefix}:{}", i % channels)));
    let cpu = CpuMark::now(&args);
    let opened = open_many(args.clone(), k, args.connect_batch, deadline, subscribe).await;
    let connected = opened.clients.len();
    let (cpu_fields, cpu_text) = cpu.since(&args, connected as u64, "connects_per_server_cpu_s");
    let rss = args.server_pid.and_then(procstat::process_rss_bytes);
    drop(opened.clients);
    let per_s = connected as f64 / opened.seconds.max(1e-9);
    let failures = k - connected;
    let verdict = if failures == 0 { "held".to_string() } else { format!("failed: {failures} of {k} did not connect") };
    let mut value = json!({
        "label": label(&args),
        "params": params(&args),
        "connections": { "requested": k, "attempted": opened.attempted, "connected": connected, "failed": failures },
        "in_flight": args.connect_batch,
        "storm_s": opened.seconds,
        "connects_per_s": per_s,
        "throughput_per_s": per_s,
        "connect_latency_ms": latency_json(&opened.latency),
        "latency_ms": latency_json(&opened.latency),
        "errors": opened.errors.total,
        "errors_by_kind": errors_json(&opened.errors),
        "server_rss_bytes": rss,
        "verdict": verdict,
    });
    if let Value::Object(map) = &mut value {
        map.extend(cpu_fields);
    }
    let mut text = header(
        &args,
        &format!(
            "{k} connects ({}), {} in flight",
            if args.mode == Mode::Routopia { "upgrade + Connect + Subscribe" } else { "upgrade" },
            args.connect_batch
        ),
    );
    let _ =
        writeln!(text, "  {:<18} {connected} of {k} in {:.2} s = {per_s:.0} connects/s", "connected", opened.seconds);
    let _ = writeln!(text, "  {:<18} {}", "connect ms", latency_text(&opened.latency));
    errors_text(&mut text, &opened.errors);
    text.push_str(&cpu_text);
    if let Some(rss) = rss {
        let _ = writeln!(text, "  {:<18} {:.1} MB at the end", "server RSS", rss as f64 / 1e6);
    }
    let _ = writeln!(text, "  {:<18} {verdict}", "verdict");
    Ok((value, text))
}

// ---------------------------------------------------------------- idle memory

/// Waits until `pid`'s RSS stops moving (four samples 500 ms apart within 0.2% or 64 KiB of
/// each other) or `bound` passes; returns the last sample and whether it was stable.
async fn stable_rss(pid: u32, bound: Duration) -> Option<(u64, bool)> {
    let deadline = Instant::now() + bound;
    let mut last = procstat::process_rss_bytes(pid)?;
    let mut still = 0;
    while Instant::now() < deadline {
        sleep(Duration::from_millis(500)).await;
        let now = procstat::process_rss_bytes(pid)?;
        let tolerance = (last / 500).max(64 * 1024);
        if now.abs_diff(last) <= tolerance {
            still += 1;
            if still >= 3 {
                return Some((now, true));
            }
        } else {
            still = 0;
        }
        last = now;
    }
    Some((last, false))
}

/// `--subscribers` K idle connections (routopia: Connect + one Subscribe each, on
/// `--channels` channels; raw: upgrade). Reports the server's RSS growth per connection.
pub async fn idle_memory(args: RunArgs) -> Outcome {
    let args = Rc::new(args);
    let pid = args.server_pid.ok_or_else(|| Fatal::new("idle-memory needs --server-pid".into(), 0))?;
    let bound = Duration::from_secs_f64(args.rss_stable_timeout);
    let (before, before_stable) =
        stable_rss(pid, bound).await.ok_or_else(|| Fatal::new(format!("cannot read the RSS of pid {pid}"), 0))?;
    let own_before = procstat::process_rss_bytes(std::process::id()).unwrap_or(0);
    let k = args.subscribers;
    let deadline = Instant::now() + Duration::from_secs_f64(args.setup_timeout);
    let prefix = args.channel_prefix.clone();
    let channels = args.channels;
    let subscribe: Rc<dyn Fn(usize) -> Option<String>> = Rc::new(move |i| Some(format!("{prefix}:{}", i % channels)));
    let opened = open_many(args.clone(), k, args.connect_batch, deadline, subscribe).await;
    let connected = opened.clients.len();
    // Keep reading so that the server's heartbeat pings are answered while we wait.
    let open_now = Rc::new(Cell::new(connected));
    let mut keep = Vec::with_capacity(connected);
    for client in opened.clients {
        let (sender, mut receiver) = client.split();
        keep.push(sender);
        let open_now = open_now.clone();
        compio::runtime::spawn(async move {
            while receiver.next_message().await.is_ok() {}
            open_now.set(open_now.get() - 1);
        })
        .detach();
    }
    let settled = Instant::now();
    let (after, after_stable) = stable_rss(pid, bound)
        .await
        .ok_or_else(|| Fatal::new(format!("pid {pid} exited while {connected} connections were open"), 0))?;
    let waited = settled.elapsed().as_secs_f64();
    let own_after = procstat::process_rss_bytes(std::process::id()).unwrap_or(0);
    let still_open = open_now.get();
    drop(keep);
    let growth = after as f64 - before as f64;
    let per_conn = if connected > 0 { growth / connected as f64 } else { 0.0 };
    let own_per_conn = if connected > 0 { (own_after as f64 - own_before as f64) / connected as f64 } else { 0.0 };
    let mut why = Vec::new();
    if connected < k {
        why.push(format!("{} of {k} did not connect", k - connected));
    }
    if still_open < connected {
        why.push(format!("{} closed while idle", connected - still_open));
    }
    if !after_stable {
        why.push(format!("RSS still moving after {:.0} s", args.rss_stable_timeout));
    }
    let verdict = if why.is_empty() { "held".to_string() } else { format!("failed: {}", why.join(", ")) };
    let value = json!({
        "label": label(&args),
        "params": params(&args),
        "connections": { "requested": k, "connected": connected, "open_at_end": still_open },
        "setup_s": opened.seconds,
        "connect_latency_ms": latency_json(&opened.latency),
        "server_rss_before_bytes": before,
        "server_rss_before_stable": before_stable,
        "server_rss_after_bytes": after,
        "server_rss_after_stable": after_stable,
        "rss_wait_s": waited,
        "server_rss_per_connection_bytes": per_conn,
        "generator_rss_per_connection_bytes": own_per_conn,
        "errors": opened.errors.total,
        "errors_by_kind": errors_json(&opened.errors),
        "verdict": verdict,
    });
    let mut text = header(
        &args,
        &format!(
            "{k} idle connections ({})",
            if args.mode == Mode::Routopia {
                format!("Connect + Subscribe on {} channel(s)", args.channels)
            } else {
                "upgrade only".into()
            }
        ),
    );
    let _ = writeln!(
        text,
        "  {:<18} {connected} of {k} in {:.2} s; open at the end {still_open}",
        "connected", opened.seconds
    );
    let _ = writeln!(
        text,
        "  {:<18} {:.1} MB before, {:.1} MB after ({}stable after {waited:.1} s)",
        "server RSS",
        before as f64 / 1e6,
        after as f64 / 1e6,
        if after_stable { "" } else { "NOT " }
    );
    let _ = writeln!(text, "  {:<18} {:.0} bytes per connection (server)", "RSS growth", per_conn);
    let _ = writeln!(text, "  {:<18} {:.0} bytes per connection (this generator, for scale)", "", own_per_conn);
    errors_text(&mut text, &opened.errors);
    let _ = writeln!(text, "  {:<18} {verdict}", "verdict");
    Ok((value, text))
}

// ---------------------------------------------------------------- request/reply

/// One closed-loop client: sends a request, waits for its answer, until `end`.
async fn requester(
    args: Rc<RunArgs>,
    index: usize,
    mut client: Client,
    end: Instant,
    pool: Rc<Vec<Vec<u8>>>,
    rtt: Rc<RefCell<Histogram<u64>>>,
    errors: Rc<RefCell<ErrorLog>>,
) -> u64 {
    let channel = format!("{}:rr:{}", args.channel_prefix, index % args.channels);
    let mut replies = 0u64;
    let mut k = index as u64;
    while Instant::now() < end {
        let template = &pool[(k % pool.len() as u64) as usize];
        let sent_ns = run::unix_ns();
        let began = Instant::now();
        let exchange = async {
            match (args.mode, args.request) {
                (Mode::Raw, _) => {
                    client.send_binary(run::stamp(template, sent_ns, k)).await?;
                    client.next_message().await.map(|_| ())
                }
                (Mode::Routopia, Request::Publish) => {
                    let publish = pb::Publish {
                        channel: channel.clone(),
                        r#type: pb::UpdateType::Route as i32,
                        key: String::new(),
                        confidence: 1.0,
                        payload: run::stamp(template, sent_ns, k),
                    };
                    match client.request(Command::Publish(publish)).await? {
                        reply::Result::Publish(_) => Ok(()),
                        other => Err(ClientError::Unexpected(format!("{other:?}"))),
                    }
                }
                (Mode::Routopia, Request::Ping) => {
                    let stamp = sent_ns / 1000;
                    let ping =
                        pb::ClientFrame { id: 0, command: Some(Command::Ping(pb::Ping { timestamp_us: stamp })) };
                    client.send_frames(vec![ping]).await?;
                    loop {
                        match client.next_frame().await?.kind {
                            Some(Kind::Pong(pong)) if pong.timestamp_us == stamp => return Ok(()),
                            Some(Kind::Disconnect(d)) => return Err(ClientError::Disconnected(d)),
                            Some(Kind::Reply(pb::Reply { result: Some(reply::Result::Error(e)), .. })) => {
                                return Err(ClientError::Server(e))
                            }
                            _ => {}
                        }
                    }
                }
            }
        };
        match timeout(REQUEST_TIMEOUT, exchange).await {
            Ok(Ok(())) => {
                // Replies after the window closed are not counted: the rate is per window.
                if Instant::now() <= end {
                    replies += 1;
                    run::record(&mut rtt.borrow_mut(), began.elapsed().as_micros() as u64);
                }
            }
            Ok(Err(err)) => {
                errors.borrow_mut().add(run::error_kind(&err), format!("client {index}: {err}"));
                break;
            }
            Err(_) => {
                errors.borrow_mut().add("timeout", format!("client {index}: no answer within {REQUEST_TIMEOUT:?}"));
                break;
            }
        }
        k += args.subscribers as u64;
    }
    replies
}

/// What the open-loop clients share.
struct OpenLoop {
    rtt: RefCell<Histogram<u64>>,
    errors: RefCell<ErrorLog>,
    sent: Cell<u64>,
    replies: Cell<u64>,
    last_reply: Cell<Option<Instant>>,
    /// Publish requests in flight, by request id: their intended send time (unix ns).
    pending: RefCell<HashMap<(usize, u32), u64>>,
}

impl OpenLoop {
    fn answered(&self, intended_ns: u64) {
        let now = run::unix_ns();
        run::record(&mut self.rtt.borrow_mut(), now.saturating_sub(intended_ns) / 1000);
        self.replies.set(self.replies.get() + 1);
        self.last_reply.set(Some(Instant::now()));
    }
}

/// Reads one open-loop client's answers until its connection ends (or the process does).
async fn open_loop_reader(args: Rc<RunArgs>, index: usize, mut receiver: Receiver, state: Rc<OpenLoop>) {
    loop {
        let outcome = match args.mode {
            Mode::Raw => receiver.next_message().await.map(|message| {
                // The echo carries the intended send time in its first 8 bytes.
                if let Some(head) = message.get(..8) {
                    state.answered(u64::from_le_bytes(head.try_into().unwrap_or_default()));
                }
            }),
            Mode::Routopia => receiver.next_frame().await.and_then(|frame| match frame.kind {
                Some(Kind::Pong(pong)) => {
                    state.answered(pong.timestamp_us * 1000);
                    Ok(())
                }
                Some(Kind::Reply(pb::Reply { id, result: Some(reply::Result::Publish(_)) })) => {
                    if let Some(intended) = state.pending.borrow_mut().remove(&(index, id)) {
                        state.answered(intended);
                    }
                    Ok(())
                }
                Some(Kind::Reply(pb::Reply { result: Some(reply::Result::Error(e)), .. })) => {
                    Err(ClientError::Server(e))
                }
                Some(Kind::Disconnect(d)) => Err(ClientError::Disconnected(d)),
                _ => Ok(()),
            }),
        };
        if let Err(err) = outcome {
            state.errors.borrow_mut().add(run::error_kind(&err), format!("client {index}: {err}"));
            if !matches!(err, ClientError::Server(_)) {
                return;
            }
        }
    }
}

/// One open-loop client: request k (k ≡ index mod N) is due at `start + k / rate`; it never
/// waits for an answer, and latency counts from the due time (coordinated omission corrected).
#[allow(clippy::too_many_arguments)]
async fn open_loop_sender(
    args: Rc<RunArgs>,
    index: usize,
    mut sender: Sender,
    start: Instant,
    start_unix_ns: u64,
    stop: Instant,
    pool: Rc<Vec<Vec<u8>>>,
    state: Rc<OpenLoop>,
) {
    let channel = format!("{}:rr:{}", args.channel_prefix, index % args.channels);
    let total = (args.rate * args.duration).ceil() as u64;
    let mut k = index as u64;
    let mut id = 0u32;
    while k < total {
        let offset = Duration::from_secs_f64(k as f64 / args.rate);
        let due = start + offset;
        if due > Instant::now() {
            sleep_until(due).await;
        }
        if Instant::now() >= stop {
            break;
        }
        let intended_ns = start_unix_ns + offset.as_nanos() as u64;
        let template = &pool[(k % pool.len() as u64) as usize];
        let send = async {
            match (args.mode, args.request) {
                (Mode::Raw, _) => sender.send_binary(run::stamp(template, intended_ns, k)).await,
                (Mode::Routopia, Request::Ping) => {
                    let ping = Command::Ping(pb::Ping { timestamp_us: intended_ns / 1000 });
                    sender.send_frames(vec![pb::ClientFrame { id: 0, command: Some(ping) }]).await
                }
                (Mode::Routopia, Request::Publish) => {
                    // Our own ids (never 0, which asks for no reply), registered before the write so
                    // that a fast answer finds its entry.
                    id = id.checked_add(1).unwrap_or(1);
                    state.pending.borrow_mut().insert((index, id), intended_ns);
                    let publish = pb::Publish {
                        channel: channel.clone(),
                        r#type: pb::UpdateType::Route as i32,
                        key: String::new(),
                        confidence: 1.0,
                        payload: run::stamp(template, intended_ns, k),
                    };
                    sender.send_frames(vec![pb::ClientFrame { id, command: Some(Command::Publish(publish)) }]).await
                }
            }
        };
        match timeout_at(stop, send).await {
            Ok(Ok(())) => state.sent.set(state.sent.get() + 1),
            Ok(Err(err)) => {
                state.errors.borrow_mut().add(run::error_kind(&err), format!("client {index} send: {err}"));
                return;
            }
            Err(_) => {
                state
                    .errors
                    .borrow_mut()
                    .add("stalled", format!("client {index}: a write outlived the drain deadline"));
                return;
            }
        }
        k += args.subscribers as u64;
    }
}

/// Open-loop request/reply: `--rate` requests per second over all clients for `--duration`.
async fn request_reply_open(args: Rc<RunArgs>, opened: Opened) -> Outcome {
    let connected = opened.clients.len();
    let pool = Rc::new(run::payload_pool(&args));
    let payload_mean = pool.iter().map(Vec::len).sum::<usize>() as f64 / pool.len() as f64;
    let state = Rc::new(OpenLoop {
        rtt: RefCell::new(run::histogram()),
        errors: RefCell::new(opened.errors),
        sent: Cell::new(0),
        replies: Cell::new(0),
        last_reply: Cell::new(None),
        pending: RefCell::new(HashMap::new()),
    });
    let mut senders = Vec::with_capacity(connected);
    for (i, client) in opened.clients.into_iter().enumerate() {
        let (sender, receiver) = client.split();
        compio::runtime::spawn(open_loop_reader(args.clone(), i, receiver, state.clone())).detach();
        senders.push(sender);
    }
    sleep(Duration::from_millis(args.settle_ms)).await;
    let cpu = CpuMark::now(&args);
    let start = Instant::now() + Duration::from_millis(1);
    let start_unix_ns = run::unix_ns() + 1_000_000;
    let window = Duration::from_secs_f64(args.duration);
    let drain = Duration::from_secs_f64(args.drain_timeout);
    let stop = start + window + drain;
    let handles: Vec<_> = senders
        .into_iter()
        .enumerate()
        .map(|(i, sender)| {
            compio::runtime::spawn(open_loop_sender(
                args.clone(),
                i,
                sender,
                start,
                start_unix_ns,
                stop,
                pool.clone(),
                state.clone(),
            ))
        })
        .collect();
    for handle in handles {
        if timeout_at(stop + Duration::from_secs(1), handle).await.is_err() {
            state.errors.borrow_mut().add("client_task", "a client task did not stop".into());
        }
    }
    let published = Instant::now();
    let drain_end = (published + drain).min(stop.max(published));
    while Instant::now() < drain_end && state.replies.get() < state.sent.get() {
        sleep(Duration::from_millis(2)).await;
    }
    let scheduled = (args.rate * args.duration).ceil() as u64;
    let (sent, replies) = (state.sent.get(), state.replies.get());
    let (cpu_fields, cpu_text) = cpu.since(&args, replies, "replies_per_server_cpu_s");
    let last = state.last_reply.get().map_or(0.0, |t| t.saturating_duration_since(start).as_secs_f64());
    let measured = last.max(published.saturating_duration_since(start).as_secs_f64().min(args.duration)).max(1e-9);
    let per_s = replies as f64 / measured;
    let rtt = state.rtt.borrow().clone();
    let errors = std::mem::take(&mut *state.errors.borrow_mut());
    let request = request_name(&args);
    let mut why = Vec::new();
    if sent < scheduled {
        why.push(format!("{} unsent", scheduled - sent));
    }
    if replies < sent {
        why.push(format!("{} unanswered", sent - replies));
    }
    if errors.total > 0 {
        why.push(format!("{} errors", errors.total));
    }
    match (!rtt.is_empty()).then(|| rtt.value_at_quantile(0.99) as f64 / 1000.0) {
        None => why.push("no reply".into()),
        Some(p99) if p99 > args.bound_ms => why.push(format!("p99 {p99:.1} ms > {} ms", args.bound_ms)),
        _ => {}
    }
    let verdict = if why.is_empty() { "held".to_string() } else { format!("failed: {}", why.join(", ")) };
    let figures = ReplyFigures {
        request: &request,
        connected,
        setup_s: opened.seconds,
        window_s: args.duration,
        payload_mean,
        replies,
        per_s,
        rtt: &rtt,
        errors: &errors,
        verdict: &verdict,
    };
    let open_loop = json!({
        "open_loop": true,
        "measured_s": measured,
        "scheduled": scheduled,
        "sent": sent,
        "unsent": scheduled.saturating_sub(sent),
        "unanswered": sent.saturating_sub(replies),
    });
    let value = reply_json(&args, &figures, open_loop, cpu_fields);
    let mut text = header(
        &args,
        &format!(
            "{connected} of {} clients, open loop at {} req/s ({request}, {payload_mean:.0} B) for {} s",
            args.subscribers, args.rate, args.duration
        ),
    );
    let _ = writeln!(text, "  {:<18} {sent} of {scheduled} scheduled", "sent");
    let _ = writeln!(text, "  {:<18} {replies} = {per_s:.0}/s; unanswered {}", "replies", sent.saturating_sub(replies));
    let _ = writeln!(text, "  {:<18} {}  (from the intended send time)", "round trip ms", latency_text(&rtt));
    errors_text(&mut text, &errors);
    text.push_str(&cpu_text);
    let _ = writeln!(text, "  {:<18} {verdict} (bound {} ms)", "verdict", args.bound_ms);
    Ok((value, text))
}

/// What both request/reply modes measured.
struct ReplyFigures<'a> {
    request: &'a str,
    connected: usize,
    setup_s: f64,
    window_s: f64,
    payload_mean: f64,
    replies: u64,
    per_s: f64,
    rtt: &'a Histogram<u64>,
    errors: &'a ErrorLog,
    verdict: &'a str,
}

/// The request/reply report: the figures, the mode's own fields (`extra`, an object), and the
/// CPU fields.
fn reply_json(args: &RunArgs, f: &ReplyFigures, extra: Value, cpu_fields: serde_json::Map<String, Value>) -> Value {
    let mut value = json!({
        "label": label(args),
        "params": params(args),
        "request": f.request,
        "clients": { "requested": args.subscribers, "connected": f.connected },
        "setup_s": f.setup_s,
        "window_s": f.window_s,
        "payload_bytes_mean": f.payload_mean,
        "replies": f.replies,
        "replies_per_s": f.per_s,
        "throughput_per_s": f.per_s,
        "rtt_ms": latency_json(f.rtt),
        "latency_ms": latency_json(f.rtt),
        "errors": f.errors.total,
        "errors_by_kind": errors_json(f.errors),
        "server_rss_bytes": args.server_pid.and_then(procstat::process_rss_bytes),
        "verdict": f.verdict,
    });
    if let (Value::Object(map), Value::Object(extra)) = (&mut value, extra) {
        map.extend(extra);
        map.extend(cpu_fields);
    }
    value
}

/// How a report names the request: `echo` for the peers, else the command sent.
fn request_name(args: &RunArgs) -> String {
    match args.mode {
        Mode::Raw => "echo".to_string(),
        Mode::Routopia => format!("{:?}", args.request).to_lowercase(),
    }
}

/// `--subscribers` clients in closed loop for `--duration` seconds: each sends one request
/// and waits for its answer before the next (routopia: Publish with a request id or Ping;
/// raw: a message the peer's `echo` mode sends back).
pub async fn request_reply(args: RunArgs) -> Outcome {
    let args = Rc::new(args);
    let n = args.subscribers;
    let deadline = Instant::now() + Duration::from_secs_f64(args.setup_timeout);
    let opened = open_many(args.clone(), n, args.connect_batch, deadline, Rc::new(|_| None)).await;
    if opened.clients.is_empty() {
        return Err(Fatal::new(
            format!("no client could connect to {} ({} errors)", args.addr, opened.errors.total),
            opened.errors.total as usize,
        ));
    }
    if args.open_loop {
        return request_reply_open(args, opened).await;
    }
    let connected = opened.clients.len();
    let pool = Rc::new(run::payload_pool(&args));
    let payload_mean = pool.iter().map(Vec::len).sum::<usize>() as f64 / pool.len() as f64;
    sleep(Duration::from_millis(args.settle_ms)).await;
    let rtt = Rc::new(RefCell::new(run::histogram()));
    let errors = Rc::new(RefCell::new(opened.errors));
    let cpu = CpuMark::now(&args);
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(args.duration);
    let handles: Vec<_> = opened
        .clients
        .into_iter()
        .enumerate()
        .map(|(i, client)| {
            compio::runtime::spawn(requester(args.clone(), i, client, end, pool.clone(), rtt.clone(), errors.clone()))
        })
        .collect();
    let mut replies = 0;
    for handle in handles {
        match timeout_at(end + REQUEST_TIMEOUT + Duration::from_secs(1), handle).await {
            Ok(Ok(count)) => replies += count,
            _ => errors.borrow_mut().add("client_task", "a client task did not stop".into()),
        }
    }
    let window = end.min(Instant::now()).duration_since(start).as_secs_f64().max(1e-9);
    let (cpu_fields, cpu_text) = cpu.since(&args, replies, "replies_per_server_cpu_s");
    let rtt = rtt.borrow().clone();
    let errors = std::mem::take(&mut *errors.borrow_mut());
    let per_s = replies as f64 / window;
    let request = request_name(&args);
    let verdict = match (errors.total, rtt.is_empty()) {
        (_, true) => "failed: no reply".to_string(),
        (0, _) => "held".to_string(),
        (e, _) => format!("failed: {e} errors"),
    };
    let figures = ReplyFigures {
        request: &request,
        connected,
        setup_s: opened.seconds,
        window_s: window,
        payload_mean,
        replies,
        per_s,
        rtt: &rtt,
        errors: &errors,
        verdict: &verdict,
    };
    let value = reply_json(&args, &figures, json!({}), cpu_fields);
    let mut text = header(
        &args,
        &format!("{connected} of {n} clients in closed loop ({request}, {payload_mean:.0} B) for {} s", args.duration),
    );
    let _ = writeln!(text, "  {:<18} {replies} = {per_s:.0}/s", "replies");
    let _ = writeln!(text, "  {:<18} {}", "round trip ms", latency_text(&rtt));
    errors_text(&mut text, &errors);
    text.push_str(&cpu_text);
    let _ = writeln!(text, "  {:<18} {verdict}", "verdict");
    Ok((value, text))
}
