//! Crash at every crash point of every multi-step operation, on the real kernel, for ext4 and
//! xfs: a child process runs the operation and aborts at the point (as `kill -9` would), then
//! the engine is re-opened and must have reconciled: records and pool agree exactly, no dm
//! device is left behind, every surviving layer still holds its data, and `thin_check` of the
//! metadata is clean.
//!
//! Needs a test build with the `crash-points` feature (scripts/vm-test builds it so); without
//! it the child does not die and the test fails saying so.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;

use common::{
    layer, open_engine, open_engine_with, require_dm_thin, teardown_and_check, RealEngine, TestPool,
};
use thinstack::config::Config;
use thinstack::crash::Point;
use thinstack::engine::{CreateLayer, ImportLayer, NewSnapshot, SnapshotRoot};
use thinstack::kernel::PoolKernel;
use thinstack::records::SnapshotKind;
use thinstack::units::ByteSize;
use thinstack::vocab::FsType;

/// Set in the child: "<operation>\t<config file>".
const CHILD_ENV: &str = "THINSTACK_CRASH_CHILD";

const OPERATIONS: [&str; 13] = [
    "create_base",
    "create_child",
    "create_larger_child",
    "commit_active",
    "remove",
    "remove_active",
    "resize",
    "snapshot_commit",
    "snapshot_commit_held",
    "checkpoint",
    "reset_to_parent",
    "reset_with_spare",
    "import",
];

/// containerd's namespace and keys in the snapshot operations.
const NS: &str = "crash";
const ACTIVE: &str = "active";
const COMMITTED: &str = "committed";

/// The operation under test, on the layer "work" (a child of "base").
fn run_operation(engine: &mut RealEngine, operation: &str) {
    match operation {
        "create_base" => drop(engine.create(&layer("fresh", None)).unwrap()),
        "create_child" => drop(engine.create(&layer("kid", Some("work"))).unwrap()),
        "create_larger_child" => drop(
            engine
                .create(&CreateLayer {
                    size: Some(ByteSize::mib(640)),
                    ..layer("kid", Some("work"))
                })
                .unwrap(),
        ),
        "commit_active" => {
            engine.activate("work").unwrap();
            drop(engine.commit("work").unwrap());
        }
        "remove" => drop(engine.remove("work").unwrap()),
        "remove_active" => {
            engine.activate("work").unwrap();
            engine.remove("work").unwrap();
        }
        "resize" => drop(engine.resize("work", ByteSize::mib(640)).unwrap()),
        "snapshot_commit" => commit_snapshot(engine),
        "snapshot_commit_held" => {
            // A running container holds its snapshot's device: the commit snapshots it.
            let device = engine.snapshot_mounts(NS, ACTIVE).unwrap().device;
            let _held = std::fs::File::open(device).unwrap();
            commit_snapshot(engine);
        }
        "checkpoint" => drop(engine.checkpoint("work", "cp", &BTreeMap::new()).unwrap()),
        "reset_with_spare" => {
            // "kid", a child of the committed "cp": the round after a reset makes a spare,
            // the next reset takes it, and the round after that makes the next.
            for _ in 0..2 {
                engine.reset("kid", None).unwrap();
                engine.process_deferred().unwrap();
            }
        }
        "reset_to_parent" => {
            engine.reset("work", None).unwrap();
            // As the daemon does after answering: the old device goes.
            engine.finish_discard("work").unwrap();
        }
        "import" => {
            let stream = std::fs::File::open(stream_file(engine)).unwrap();
            let request = ImportLayer {
                name: "copy".into(),
                parent: None,
            };
            drop(engine.import(&request, stream).unwrap());
        }
        other => panic!("unknown operation {other}"),
    }
}

/// Where the import operation's stream (an export of "work") is, beside the state directory.
fn stream_file(engine: &RealEngine) -> std::path::PathBuf {
    engine.state_dir().with_file_name("work.stream")
}

fn commit_snapshot(engine: &mut RealEngine) {
    engine
        .snapshot_commit(NS, ACTIVE, COMMITTED, BTreeMap::new())
        .unwrap();
}

/// containerd's active snapshot of the snapshot operations, a fresh root.
fn prepare_snapshot(engine: &mut RealEngine) {
    let new = NewSnapshot {
        namespace: NS,
        key: ACTIVE,
        parent: "",
        kind: SnapshotKind::Active,
        labels: BTreeMap::new(),
    };
    let root = SnapshotRoot {
        size: ByteSize::mib(320),
        filesystem: engine.inspect("base").unwrap().filesystem,
    };
    engine.snapshot_create(new, root).unwrap();
}

/// Write `text` into file `name` of a layer through a mount.
fn write_file(engine: &mut RealEngine, layer: &str, name: &str, text: &str) {
    let mnt = engine.mount(layer, None, false).unwrap();
    std::fs::write(mnt.join(name), text).unwrap();
    engine.unmount(layer, None).unwrap();
    engine.deactivate(layer).unwrap();
}

/// The file `name` of a layer, read through a read-only mount.
fn read_file(engine: &mut RealEngine, layer: &str, name: &str) -> String {
    let mnt = engine.mount(layer, None, true).unwrap();
    let text = std::fs::read_to_string(mnt.join(name));
    engine.unmount(layer, None).unwrap();
    engine.deactivate(layer).unwrap();
    text.unwrap_or_else(|e| panic!("layer {layer} lost {name}: {e}"))
}

/// Bring the pool to: "base" (with its file) and a fresh "work" child (with its file), and for
/// the snapshot operations containerd's active snapshot, only.
fn reset(engine: &mut RealEngine, operation: &str) {
    for key in [COMMITTED, ACTIVE] {
        if engine.snapshot_stat(NS, key).is_ok() {
            engine.snapshot_remove(NS, key).unwrap();
        }
    }
    for name in ["kid", "fresh", "cp", "copy", "work"] {
        if engine.inspect(name).is_ok() {
            engine.remove(name).unwrap();
        }
    }
    if engine.inspect("base").is_err() {
        engine.create(&layer("base", None)).unwrap();
        write_file(engine, "base", "data", "base data");
    }
    engine.create(&layer("work", Some("base"))).unwrap();
    write_file(engine, "work", "data", "work data");
    if operation.starts_with("snapshot_") {
        prepare_snapshot(engine);
    }
    if operation == "reset_with_spare" {
        // Only a layer whose parent is committed gets a spare.
        engine.checkpoint("work", "cp", &BTreeMap::new()).unwrap();
        engine.create(&layer("kid", Some("cp"))).unwrap();
        write_file(engine, "kid", "data", "kid data");
    }
    if operation == "import" {
        let file = std::fs::File::create(stream_file(engine)).unwrap();
        engine.export("work", None, false, || Ok(file)).unwrap();
    }
}

/// Run the operation in a child process; returns its exit status and output.
fn child(
    config_path: &Path,
    operation: &str,
    env: &[(&str, &str)],
) -> (std::process::ExitStatus, String) {
    let exe = std::env::current_exe().unwrap();
    let mut command = Command::new(exe);
    command
        .args([
            "kernel_crash_at_every_point",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, format!("{operation}\t{}", config_path.display()));
    for (key, value) in env {
        command.env(key, value);
    }
    let out = command.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status, text)
}

/// The child side: open the engine, run one operation (dying at the armed point).
fn run_child(spec: &str) {
    let (operation, config_path) = spec.split_once('\t').expect("child spec");
    let config = Config::load(Some(Path::new(config_path))).unwrap();
    let (mut engine, _) = open_engine_with(&config);
    run_operation(&mut engine, operation);
}

/// After a crash: re-open and check everything the issue asks.
fn check_after_crash(t: &TestPool, operation: &str, point: &str) {
    let what = format!("{operation} crashed at {point}");
    let (mut engine, report) = open_engine(t);
    assert!(
        report.unowned_kept.is_empty(),
        "{what}: start-up took its own devices for strangers; {report:?}"
    );
    // What the daemon's first round does after a start: devices removals queued go.
    engine.finish_deletions().unwrap();
    assert_eq!(engine.deletions_pending(), 0, "{what}");
    let layers = engine.list(&BTreeMap::new()).unwrap();
    // Each layer's own device, and a spare made ahead for its next reset.
    let owned: BTreeSet<_> = layers
        .iter()
        .flat_map(|l| std::iter::once(l.thin_id).chain(l.reset_spare))
        .collect();
    let pool_ids = engine.kernel().thin_ids().unwrap();
    assert_eq!(pool_ids, owned, "{what}: pool ids vs records; {report:?}");
    for l in &layers {
        assert_eq!(
            l.state,
            thinstack::records::LayerState::Ready,
            "{what}: {l:?}"
        );
    }
    let active = engine.kernel().active_ids().unwrap();
    let wanted: BTreeSet<_> = layers
        .iter()
        .filter(|l| l.device.is_some())
        .map(|l| l.thin_id)
        .collect();
    assert_eq!(active, wanted, "{what}: dm devices left behind");
    for l in layers.iter().filter(|l| l.device.is_some()) {
        let read_only = engine.kernel().active_read_only(l.thin_id).unwrap();
        assert_eq!(
            read_only,
            Some(l.committed),
            "{what}: {} read-only flag",
            l.name
        );
    }
    let names: BTreeSet<String> = layers.iter().map(|l| l.name.to_string()).collect();
    assert!(names.contains("base"), "{what}: base lost");
    if operation.starts_with("snapshot_") {
        let active = engine.snapshot_stat(NS, ACTIVE).is_ok();
        let committed = engine.snapshot_stat(NS, COMMITTED).is_ok();
        assert!(active || committed, "{what}: containerd's snapshot lost");
    }
    assert_eq!(
        read_file(&mut engine, "base", "data"),
        "base data",
        "{what}"
    );
    if !operation.starts_with("remove") {
        assert!(names.contains("work"), "{what}: work lost");
    }
    if names.contains("work") {
        let data = read_file(&mut engine, "work", "data");
        // A reset takes it back to its parent's content whole, or leaves it whole.
        let reset = operation.starts_with("reset_") && data == "base data";
        assert!(data == "work data" || reset, "{what}: work holds {data:?}");
    }
    for copy in ["cp", "copy"].into_iter().filter(|n| names.contains(*n)) {
        let data = read_file(&mut engine, copy, "data");
        assert_eq!(data, "work data", "{what}: {copy}");
    }
    if names.contains("kid") {
        let data = read_file(&mut engine, "kid", "data");
        // Reset to "cp" (work's data) whole, or left whole.
        let unreset = operation == "reset_with_spare" && data == "kid data";
        assert!(data == "work data" || unreset, "{what}: kid holds {data:?}");
    }
    for key in [COMMITTED, ACTIVE] {
        let _ = engine.snapshot_remove(NS, key);
    }
    for name in names.iter().filter(|n| n.as_str() != "base") {
        let _ = engine.deactivate(name);
    }
    let _ = engine.deactivate("base");
    drop(engine);
    teardown_and_check(t);
}

/// Crash every pass of every point each operation reaches; returns the points crashed.
fn crash_everywhere(fs_type: FsType) -> BTreeSet<String> {
    let _dm = require_dm_thin();
    let t = TestPool::new(
        &format!("crash-{fs_type}"),
        &format!("[layers]\nfilesystem = \"{fs_type}\"\nbase_size = \"320M\"\n"),
    );
    let config_path = t.dir.path().join("config.toml");
    std::fs::write(&config_path, t.config.to_toml()).unwrap();
    let mut crashed = BTreeSet::new();
    let mut crashes = 0;
    for operation in OPERATIONS {
        reset(&mut open_engine(&t).0, operation);
        let trace = t.dir.path().join(format!("trace-{operation}"));
        let (status, output) = child(
            &config_path,
            operation,
            &[("THINSTACK_CRASH_TRACE", trace.to_str().unwrap())],
        );
        assert!(
            status.success(),
            "{operation} failed without a crash:\n{output}"
        );
        let points: Vec<String> = std::fs::read_to_string(&trace)
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect();
        assert!(
            !points.is_empty(),
            "{operation} passed no crash point: was the test built with --features crash-points? (scripts/vm-test builds it so)"
        );
        // Each pass of each point ("name#n"): a point passed twice is crashed at both.
        for point in points.iter().collect::<BTreeSet<_>>() {
            reset(&mut open_engine(&t).0, operation);
            let (status, output) = child(&config_path, operation, &[("THINSTACK_CRASH_AT", point)]);
            use std::os::unix::process::ExitStatusExt;
            assert_eq!(
                status.signal(),
                Some(nix::libc::SIGABRT),
                "{operation} did not die at {point} ({status}):\n{output}"
            );
            // Only a crash at the point counts, not an abort anywhere else.
            assert!(
                output.contains(&format!("crash point {point} reached")),
                "{operation} died, but not at {point}:\n{output}"
            );
            check_after_crash(&t, operation, point);
            crashed.insert(point.split('#').next().unwrap().to_string());
            crashes += 1;
        }
    }
    eprintln!(
        "{fs_type}: {crashes} crashes survived at {} points",
        crashed.len()
    );
    crashed
}

/// Verify recovery from a crash at every pass of every point of create-base, create-child, a
/// larger child, commit, remove (of an inactive and an active layer), resize, and containerd's
/// commit (in place, and of a held snapshot), on ext4 and xfs; every point is crashed by name.
#[test]
#[ignore = "needs root and dm-thin: run with scripts/vm-test"]
fn kernel_crash_at_every_point() {
    if let Ok(spec) = std::env::var(CHILD_ENV) {
        return run_child(&spec);
    }
    for fs_type in [FsType::Ext4, FsType::Xfs] {
        let crashed = crash_everywhere(fs_type);
        // Every point of the layer operations, by name (pool creation's are crashed in
        // kernel_backends, the rbd pool's and its catalog's in kernel_rbd_crash).
        let missing: Vec<&str> = Point::ALL
            .iter()
            .map(|p| p.name())
            .filter(|p| !p.starts_with("lvm.") && !p.starts_with("devices."))
            .filter(|p| !p.starts_with("rbd.") && !p.starts_with("shared."))
            .filter(|p| !crashed.contains(*p))
            .collect();
        assert!(
            missing.is_empty(),
            "{fs_type}: crash points never crashed: {missing:?}"
        );
    }
}
