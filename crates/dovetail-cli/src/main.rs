//! `dovetail`: the binary. Parses arguments, wires the libraries together,
//! prints. The work happens in the library crates.

mod dev;
mod dlq;
mod init;
mod project;
mod status;
mod trial;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};

/// mimalloc instead of glibc's allocator: in the e2e bench's profile,
/// glibc's malloc and free were 15 % of the engine's samples (arena locks
/// and consolidation, as records are allocated on one thread and freed on
/// another); with mimalloc the allocator is about 6 %.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "dovetail",
    version,
    about = "Integrations that hold: durable journal, idempotent delivery, classified retries, dead-letter queue."
)]
struct Cli {
    /// The config file.
    #[arg(short = 'c', long = "config", global = true, env = "DOVETAIL_CONFIG", default_value = "dovetail.toml")]
    config: PathBuf,
    /// Log level: error, warn, info, debug or trace.
    #[arg(long, global = true, env = "DOVETAIL_LOG", default_value = "info")]
    log_level: tracing::Level,
    /// Log lines as human-readable text or as JSON objects (one per line).
    #[arg(long, global = true, env = "DOVETAIL_LOG_FORMAT", value_enum, default_value = "text")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the engine: webhook intake, delivery, health endpoints.
    Run,
    /// Validate the config file; exits non-zero on any error.
    Check,
    /// Per-flow counts: pending, in flight, delivered, dead, oldest pending age.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// The dead-letter queue.
    #[command(subcommand)]
    Dlq(dlq::DlqCommand),
    /// Schema drift: fields that appeared, changed type or stopped appearing, newest first.
    Drift {
        #[arg(long)]
        flow: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: usize,
        #[arg(long)]
        json: bool,
    },
    /// Run one record through a flow's validation and mappings without
    /// sending it: prints what came in, what was mapped, and the request that would go out.
    Test {
        flow: String,
        /// A JSON file holding one inbound record (`-` for stdin).
        #[arg(long)]
        input: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// A record's whole story: raw, mapped and sent side by side, every attempt, its state.
    Trace {
        /// A record id, correlation id, delivery id or external key.
        id: String,
        /// Most records shown when a key names many.
        #[arg(long, default_value_t = 10)]
        limit: usize,
        #[arg(long)]
        json: bool,
    },
    /// Active alerts and the recently resolved ones.
    Alerts {
        #[arg(long)]
        json: bool,
    },
    /// Lift a flow's pause (set after an auth failure) once the cause is fixed.
    Resume { flow: String },
    /// Write a runnable example project into DIR.
    Init { dir: PathBuf },
    /// Development aids: a local partner and a signed-webhook sender.
    #[command(subcommand)]
    Dev(dev::DevCommand),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    use std::io::IsTerminal as _;
    let logs = tracing_subscriber::fmt().with_max_level(cli.log_level).with_target(false).with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => logs.with_ansi(std::io::stderr().is_terminal()).init(),
        // One JSON object per line: timestamp, level, message and every field
        // (flow, record_id, correlation_id, ...) at the top level.
        LogFormat::Json => logs.json().flatten_event(true).with_current_span(false).init(),
    }
    dovetail_connectors::http::install_crypto_provider();
    // `run` reads its config first: the engine's runtimes split the cores
    // between them (the dispatchers get their own), and this one is the
    // intake's.
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    let mut config = None;
    if matches!(cli.command, Command::Run) {
        match project::load(&cli.config) {
            Ok(loaded) => {
                builder.worker_threads(dovetail_engine::thread_split(&loaded.config.engine).intake);
                config = Some(loaded);
            }
            Err(e) => {
                eprintln!("error: {e:#}");
                return ExitCode::FAILURE;
            }
        }
    }
    let runtime = match builder.enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = match runtime.block_on(dispatch(cli, config)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    };
    // A jq program that loops keeps a blocking thread busy; it must not keep the process alive.
    runtime.shutdown_timeout(std::time::Duration::from_secs(5));
    code
}

/// `loaded`: the config, when `main` has read it already (`run`).
async fn dispatch(cli: Cli, loaded: Option<dovetail_core::config::Loaded>) -> Result<ExitCode> {
    let config = cli.config;
    match cli.command {
        Command::Run => match loaded {
            Some(loaded) => project::run(loaded).await,
            None => project::run(project::load(&config)?).await,
        },
        Command::Check => project::check(&config),
        Command::Status { json } => status::status(&config, json).await,
        Command::Dlq(cmd) => dlq::run(&config, cmd).await,
        Command::Resume { flow } => project::resume(&config, &flow).await,
        Command::Drift { flow, limit, json } => status::drift(&config, flow.as_deref(), limit, json).await,
        Command::Init { dir } => init::init(&dir),
        Command::Alerts { json } => status::alerts(&config, json).await,
        Command::Trace { id, limit, json } => dlq::trace(&config, &id, limit, json).await,
        Command::Test { flow, input, json } => trial::test(&config, &flow, &input, json),
        Command::Dev(cmd) => dev::run(&config, cmd).await,
    }
}
