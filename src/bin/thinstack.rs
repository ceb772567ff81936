//! thinstack: the command-line client of thinstackd.
//!
//! The daemon's API arrives with the daemon itself; until then this binary answers `--help` and
//! `--version`, and says so plainly for anything else.

use clap::Parser;

/// Manage thin-provisioned block layers through thinstackd.
#[derive(Parser, Debug)]
#[command(name = "thinstack", version, about)]
struct Cli {
    /// The daemon's API socket.
    #[arg(long, default_value = "/run/thinstack/thinstack.sock")]
    socket: std::path::PathBuf,
}

fn main() {
    let cli = Cli::parse();
    eprintln!(
        "thinstack: the daemon API at {} is not available in this version; \
         use `thinstackd --check-config` and `scripts/demo` for now",
        cli.socket.display()
    );
    std::process::exit(1);
}
