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
//!   `set_transaction_id`: the kernel work behind thinstack's `create --parent` + `commit`;
//! - `reset`: an origin that holds `--origin-mib` MiB of data (written once, then inactive),
//!   and per round a `create_snap` of that same origin and a `set_transaction_id`, timed; the
//!   snapshot of the round before is deleted after the timing. The kernel work behind
//!   thinstack's `layer reset`, which snapshots the same parent each time and deletes the old
//!   device after it answers. A snapshot's cost depends on its origin, so this is the floor a
//!   reset is held to.
//!
//! `--udev wait` waits for udev after each resume as dmsetup does (a cookie per change);
//! `--udev nowait` announces nothing and waits for nothing.
//!
//! bench_floor --pool DM_NAME --layers N --sequence activate|message|reset --udev wait|nowait
//!             --size BYTES [--origin-mib N] --csv FILE --label LABEL

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::time::Instant;

use devicemapper::DmNameBuf;
use thinstack::kernel::dm::{self, Dm, Udev};
use thinstack::names::ThinId;
use thinstack::units::ByteSize;

#[derive(Clone, Copy, PartialEq)]
enum Sequence {
    Activate,
    Message,
    Reset,
}

struct Args {
    pool: String,
    layers: u32,
    sequence: Sequence,
    origin_mib: u64,
    udev: Udev,
    size: ByteSize,
    csv: PathBuf,
    label: String,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        pool: String::new(),
        layers: 20,
        sequence: Sequence::Activate,
        origin_mib: 0,
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
                args.sequence = match value.as_str() {
                    "activate" => Sequence::Activate,
                    "message" => Sequence::Message,
                    "reset" => Sequence::Reset,
                    other => return Err(format!("--sequence activate|message|reset, not {other}")),
                }
            }
            "--origin-mib" => {
                args.origin_mib = value.parse().map_err(|e| format!("--origin-mib: {e}"))?
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
    let costs = match args.sequence {
        Sequence::Activate => {
            activate(1)?;
            let mut costs = Vec::with_capacity(args.layers as usize);
            for id in 2..args.layers + 2 {
                let started = Instant::now();
                let origin = name(id - 1);
                dm.snapshot(&pool, thin(id - 1), Some(&origin), thin(id), args.udev)
                    .map_err(|e| e.to_string())?;
                activate(id)?;
                costs.push(started.elapsed().as_secs_f64() * 1000.0);
            }
            for id in (1..args.layers + 2).rev() {
                dm.remove_device(&name(id), args.udev)
                    .map_err(|e| e.to_string())?;
            }
            costs
        }
        Sequence::Message => {
            let mut costs = Vec::with_capacity(args.layers as usize);
            for (txn, id) in (first_txn..).zip(2..args.layers + 2) {
                let started = Instant::now();
                dm.snapshot(&pool, thin(id - 1), None, thin(id), args.udev)
                    .map_err(|e| e.to_string())?;
                dm.set_transaction_id(&pool, txn, txn + 1)
                    .map_err(|e| e.to_string())?;
                costs.push(started.elapsed().as_secs_f64() * 1000.0);
            }
            costs
        }
        Sequence::Reset => {
            activate(1)?;
            fill(&kernel_path(&dm, &name(1))?, args.origin_mib)?;
            dm.remove_device(&name(1), args.udev)
                .map_err(|e| e.to_string())?;
            let mut costs = Vec::with_capacity(args.layers as usize);
            for (txn, id) in (first_txn..).zip(2..args.layers + 2) {
                let started = Instant::now();
                dm.snapshot(&pool, thin(1), None, thin(id), args.udev)
                    .map_err(|e| e.to_string())?;
                dm.set_transaction_id(&pool, txn, txn + 1)
                    .map_err(|e| e.to_string())?;
                costs.push(started.elapsed().as_secs_f64() * 1000.0);
                if id > 2 {
                    dm.delete_thin(&pool, thin(id - 1))
                        .map_err(|e| e.to_string())?;
                }
            }
            costs
        }
    };
    append_csv(args, &costs)
}

fn kernel_path(dm: &Dm, name: &DmNameBuf) -> Result<PathBuf, String> {
    let info = dm.info(name).map_err(|e| e.to_string())?;
    Ok(dm::kernel_node(&info))
}

/// Write `mib` MiB of data that differs from block to block (so nothing shares or compresses)
/// to `device`, with direct I/O, as a layer's writes reach the pool.
fn fill(device: &std::path::Path, mib: u64) -> Result<(), String> {
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(nix::fcntl::OFlag::O_DIRECT.bits())
        .open(device)
        .map_err(|e| format!("{}: {e}", device.display()))?;
    let mut buffer = AlignedMib::new();
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    for _ in 0..mib {
        for word in buffer.words() {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            *word = state;
        }
        file.write_all(buffer.bytes())
            .map_err(|e| format!("{}: {e}", device.display()))?;
    }
    Ok(())
}

/// One MiB aligned for direct I/O.
struct AlignedMib(Box<[u64]>);

impl AlignedMib {
    fn new() -> AlignedMib {
        // A boxed slice of u64 is 8-byte aligned; over-allocate and start at a page boundary.
        AlignedMib(vec![0u64; (1 << 17) + 512].into_boxed_slice())
    }
    fn offset(&self) -> usize {
        let address = self.0.as_ptr() as usize;
        ((4096 - address % 4096) % 4096) / 8
    }
    fn words(&mut self) -> &mut [u64] {
        let offset = self.offset();
        &mut self.0[offset..offset + (1 << 17)]
    }
    fn bytes(&self) -> &[u8] {
        let offset = self.offset();
        let words = &self.0[offset..offset + (1 << 17)];
        // SAFETY: u64s reinterpreted as their bytes; any bit pattern is a valid u8.
        unsafe { std::slice::from_raw_parts(words.as_ptr().cast::<u8>(), 1 << 20) }
    }
}

fn append_csv(args: &Args, costs: &[f64]) -> Result<(), String> {
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&args.csv)
        .map_err(|e| format!("{}: {e}", args.csv.display()))?;
    let operation = match args.sequence {
        Sequence::Activate => "snapshot+activate",
        Sequence::Message => "snapshot (inactive origin)",
        Sequence::Reset => "snapshot of one origin holding data",
    };
    for (i, ms) in costs.iter().enumerate() {
        writeln!(file, "{},{operation},{},{ms:.3}", args.label, i + 1)
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}
