//! The floor: what the kernel itself costs per layer, with no records, no engine and no API.
//! A chain of thin snapshots on an existing pool, issued as device-mapper ioctls from this one
//! process, timed layer by layer. `scripts/bench` runs it on a pool it made with dmsetup.
//!
//! Sequences (`--sequence`):
//! - `activate`: per layer, suspend the previous (active) device, `create_snap`, resume it,
//!   then create, load and resume the new device: what a shell script does with dmsetup, and
//!   the kernel work behind `lvcreate -s`, `ctr snapshots prepare` or thinstack's
//!   `create --parent` + `activate`;
//! - `message`: per layer, `create_snap` of the previous (inactive) thin device and a
//!   `set_transaction_id`: the kernel work behind thinstack's `create --parent` + `commit`.
//!
//! `--udev wait` waits for udev after each resume as dmsetup does (a cookie per change);
//! `--udev nowait` announces nothing and waits for nothing.
//!
//! bench_floor --pool DM_NAME --layers N --sequence activate|message --udev wait|nowait
//!             --size BYTES --csv FILE --label LABEL

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use devicemapper::DmNameBuf;
use thinstack::kernel::dm::{self, Dm, Udev};
use thinstack::names::ThinId;
use thinstack::units::ByteSize;

struct Args {
    pool: String,
    layers: u32,
    activate: bool,
    udev: Udev,
    size: ByteSize,
    csv: PathBuf,
    label: String,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        pool: String::new(),
        layers: 20,
        activate: true,
        udev: Udev::Wait,
        size: ByteSize::mib(512),
        csv: PathBuf::new(),
        label: String::new(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let value = it.next().ok_or(format!("{arg} needs a value"))?;
        match arg.as_str() {
            "--pool" => args.pool = value,
            "--layers" => args.layers = value.parse().map_err(|e| format!("--layers: {e}"))?,
            "--sequence" => {
                args.activate = match value.as_str() {
                    "activate" => true,
                    "message" => false,
                    other => return Err(format!("--sequence activate|message, not {other}")),
                }
            }
            "--udev" => {
                args.udev = match value.as_str() {
                    "wait" => Udev::Wait,
                    "nowait" => Udev::NoWait,
                    other => return Err(format!("--udev wait|nowait, not {other}")),
                }
            }
            "--size" => args.size = value.parse().map_err(|e| format!("--size: {e}"))?,
            "--csv" => args.csv = value.into(),
            "--label" => args.label = value,
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    if args.pool.is_empty() || args.label.is_empty() || args.csv.as_os_str().is_empty() {
        return Err("--pool, --label and --csv are needed".into());
    }
    Ok(args)
}

fn main() -> std::process::ExitCode {
    match parse_args().and_then(|args| run(&args)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench_floor: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> Result<(), String> {
    let dm = Dm::open().map_err(|e| e.to_string())?;
    let pool = DmNameBuf::new(args.pool.clone()).map_err(|e| e.to_string())?;
    let pool_device = dm.info(&pool).map_err(|e| e.to_string())?.device();
    let first_txn = match dm.pool_status(&pool).map_err(|e| e.to_string())? {
        devicemapper::ThinPoolStatus::Working(status) => status.transaction_id,
        _ => return Err(format!("pool {} has failed", args.pool)),
    };
    let name = |id: u32| DmNameBuf::new(format!("{}-floor-{id}", args.pool)).expect("dm name");
    let thin = |id: u32| ThinId::new(id).expect("thin id");
    let activate = |id: u32| -> Result<(), String> {
        let table = dm::thin_table(pool_device, thin(id), args.size.sectors());
        dm.create_device(&name(id), None, &table, false, args.udev)
            .map(drop)
            .map_err(|e| e.to_string())
    };

    dm.create_thin(&pool, thin(1)).map_err(|e| e.to_string())?;
    if args.activate {
        activate(1)?;
    }
    let mut costs = Vec::with_capacity(args.layers as usize);
    for (txn, id) in (first_txn..).zip(2..args.layers + 2) {
        let started = Instant::now();
        if args.activate {
            let origin = name(id - 1);
            dm.snapshot(&pool, thin(id - 1), Some(&origin), thin(id), args.udev)
                .map_err(|e| e.to_string())?;
            activate(id)?;
        } else {
            dm.snapshot(&pool, thin(id - 1), None, thin(id), args.udev)
                .map_err(|e| e.to_string())?;
            dm.set_transaction_id(&pool, txn, txn + 1)
                .map_err(|e| e.to_string())?;
        }
        costs.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    if args.activate {
        for id in (1..args.layers + 2).rev() {
            dm.remove_device(&name(id), args.udev)
                .map_err(|e| e.to_string())?;
        }
    }
    append_csv(args, &costs)
}

fn append_csv(args: &Args, costs: &[f64]) -> Result<(), String> {
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&args.csv)
        .map_err(|e| format!("{}: {e}", args.csv.display()))?;
    let operation = if args.activate {
        "snapshot+activate"
    } else {
        "snapshot (inactive origin)"
    };
    for (i, ms) in costs.iter().enumerate() {
        writeln!(file, "{},{operation},{},{ms:.3}", args.label, i + 1)
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}
