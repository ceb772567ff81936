//! thinstackd: the thinstack daemon.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use thinstack::config::{Config, DEFAULT_CONFIG_PATH};

/// Manage a dm-thin pool of block layers.
#[derive(Parser, Debug)]
#[command(name = "thinstackd", version, about)]
struct Args {
    /// Configuration file (absent default file = all defaults).
    #[arg(long, value_name = "FILE", help = format!("Configuration file [default: {DEFAULT_CONFIG_PATH}; absent = all defaults]"))]
    config: Option<PathBuf>,

    /// Validate the configuration, print the effective configuration, and exit.
    #[arg(long)]
    check_config: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let config = match Config::load(args.config.as_deref()) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("thinstackd: {err}");
            return ExitCode::from(2);
        }
    };
    if args.check_config {
        print!("{}", config.to_toml());
        return ExitCode::SUCCESS;
    }
    eprintln!("thinstackd: serving the API arrives with the daemon issue; use --check-config");
    ExitCode::from(1)
}
