//! The `routopia-realtime` binary: command line → config → logging → shards → signals.

use std::io::Write;
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
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Address to listen on (HTTP and WebSocket), e.g. 127.0.0.1:3000.
    #[arg(long)]
    listen: Option<std::net::SocketAddr>,
    /// Number of shards; 0 = one per core.
    #[arg(long)]
    shards: Option<usize>,
    /// TOML config file.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Log filter (overrides `log_level`).
    #[arg(long)]
    log_level: Option<String>,
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
    }
}

fn serve(args: ServeArgs) -> ExitCode {
    let overrides =
        Overrides { listen: args.listen, shards: args.shards, log_level: args.log_level, broker: args.broker };
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
    // One machine-readable line on stdout, for supervisors and tests that listen on port 0.
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
    Ok(config)
}

fn init_logging(config: &Config) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&config.log_level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match config.log_format {
        LogFormat::Pretty => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}
