//! The `isthmus` binary: `run`, `check-config`, `migrate`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(name = "isthmus", version, about = "XMPP gateway to IRC (and, soon, Matrix, Telegram and Discord)")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway.
    Run {
        /// The YAML configuration file.
        #[arg(short, long, default_value = "isthmus.yaml")]
        config: PathBuf,
    },
    /// Check a configuration file and report every problem with file:line:column.
    CheckConfig {
        /// The YAML configuration file.
        file: PathBuf,
    },
    /// Create or update the database schema, then exit.
    Migrate {
        /// The YAML configuration file.
        #[arg(short, long, default_value = "isthmus.yaml")]
        config: PathBuf,
    },
}

fn init_logging(default_filter: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    use std::io::IsTerminal;
    let ansi = std::io::stderr().is_terminal();
    tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi).with_writer(std::io::stderr).init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::CheckConfig { file } => match isthmus_config::load(&file) {
            Ok(_) => {
                eprintln!("{}: OK", file.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::FAILURE
            }
        },
        Command::Run { config } => exit(run(&config, false)),
        Command::Migrate { config } => exit(run(&config, true)),
    }
}

fn exit(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("isthmus: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(path: &std::path::Path, migrate_only: bool) -> anyhow::Result<()> {
    let config = isthmus_config::load(path).map_err(|e| anyhow::anyhow!("{e}"))?;
    init_logging(&config.log.filter);
    // Both ring and aws-lc-rs end up in the dependency tree: pick one before any TLS.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    runtime.block_on(async move {
        if migrate_only {
            isthmus_component::app::open_store(&config).await?;
            tracing::info!("database schema is up to date");
            Ok(())
        } else {
            isthmus_component::app::run(config).await.map_err(anyhow::Error::from)
        }
    })
}
