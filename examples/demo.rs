//! The main job, end to end on the real kernel: a loop-backed pool with the default settings,
//! a base layer with a filesystem, a child layer snapshotted while the base is mounted, files
//! written and read on both sides, a commit, the layer list and the pool's status.
//! `scripts/demo` runs it (in a VM where the host lacks dm-thin).
//!
//! demo [--config FILE] [--state-dir DIR] [--keep | --teardown]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use thinstack::engine::{CreateLayer, Engine, Settings};
use thinstack::kernel::dm::Dm;
use thinstack::kernel::real::RealFs;
use thinstack::pool::RealPool;
use thinstack::{Config, Error, Pool, Result};

struct Args {
    config: Option<PathBuf>,
    state_dir: Option<PathBuf>,
    keep: bool,
    teardown: bool,
}

fn parse_args() -> std::result::Result<Args, String> {
    let mut args = Args {
        config: None,
        state_dir: None,
        keep: false,
        teardown: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--config" => args.config = it.next().map(PathBuf::from),
            "--state-dir" => args.state_dir = it.next().map(PathBuf::from),
            "--keep" => args.keep = true,
            "--teardown" => args.teardown = true,
            other => {
                return Err(format!(
                    "unknown argument {other:?}; usage: demo [--config FILE] [--state-dir DIR] [--keep | --teardown]"
                ))
            }
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
        config.state_dir = thinstack::config::AbsolutePath::new(dir).map_err(Error::invalid)?;
    }
    step(&format!(
        "opening pool {:?} on loop files in {} ({} data, {} metadata, sparse)",
        config.pool.name.as_str(),
        config.state_dir.path().display(),
        config.pool.loop_files.data_size,
        config.pool.loop_files.metadata_size.size()
    ));
    let dm = Dm::open()?;
    let pool = Pool::open(&config, &dm)?;
    if args.teardown {
        // After scripts/demo's daemon stopped with every layer deactivated.
        let metadata = pool
            .loop_backing()
            .expect("the demo uses the loop backend")
            .metadata_file
            .clone();
        pool.teardown(&dm)?;
        thinstack::kernel::thin_tools::check(&metadata)?;
        println!("    pool torn down; thin_check of the metadata: clean");
        return Ok(());
    }
    let (engine, report) = Engine::open(
        RealPool::new(dm, pool, config.clone()),
        RealFs,
        Settings::from_config(&config),
    )?;
    if !report.is_clean() {
        println!("    reconciled: {report:?}");
    }

    step(&format!(
        "base layer \"base\": {} {}",
        config.layers.base_size, config.layers.filesystem
    ));
    let started = Instant::now();
    let base = engine.create(&CreateLayer {
        name: "base".into(),
        labels: BTreeMap::from([("role".into(), "demo".into())]),
        ..CreateLayer::default()
    })?;
    println!(
        "    thin device {}, made with its filesystem in {:.1}s",
        base.thin_id,
        started.elapsed().as_secs_f64()
    );
    let base_mnt = engine.mount("base", None, false)?;
    write(&base_mnt.join("hello.txt"), "written in the base layer\n")?;
    println!("    mounted at {}, wrote hello.txt", base_mnt.display());

    step("child layer \"app\": a snapshot of base, taken while base is mounted");
    let started = Instant::now();
    engine.create(&CreateLayer {
        name: "app".into(),
        parent: Some("base".into()),
        ..CreateLayer::default()
    })?;
    println!(
        "    made in {:.0} ms",
        started.elapsed().as_secs_f64() * 1000.0
    );
    let app_mnt = engine.mount("app", None, false)?;
    print!(
        "    app shows hello.txt: {}",
        read(&app_mnt.join("hello.txt"))?
    );
    write(&app_mnt.join("app.txt"), "written in the app layer only\n")?;
    println!(
        "    wrote app.txt in app; base has it: {}",
        base_mnt.join("app.txt").exists()
    );

    step("commit app (read-only from now on) and list the layers");
    engine.unmount("app", None)?;
    engine.commit("app")?;
    for layer in engine.list(&BTreeMap::new())? {
        println!(
            "    {:<6} thin {:<3} parent {:<6} {:<5} {} {}",
            layer.name.as_str(),
            layer.thin_id,
            layer.parent.as_ref().map_or("-", |p| p.as_str()),
            layer.filesystem,
            layer.size,
            if layer.committed {
                "committed"
            } else {
                "writable"
            }
        );
    }
    let usage = engine.usage("app")?;
    println!(
        "    app maps {}, {} of it its own",
        usage.mapped.human(),
        usage.exclusive.human()
    );

    step("pool status");
    let status = engine.status()?;
    println!(
        "    pool {} ({}): data {}, metadata {}, health {}, {} layers",
        status.pool.name,
        status.pool.backend,
        status.data.describe(),
        status.metadata.describe(),
        status.health.describe(),
        status.layers
    );

    if args.keep {
        step("keeping the pool and its layers (--keep)");
        return Ok(());
    }
    step("cleaning up: unmount, remove the layers, tear the pool down");
    engine.unmount("base", None)?;
    for name in ["app", "base"] {
        engine.remove(name)?;
    }
    drop(engine);
    let dm = Dm::open()?;
    let pool = Pool::open(&config, &dm)?;
    let metadata = pool
        .loop_backing()
        .expect("the demo uses the loop backend")
        .metadata_file
        .clone();
    pool.teardown(&dm)?;
    thinstack::kernel::thin_tools::check(&metadata)?;
    println!("    thin_check of the metadata: clean");
    Ok(())
}

fn write(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).map_err(|e| Error::io(format!("writing {}", path.display()), e))
}

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| Error::io(format!("reading {}", path.display()), e))
}
