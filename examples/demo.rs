//! The main job, end to end on the real kernel: a loop-backed pool with the default settings, a
//! base device with a filesystem, a snapshot of it taken while mounted, files written and read
//! on both sides, and the pool's status. `scripts/demo` runs it (in a VM where the host lacks
//! dm-thin).
//!
//! demo [--config FILE] [--state-dir DIR] [--keep]

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use thinstack::kernel::dm::Dm;
use thinstack::kernel::fs;
use thinstack::names::ThinId;
use thinstack::{Config, Pool, Result};

struct Args {
    config: Option<PathBuf>,
    state_dir: Option<PathBuf>,
    keep: bool,
}

fn parse_args() -> std::result::Result<Args, String> {
    let mut args = Args {
        config: None,
        state_dir: None,
        keep: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--config" => args.config = it.next().map(PathBuf::from),
            "--state-dir" => args.state_dir = it.next().map(PathBuf::from),
            "--keep" => args.keep = true,
            other => return Err(format!("unknown argument {other:?}; usage: demo [--config FILE] [--state-dir DIR] [--keep]")),
        }
    }
    Ok(args)
}

fn step(text: &str) {
    println!("==> {text}");
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();
    let args = match parse_args() {
        Ok(args) => args,
        Err(e) => {
            eprintln!("demo: {e}");
            return ExitCode::from(2);
        }
    };
    match run(&args) {
        Ok(()) => {
            println!("demo: done");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("demo: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> Result<()> {
    let mut config = Config::load(args.config.as_deref())?;
    if let Some(dir) = &args.state_dir {
        config.state_dir =
            thinstack::config::AbsolutePath::new(dir).map_err(thinstack::Error::invalid)?;
    }
    let fs_type = config.layers.filesystem;
    let size = config.layers.base_size;
    let dm = Dm::open()?;

    step(&format!(
        "opening the pool {:?} on loop files in {}",
        config.pool.name.as_str(),
        config.state_dir.path().display()
    ));
    let pool = Pool::open(&config, &dm)?;
    let base = ThinId::new(1)?;
    let child = ThinId::new(2)?;

    step(&format!(
        "base device: thin {base}, {size} virtual, {fs_type}"
    ));
    pool.create_thin(&dm, base)?;
    let base_dev = pool.activate_thin(&dm, base, size, false)?;
    let started = std::time::Instant::now();
    let mkfs_args: Vec<String> = config.layers.mkfs_args.clone();
    fs::mkfs(fs_type, &base_dev.node, &mkfs_args)?;
    println!(
        "    mkfs.{fs_type} took {:.1}s on {}",
        started.elapsed().as_secs_f64(),
        base_dev.node.display()
    );
    let base_mnt = mount_point(&config, "base")?;
    fs::mount(&base_dev.node, &base_mnt, fs_type, false, &[])?;
    write(&base_mnt.join("hello.txt"), "written in the base layer\n")?;
    println!("    mounted at {}, wrote hello.txt", base_mnt.display());

    step(&format!(
        "snapshot: thin {child} of thin {base}, taken while the base is mounted"
    ));
    pool.snapshot(&dm, base, child)?;
    let child_dev = pool.activate_thin(&dm, child, size, false)?;
    let child_mnt = mount_point(&config, "child")?;
    fs::mount(&child_dev.node, &child_mnt, fs_type, false, &[])?;
    print!(
        "    the snapshot shows hello.txt: {}",
        read(&child_mnt.join("hello.txt"))?
    );
    write(&child_mnt.join("child.txt"), "written in the child only\n")?;
    println!(
        "    wrote child.txt in the child; the base has it: {}",
        base_mnt.join("child.txt").exists()
    );

    step("pool status");
    print!("{}", pool.status(&dm)?);
    println!(
        "    child layer maps {} of data",
        pool.thin_mapped(&dm, child)?.human()
    );

    if args.keep {
        step("keeping the pool, devices and mounts (--keep)");
        return Ok(());
    }
    step("cleaning up: unmount, deactivate, delete thin devices, tear the pool down");
    for mnt in [&child_mnt, &base_mnt] {
        fs::unmount(mnt)?;
    }
    for id in [child, base] {
        pool.deactivate_thin(&dm, id)?;
        pool.delete_thin(&dm, id)?;
    }
    let metadata = pool.backing().metadata_file.clone();
    pool.teardown(&dm)?;
    thinstack::kernel::thin_tools::check(&metadata)?;
    println!("    thin_check of the metadata: clean");
    Ok(())
}

fn mount_point(config: &Config, name: &str) -> Result<PathBuf> {
    let path = config.state_dir.path().join("mnt").join(name);
    std::fs::create_dir_all(&path)
        .map_err(|e| thinstack::Error::io(format!("creating {}", path.display()), e))?;
    Ok(path)
}

fn write(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text)
        .map_err(|e| thinstack::Error::io(format!("writing {}", path.display()), e))
}

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path)
        .map_err(|e| thinstack::Error::io(format!("reading {}", path.display()), e))
}
