//! The `routopia-realtime` binary: command line → config → logging → shards → signals.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use routopia_realtime::config::{Config, LogFormat, Overrides};
use routopia_realtime::shard::Server;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use tracing_subscriber::EnvFilter;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "routopia-realtime", version, about = "Real-time WebSocket pub/sub server for navigation updates")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server (embedded defaults: 0.0.0.0:3000, one shard per core, in-memory broker).
    Serve(ServeArgs),
    /// Validate a config file and print the effective configuration.
    CheckConfig {
        /// The TOML file to check.
        file: PathBuf,
    },
    /// Train a zstd dictionary from sample payloads of one update type, for
    /// `delivery.zstd_dictionaries`; prints what it saves on held-out samples.
    TrainDict(TrainDictArgs),
}

#[derive(clap::Args)]
struct TrainDictArgs {
    /// The update type the samples are payloads of (ROUTE, WEATHER, TRAFFIC, INCIDENT, POI).
    #[arg(long = "type")]
    update_type: String,
    /// Where to write the dictionary.
    #[arg(long)]
    out: PathBuf,
    /// Largest dictionary size, bytes (every client downloads it once).
    #[arg(long, default_value_t = 16 * 1024)]
    max_size: usize,
    /// zstd level to report the savings at (use `delivery.compression_level`).
    #[arg(long, default_value_t = 1)]
    level: i32,
    /// Each line of each file is one sample (JSON lines), instead of each file.
    #[arg(long)]
    lines: bool,
    /// Sample files, or directories of them (one sample per file unless `--lines`).
    #[arg(required = true)]
    samples: Vec<PathBuf>,
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Address to listen on (HTTP and WebSocket), e.g. 127.0.0.1:3000.
    #[arg(long)]
    listen: Option<std::net::SocketAddr>,
    /// A second address serving only /metrics and /health, e.g. 127.0.0.1:9090.
    #[arg(long)]
    metrics_listen: Option<std::net::SocketAddr>,
    /// Number of shards; 0 = one per core.
    #[arg(long)]
    shards: Option<usize>,
    /// TOML config file.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Log filter, e.g. `info` or `warn,routopia_realtime=debug` (wins over `log_level`,
    /// `ROUTOPIA_LOG_LEVEL` and `RUST_LOG`).
    #[arg(long)]
    log_level: Option<String>,
    /// Log format: `pretty` (for a terminal) or `json` (one object a line).
    #[arg(long, value_name = "pretty|json")]
    log_format: Option<LogFormat>,
    /// Log this server's own events at debug: each frame in and out (never token contents).
    #[arg(long)]
    debug: bool,
    /// `memory` (default) or a Redis URL, e.g. redis://127.0.0.1:6379/0.
    #[arg(long)]
    broker: Option<String>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::CheckConfig { file } => match load_checked(Some(&file), &Overrides::default()) {
            Ok(config) => {
                println!("# {} is valid; effective configuration:", file.display());
                print!("{}", config.to_toml());
                ExitCode::SUCCESS
            }
            Err(err) => {
                eprintln!("error: {err}");
                ExitCode::from(2)
            }
        },
        Command::Serve(args) => serve(args),
        Command::TrainDict(args) => match train_dict(&args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                eprintln!("error: {err}");
                ExitCode::from(2)
            }
        },
    }
}

fn train_dict(args: &TrainDictArgs) -> Result<(), String> {
    use routopia_realtime::compression;
    let update_type = routopia_realtime::config::parse_update_type(&args.update_type).ok_or_else(|| {
        format!("`{}` is not an update type (ROUTE, WEATHER, TRAFFIC, INCIDENT, POI)", args.update_type)
    })?;
    let samples = compression::read_samples(&args.samples, args.lines).map_err(|err| err.to_string())?;
    // Every tenth sample is held out, so the figures printed are for payloads it never saw.
    let (held_out, training): (Vec<_>, Vec<_>) = samples.into_iter().enumerate().partition(|(i, _)| i % 10 == 9);
    let training: Vec<Vec<u8>> = training.into_iter().map(|(_, s)| s).collect();
    let held_out: Vec<Vec<u8>> = held_out.into_iter().map(|(_, s)| s).collect();
    if training.len() < 20 {
        return Err(format!("{} samples to train on; give at least 20 (a few hundred is better)", training.len()));
    }
    let trained = compression::train(&training, args.max_size).map_err(|err| format!("zstd training failed: {err}"))?;
    let dictionary = compression::Dictionary::from_bytes(trained.clone().into(), update_type, args.level)?;
    std::fs::write(&args.out, &trained).map_err(|err| format!("{}: {err}", args.out.display()))?;
    let report = compression::dictionary_savings(&dictionary, &held_out, args.level);
    println!(
        "wrote {} ({} bytes, id {}) from {} samples",
        args.out.display(),
        trained.len(),
        dictionary.id,
        training.len()
    );
    println!(
        "held-out samples: {}; plain {} B, zstd level {} {} B, with the dictionary {} B (mean per sample)",
        held_out.len(),
        report.plain,
        args.level,
        report.without_dictionary,
        report.with_dictionary
    );
    println!(
        "config: [[delivery.zstd_dictionaries]]\ntype = \"{}\"\nfile = \"{}\"",
        args.update_type.to_uppercase(),
        args.out.display()
    );
    Ok(())
}

fn serve(args: ServeArgs) -> ExitCode {
    let overrides = Overrides {
        listen: args.listen,
        metrics_listen: args.metrics_listen,
        shards: args.shards,
        log_level: args.log_level,
        log_format: args.log_format,
        broker: args.broker,
        debug: args.debug,
    };
    let config = match load_checked(args.config.as_deref(), &overrides) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("error: {err}");
            return ExitCode::from(2);
        }
    };
    init_logging(&config);
    let mut signals = match signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP]) {
        Ok(signals) => signals,
        Err(err) => {
            tracing::error!(error = %err, "cannot install signal handlers");
            return ExitCode::FAILURE;
        }
    };
    let shards = config.shard_count();
    let server = match Server::start(config) {
        Ok(server) => server,
        Err(err) => {
            tracing::error!(error = %err, "cannot start");
            return ExitCode::FAILURE;
        }
    };
    tracing::info!(addr = %server.local_addr(), shards, version = env!("CARGO_PKG_VERSION"), "listening");
    // Machine-readable lines on stdout, for supervisors and tests that listen on port 0.
    if let Some(addr) = server.metrics_addr() {
        tracing::info!(%addr, "serving /metrics and /health");
        println!("metrics on {addr}");
    }
    println!("listening on {}", server.local_addr());
    let _ = std::io::stdout().flush();
    for signal in signals.forever() {
        if signal == SIGHUP {
            server.reload_tls();
            continue;
        }
        tracing::info!(signal, "shutting down");
        break;
    }
    server.shutdown();
    tracing::info!("stopped");
    ExitCode::SUCCESS
}

/// The configuration, with the files it names (the TLS certificate and key) checked too, so a
/// bad file is refused like any other bad setting.
fn load_checked(file: Option<&std::path::Path>, overrides: &Overrides) -> Result<Config, String> {
    let config = Config::load(file, overrides).map_err(|err| err.to_string())?;
    if config.tls.enabled() {
        routopia_realtime::tls::load(&config.tls.cert_file, &config.tls.key_file)
            .map_err(|err| format!("invalid setting `tls`: {err}"))?;
    }
    routopia_realtime::compression::ZstdSettings::from_config(&config.delivery)
        .map_err(|err| format!("invalid setting `delivery.zstd_dictionaries`: {err}"))?;
    Ok(config)
}

/// Logs to stderr. `log_level` is already the filter every layer (RUST_LOG included) agreed
/// on, and valid.
fn init_logging(config: &Config) {
    let filter = EnvFilter::try_new(&config.log_level).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match config.log_format {
        // Colours only for a terminal: a journal or a file gets plain text.
        LogFormat::Pretty => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}
