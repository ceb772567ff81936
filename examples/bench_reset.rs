//! Resets through the API, back to back on one kept-alive connection, as a program that resets
//! a layer between jobs would: `--count` resets of `--layer`, each timed at the client (the
//! round trip on the socket included). The daemon times them too (its operation histogram);
//! `scripts/bench` reads both. Back to back, like the floor's own loop of snapshots: a command
//! started per reset would put a process start (translated afresh under emulation) between
//! every two, and the kernel's code path would be cold at each one in the daemon and warm in
//! the floor.
//!
//! bench_reset --socket PATH --layer NAME --count N --csv FILE --label LABEL

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use serde_json::Value;
use thinstack::api::ResetRequest;
use thinstack::client::Client;

struct Args {
    socket: PathBuf,
    layer: String,
    count: usize,
    csv: PathBuf,
    label: String,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        socket: PathBuf::new(),
        layer: String::new(),
        count: 30,
        csv: PathBuf::new(),
        label: String::new(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let value = it.next().ok_or(format!("{arg} needs a value"))?;
        match arg.as_str() {
            "--socket" => args.socket = value.into(),
            "--layer" => args.layer = value,
            "--count" => args.count = value.parse().map_err(|e| format!("--count: {e}"))?,
            "--csv" => args.csv = value.into(),
            "--label" => args.label = value,
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    if args.socket.as_os_str().is_empty()
        || args.layer.is_empty()
        || args.csv.as_os_str().is_empty()
        || args.label.is_empty()
    {
        return Err("--socket, --layer, --csv and --label are needed".into());
    }
    Ok(args)
}

fn main() -> std::process::ExitCode {
    match parse_args().and_then(|args| run(&args)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench_reset: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> Result<(), String> {
    let mut client = Client::new(&args.socket);
    let path = format!("/v1/layers/{}/reset", args.layer);
    let mut costs = Vec::with_capacity(args.count);
    for _ in 0..args.count {
        let started = Instant::now();
        let _: Value = client
            .post(&path, &ResetRequest::default())
            .map_err(|e| format!("reset {}: {e}", args.layer))?;
        costs.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&args.csv)
        .map_err(|e| format!("{}: {e}", args.csv.display()))?;
    for (i, ms) in costs.iter().enumerate() {
        writeln!(
            file,
            "{},reset (API round trip),{},{ms:.3}",
            args.label,
            i + 1
        )
        .map_err(|e| e.to_string())?;
    }
    Ok(())
}
