//! thinstackd: the thinstack daemon.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use thinstack::config::{Config, DEFAULT_CONFIG_PATH};
use tracing_subscriber::fmt::format::FmtSpan;
use tracing_subscriber::EnvFilter;

/// Manage a dm-thin pool of block layers and serve the thinstack API on a Unix socket.
#[derive(Parser, Debug)]
#[command(name = "thinstackd", version, about)]
struct Args {
    /// Configuration file (absent default file = all defaults).
    #[arg(long, value_name = "FILE", help = format!("Configuration file [default: {DEFAULT_CONFIG_PATH}; absent = all defaults]"))]
    config: Option<PathBuf>,

    /// Validate the configuration, print the effective configuration, and exit.
    #[arg(long)]
    check_config: bool,

    /// Check the pool's metadata with thin_check while thinstackd is stopped (the pool may be
    /// inactive), print what was found, and exit: 0 clean, 1 damaged or not checkable.
    #[arg(long, conflicts_with = "check_config")]
    check_pool: bool,

    /// Run over an in-memory kernel instead of device-mapper: the same daemon, engine and API,
    /// as an ordinary user, without root or dm-thin, for developing and testing scripts that
    /// drive thinstack. The sim's pool and devices live in memory and are gone when thinstackd
    /// stops (records in the state directory stay, so use a fresh state directory per run);
    /// a mounted layer's target directory holds its files.
    #[arg(long, conflicts_with = "check_pool")]
    sim: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let config = match Config::load(args.config.as_deref()) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("thinstackd: {err}");
            return ExitCode::from(2);
        }
    };
    if args.check_config {
        print!("{}", config.to_toml());
        return check_cluster(&config);
    }
    init_logging(&config);
    if args.check_pool {
        return check_pool(&config);
    }
    let kernel = if args.sim {
        thinstack::daemon::KernelChoice::Sim
    } else {
        thinstack::daemon::KernelChoice::Real
    };
    match thinstack::daemon::run(config, kernel) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!(kind = %err.kind(), "{err}");
            eprintln!("thinstackd: {err}");
            ExitCode::FAILURE
        }
    }
}

/// `--check-config` of an rbd pool: the file is valid; is the cluster it names usable? Exit 1
/// (not 2, a bad file) when it is not.
fn check_cluster(config: &Config) -> ExitCode {
    if config.pool.backend != thinstack::config::Backend::Rbd {
        return ExitCode::SUCCESS;
    }
    match thinstack::pool::rbd::check_cluster(config) {
        Ok(summary) => {
            eprintln!("thinstackd: {summary}");
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!(
                "thinstackd: the configuration is valid, but its Ceph cluster is not usable: {err}"
            );
            ExitCode::FAILURE
        }
    }
}

/// `--check-pool`: hold the state directory's lock (so no daemon runs), then check.
fn check_pool(config: &Config) -> ExitCode {
    let checked =
        thinstack::records::StateLock::acquire(config.state_dir.path()).and_then(|_lock| {
            let dm = thinstack::kernel::dm::Dm::open()?;
            thinstack::pool::Pool::check_offline(config, &dm)
        });
    match checked {
        Ok(report) if report.clean => {
            println!("Pool metadata is clean ({}).", report.checked);
            ExitCode::SUCCESS
        }
        Ok(report) => {
            println!(
                "Pool metadata is damaged ({}): {}",
                report.checked, report.findings
            );
            ExitCode::FAILURE
        }
        Err(err) => {
            eprintln!("thinstackd: {err}");
            ExitCode::FAILURE
        }
    }
}

/// Human text with colours on a terminal; plain lines without timestamps otherwise (journald
/// stamps each line itself). `RUST_LOG` overrides `daemon.log_level`. Audit lines are kept at
/// every `daemon.log_level`: a quieter log must not lose who changed what.
fn init_logging(config: &Config) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        EnvFilter::new(format!(
            "{},{}=info",
            config.daemon.log_level.as_str(),
            thinstack::audit::TARGET
        ))
    });
    let terminal = std::io::stderr().is_terminal();
    // THINSTACK_LOG_SPANS=1 (with RUST_LOG=thinstack=debug): how long each step of an
    // operation took, a line per step as it ends (time.busy), to see where the time goes.
    let spans = std::env::var_os("THINSTACK_LOG_SPANS").is_some();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_span_events(if spans { FmtSpan::CLOSE } else { FmtSpan::NONE })
        .with_ansi(terminal);
    // Without a timer the subscriber leaves the spans' times out too.
    if terminal || spans {
        builder.init();
    } else {
        builder.without_time().with_target(false).init();
    }
}
