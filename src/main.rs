//! The `routopia-realtime` binary: command line → config → logging → shards → signals.

use std::backtrace::{Backtrace, BacktraceStatus};
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};

use clap::{Parser, Subcommand};
use routopia_realtime::config::{Config, LogFormat, Overrides, Tls};
use routopia_realtime::shard::{ReloadRefusal, Server};
use sd_notify::NotifyState;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{fmt, EnvFilter, Registry};

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
    let log_filter = init_logging(&config);
    install_panic_hook();
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
    if let Some(addr) = server.api_addr() {
        tracing::info!(%addr, "serving the server API");
        println!("api on {addr}");
    }
    println!("listening on {}", server.local_addr());
    let _ = std::io::stdout().flush();
    let status = format!("listening on {}, {shards} shards", server.local_addr());
    notify(&[NotifyState::Ready, NotifyState::Status(&status)]);
    for signal in signals.forever() {
        if signal == SIGHUP {
            reload(&server, args.config.as_deref(), &overrides, &log_filter);
            continue;
        }
        notify(&[NotifyState::Stopping, NotifyState::Status("draining connections")]);
        let timeout = server.config().shutdown_timeout;
        tracing::info!(signal, shutdown_timeout = ?timeout, "shutting down: no new connections; every client is told to reconnect elsewhere");
        break;
    }
    let report = server.shutdown();
    tracing::info!(drained = report.drained, cut_at_timeout = report.cut, "stopped");
    ExitCode::SUCCESS
}

/// SIGHUP: loads the configuration again (the same file, environment and flags) and puts
/// what can change without a restart in force, or, when anything in it is wrong, nothing.
fn reload(server: &Server, file: Option<&Path>, overrides: &Overrides, log_filter: &LogFilter) {
    let mut reloading = vec![NotifyState::Reloading];
    reloading.extend(NotifyState::monotonic_usec_now().ok());
    notify(&reloading);
    let running = server.config();
    let checked = Config::load(file, overrides)
        .map_err(|err| err.to_string())
        .and_then(|loaded| check_files(&loaded, Some(&running.tls)).map(|()| loaded));
    let outcome = match checked {
        Ok(loaded) => server.reload(&loaded).map_err(|refusal| {
            if let ReloadRefusal::Tls(err) = &refusal {
                tracing::error!(error = %err, "TLS certificate not reloaded; the previous one stays in use");
            }
            refusal.to_string()
        }),
        Err(err) => Err(err),
    };
    let status = match outcome {
        Ok(reload) => {
            for change in &reload.applied {
                tracing::info!(setting = %change.setting, old = %change.old, new = %change.new, "setting reloaded");
            }
            for change in &reload.needs_restart {
                tracing::warn!(
                    setting = %change.setting, old = %change.old, new = %change.new,
                    "setting changed but needs a restart; not applied"
                );
            }
            if reload.applied.iter().any(|change| change.setting == "log_level") {
                log_filter.set(&reload.config.log_level);
            }
            if let Some(tls) = &server.cluster.tls {
                tracing::info!(
                    cert_file = %tls.cert_file().display(),
                    key_file = %tls.key_file().display(),
                    reloads = tls.reloads(),
                    "TLS certificate reloaded; new connections use it"
                );
            }
            tracing::info!(
                applied = reload.applied.len(),
                needs_restart = reload.needs_restart.len(),
                "configuration reloaded; connections opened from now on use it"
            );
            "configuration reloaded".to_owned()
        }
        Err(err) => {
            tracing::error!(error = %err, "configuration not reloaded; the previous settings all stay in force");
            format!("reload refused, previous configuration in force: {err}")
        }
    };
    notify(&[NotifyState::Ready, NotifyState::Status(&status)]);
}

/// Tells the service manager (systemd, `Type=notify`) what the server is doing; nothing when
/// it did not ask (`NOTIFY_SOCKET` unset).
fn notify(states: &[NotifyState]) {
    if let Err(err) = sd_notify::notify(states) {
        tracing::warn!(error = %err, "cannot notify the service manager");
    }
}

/// The configuration, with the files it names (the TLS certificate and key, the zstd
/// dictionaries) checked too, so a bad file is refused like any other bad setting.
fn load_checked(file: Option<&Path>, overrides: &Overrides) -> Result<Config, String> {
    let config = Config::load(file, overrides).map_err(|err| err.to_string())?;
    check_files(&config, None)?;
    Ok(config)
}

/// Checks the files `config` names. A certificate and key at the paths `running` already
/// uses are left out: the reload loads those itself.
fn check_files(config: &Config, running: Option<&Tls>) -> Result<(), String> {
    if config.tls.enabled() && running != Some(&config.tls) {
        routopia_realtime::tls::load(&config.tls.cert_file, &config.tls.key_file)
            .map_err(|err| format!("invalid setting `tls`: {err}"))?;
    }
    routopia_realtime::compression::ZstdSettings::from_config(&config.delivery)
        .map_err(|err| format!("invalid setting `delivery.zstd_dictionaries`: {err}"))?;
    Ok(())
}

/// Changes the running log filter when `log_level` is reloaded.
struct LogFilter {
    handle: tracing_subscriber::reload::Handle<EnvFilter, Registry>,
}

impl LogFilter {
    /// `log_level` is the filter every layer (RUST_LOG included) agreed on, as at start.
    fn set(&self, log_level: &str) {
        // The configuration was validated, so the filter parses.
        let Ok(filter) = EnvFilter::try_new(log_level) else { return };
        if let Err(err) = self.handle.reload(filter) {
            tracing::warn!(error = %err, "cannot change the log filter");
        }
    }
}

/// Logs each panic as one error line (thread, place, message); the shard that catches it logs
/// and counts it too (see `shard::supervise`). A backtrace comes with the first panic only,
/// and only when `RUST_BACKTRACE` asks for one: resolving it reads the binary's debug
/// information into memory (tens of MB), which a panic on every tick would pay again and again.
fn install_panic_hook() {
    static PANICS: AtomicU64 = AtomicU64::new(0);
    std::panic::set_hook(Box::new(|info| {
        let earlier = PANICS.fetch_add(1, Ordering::Relaxed);
        let thread = std::thread::current();
        let thread = thread.name().unwrap_or("unnamed");
        let place = info.location().map(ToString::to_string).unwrap_or_default();
        let message = routopia_realtime::core::panic_message(info.payload());
        let backtrace = if earlier == 0 { Backtrace::capture() } else { Backtrace::disabled() };
        if backtrace.status() == BacktraceStatus::Captured {
            tracing::error!(thread, place, %backtrace, "panic: {message}");
        } else {
            tracing::error!(thread, place, panics = earlier + 1, "panic: {message}");
        }
    }));
}

/// Logs to stderr. `log_level` is already the filter every layer (RUST_LOG included) agreed
/// on, and valid; a reload may change it.
fn init_logging(config: &Config) -> LogFilter {
    let filter = EnvFilter::try_new(&config.log_level).unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter, handle) = tracing_subscriber::reload::Layer::new(filter);
    let registry = tracing_subscriber::registry().with(filter);
    match config.log_format {
        // Colours only for a terminal: a journal or a file gets plain text.
        LogFormat::Pretty => {
            registry.with(fmt::layer().with_ansi(std::io::stderr().is_terminal()).with_writer(std::io::stderr)).init()
        }
        LogFormat::Json => registry.with(fmt::layer().json().flatten_event(true).with_writer(std::io::stderr)).init(),
    }
    LogFilter { handle }
}
