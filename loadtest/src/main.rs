//! `routopia-loadtest`: the measurement suite for routopia-realtime and for the peer servers in
//! shared/peers (raw WebSocket): open-loop fan-out, many channels, request/reply, connection
//! storms, idle memory, and sweeps over the server's batching knobs. The generator runs on one
//! single-threaded compio runtime so that it can be pinned to one core. See loadtest/README.md.

// serde_json::json! of a full report nests deeper than the default limit.
#![recursion_limit = "256"]

mod payloads;
mod plot;
mod procstat;
mod report;
mod run;
mod scenarios;
mod sweep;
mod zstd_table;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::parser::ValueSource;
use clap::{ArgMatches, CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};

#[derive(Parser, Debug)]
#[command(
    name = "routopia-loadtest",
    version,
    about = "Load generator and measurement suite for routopia-realtime and its peers: fan-out, many channels, \
             request/reply, connection storms, idle memory, batching sweeps (see loadtest/README.md)",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Print one side-by-side table from files of `--json` reports (one JSON object a line).
    Table {
        /// Files holding reports; lines that are not JSON objects are shown as failed runs.
        files: Vec<PathBuf>,
    },
    /// Write N generated payloads of one kind to DIR, one sample per file (training sets for
    /// `routopia-realtime train-dict`).
    Samples {
        /// route, poi, weather, traffic or incident.
        #[arg(long, value_parser = parse_kind)]
        kind: payloads::Kind,
        /// How many samples.
        #[arg(short = 'n', long, default_value_t = 1000)]
        count: usize,
        /// Directory to write into (created if missing).
        #[arg(long)]
        dir: PathBuf,
        /// Seed of the generator (the same seed writes the same files).
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// Print what zstd saves and costs on realistic ROUTE and POI messages: per batch size, per
    /// compression threshold, at levels 1 and 3, with and without a trained dictionary.
    ZstdTable(zstd_table::ZstdTableArgs),
    /// Start the server once per combination of batching knobs, run a scenario at each rate,
    /// stop it; print a table and write results.jsonl and a latency/throughput SVG plot.
    Sweep(sweep::SweepArgs),
}

fn parse_kind(s: &str) -> Result<payloads::Kind, String> {
    s.parse()
}

/// Named scenarios: presets for the flags not given on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Scenario {
    /// 1→1,000 fan-out on one channel at 1,000 msg/s.
    #[value(name = "fanout-1k")]
    Fanout1k,
    /// 1→10,000 fan-out on one channel at 100 msg/s.
    #[value(name = "fanout-10k")]
    Fanout10k,
    /// 1,000 channels with 3 subscribers each, 4 publishers spread over them, 4,000 msg/s.
    ManyChannels,
    /// Closed-loop request/reply: 100 clients, each sends a request and waits for its answer
    /// (routopia: Publish with a request id → PublishResult, or Ping → Pong; raw: echo).
    RequestReply,
    /// 10,000 connects as fast as possible (500 in flight): connects/s, failures, latency.
    ConnectStorm,
    /// 10,000 idle connections: the server's RSS growth per connection (needs --server-pid).
    IdleMemory,
}

impl Scenario {
    pub fn name(self) -> String {
        self.to_possible_value().map(|v| v.get_name().to_string()).unwrap_or_default()
    }
}

/// What the publishers (and request/reply clients) send after the timing header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PayloadKind {
    /// Fixed-size filler bytes of `--payload` bytes (the timing header included).
    Synthetic,
    Route,
    Poi,
    Weather,
    Traffic,
    Incident,
}

impl PayloadKind {
    pub fn json_kind(self) -> Option<payloads::Kind> {
        match self {
            PayloadKind::Synthetic => None,
            PayloadKind::Route => Some(payloads::Kind::Route),
            PayloadKind::Poi => Some(payloads::Kind::Poi),
            PayloadKind::Weather => Some(payloads::Kind::Weather),
            PayloadKind::Traffic => Some(payloads::Kind::Traffic),
            PayloadKind::Incident => Some(payloads::Kind::Incident),
        }
    }
}

/// The request the request-reply scenario sends in routopia mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Request {
    /// `Publish` with a request id; the server answers `PublishResult`.
    Publish,
    /// `Ping`; the server answers `Pong`.
    Ping,
}

/// What the generator speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// routopia-realtime's protocol: Connect, Subscribe, fire-and-forget Publish, batched updates.
    Routopia,
    /// Plain WebSocket broadcast (the peers in shared/peers): every message goes to every connection.
    Raw,
}

/// The generator's own I/O driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Driver {
    /// io_uring with single issuer, cooperative and deferred task running (least overhead).
    Uring,
    /// io_uring with compio's default setup flags.
    UringPlain,
    /// epoll (readiness, then a syscall per read).
    Epoll,
}

#[derive(clap::Args, Debug, Clone)]
pub struct RunArgs {
    /// Server address (loopback only).
    #[arg(long, default_value = "127.0.0.1:3000")]
    pub addr: SocketAddr,
    /// Protocol: `routopia` (path /ws) or `raw` (peer servers in broadcast mode).
    #[arg(long, value_enum, default_value_t = Mode::Routopia)]
    pub mode: Mode,
    /// WebSocket path in raw mode (routopia mode always uses /ws).
    #[arg(long, default_value = "/")]
    pub path: String,
    /// JWT sent in Connect (routopia mode), allowed to publish and subscribe on the channels
    /// used; empty for a server with `auth.mode = "disabled"`.
    #[arg(long, env = "ROUTOPIA_TOKEN", default_value = "")]
    pub token: String,
    /// Subscriber connections (N).
    #[arg(short = 'n', long, default_value_t = 1000)]
    pub subscribers: usize,
    /// Channels (C); subscriber i listens on channel i mod C. Raw mode: must be 1.
    #[arg(short = 'c', long, default_value_t = 1)]
    pub channels: usize,
    /// Publisher connections (P); they share the total rate.
    #[arg(short = 'p', long, default_value_t = 1)]
    pub publishers: usize,
    /// Total publish rate (R), messages per second over all publishers.
    #[arg(short = 'r', long, default_value_t = 2000.0)]
    pub rate: f64,
    /// Publishing window (D), seconds.
    #[arg(short = 'd', long, default_value_t = 10.0)]
    pub duration: f64,
    /// Payload size (S), bytes; at least 16 (intended send time and sequence number).
    #[arg(short = 's', long, default_value_t = 64)]
    pub payload: usize,
    /// Channel name prefix: channels are PREFIX:0, PREFIX:1, ...
    #[arg(long, default_value = "route")]
    pub channel_prefix: String,
    /// Connections set up concurrently (in batches of this size).
    #[arg(long, default_value_t = 200)]
    pub connect_batch: usize,
    /// Bound on the whole connection setup, seconds (each connection also gets at most 10 s).
    #[arg(long, default_value_t = 60.0)]
    pub setup_timeout: f64,
    /// Pause between setup and the first publish, milliseconds (lets raw servers register
    /// connections whose handshake just finished).
    #[arg(long, default_value_t = 500)]
    pub settle_ms: u64,
    /// After the window: how long to wait for deliveries still in flight (and for a publisher
    /// that fell behind to send its backlog), seconds.
    #[arg(long, default_value_t = 5.0)]
    pub drain_timeout: f64,
    /// The server's process id, to report its CPU seconds (all threads) and RSS over the window.
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// Name of the server in reports and tables.
    #[arg(long)]
    pub label: Option<String>,
    /// Bound on p99 latency and on publisher lag for the `held` verdict, milliseconds.
    #[arg(long, default_value_t = 50.0)]
    pub bound_ms: f64,
    /// The generator's I/O driver (not the server's).
    #[arg(long, value_enum, default_value_t = Driver::Uring)]
    pub driver: Driver,
    /// Tasks the generator's runtime runs between two looks at I/O completions and timers
    /// (compio's default is 61). Lower keeps the publishers on schedule when the readers are busy.
    #[arg(long, default_value_t = 61)]
    pub event_interval: usize,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
    /// A named scenario; it presets the flags not given (see loadtest/README.md).
    #[arg(long, value_enum)]
    pub scenario: Option<Scenario>,
    /// What publishers send after the 24-byte timing header: realistic JSON of a kind, or
    /// `synthetic` filler of `--payload` bytes.
    #[arg(long, value_enum, default_value_t = PayloadKind::Synthetic)]
    pub payload_kind: PayloadKind,
    /// Seed of the payload generator.
    #[arg(long, default_value_t = 1)]
    pub payload_seed: u64,
    /// routopia mode: ask the server for zstd-compressed envelopes (`Connect.accept_zstd`).
    #[arg(long)]
    pub accept_zstd: bool,
    /// Pin this process to one CPU core (sched_setaffinity) before anything starts.
    #[arg(long)]
    pub pin_generator: Option<usize>,
    /// request-reply, routopia mode: which request the clients send.
    #[arg(long, value_enum, default_value_t = Request::Publish)]
    pub request: Request,
    /// request-reply: send open loop at `--rate` requests/s over all clients (latency from the
    /// intended send time) instead of one request in flight per client.
    #[arg(long)]
    pub open_loop: bool,
    /// idle-memory: longest wait for the server's RSS to stop moving after the connects, seconds.
    #[arg(long, default_value_t = 30.0)]
    pub rss_stable_timeout: f64,
}

impl RunArgs {
    fn validate(&self) -> Result<(), String> {
        if !self.addr.ip().is_loopback() {
            return Err(format!("{} is not a loopback address: this tool only drives local servers", self.addr));
        }
        if self.subscribers == 0 || self.publishers == 0 || self.channels == 0 {
            return Err("--subscribers, --publishers and --channels must be at least 1".into());
        }
        if self.mode == Mode::Raw && self.channels != 1 {
            return Err("raw mode broadcasts to every connection: only --channels 1 makes sense".into());
        }
        if !(self.rate.is_finite() && self.rate > 0.0) {
            return Err("--rate must be a positive number".into());
        }
        if !(self.duration.is_finite() && self.duration > 0.0 && self.duration <= 3600.0) {
            return Err("--duration must be between 0 and 3600 seconds".into());
        }
        if self.scenario == Some(Scenario::IdleMemory) && self.server_pid.is_none() {
            return Err("idle-memory measures the server's RSS: give --server-pid".into());
        }
        if self.accept_zstd && self.mode == Mode::Raw {
            return Err("--accept-zstd is part of routopia's Connect: not in raw mode".into());
        }
        if self.payload < run::PAYLOAD_HEADER {
            return Err(format!("--payload must be at least {} bytes", run::PAYLOAD_HEADER));
        }
        if self.connect_batch == 0 {
            return Err("--connect-batch must be at least 1".into());
        }
        for (name, value) in [
            ("--setup-timeout", self.setup_timeout),
            ("--drain-timeout", self.drain_timeout),
            ("--bound-ms", self.bound_ms),
            ("--rss-stable-timeout", self.rss_stable_timeout),
        ] {
            if !(value.is_finite() && value > 0.0 && value <= 3600.0) {
                return Err(format!("{name} must be between 0 and 3600"));
            }
        }
        Ok(())
    }

    /// Fills in the scenario's presets for every flag `given` says was not on the command line.
    pub fn apply_scenario(&mut self, given: impl Fn(&str) -> bool) {
        let Some(scenario) = self.scenario else { return };
        let mut set = |id: &str, apply: &mut dyn FnMut(&mut RunArgs)| {
            if !given(id) {
                apply(self);
            }
        };
        match scenario {
            Scenario::Fanout1k => {
                set("subscribers", &mut |a| a.subscribers = 1000);
                set("rate", &mut |a| a.rate = 1000.0);
            }
            Scenario::Fanout10k => {
                set("subscribers", &mut |a| a.subscribers = 10_000);
                set("rate", &mut |a| a.rate = 100.0);
                set("setup_timeout", &mut |a| a.setup_timeout = 90.0);
            }
            Scenario::ManyChannels => {
                set("channels", &mut |a| a.channels = 1000);
                set("subscribers", &mut |a| a.subscribers = 3000);
                set("publishers", &mut |a| a.publishers = 4);
                set("rate", &mut |a| a.rate = 4000.0);
            }
            Scenario::RequestReply => {
                set("subscribers", &mut |a| a.subscribers = 100);
            }
            Scenario::ConnectStorm => {
                set("subscribers", &mut |a| a.subscribers = 10_000);
                set("connect_batch", &mut |a| a.connect_batch = 500);
                set("setup_timeout", &mut |a| a.setup_timeout = 120.0);
            }
            Scenario::IdleMemory => {
                set("subscribers", &mut |a| a.subscribers = 10_000);
                set("setup_timeout", &mut |a| a.setup_timeout = 120.0);
            }
        }
    }
}

/// Whether `id` was given on the command line or through the environment.
fn given(matches: &ArgMatches, id: &str) -> bool {
    matches!(matches.value_source(id), Some(ValueSource::CommandLine | ValueSource::EnvVariable))
}

/// Pins the calling thread (and the threads it starts later) to one core.
pub fn pin_to_core(core: usize) -> std::io::Result<()> {
    // SAFETY: cpu_set_t is plain data; CPU_SET writes inside it for core < CPU_SETSIZE, which
    // is checked first; sched_setaffinity only reads the set.
    unsafe {
        if core >= libc::CPU_SETSIZE as usize {
            return Err(std::io::Error::from(std::io::ErrorKind::InvalidInput));
        }
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(core, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

fn build_runtime(driver: Driver, event_interval: usize) -> std::io::Result<compio::runtime::Runtime> {
    let mut proactor = compio::driver::ProactorBuilder::new();
    match driver {
        Driver::Uring => {
            proactor
                .driver_type(compio::driver::DriverType::IoUring)
                .single_issuer(true)
                .coop_taskrun(true)
                .taskrun_flag(true)
                .defer_taskrun(true);
        }
        Driver::UringPlain => {
            proactor.driver_type(compio::driver::DriverType::IoUring);
        }
        Driver::Epoll => {
            proactor.driver_type(compio::driver::DriverType::Poll);
        }
    }
    compio::runtime::RuntimeBuilder::new().with_proactor(proactor).event_interval(event_interval.max(1)).build()
}

fn exit_with(result: Result<(), String>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::from(2)
        }
    }
}

fn main() -> ExitCode {
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|err| err.exit());
    match cli.command {
        Some(Command::Table { files }) => return exit_with(report::print_table(&files)),
        Some(Command::Samples { kind, count, dir, seed }) => {
            return exit_with(zstd_table::write_samples(kind, count, &dir, seed))
        }
        Some(Command::ZstdTable(args)) => return exit_with(zstd_table::run(&args)),
        Some(Command::Sweep(args)) => return exit_with(sweep::run(&args)),
        None => {}
    }
    let mut args = cli.run;
    args.apply_scenario(|id| given(&matches, id));
    if let Err(err) = args.validate() {
        eprintln!("error: {err}");
        return ExitCode::from(2);
    }
    if let Some(core) = args.pin_generator {
        if let Err(err) = pin_to_core(core) {
            eprintln!("error: cannot pin the generator to core {core}: {err}");
            return ExitCode::from(2);
        }
    }
    let runtime = match build_runtime(args.driver, args.event_interval) {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the compio runtime ({:?} driver): {err}", args.driver);
            return ExitCode::FAILURE;
        }
    };
    let outcome = runtime.block_on(async {
        match args.scenario {
            Some(Scenario::RequestReply) => scenarios::request_reply(args.clone()).await,
            Some(Scenario::ConnectStorm) => scenarios::connect_storm(args.clone()).await,
            Some(Scenario::IdleMemory) => scenarios::idle_memory(args.clone()).await,
            _ => run::run(args.clone()).await.map(|report| (report.to_json(), report.to_text())),
        }
    });
    let code = match outcome {
        Ok((json, text)) => {
            if args.json {
                println!("{json}");
            } else {
                print!("{text}");
            }
            0
        }
        Err(fatal) => {
            if args.json {
                println!("{}", fatal.to_json(&args));
            }
            eprintln!("error: {}", fatal.message);
            1
        }
    };
    // Connections and tasks still hold sockets and pending reads: leave at once rather than
    // tearing the runtime down (which has nothing useful left to wait for).
    use std::io::Write;
    let _ = std::io::stdout().flush();
    std::process::exit(code);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(argv: &[&str]) -> RunArgs {
        let matches = Cli::command().try_get_matches_from(argv).unwrap();
        let mut args = Cli::from_arg_matches(&matches).unwrap().run;
        args.apply_scenario(|id| given(&matches, id));
        args
    }

    #[test]
    fn scenarios_preset_only_what_was_not_given() {
        let args = parse(&["routopia-loadtest", "--scenario", "fanout-10k"]);
        assert_eq!((args.subscribers, args.rate), (10_000, 100.0));
        let args = parse(&["routopia-loadtest", "--scenario", "fanout-10k", "--rate", "50", "-n", "2000"]);
        assert_eq!((args.subscribers, args.rate), (2000, 50.0));
        let args = parse(&["routopia-loadtest", "--scenario", "many-channels"]);
        assert_eq!((args.channels, args.subscribers, args.publishers), (1000, 3000, 4));
        // No scenario: the flags' own defaults, as compare.sh relies on.
        let args = parse(&["routopia-loadtest"]);
        assert_eq!((args.subscribers, args.rate, args.channels), (1000, 2000.0, 1));
    }

    #[test]
    fn idle_memory_needs_the_server_pid() {
        let args = parse(&["routopia-loadtest", "--scenario", "idle-memory"]);
        assert!(args.validate().unwrap_err().contains("--server-pid"));
        let args = parse(&["routopia-loadtest", "--scenario", "idle-memory", "--server-pid", "1"]);
        assert!(args.validate().is_ok());
    }
}
