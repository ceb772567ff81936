//! Crashes inside the rbd pool's multi-step operations (a snapshot is a snapshot, a clone, and
//! maybe a flatten; a removal is snapshots, the parent's snapshot, then the image), on a real
//! Ceph cluster: a child process dies at every pass of every `rbd.` and `pool_step.` point of
//! creating a child (flattened past the depth limit), a larger child (grown when activated),
//! and removing a layer; the next open must settle all of it, in the records and in the cluster.
//! Run with `scripts/vm-test` (a build with crash points).

mod common;

use std::collections::BTreeSet;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::Command;

use common::ceph::cluster;
use common::{layer, require_dm_thin, wait_until, TestPool};
use thinstack::config::Config;
use thinstack::engine::{CreateLayer, Engine, Settings};
use thinstack::kernel::real::RealFs;
use thinstack::kernel::PoolKernel;
use thinstack::pool::rbd::RbdPool;
use thinstack::units::ByteSize;

type RbdEngine = Engine<RbdPool, RealFs>;

/// Set in the child: "<operation>\t<config file>".
const CHILD_ENV: &str = "THINSTACK_RBD_CRASH_CHILD";

const OPERATIONS: [&str; 3] = ["create_flattened_child", "create_larger_child", "remove"];

fn open(config: &Config) -> RbdEngine {
    let pool = RbdPool::open(config).expect("open the rbd pool");
    let (engine, report) = Engine::open(pool, RealFs, Settings::from_config(config)).unwrap();
    assert!(report.unowned_kept.is_empty(), "{report:?}");
    engine
}

fn write_file(engine: &RbdEngine, name: &str, text: &str) {
    let mnt = engine.mount(name, None, false).unwrap();
    std::fs::write(mnt.join("data"), text).unwrap();
    engine.unmount(name, None).unwrap();
    engine.deactivate(name).unwrap();
}

fn read_file(engine: &RbdEngine, name: &str) -> String {
    let mnt = engine.mount(name, None, true).unwrap();
    let text = std::fs::read_to_string(mnt.join("data"));
    engine.unmount(name, None).unwrap();
    engine.deactivate(name).unwrap();
    text.unwrap_or_else(|e| panic!("layer {name} lost its file: {e}"))
}

/// "base" (depth 0) with its file, its child "work" (depth 1) with its file, and nothing else.
fn reset(engine: &RbdEngine) {
    if engine.inspect("kid").is_ok() {
        engine.remove("kid").unwrap();
    }
    if engine.inspect("base").is_err() {
        engine.create(&layer("base", None)).unwrap();
        write_file(engine, "base", "base data");
    }
    if engine.inspect("work").is_err() {
        engine.create(&layer("work", Some("base"))).unwrap();
        write_file(engine, "work", "work data");
    }
    engine.finish_deletions().unwrap();
}

fn run_operation(engine: &RbdEngine, operation: &str) {
    match operation {
        // flatten_depth is 1: a child of "work" is made at depth 2, and flattened.
        "create_flattened_child" => drop(engine.create(&layer("kid", Some("work"))).unwrap()),
        "create_larger_child" => drop(
            engine
                .create(&CreateLayer {
                    size: Some(ByteSize::mib(96)),
                    ..layer("kid", Some("work"))
                })
                .unwrap(),
        ),
        "remove" => {
            engine.remove("work").unwrap();
            engine.finish_deletions().unwrap();
        }
        other => panic!("unknown operation {other}"),
    }
}

fn child(
    config_path: &Path,
    operation: &str,
    env: (&str, &str),
) -> (std::process::ExitStatus, String) {
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "rbd_crash_at_every_point",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, format!("{operation}\t{}", config_path.display()))
        .env(env.0, env.1)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status, text)
}

/// After a crash: records and images agree, every layer is whole, and the cluster holds no
/// snapshot that no clone reads and nothing in the trash.
fn check_after_crash(config: &Config, what: &str) {
    let engine = open(config);
    // A removal meets the image still watched by the dead process until the cluster times
    // the watch out: the deletion waits in the queue, and is retried, as the daemon does.
    wait_until(
        "the removed layers' images to be deleted",
        || {
            let _ = engine.finish_deletions();
            engine.deletions_pending() == 0
        },
        || format!("{what}: {} deletions pending", engine.deletions_pending()),
    );
    let layers = engine.list(&Default::default()).unwrap();
    let owned: BTreeSet<_> = layers.iter().map(|l| l.thin_id).collect();
    assert_eq!(
        engine.kernel().thin_ids().unwrap(),
        owned,
        "{what}: images vs records"
    );
    assert!(
        engine.kernel().active_ids().unwrap().is_empty(),
        "{what}: mapped images left"
    );
    let names: BTreeSet<String> = layers.iter().map(|l| l.name.to_string()).collect();
    // The pool's catalog agrees: an entry per layer, none left half made or half removed.
    let catalog = engine
        .kernel()
        .catalog()
        .unwrap()
        .entries()
        .unwrap()
        .entries;
    assert_eq!(
        catalog.keys().cloned().collect::<BTreeSet<_>>(),
        names,
        "{what}: catalog vs records"
    );
    for (name, entry) in &catalog {
        assert!(
            entry.contains(r#""state":"ready""#),
            "{what}: {name}: {entry}"
        );
    }
    assert_eq!(read_file(&engine, "base"), "base data", "{what}");
    if names.contains("work") {
        assert_eq!(read_file(&engine, "work"), "work data", "{what}");
    } else {
        assert!(what.starts_with("remove"), "{what}: work lost");
    }
    if names.contains("kid") {
        assert_eq!(read_file(&engine, "kid"), "work data", "{what}");
    }
    let test = cluster();
    let spec = format!("{}/{}", test.pool, config.pool.rbd.namespace);
    for image in test.rbd(&["ls", &spec]).split_whitespace() {
        for line in test
            .rbd(&["snap", "ls", &format!("{spec}/{image}")])
            .lines()
            .skip(1)
        {
            let snap = line.split_whitespace().nth(1).unwrap_or_default();
            let children = test.rbd(&["children", &format!("{spec}/{image}@{snap}")]);
            assert!(
                !children.trim().is_empty(),
                "{what}: {image}@{snap} serves no clone"
            );
        }
    }
    let trash = test.rbd(&["trash", "ls", &spec]);
    assert!(
        trash.trim().is_empty(),
        "{what}: left in the trash: {trash}"
    );
}

#[test]
#[ignore = "kernel test: run with scripts/vm-test"]
fn rbd_crash_at_every_point() {
    if let Ok(spec) = std::env::var(CHILD_ENV) {
        let (operation, path) = spec.split_once('\t').unwrap();
        let config = Config::load(Some(Path::new(path))).unwrap();
        return run_operation(&open(&config), operation);
    }
    require_dm_thin();
    let test = cluster();
    let namespace = format!("t{}-crash", std::process::id());
    let t = TestPool::new(
        "rbd-crash",
        &format!(
            "{}flatten_depth = 1\n[layers]\nbase_size = \"64M\"\n",
            test.pool_toml(&namespace)
        ),
    );
    let config_path = t.dir.path().join("config.toml");
    std::fs::write(&config_path, t.config.to_toml()).unwrap();
    let mut crashed = BTreeSet::new();
    for operation in OPERATIONS {
        reset(&open(&t.config));
        let trace = t.dir.path().join(format!("trace-{operation}"));
        let (status, output) = child(
            &config_path,
            operation,
            ("THINSTACK_CRASH_TRACE", trace.to_str().unwrap()),
        );
        assert!(
            status.success(),
            "{operation} failed without a crash:\n{output}"
        );
        let points: BTreeSet<String> = std::fs::read_to_string(&trace)
            .unwrap_or_default()
            .lines()
            .filter(|p| {
                p.starts_with("rbd.") || p.starts_with("pool_step.") || p.starts_with("shared.")
            })
            .map(str::to_owned)
            .collect();
        assert!(
            points.iter().any(|p| p.starts_with("rbd.")),
            "{operation} passed no rbd point:\n{output}"
        );
        for point in &points {
            reset(&open(&t.config));
            let (status, output) = child(&config_path, operation, ("THINSTACK_CRASH_AT", point));
            assert_eq!(
                status.signal(),
                Some(nix::libc::SIGABRT),
                "{operation} did not die at {point}:\n{output}"
            );
            assert!(
                output.contains(&format!("crash point {point} reached")),
                "{operation} died, but not at {point}:\n{output}"
            );
            check_after_crash(&t.config, &format!("{operation} crashed at {point}"));
            crashed.insert(point.split('#').next().unwrap().to_string());
        }
    }
    let missing: Vec<&str> = thinstack::crash::Point::ALL
        .iter()
        .map(|p| p.name())
        .filter(|p| (p.starts_with("rbd.") || p.starts_with("shared.")) && !crashed.contains(*p))
        .collect();
    assert!(
        missing.is_empty(),
        "rbd and shared crash points never crashed: {missing:?}"
    );
    eprintln!("rbd: crashed at {} points: {crashed:?}", crashed.len());
}
