//! Layer data on the real kernel, through real daemons and the command as shipped: a layer and
//! its changes moved between two daemons with two state directories and two pools (two hosts
//! in one VM), byte for byte; a checkpoint of a mounted layer and resets to it and to the
//! parent, on ext4 and xfs.

mod common;

use std::io::Read;
use std::process::Stdio;

use common::daemon::{command_at, TestDaemon};
use common::require_dm_thin;
use thinstack::vocab::FsType;

const FILESYSTEMS: [FsType; 2] = [FsType::Ext4, FsType::Xfs];

fn config(fs: FsType) -> String {
    format!("[layers]\nfilesystem = \"{fs}\"\nbase_size = \"320M\"\n")
}

/// BLAKE3 of the whole device.
fn digest(device: &str) -> blake3::Hash {
    let mut file = std::fs::File::open(device).unwrap();
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).unwrap();
        if n == 0 {
            return hasher.finalize();
        }
        hasher.update(&buf[..n]);
    }
}

/// Mount `layer` read-write, write `files` (name, bytes), unmount.
fn write_files(d: &TestDaemon, layer: &str, files: &[(&str, Vec<u8>)]) {
    let mounted = d.json(&["layer", "mount", layer]);
    let dir = std::path::PathBuf::from(mounted["mount_point"].as_str().unwrap());
    for (name, bytes) in files {
        std::fs::write(dir.join(name), bytes).unwrap();
    }
    d.json(&["layer", "unmount", layer]);
}

/// The files of `layer`, read through a read-only mount: name → bytes.
fn read_files(d: &TestDaemon, layer: &str) -> std::collections::BTreeMap<String, Vec<u8>> {
    let mounted = d.json(&["layer", "mount", layer, "--readonly"]);
    let dir = std::path::PathBuf::from(mounted["mount_point"].as_str().unwrap());
    let files = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_type().unwrap().is_file())
        .map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            (name, std::fs::read(e.path()).unwrap())
        })
        .collect();
    d.json(&["layer", "unmount", layer]);
    d.json(&["layer", "deactivate", layer]);
    files
}

fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// The device of `layer`, activated (and the digest of it, then deactivated).
fn device_digest(d: &TestDaemon, layer: &str) -> blake3::Hash {
    let active = d.json(&["layer", "activate", layer]);
    let hash = digest(active["device"].as_str().unwrap());
    d.json(&["layer", "deactivate", layer]);
    hash
}

fn file_size(path: &std::path::Path) -> u64 {
    std::fs::metadata(path).unwrap().len()
}

#[test]
#[ignore = "needs root and dm-thin: run with scripts/vm-test"]
fn kernel_transfer_a_layer_and_its_changes_between_two_daemons() {
    let _dm = require_dm_thin();
    for fs in FILESYSTEMS {
        let a = TestDaemon::start(&format!("xfer-a-{fs}"), &config(fs));
        let b = TestDaemon::start(&format!("xfer-b-{fs}"), &config(fs));
        a.json(&["layer", "create", "base"]);
        write_files(
            &a,
            "base",
            &[
                ("big", pseudo_random(24 << 20, 1)),
                ("keep", b"base".to_vec()),
            ],
        );
        a.json(&["layer", "commit", "base"]);
        a.json(&["layer", "create", "app", "--parent", "base"]);
        write_files(
            &a,
            "app",
            &[
                ("new", pseudo_random(8 << 20, 2)),
                ("keep", b"app".to_vec()),
            ],
        );
        a.json(&["layer", "commit", "app"]);

        // The base through a file, the changes through a pipe (compressed), as two hosts would.
        let whole = a.pool.dir.path().join("base.stream");
        let run = a.cli(&[
            "layer",
            "export",
            "base",
            "--output",
            whole.to_str().unwrap(),
        ]);
        assert_eq!(run.code, 0, "{run:?}");
        let run = b.cli(&[
            "layer",
            "import",
            "base",
            "--input",
            whole.to_str().unwrap(),
        ]);
        assert_eq!(run.code, 0, "{run:?}");
        let mut export = command_at(&a.socket)
            .args(["layer", "export", "app", "--from", "base", "--compress"])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let import = command_at(&b.socket)
            .args(["layer", "import", "app", "--parent", "base"])
            .stdin(export.stdout.take().unwrap())
            .output()
            .unwrap();
        assert!(export.wait().unwrap().success(), "{fs}: export");
        assert!(
            import.status.success(),
            "{fs}: {}",
            String::from_utf8_lossy(&import.stderr)
        );

        for layer in ["base", "app"] {
            assert_eq!(
                device_digest(&a, layer),
                device_digest(&b, layer),
                "{fs}: {layer} differs between the two pools"
            );
        }
        let files = read_files(&b, "app");
        assert_eq!(files["keep"], b"app");
        assert_eq!(files["new"], pseudo_random(8 << 20, 2));
        assert_eq!(files["big"], pseudo_random(24 << 20, 1));

        // The changes are what changed: the 8 MiB written and the filesystem's own blocks
        // (its journal or log among them), not the 24 MiB of the base.
        let changes = a.pool.dir.path().join("app.stream");
        let full = a.pool.dir.path().join("app-full.stream");
        let run = a.cli(&[
            "layer",
            "export",
            "app",
            "--from",
            "base",
            "--output",
            changes.to_str().unwrap(),
        ]);
        assert_eq!(run.code, 0, "{run:?}");
        let run = a.cli(&["layer", "export", "app", "--output", full.to_str().unwrap()]);
        assert_eq!(run.code, 0, "{run:?}");
        let (changes, full) = (file_size(&changes), file_size(&full));
        eprintln!("{fs}: full stream {full} bytes, changes since base {changes} bytes");
        assert!(changes >= 8 << 20, "{fs}: {changes}");
        assert!(changes + (20 << 20) < full, "{fs}: {changes} of {full}");

        // A stream made against other content is refused on a pool that lacks it.
        b.json(&["layer", "create", "other"]);
        b.json(&["layer", "commit", "other"]);
        let run = b.cli(&[
            "layer",
            "import",
            "x",
            "--parent",
            "other",
            "--input",
            whole.to_str().unwrap(),
        ]);
        assert_eq!(run.code, 1, "{run:?}");
        let layers = b.json(&["layer", "list"]);
        assert_eq!(layers.as_array().unwrap().len(), 3, "{layers}");
    }
}

#[test]
#[ignore = "needs root and dm-thin: run with scripts/vm-test"]
fn kernel_transfer_a_mounted_layer_is_checkpointed_and_reset() {
    let _dm = require_dm_thin();
    for fs in FILESYSTEMS {
        let d = TestDaemon::start(&format!("reset-{fs}"), &config(fs));
        d.json(&["layer", "create", "base"]);
        write_files(&d, "base", &[("base", b"base".to_vec())]);
        d.json(&["layer", "commit", "base"]);
        d.json(&[
            "layer", "create", "work", "--parent", "base", "--label", "job=1",
        ]);

        // Checkpointed while mounted and written: the checkpoint holds what was written.
        let mounted = d.json(&["layer", "mount", "work"]);
        let dir = std::path::PathBuf::from(mounted["mount_point"].as_str().unwrap());
        std::fs::write(dir.join("a"), b"first").unwrap();
        let checkpoint = d.json(&["layer", "checkpoint", "work", "cp1"]);
        assert_eq!(checkpoint["checkpoint_of"], "work");
        std::fs::write(dir.join("b"), b"second").unwrap();
        let busy = d.cli(&["layer", "reset", "work", "--to", "cp1"]);
        assert_eq!(busy.code, 5, "{fs}: a mounted layer is busy: {busy:?}");
        d.json(&["layer", "unmount", "work"]);

        let names = |files: std::collections::BTreeMap<String, Vec<u8>>| -> Vec<String> {
            files.into_keys().collect()
        };
        assert_eq!(names(read_files(&d, "cp1")), ["a", "base"], "{fs}");
        let reset = d.json(&["layer", "reset", "work", "--to", "cp1"]);
        assert_eq!(reset["labels"]["job"], "1");
        assert_eq!(names(read_files(&d, "work")), ["a", "base"], "{fs}");
        d.json(&["layer", "reset", "work"]);
        assert_eq!(names(read_files(&d, "work")), ["base"], "{fs}");
        // Writable again after the reset, and a checkpoint is no child: work stays free.
        write_files(&d, "work", &[("c", b"third".to_vec())]);
        assert_eq!(names(read_files(&d, "work")), ["base", "c"], "{fs}");

        // After the answer, the daemon made a spare (a snapshot of the parent): the next
        // reset to the parent takes it, and holds the parent's files.
        let spare = wait_for_spare(&d, "work");
        let reset = d.json(&["layer", "reset", "work"]);
        assert_eq!(reset["thin_id"], spare, "{fs}: the spare taken");
        assert_eq!(names(read_files(&d, "work")), ["base"], "{fs}");
        write_files(&d, "work", &[("c", b"third".to_vec())]);
        let doctor = d.cli(&["pool", "doctor"]);
        assert_eq!(doctor.code, 0, "{fs}: {doctor:?}");

        // Committed, the layer is never reset again: its spare's device is deleted.
        let spare = wait_for_spare(&d, "work");
        let committed = d.json(&["layer", "commit", "work"]);
        assert!(committed.get("reset_spare").is_none(), "{fs}: {committed}");
        let spare = spare.as_u64().unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
        while d.pool_thin_ids().contains(&spare) {
            assert!(
                std::time::Instant::now() < deadline,
                "{fs}: the spare {spare} still in the pool 120 s after the commit"
            );
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
        assert_eq!(names(read_files(&d, "work")), ["base", "c"], "{fs}");
        let run = d.cli(&["layer", "remove", "work"]);
        assert_eq!(run.code, 0, "{run:?}");
        assert_eq!(names(read_files(&d, "cp1")), ["a", "base"], "{fs}");
    }
}

/// The spare the daemon makes for `layer`'s next reset, once it has one (it is made after a
/// reset's answer, by the deferred work).
fn wait_for_spare(d: &TestDaemon, layer: &str) -> serde_json::Value {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    loop {
        let inspected = d.json(&["layer", "inspect", layer]);
        if let Some(spare) = inspected.get("reset_spare") {
            return spare.clone();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no spare for {layer} after 120 s: {inspected}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}
