//! Sweeps over the server's configuration knobs (batching first of all): for every combination
//! of values and every rate, start routopia-realtime with those environment variables pinned to
//! one core, run a scenario (this binary, as a child pinned to another core), stop the server.
//! Prints a table; writes results.jsonl, the server logs and a latency/throughput SVG plot.

use std::io::Read as _;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::plot::{self, Series};
use crate::{procstat, Scenario};

#[derive(clap::Args, Debug, Clone)]
pub struct SweepArgs {
    /// A knob and its values, repeatable: `batch_size=1,10,100`, `batch_interval=1ms,5ms`,
    /// `compression_threshold=512,4096` (short names are `delivery.*`), `limits.max_outbox_bytes=…`,
    /// or a full variable `ROUTOPIA_DELIVERY__BATCH_SIZE=…`. Every combination is run.
    #[arg(long = "set", value_name = "KNOB=V1,V2,...")]
    pub knobs: Vec<String>,
    /// Scenario run against each setting (any that reports a latency: fanout-1k, fanout-10k,
    /// many-channels, request-reply, connect-storm).
    #[arg(long, value_enum, default_value_t = Scenario::Fanout1k)]
    pub scenario: Scenario,
    /// Publish rates, msg/s, comma-separated (default: the scenario's own rate); with
    /// request-reply, request rates in open loop (`--open-loop`).
    #[arg(long, value_delimiter = ',')]
    pub rates: Vec<f64>,
    /// The server binary (default: routopia-realtime next to this binary, else
    /// target/release/routopia-realtime).
    #[arg(long)]
    pub server_bin: Option<PathBuf>,
    /// Shards the server runs (`serve --shards`).
    #[arg(long, default_value_t = 1)]
    pub shards: usize,
    /// Core(s) the server is pinned to with taskset (a taskset list, e.g. `1` or `2,3`).
    #[arg(long, default_value = "1")]
    pub server_core: String,
    /// Core the generator pins itself to.
    #[arg(long, default_value_t = 0)]
    pub generator_core: usize,
    /// Bound on each generator run, seconds (it is killed after).
    #[arg(long, default_value_t = 240)]
    pub run_timeout: u64,
    /// Kill a server whose RSS passes this, MiB.
    #[arg(long, default_value_t = 4096)]
    pub max_server_rss_mb: u64,
    /// Where results, logs and the plot go (default: a new /tmp/routopia-sweep.PID).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// More flags for each generator run, after `--` (e.g. `-- -d 5 --payload-kind route`).
    #[arg(last = true)]
    pub extra: Vec<String>,
}

/// The server built alongside this binary (same target directory), else the workspace path.
fn default_server_bin() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.join("routopia-realtime")))
        .filter(|path| path.exists())
        .unwrap_or_else(|| PathBuf::from("target/release/routopia-realtime"))
}

/// One server setting to sweep: an environment variable and the values it takes.
#[derive(Debug, Clone, PartialEq)]
pub struct Knob {
    /// Short name for labels, as given.
    pub name: String,
    pub env: String,
    pub values: Vec<String>,
}

/// Parses `NAME=V1,V2,...`: a short `delivery.*` field name, a `section.field` path, or a full
/// `ROUTOPIA_*` variable.
pub fn parse_knob(text: &str) -> Result<Knob, String> {
    let (name, values) = text.split_once('=').ok_or_else(|| format!("'{text}': expected KNOB=V1,V2,..."))?;
    let name = name.trim();
    let valid = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '.';
    if name.is_empty() || !name.chars().all(valid) {
        return Err(format!("'{name}': a knob is letters, digits, '_' and '.'"));
    }
    let env = if name.starts_with("ROUTOPIA_") {
        name.to_string()
    } else if name.contains('.') {
        format!("ROUTOPIA_{}", name.replace('.', "__").to_ascii_uppercase())
    } else {
        format!("ROUTOPIA_DELIVERY__{}", name.to_ascii_uppercase())
    };
    let values: Vec<String> = values.split(',').map(|v| v.trim().to_string()).collect();
    if values.iter().any(|v| v.is_empty() || v.contains(char::is_whitespace)) {
        return Err(format!("'{text}': empty value or value with spaces"));
    }
    let short = name.strip_prefix("ROUTOPIA_").map_or(name.to_string(), |rest| rest.to_ascii_lowercase());
    Ok(Knob { name: short, env, values })
}

/// Every combination of the knobs' values (the first knob varies slowest); no knobs: one empty
/// combination (the server's defaults).
pub fn combinations(knobs: &[Knob]) -> Vec<Vec<(usize, String)>> {
    let mut combos: Vec<Vec<(usize, String)>> = vec![Vec::new()];
    for (k, knob) in knobs.iter().enumerate() {
        combos = combos
            .into_iter()
            .flat_map(|combo| {
                knob.values.iter().map(move |v| {
                    let mut next = combo.clone();
                    next.push((k, v.clone()));
                    next
                })
            })
            .collect();
    }
    combos
}

/// A combination's name in tables and the legend.
pub fn setting_label(knobs: &[Knob], combo: &[(usize, String)]) -> String {
    if combo.is_empty() {
        return "defaults".into();
    }
    combo.iter().map(|(k, v)| format!("{}={v}", knobs[*k].name)).collect::<Vec<_>>().join(" ")
}

/// Lowest port the kernel hands out to outgoing connections.
fn ephemeral_low() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|text| text.split_whitespace().next()?.parse().ok())
        .unwrap_or(32768)
}

/// A free port below the ephemeral range: thousands of generator connections leave their
/// local ports there in TIME-WAIT, and a server may not be able to bind one of those.
fn free_port() -> Result<u16, String> {
    let high = ephemeral_low().max(10_001);
    for _ in 0..200 {
        let port = rand::random_range(10_000..high);
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    Err("no free port below the ephemeral range".into())
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    all[all.len().saturating_sub(lines)..].join(" / ")
}

/// A started server; stopped (TERM, then KILL after 5 s) when dropped.
struct Server {
    child: Child,
}

impl Server {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn start(args: &SweepArgs, env: &[(String, String)], port: u16, log: &Path) -> Result<Server, String> {
        let file = std::fs::File::create(log).map_err(|err| format!("{}: {err}", log.display()))?;
        let err_file = file.try_clone().map_err(|err| err.to_string())?;
        let mut command = Command::new("taskset");
        command
            .arg("-c")
            .arg(&args.server_core)
            .arg(args.server_bin.as_deref().unwrap_or(Path::new("routopia-realtime")))
            .args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--shards", &args.shards.to_string()])
            // Like compare.sh: the peers check nothing and limit nothing, and every generated
            // connection comes from 127.0.0.1.
            .env("ROUTOPIA_LOG_LEVEL", std::env::var("ROUTOPIA_LOG_LEVEL").unwrap_or_else(|_| "warn".into()))
            .env("ROUTOPIA_AUTH__MODE", "disabled")
            .env("ROUTOPIA_RATE_LIMITS__ENABLED", "false")
            .env("ROUTOPIA_LIMITS__MAX_CONNECTIONS_PER_IP", "1000000")
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(err_file);
        for (key, value) in env {
            command.env(key, value);
        }
        let child = command.spawn().map_err(|err| format!("cannot start taskset with {:?}: {err}", args.server_bin))?;
        let mut server = Server { child };
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = server.child.try_wait() {
                return Err(format!("server exited at start ({status}): {}", tail(log, 3)));
            }
            let logged = std::fs::read_to_string(log).is_ok_and(|t| t.contains("listening on"));
            if logged && TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return Ok(server);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Err(format!("server did not listen within 15 s: {}", tail(log, 3)))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // SAFETY: kill only sends a signal to the server child this sweep started.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs this binary once against the server; the first JSON line of its output, or why not.
fn run_generator(
    args: &SweepArgs,
    server: &Server,
    port: u16,
    label: &str,
    rate: Option<f64>,
    err_log: &Path,
) -> Result<Value, String> {
    let exe = std::env::current_exe().map_err(|err| format!("cannot find this binary: {err}"))?;
    let err_file = std::fs::File::create(err_log).map_err(|err| format!("{}: {err}", err_log.display()))?;
    let mut command = Command::new(exe);
    command
        .args(["--scenario", &args.scenario.name(), "--addr", &format!("127.0.0.1:{port}"), "--label", label])
        .args(["--server-pid", &server.pid().to_string(), "--pin-generator", &args.generator_core.to_string()])
        .arg("--json");
    if let Some(rate) = rate {
        command.args(["--rate", &rate.to_string()]);
        // A rate only means something to request/reply in open loop.
        if args.scenario == Scenario::RequestReply {
            command.arg("--open-loop");
        }
    }
    command.args(&args.extra).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(err_file);
    let mut child = command.spawn().map_err(|err| format!("cannot start the generator: {err}"))?;
    let deadline = Instant::now() + Duration::from_secs(args.run_timeout);
    let max_rss = args.max_server_rss_mb * 1024 * 1024;
    let mut killed = None;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) => {}
            Err(err) => return Err(format!("waiting for the generator: {err}")),
        }
        if Instant::now() >= deadline {
            killed = Some(format!("generator killed after {} s", args.run_timeout));
        } else if procstat::process_rss_bytes(server.pid()).is_some_and(|rss| rss > max_rss) {
            killed = Some(format!("server RSS passed {} MiB: stopped", args.max_server_rss_mb));
        }
        if killed.is_some() {
            let _ = child.kill();
            let _ = child.wait();
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let mut stdout = String::new();
    if let Some(mut out) = child.stdout.take() {
        let _ = out.read_to_string(&mut stdout);
    }
    if let Some(why) = killed {
        return Err(why);
    }
    let line = stdout.lines().find(|l| l.trim_start().starts_with('{'));
    match line.map(serde_json::from_str::<Value>) {
        Some(Ok(value)) => Ok(value),
        _ => Err(format!("no report from the generator: {}", tail(err_log, 2))),
    }
}

fn num(v: &Value, path: &[&str]) -> Option<f64> {
    let mut cur = v;
    for key in path {
        cur = cur.get(key)?;
    }
    cur.as_f64()
}

fn cell(value: Option<f64>, decimals: usize) -> String {
    value.map_or_else(|| "-".into(), |x| format!("{x:.decimals$}"))
}

fn print_table(results: &[Value]) {
    let mut rows = vec![[
        "setting",
        "rate/s",
        "throughput/s",
        "p50 ms",
        "p99 ms",
        "max ms",
        "lost",
        "upd/msg",
        "wire B/deliv",
        "server CPU %",
        "gen CPU %",
        "verdict",
    ]
    .map(String::from)
    .to_vec()];
    for r in results {
        let mut verdict = r.get("verdict").and_then(Value::as_str).unwrap_or("?").to_string();
        if let Some(fatal) = r.get("fatal").and_then(Value::as_str) {
            verdict = format!("no measurement: {fatal}");
        }
        if r.get("generator_saturated").and_then(Value::as_bool) == Some(true) {
            verdict.push_str(" [generator saturated]");
        }
        if r.get("cpu_contended").and_then(Value::as_bool) == Some(true) {
            verdict.push_str(" [cpu contended]");
        }
        rows.push(vec![
            r.get("setting").and_then(Value::as_str).unwrap_or("?").to_string(),
            cell(num(r, &["sweep_rate"]).or(num(r, &["params", "rate"])), 0),
            cell(num(r, &["throughput_per_s"]), 0),
            cell(num(r, &["latency_ms", "p50"]), 2),
            cell(num(r, &["latency_ms", "p99"]), 2),
            cell(num(r, &["latency_ms", "max"]), 2),
            cell(num(r, &["lost"]), 0),
            cell(num(r, &["updates_per_message"]), 1),
            cell(num(r, &["wire_bytes_per_delivery"]), 1),
            cell(num(r, &["server_cpu_pct"]), 1),
            cell(num(r, &["generator_cpu_pct"]), 1),
            verdict,
        ]);
    }
    let widths: Vec<usize> =
        (0..rows[0].len()).map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0)).collect();
    for (i, row) in rows.iter().enumerate() {
        let last = row.len() - 1;
        let cells: Vec<String> = row
            .iter()
            .enumerate()
            .map(|(c, s)| {
                if c == 0 || c == last {
                    format!("{s:<w$}", w = widths[c])
                } else {
                    format!("{s:>w$}", w = widths[c])
                }
            })
            .collect();
        println!("| {} |", cells.join(" | "));
        if i == 0 {
            println!("| {} |", widths.iter().map(|w| "-".repeat(*w)).collect::<Vec<_>>().join(" | "));
        }
    }
}

pub fn run(args: &SweepArgs) -> Result<(), String> {
    let knobs = args.knobs.iter().map(|k| parse_knob(k)).collect::<Result<Vec<_>, _>>()?;
    if matches!(args.scenario, Scenario::IdleMemory) {
        return Err("sweep plots latency against throughput: idle-memory has neither".into());
    }
    let mut args = args.clone();
    let server_bin = args.server_bin.clone().unwrap_or_else(default_server_bin);
    if !server_bin.exists() {
        return Err(format!(
            "{} not found (build it: cargo build --release -p routopia-realtime)",
            server_bin.display()
        ));
    }
    args.server_bin = Some(server_bin);
    let args = &args;
    if args.rates.iter().any(|r| !(r.is_finite() && *r > 0.0)) {
        return Err("--rates must be positive numbers".into());
    }
    let out = args.out.clone().unwrap_or_else(|| PathBuf::from(format!("/tmp/routopia-sweep.{}", std::process::id())));
    std::fs::create_dir_all(&out).map_err(|err| format!("{}: {err}", out.display()))?;
    let rates: Vec<Option<f64>> =
        if args.rates.is_empty() { vec![None] } else { args.rates.iter().copied().map(Some).collect() };
    let combos = combinations(&knobs);
    eprintln!(
        "[sweep] {} setting(s) × {} rate(s) of {}; server on core {}, generator on core {}; results in {}",
        combos.len(),
        rates.len(),
        args.scenario.name(),
        args.server_core,
        args.generator_core,
        out.display()
    );
    let mut results = Vec::new();
    let mut jsonl = String::new();
    for (c, combo) in combos.iter().enumerate() {
        let setting = setting_label(&knobs, combo);
        let env: Vec<(String, String)> = combo.iter().map(|(k, v)| (knobs[*k].env.clone(), v.clone())).collect();
        for (r, rate) in rates.iter().enumerate() {
            let stem = out.join(format!("s{c}-r{r}"));
            let log = stem.with_extension("server.log");
            eprintln!("[sweep] {setting}, rate {}", rate.map_or("preset".into(), |r| r.to_string()));
            let outcome = free_port().and_then(|port| {
                let server = Server::start(args, &env, port, &log)?;
                let result = run_generator(args, &server, port, &setting, *rate, &stem.with_extension("loadtest.err"));
                let alive = procstat::process_cpu_seconds(server.pid()).is_some();
                drop(server);
                match result {
                    Ok(value) if !alive => Err(format!(
                        "server died during the run: {} (report: {})",
                        tail(&log, 2),
                        value.get("verdict").and_then(Value::as_str).unwrap_or("?")
                    )),
                    other => other,
                }
            });
            let mut value = outcome.unwrap_or_else(|why| {
                eprintln!("[sweep] {setting}: {why}");
                json!({ "label": setting, "fatal": why, "verdict": "failed: no measurement" })
            });
            if let Value::Object(map) = &mut value {
                map.insert("setting".into(), json!(setting));
                map.insert("knobs".into(), env.iter().map(|(k, v)| (k.clone(), json!(v))).collect());
                map.insert("sweep_rate".into(), json!(rate));
            }
            jsonl.push_str(&value.to_string());
            jsonl.push('\n');
            // Written after every run, so that an interrupted sweep keeps what it measured.
            std::fs::write(out.join("results.jsonl"), &jsonl).map_err(|err| format!("results.jsonl: {err}"))?;
            results.push(value);
            std::thread::sleep(Duration::from_millis(500));
        }
    }
    let series: Vec<Series> = combos
        .iter()
        .map(|combo| {
            let name = setting_label(&knobs, combo);
            let points = results
                .iter()
                .filter(|r| r.get("setting").and_then(Value::as_str) == Some(name.as_str()))
                .filter_map(|r| {
                    Some((
                        num(r, &["throughput_per_s"])?,
                        num(r, &["latency_ms", "p50"])?,
                        num(r, &["latency_ms", "p99"])?,
                    ))
                })
                .collect();
            Series { name, points }
        })
        .collect();
    let x_label = match args.scenario {
        Scenario::RequestReply => "replies per second",
        Scenario::ConnectStorm => "connects per second",
        _ => "deliveries per second",
    };
    let title = format!(
        "routopia-realtime {}: latency against throughput per setting ({})",
        args.scenario.name(),
        chrono_free_date()
    );
    let svg_path = out.join("sweep.svg");
    std::fs::write(&svg_path, plot::svg(&title, x_label, &series)).map_err(|err| format!("sweep.svg: {err}"))?;
    println!();
    print_table(&results);
    println!("\nresults: {}  plot: {}", out.join("results.jsonl").display(), svg_path.display());
    // A sweep in which nothing ran (e.g. a knob the server does not know) must not look fine.
    if results.iter().all(|r| r.get("fatal").is_some()) {
        return Err("no run of the sweep measured anything (see the table)".into());
    }
    Ok(())
}

/// Today's date (UTC) as YYYY-MM-DD, from the system clock.
fn chrono_free_date() -> String {
    let days = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() / 86_400);
    // Civil date from days since 1970-01-01 (the proleptic Gregorian calendar).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn knobs_parse_to_server_variables() {
        let k = parse_knob("batch_size=1,10,100").unwrap();
        assert_eq!(k.env, "ROUTOPIA_DELIVERY__BATCH_SIZE");
        assert_eq!(k.values, ["1", "10", "100"]);
        assert_eq!(k.name, "batch_size");
        assert_eq!(parse_knob("batch_interval=1ms, 5ms").unwrap().values, ["1ms", "5ms"]);
        assert_eq!(parse_knob("limits.max_outbox_bytes=65536").unwrap().env, "ROUTOPIA_LIMITS__MAX_OUTBOX_BYTES");
        let full = parse_knob("ROUTOPIA_DELIVERY__COMPRESSION_THRESHOLD=512").unwrap();
        assert_eq!(full.env, "ROUTOPIA_DELIVERY__COMPRESSION_THRESHOLD");
        assert_eq!(full.name, "delivery__compression_threshold");
        for bad in ["batch_size", "=1", "batch size=1", "batch_size=1,,2", "batch_size="] {
            assert!(parse_knob(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn combinations_cover_every_pair() {
        let knobs = vec![parse_knob("batch_size=1,100").unwrap(), parse_knob("batch_interval=1ms,5ms,50ms").unwrap()];
        let combos = combinations(&knobs);
        assert_eq!(combos.len(), 6);
        assert_eq!(setting_label(&knobs, &combos[0]), "batch_size=1 batch_interval=1ms");
        assert_eq!(setting_label(&knobs, &combos[5]), "batch_size=100 batch_interval=50ms");
        assert_eq!(combinations(&[]), vec![Vec::new()]);
        assert_eq!(setting_label(&[], &[]), "defaults");
    }

    #[test]
    fn dates_are_civil() {
        let date = chrono_free_date();
        assert_eq!(date.len(), 10);
        assert!(date.starts_with("20"));
    }
}
