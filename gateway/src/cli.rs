//! The command line: `isthmus serve` and `isthmus check-config`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::{self, Config, ConfigError, ProcessEnvironment};

#[derive(Debug, Parser)]
#[command(
    name = "isthmus",
    version,
    about = "Edge-to-cloud LLM inference gateway"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gateway.
    Serve {
        /// The configuration file (TOML).
        #[arg(long, short)]
        config: PathBuf,
        /// Override server.listen (the HTTPS data plane), e.g. 127.0.0.1:0.
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Override server.admin_listen.
        #[arg(long)]
        admin_listen: Option<SocketAddr>,
    },
    /// Validate a configuration file; report every error with its key path.
    CheckConfig {
        /// The configuration file (TOML).
        config: PathBuf,
    },
}

/// Loads the configuration, printing every error to stderr.
fn load_config(path: &std::path::Path) -> Result<Config, ExitCode> {
    config::load(path, &ProcessEnvironment).map_err(|errors| {
        report(path, &errors);
        ExitCode::from(2)
    })
}

fn report(path: &std::path::Path, errors: &[ConfigError]) {
    eprintln!(
        "{}: {} error{}",
        path.display(),
        errors.len(),
        if errors.len() == 1 { "" } else { "s" }
    );
    for error in errors {
        eprintln!("  {error}");
    }
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> ExitCode {
    match cli.command {
        Command::CheckConfig { config } => match load_config(&config) {
            Ok(loaded) => {
                println!(
                    "{}: ok ({} model{})",
                    config.display(),
                    loaded.models.len(),
                    if loaded.models.len() == 1 { "" } else { "s" }
                );
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
        Command::Serve {
            config,
            listen,
            admin_listen,
        } => {
            let mut loaded = match load_config(&config) {
                Ok(loaded) => loaded,
                Err(code) => return code,
            };
            if let Some(listen) = listen {
                loaded.server.listen = listen;
            }
            if let Some(admin_listen) = admin_listen {
                loaded.server.admin_listen = admin_listen;
            }
            init_logging(&loaded.logging);
            match crate::serve::serve(loaded) {
                Ok(()) => ExitCode::SUCCESS,
                Err(error) => {
                    tracing::error!("{error:#}");
                    eprintln!("isthmus: {error:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// llama.cpp reports every step of loading at info level; operators see its warnings unless
/// they ask for more by naming it in the filter.
const LLAMA_CPP_DEFAULT_FILTER: &str = "llama-cpp-2=warn";

fn init_logging(logging: &config::LoggingConfig) {
    let directive = std::env::var("ISTHMUS_LOG").unwrap_or_else(|_| logging.level.clone());
    let directive = if directive.contains("llama") {
        directive
    } else {
        format!("{directive},{LLAMA_CPP_DEFAULT_FILTER}")
    };
    let filter = tracing_subscriber::EnvFilter::try_new(&directive)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match logging.format {
        config::LogFormat::Json => builder.json().init(),
        config::LogFormat::Text => builder.init(),
    }
}
