//! `routopia-loadtest`: an open-loop 1→N fan-out load generator for routopia-realtime and for
//! the peer servers in shared/peers (raw WebSocket broadcast), on one single-threaded compio
//! runtime so that it can be pinned to one core. See loadtest/README.md.

mod procstat;
mod report;
mod run;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser, Debug)]
#[command(
    name = "routopia-loadtest",
    version,
    about = "Open-loop fan-out load generator: N subscribers on C channels, P publishers at R msg/s for D seconds",
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
        ] {
            if !(value.is_finite() && value > 0.0 && value <= 3600.0) {
                return Err(format!("{name} must be between 0 and 3600"));
            }
        }
        Ok(())
    }
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Command::Table { files }) = cli.command {
        return match report::print_table(&files) {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                eprintln!("error: {err}");
                ExitCode::from(2)
            }
        };
    }
    let args = cli.run;
    if let Err(err) = args.validate() {
        eprintln!("error: {err}");
        return ExitCode::from(2);
    }
    let runtime = match build_runtime(args.driver, args.event_interval) {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the compio runtime ({:?} driver): {err}", args.driver);
            return ExitCode::FAILURE;
        }
    };
    let outcome = runtime.block_on(run::run(args.clone()));
    let code = match outcome {
        Ok(report) => {
            if args.json {
                println!("{}", report.to_json());
            } else {
                print!("{}", report.to_text());
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
