//! Per-layer cost against layer count, on the real kernel: a chain of N layers, each a
//! snapshot of the one before (create child + commit), timed one by one. Prints the median,
//! min and max around layers 10, 100 and 1000 (a window of 11 layers each), the ratio of the
//! 1000th to the 10th, and the time to re-open (reconcile) the engine with N layers.
//! `scripts/bench-layers` runs it (in a VM where the host lacks dm-thin).
//!
//! With `--floor`, the same chain is made with the kernel messages alone (`create_snap` and
//! `set_transaction_id` straight to the pool, no records, no engine): what the kernel costs.
//!
//! bench_layers --state-dir DIR [--layers N] [--csv FILE] [--floor]

use std::path::PathBuf;
use std::time::Instant;

use thinstack::engine::{CreateLayer, Engine, Settings};
use thinstack::kernel::dm::Dm;
use thinstack::kernel::real::{RealFs, RealPool};
use thinstack::units::ByteSize;
use thinstack::{Config, Pool, Result};

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench_layers: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    let mut state_dir = None;
    let mut layers = 1000usize;
    let mut csv = None;
    let mut floor = false;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--state-dir" => state_dir = args.next().map(PathBuf::from),
            "--layers" => {
                layers = args
                    .next()
                    .and_then(|n| n.parse().ok())
                    .expect("--layers N")
            }
            "--csv" => csv = args.next().map(PathBuf::from),
            "--floor" => floor = true,
            other => panic!("unknown argument {other}"),
        }
    }
    let state_dir = state_dir.expect("--state-dir DIR");
    let mut config = Config::default();
    config.state_dir =
        thinstack::config::AbsolutePath::new(&state_dir).map_err(thinstack::Error::invalid)?;
    config.layers.base_size = ByteSize::mib(64);
    let open = |config: &Config| -> Result<Engine<RealPool, RealFs>> {
        let dm = Dm::open()?;
        let pool = Pool::open(config, &dm)?;
        Ok(Engine::open(
            RealPool::new(dm, pool),
            RealFs,
            Settings::from_config(config),
        )?
        .0)
    };
    if floor {
        return kernel_floor(&config, layers);
    }
    let engine = open(&config)?;
    engine.create(&CreateLayer {
        name: "layer0".into(),
        ..CreateLayer::default()
    })?;
    engine.commit("layer0")?;
    let mut costs = Vec::with_capacity(layers);
    for i in 1..=layers {
        let started = Instant::now();
        engine.create(&CreateLayer {
            name: format!("layer{i}"),
            parent: Some(format!("layer{}", i - 1)),
            ..CreateLayer::default()
        })?;
        engine.commit(&format!("layer{i}"))?;
        costs.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    drop(engine);
    let started = Instant::now();
    let engine = open(&config)?;
    let reopen = started.elapsed().as_secs_f64() * 1000.0;
    drop(engine);

    report(&costs, layers, csv)?;
    println!(
        "re-open (reconcile) with {} layers: {reopen:.0} ms",
        layers + 1
    );
    Ok(())
}

/// The chain through the kernel messages alone.
fn kernel_floor(config: &Config, layers: usize) -> Result<()> {
    use thinstack::kernel::PoolKernel;
    use thinstack::names::ThinId;
    let dm = Dm::open()?;
    let pool = RealPool::new(Dm::open()?, Pool::open(config, &dm)?);
    pool.create_thin(ThinId::new(1)?)?;
    let first_txn = pool.usage()?.transaction_id;
    let mut costs = Vec::with_capacity(layers);
    for (txn, i) in (first_txn..).zip(1..=layers as u32) {
        let started = Instant::now();
        pool.snapshot(ThinId::new(i)?, ThinId::new(i + 1)?)?;
        pool.set_transaction_id(txn, txn + 1)?;
        costs.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    println!("kernel floor (create_snap + set_transaction_id, no records):");
    report(&costs, layers, None)
}

fn report(costs: &[f64], layers: usize, csv: Option<PathBuf>) -> Result<()> {
    if let Some(path) = csv {
        let mut text = String::from("layer,create_child_plus_commit_ms\n");
        for (i, cost) in costs.iter().enumerate() {
            text += &format!("{},{cost:.3}\n", i + 1);
        }
        std::fs::write(&path, text)
            .map_err(|e| thinstack::Error::io(format!("writing {}", path.display()), e))?;
    }
    println!("| layer | median ms | min ms | max ms |");
    println!("|---|---|---|---|");
    let mut medians = Vec::new();
    for at in [10usize, 100, 1000, 10000]
        .into_iter()
        .filter(|at| *at <= layers)
    {
        let lo = at.saturating_sub(5).max(1);
        let hi = (at + 5).min(layers);
        let mut window: Vec<f64> = costs[lo - 1..hi].to_vec();
        window.sort_by(f64::total_cmp);
        let median = window[window.len() / 2];
        medians.push((at, median));
        println!(
            "| {at} | {median:.2} | {:.2} | {:.2} |",
            window[0],
            window[window.len() - 1]
        );
    }
    if let (Some((_, first)), Some((last_at, last))) = (medians.first(), medians.last()) {
        println!("\nlayer {last_at} costs {:.2}x layer 10", last / first);
    }
    Ok(())
}
