//! Leftovers (issue 7, item 6): `thinstack pool doctor` lists what a crash or a foreign tool
//! left beside the records, changes nothing without `--repair`, cleans what is safe with it,
//! and never touches what is in use or not this pool's. The leftovers are made as a crash or a
//! foreign tool makes them: with dmsetup, losetup, mount and umount.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::daemon::{Run, TestDaemon};
use common::require_dm_thin;
use serde_json::Value;

/// Run a program (never a shell) that must succeed; its stdout.
fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program).args(args).output().expect(program);
    let run = Run::from(out);
    assert_eq!(run.code, 0, "{program} {args:?}: {run:?}");
    run.stdout
}

fn dm_exists(name: &str) -> bool {
    Command::new("dmsetup")
        .args(["info", name])
        .output()
        .is_ok_and(|o| o.status.success())
}

fn loop_bound(device: &str) -> bool {
    let name = Path::new(device)
        .file_name()
        .unwrap()
        .to_string_lossy()
        .to_string();
    Path::new("/sys/block")
        .join(name)
        .join("loop/backing_file")
        .exists()
}

/// Run a cleanup command; it may find its work done already (quietly).
fn clean(program: &str, args: &[&str]) {
    let _ = Command::new(program)
        .args(args)
        .stderr(Stdio::null())
        .status();
}

/// Foreign leftovers this test makes outside its pool; removed even when the test fails.
#[derive(Default)]
struct Foreign {
    dm: Vec<String>,
    loops: Vec<String>,
    mounts: Vec<PathBuf>,
}

impl Drop for Foreign {
    fn drop(&mut self) {
        for target in &self.mounts {
            clean("umount", &[target.to_str().unwrap()]);
        }
        for name in &self.dm {
            clean("dmsetup", &["remove", name]);
        }
        for device in &self.loops {
            clean("losetup", &["-d", device]);
        }
    }
}

/// A file bound to a loop device, then deleted.
fn loop_on_deleted_file(path: &Path, foreign: &mut Foreign) -> String {
    std::fs::write(path, vec![0u8; 1 << 20]).unwrap();
    let device = run("losetup", &["--find", "--show", path.to_str().unwrap()])
        .trim()
        .to_string();
    foreign.loops.push(device.clone());
    std::fs::remove_file(path).unwrap();
    device
}

/// `pool doctor` (with `--repair` when asked): exit code and findings as (kind, subject, status).
fn doctor(d: &TestDaemon, repair: bool) -> (i32, Vec<(String, String, String)>) {
    doctor_with(d, repair, false)
}

/// [`doctor`], deleting thin devices no record owns too when `delete_unowned`.
fn doctor_with(
    d: &TestDaemon,
    repair: bool,
    delete_unowned: bool,
) -> (i32, Vec<(String, String, String)>) {
    let mut args = vec!["--json", "pool", "doctor"];
    if repair {
        args.push("--repair");
    }
    if delete_unowned {
        args.push("--delete-unowned");
    }
    let run = d.cli(&args);
    assert!(run.code == 0 || run.code == 1, "doctor failed: {run:?}");
    let report = run.json();
    assert_eq!(report["repair"], repair);
    let findings = report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            let text = |k: &str| f[k].as_str().unwrap().to_string();
            (text("kind"), text("subject"), text("status"))
        })
        .collect();
    (run.code, findings)
}

fn status_of<'a>(findings: &'a [(String, String, String)], subject: &str) -> Vec<&'a str> {
    findings
        .iter()
        .filter(|(_, s, _)| s == subject)
        .map(|(_, _, status)| status.as_str())
        .collect()
}

#[test]
#[ignore = "needs root and dm-thin: run with scripts/vm-test"]
fn kernel_doctor_lists_then_repairs_leftovers_and_leaves_the_rest_alone() {
    let _dm = require_dm_thin();
    let d = TestDaemon::start("doctor", "[layers]\nbase_size = \"64M\"\n");
    let mut foreign = Foreign::default();
    let state = d.pool.config.state_dir.path().to_path_buf();
    let pool = d.pool.config.pool.name.to_string();
    let pool_dm = format!("/dev/mapper/thinstack-1-{pool}-pool");

    // Layers: "kept" mounted through thinstack with a file; "byhand" mounted by hand
    // elsewhere; "unmounted" mounted through thinstack, then unmounted behind its back.
    for name in ["kept", "byhand", "unmounted"] {
        d.json(&["layer", "create", name]);
    }
    let kept = d.json(&["layer", "mount", "kept"])["mount_point"]
        .as_str()
        .unwrap()
        .to_string();
    std::fs::write(Path::new(&kept).join("marker"), b"still here").unwrap();
    let node = d.json(&["layer", "activate", "byhand"])["device"]
        .as_str()
        .unwrap()
        .to_string();
    let by_hand = d.pool.mount_point("by-hand");
    run("mount", &[&node, by_hand.to_str().unwrap()]);
    foreign.mounts.push(by_hand.clone());
    let gone = d.json(&["layer", "mount", "unmounted"])["mount_point"]
        .as_str()
        .unwrap()
        .to_string();
    run("umount", &[&gone]);

    // A foreign tool's thin devices in this pool, with active devices named as thinstack's:
    // 4242 unused, 4343 held open.
    for id in ["4242", "4343"] {
        run(
            "dmsetup",
            &["message", &pool_dm, "0", &format!("create_thin {id}")],
        );
        let table = format!("0 16384 thin {pool_dm} {id}");
        let name = format!("thinstack-1-{pool}-thin-{id}");
        run("dmsetup", &["create", &name, "--table", &table]);
    }
    let held_name = format!("thinstack-1-{pool}-thin-4343");
    let held = std::fs::File::open(format!("/dev/mapper/{held_name}")).unwrap();
    // Another pool's device, by thinstack's prefix; a stale mount point; loop devices on
    // deleted files, in the state directory and elsewhere.
    let other = format!("thinstack-1-other{}-pool", std::process::id());
    run("dmsetup", &["create", &other, "--table", "0 8 zero"]);
    foreign.dm.push(other.clone());
    std::fs::create_dir(state.join("mnt").join("ghost")).unwrap();
    let ours_loop = loop_on_deleted_file(&state.join("leftover.img"), &mut foreign);
    let foreign_loop = loop_on_deleted_file(&d.pool.dir.path().join("foreign.img"), &mut foreign);

    // Listing changes nothing.
    let (code, found) = doctor(&d, false);
    eprintln!("doctor found: {found:#?}");
    assert_eq!(code, 1, "leftovers need attention");
    let orphan = format!("thinstack-1-{pool}-thin-4242");
    let ghost = state.join("mnt/ghost").display().to_string();
    for (subject, status) in [
        (by_hand.display().to_string(), "repairable"),
        (gone.clone(), "repairable"),
        (ghost.clone(), "repairable"),
        (orphan.clone(), "repairable"),
        (held_name.clone(), "in_use"),
        ("4242".to_string(), "needs_operator"),
        ("4343".to_string(), "needs_operator"),
        (other.clone(), "not_ours"),
        (ours_loop.clone(), "repairable"),
        (foreign_loop.clone(), "not_ours"),
    ] {
        assert_eq!(
            status_of(&found, &subject),
            [status],
            "{subject}: {found:#?}"
        );
    }
    // Nothing else of this pool's (tests running beside this one have pools of their own).
    let ours = found
        .iter()
        .filter(|(_, _, status)| status != "not_ours")
        .count();
    assert_eq!(ours, 8, "nothing else: {found:#?}");
    assert!(dm_exists(&orphan) && loop_bound(&ours_loop) && Path::new(&ghost).exists());
    assert_eq!(
        d.json(&["layer", "inspect", "unmounted"])["mounts"]
            .as_object()
            .unwrap()
            .len(),
        1
    );

    // Repair cleans all but what is in use, what is not ours, and thin devices no record owns
    // (they may be layers whose records were lost): those only on the operator's word.
    let (code, repaired) = doctor(&d, true);
    eprintln!("doctor repaired: {repaired:#?}");
    assert_eq!(code, 1, "the held device still needs attention");
    for (subject, status) in [
        (by_hand.display().to_string(), "repaired"),
        (gone.clone(), "repaired"),
        (ghost.clone(), "repaired"),
        (orphan.clone(), "repaired"),
        (held_name.clone(), "in_use"),
        ("4242".to_string(), "needs_operator"),
        ("4343".to_string(), "needs_operator"),
        (other.clone(), "not_ours"),
        (ours_loop.clone(), "repaired"),
        (foreign_loop.clone(), "not_ours"),
    ] {
        assert_eq!(
            status_of(&repaired, &subject),
            [status],
            "{subject}: {repaired:#?}"
        );
    }
    let (code, repaired) = doctor_with(&d, true, true);
    assert_eq!(code, 1, "the held device still needs attention");
    for (subject, status) in [
        (held_name.clone(), "in_use"),
        ("4242".to_string(), "repaired"),
        ("4343".to_string(), "in_use"),
        (other.clone(), "not_ours"),
        (foreign_loop.clone(), "not_ours"),
    ] {
        assert_eq!(
            status_of(&repaired, &subject),
            [status],
            "{subject}: {repaired:#?}"
        );
    }
    assert!(!dm_exists(&orphan) && !loop_bound(&ours_loop) && !Path::new(&ghost).exists());
    assert!(dm_exists(&other) && loop_bound(&foreign_loop) && dm_exists(&held_name));

    // Released, the last one goes; what is left is not ours, and the exit code says so.
    drop(held);
    let (code, last) = doctor_with(&d, true, true);
    assert_eq!(code, 0, "{last:#?}");
    assert_eq!(status_of(&last, &held_name), ["repaired"]);
    assert_eq!(status_of(&last, "4343"), ["repaired"]);
    let (code, after) = doctor(&d, false);
    assert_eq!(code, 0);
    assert!(
        after.iter().all(|(_, _, status)| status == "not_ours"),
        "{after:#?}"
    );

    // Every layer is intact, and the pool's metadata is clean.
    assert_eq!(
        std::fs::read(Path::new(&kept).join("marker")).unwrap(),
        b"still here"
    );
    let layers: Vec<Value> = d.json(&["layer", "list"]).as_array().unwrap().clone();
    assert_eq!(layers.len(), 3);
    assert!(d.json(&["layer", "inspect", "unmounted"])["mounts"]
        .as_object()
        .unwrap()
        .is_empty());
    assert_eq!(d.cli(&["pool", "check"]).code, 0);
    let text = d.cli(&["pool", "doctor"]);
    assert!(text.stdout.contains("not ours"), "{text:?}");
}

fn suspended(name: &str) -> bool {
    run("dmsetup", &["info", name]).contains("SUSPENDED")
}

#[test]
#[ignore = "needs root and dm-thin: run with scripts/vm-test"]
fn kernel_start_settles_devices_a_kill_left_half_done() {
    let _dm = require_dm_thin();
    let mut d = TestDaemon::start("half-done", "[layers]\nbase_size = \"64M\"\n");
    let pool = d.pool.config.pool.name.to_string();
    d.json(&["layer", "create", "a"]);
    let node = d.json(&["layer", "activate", "a"])["device"]
        .as_str()
        .unwrap()
        .to_string();
    let id = d.json(&["layer", "inspect", "a"])["thin_id"]
        .as_u64()
        .unwrap();
    d.kill9();
    // As a kill between ioctls leaves them: a thin device created without its table, a
    // thin device suspended inside a snapshot, the pool suspended inside a reload.
    let tableless = format!("thinstack-1-{pool}-thin-999");
    let thin = format!("thinstack-1-{pool}-thin-{id}");
    let pool_dm = format!("thinstack-1-{pool}-pool");
    run("dmsetup", &["create", "--notable", &tableless]);
    run("dmsetup", &["suspend", &thin]);
    run("dmsetup", &["suspend", &pool_dm]);
    assert!(suspended(&thin) && suspended(&pool_dm));

    d.spawn();
    assert!(
        !dm_exists(&tableless),
        "the tableless device is still there"
    );
    assert!(!suspended(&thin), "{thin} is still suspended");
    assert!(!suspended(&pool_dm), "{pool_dm} is still suspended");
    // I/O on the layer goes through again.
    run(
        "dd",
        &[
            "if=/dev/zero",
            &format!("of={node}"),
            "bs=64k",
            "count=4",
            "oflag=direct",
        ],
    );
    // Nothing of this pool's is left over (other tests' pools are reported as not ours).
    let (code, findings) = doctor(&d, false);
    assert_eq!(code, 0, "{findings:#?}");
    assert!(
        findings.iter().all(|(_, _, status)| status == "not_ours"),
        "{findings:#?}"
    );
}
