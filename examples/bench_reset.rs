//! Resets through the API on one kept-alive connection, as a program that resets a layer
//! between jobs would: `--count` resets of `--layer`, each timed at the client (the round trip
//! on the socket included), one row each, so `scripts/bench` compares medians with the floor's.
//! No command is started per reset: under emulation a process start (translated afresh) costs
//! hundreds of ms, and the floor starts none either.
//!
//! With `--pause-ms N`, each reset comes N ms after the answer to the one before (untimed), as
//! resets between jobs come; without, back to back. Paced, each reset is followed (after the
//! same pause) by a request that does nothing, `GET /v1/version`, timed the same way: what any
//! API call costs here, the socket's round trip and the daemon's handling, beside what the
//! reset costs on top of it.
//!
//! bench_reset --socket PATH --layer NAME --count N [--pause-ms N] --csv FILE --label LABEL

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
    pause_ms: u64,
    csv: PathBuf,
    label: String,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        socket: PathBuf::new(),
        layer: String::new(),
        count: 30,
        pause_ms: 0,
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
            "--pause-ms" => {
                args.pause_ms = value.parse().map_err(|e| format!("--pause-ms: {e}"))?
            }
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

/// The CSV's operations: the reset's round trip, paced or back to back, and the round trip of
/// a request that does nothing, paced alike.
fn operations(args: &Args) -> (String, String) {
    match args.pause_ms {
        0 => (
            "reset (API round trip; back to back)".to_string(),
            String::new(),
        ),
        ms => (
            format!("reset (API round trip; {ms} ms apart)"),
            format!("GET /v1/version (API round trip; {ms} ms apart)"),
        ),
    }
}

/// Milliseconds `call` took.
fn timed(call: impl FnOnce() -> Result<(), String>) -> Result<f64, String> {
    let started = Instant::now();
    call()?;
    Ok(started.elapsed().as_secs_f64() * 1000.0)
}

fn run(args: &Args) -> Result<(), String> {
    let mut client = Client::new(&args.socket);
    let path = format!("/v1/layers/{}/reset", args.layer);
    let pause = std::time::Duration::from_millis(args.pause_ms);
    let (reset_operation, null_operation) = operations(args);
    let mut rows = Vec::with_capacity(2 * args.count);
    for round in 1..=args.count {
        std::thread::sleep(pause);
        let ms = timed(|| {
            let _: Value = client
                .post(&path, &ResetRequest::default())
                .map_err(|e| format!("reset {}: {e}", args.layer))?;
            Ok(())
        })?;
        rows.push((&reset_operation, round, ms));
        if args.pause_ms > 0 {
            std::thread::sleep(pause);
            let ms = timed(|| {
                let _: Value = client
                    .get("/v1/version")
                    .map_err(|e| format!("GET /v1/version: {e}"))?;
                Ok(())
            })?;
            rows.push((&null_operation, round, ms));
        }
    }
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&args.csv)
        .map_err(|e| format!("{}: {e}", args.csv.display()))?;
    for (operation, round, ms) in rows {
        writeln!(file, "{},{operation},{round},{ms:.3}", args.label).map_err(|e| e.to_string())?;
    }
    Ok(())
}
