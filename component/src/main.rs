//! The `isthmus` binary: `run`, `check-config`, `migrate`, `user`, `matrix-registration`.

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
    /// Manage the embedded server's accounts (stored in the database, never as plain text).
    User {
        #[command(subcommand)]
        action: UserAction,
        /// The YAML configuration file (for the database).
        #[arg(short, long, default_value = "isthmus.yaml", global = true)]
        config: PathBuf,
    },
    /// Create or update the database schema, then exit.
    Migrate {
        /// The YAML configuration file.
        #[arg(short, long, default_value = "isthmus.yaml")]
        config: PathBuf,
    },
    /// Print the application-service registration file (YAML) for the homeserver of
    /// each Matrix network with an `appservice` (for Synapse's `app_service_config_files`).
    MatrixRegistration {
        /// The YAML configuration file.
        #[arg(short, long, default_value = "isthmus.yaml")]
        config: PathBuf,
    },
}

#[derive(Subcommand)]
enum UserAction {
    /// Create an account; the password is read from standard input.
    Add { jid: String },
    /// Change an account's password (read from standard input).
    Passwd { jid: String },
    /// Delete an account and its roster.
    Del { jid: String },
    /// Print the hash of a password (read from standard input) for `xmpp.embedded.users`.
    Hash,
}

fn init_logging(default_filter: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    use std::io::IsTerminal;
    let ansi = std::io::stderr().is_terminal();
    // The IRC library traces every line it sends and receives: PASS, AUTHENTICATE
    // (SASL PLAIN), on-connect commands and channel keys in clear. Never logged.
    let raw_irc = tracing_subscriber::filter::filter_fn(|m| {
        !(*m.level() == tracing::Level::TRACE && m.target().starts_with("irc::client"))
    });
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr)
        .finish()
        .with(raw_irc)
        .init();
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
        Command::User { action, config } => exit(user(action, &config)),
        Command::MatrixRegistration { config } => exit(matrix_registration(&config)),
    }
}

/// One registration per Matrix network with an application service, as YAML
/// documents (`---` between them: each goes into its own file).
fn matrix_registration(path: &std::path::Path) -> anyhow::Result<()> {
    let config = isthmus_config::load(path).map_err(|e| anyhow::anyhow!("{e}"))?;
    let files: Vec<String> = config
        .matrix
        .iter()
        .filter_map(|net| {
            net.appservice.as_ref().map(|a| isthmus_matrix::appservice::registration_yaml(&net.domain, a))
        })
        .collect();
    anyhow::ensure!(!files.is_empty(), "{}: no Matrix network has an `appservice`", path.display());
    print!("{}", files.join("---\n"));
    Ok(())
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

/// Read a password: prompted without echo on a terminal, else the first line of stdin.
fn read_password() -> anyhow::Result<String> {
    use std::io::IsTerminal;
    let password = if std::io::stdin().is_terminal() {
        rpassword::prompt_password("password: ").context("cannot read the password")?
    } else {
        let mut line = String::new();
        std::io::stdin().read_line(&mut line).context("cannot read the password from standard input")?;
        line.trim_end_matches(['\r', '\n']).to_owned()
    };
    anyhow::ensure!(!password.is_empty(), "the password is empty");
    Ok(password)
}

fn user(action: UserAction, path: &std::path::Path) -> anyhow::Result<()> {
    use isthmus_component::server::accounts;
    if let UserAction::Hash = action {
        // No configuration is read for a hash: the default count, which `user add` also uses by default.
        let c = accounts::Credentials::from_password(&read_password()?, accounts::DEFAULT_ITERATIONS)?;
        println!("{}", c.to_hash_string());
        return Ok(());
    }
    let config = isthmus_config::load(path).map_err(|e| anyhow::anyhow!("{e}"))?;
    let iterations = config.xmpp.embedded.clone().unwrap_or_default().scram_iterations;
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let store = isthmus_component::app::open_store(&config).await?;
        match action {
            UserAction::Add { jid } => {
                let jid = accounts::account_jid(&jid)?;
                check_domain(&config, &jid)?;
                anyhow::ensure!(
                    store.local_user(&jid).await?.is_none(),
                    "{jid} already exists (use `isthmus user passwd`)"
                );
                accounts::set_password(&store, &jid, &read_password()?, iterations).await?;
                eprintln!("added {jid}");
            }
            UserAction::Passwd { jid } => {
                let jid = accounts::account_jid(&jid)?;
                anyhow::ensure!(store.local_user(&jid).await?.is_some(), "there is no account {jid}");
                accounts::set_password(&store, &jid, &read_password()?, iterations).await?;
                eprintln!("changed the password of {jid}");
            }
            UserAction::Del { jid } => {
                let jid = accounts::account_jid(&jid)?;
                anyhow::ensure!(store.delete_local_user(&jid).await?, "there is no account {jid}");
                eprintln!("deleted {jid}");
            }
            UserAction::Hash => {}
        }
        Ok(())
    })
}

fn check_domain(config: &isthmus_config::Config, jid: &str) -> anyhow::Result<()> {
    let domain = config.xmpp.embedded.clone().unwrap_or_default().domain.to_lowercase();
    let (_, d) = jid.split_once('@').unwrap_or_default();
    anyhow::ensure!(d == domain, "{jid} is not on the embedded server's domain {domain}");
    Ok(())
}
