//! Per-layer cost of "create child + commit" through thinstackd: over the API socket (one
//! kept-alive connection, as a program would) and through the `thinstack` command (a process
//! per call, as a shell script would). A chain of N layers each way, timed layer by layer.
//! `scripts/bench-daemon` starts the daemon and runs this (in a VM where the host lacks dm-thin).
//!
//! bench_daemon --socket PATH --thinstack BIN [--layers N] [--csv FILE]

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use serde_json::Value;
use thinstack::api::CreateRequest;
use thinstack::client::Client;

struct Args {
    socket: PathBuf,
    thinstack: PathBuf,
    layers: usize,
    csv: Option<PathBuf>,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        socket: PathBuf::new(),
        thinstack: PathBuf::new(),
        layers: 100,
        csv: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = || it.next().ok_or(format!("{arg} needs a value"));
        match arg.as_str() {
            "--socket" => args.socket = value()?.into(),
            "--thinstack" => args.thinstack = value()?.into(),
            "--layers" => args.layers = value()?.parse().map_err(|e| format!("--layers: {e}"))?,
            "--csv" => args.csv = Some(value()?.into()),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(args)
}

fn main() -> std::process::ExitCode {
    match parse_args().and_then(|args| run(&args)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench_daemon: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> Result<(), String> {
    let mut client = Client::new(&args.socket);
    for base in ["api-0", "cli-0"] {
        create_and_commit(&mut client, base, None)?;
    }
    let api = chain(
        args.layers,
        |parent, name| create_and_commit(&mut client, name, Some(parent)),
        "api",
    )?;
    let cli = chain(
        args.layers,
        |parent, name| {
            let socket = args.socket.to_string_lossy();
            run_cli(
                &args.thinstack,
                &[
                    "--socket", &socket, "layer", "create", name, "--parent", parent,
                ],
            )?;
            run_cli(
                &args.thinstack,
                &["--socket", &socket, "layer", "commit", name],
            )
        },
        "cli",
    )?;
    println!("| path | layers | median ms | min ms | max ms |");
    println!("|---|---|---|---|---|");
    for (what, costs) in [
        ("API socket (one connection)", &api),
        ("thinstack CLI (a process per call)", &cli),
    ] {
        let (median, min, max) = summary(costs);
        println!(
            "| {what} | {} | {median:.2} | {min:.2} | {max:.2} |",
            costs.len()
        );
    }
    if let Some(path) = &args.csv {
        let mut text = String::from("layer,api_ms,cli_ms\n");
        for (i, (a, c)) in api.iter().zip(&cli).enumerate() {
            text.push_str(&format!("{},{a:.3},{c:.3}\n", i + 1));
        }
        std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(())
}

/// Make a chain `<prefix>-1 .. <prefix>-n` on `<prefix>-0`; the cost of each link in ms.
fn chain(
    n: usize,
    mut link: impl FnMut(&str, &str) -> Result<(), String>,
    prefix: &str,
) -> Result<Vec<f64>, String> {
    let mut costs = Vec::with_capacity(n);
    for i in 1..=n {
        let (parent, name) = (format!("{prefix}-{}", i - 1), format!("{prefix}-{i}"));
        let started = Instant::now();
        link(&parent, &name)?;
        costs.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    Ok(costs)
}

/// Create `name` (a 64M base layer, or a snapshot of `parent`) and commit it, over the API.
fn create_and_commit(client: &mut Client, name: &str, parent: Option<&str>) -> Result<(), String> {
    let request = CreateRequest {
        name: name.into(),
        parent: parent.map(Into::into),
        size: parent
            .is_none()
            .then(|| thinstack::units::ByteSize::mib(64)),
        ..CreateRequest::default()
    };
    let _: Value = client
        .post("/v1/layers", &request)
        .map_err(|e| e.to_string())?;
    let _: Value = client
        .post(&format!("/v1/layers/{name}/commit"), &Value::Null)
        .map_err(|e| e.to_string())?;
    Ok(())
}

fn run_cli(bin: &PathBuf, args: &[&str]) -> Result<(), String> {
    let out = Command::new(bin)
        .args(args)
        .output()
        .map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(format!(
            "thinstack {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(())
}

fn summary(costs: &[f64]) -> (f64, f64, f64) {
    let mut sorted = costs.to_vec();
    sorted.sort_by(f64::total_cmp);
    let median = sorted.get(sorted.len() / 2).copied().unwrap_or(0.0);
    let min = sorted.first().copied().unwrap_or(0.0);
    let max = sorted.last().copied().unwrap_or(0.0);
    (median, min, max)
}
