//! The trust boundary on the real kernel (issue 15): what a socket client can make root do.
//! Mount targets are confined and reached through no symbolic link, a layer unmounts only its
//! own mount, mount records follow the mount table, and crossing requests never hang.

mod common;

use std::path::{Path, PathBuf};

use common::daemon::TestDaemon;
use common::{require_dm_thin, unmount_by_hand, EVENTUALLY};
use serde_json::Value;
use thinstack::api::CreateRequest;

const SMALL: &str = "[layers]\nbase_size = \"64M\"\n";

/// The per-mount options (`nodev`, `nosuid`, ...) of the top mount at `target`, if any.
fn mount_options_at(target: &Path) -> Option<Vec<String>> {
    let table = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    table
        .lines()
        .rfind(|line| line.split(' ').nth(4) == Some(&*target.to_string_lossy()))
        .map(|line| {
            line.split(' ')
                .nth(5)
                .unwrap()
                .split(',')
                .map(str::to_string)
                .collect()
        })
}

/// The mountinfo lines of mounts at `target` (a test VM may have mounts at /etc already).
fn mounts_at(target: &Path) -> Vec<String> {
    let table = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    table
        .lines()
        .filter(|line| line.split(' ').nth(4) == Some(&*target.to_string_lossy()))
        .map(str::to_string)
        .collect()
}

/// The mount root the test config allows (`layers.mount_roots`).
fn mount_root(d: &TestDaemon) -> PathBuf {
    let root = d.pool.config.layers.mount_roots[0].path().to_path_buf();
    std::fs::create_dir_all(&root).unwrap();
    root
}

#[test]
#[ignore = "needs root and dm-thin: run with scripts/vm-test"]
fn kernel_mount_targets_are_confined_and_never_reached_through_a_link() {
    let _dm = require_dm_thin();
    let d = TestDaemon::start("targets", SMALL);
    d.json(&["layer", "create", "a"]);
    let root = mount_root(&d);
    let state_dir = d.pool.config.state_dir.path().to_path_buf();
    std::fs::create_dir_all(root.join("real")).unwrap();
    std::os::unix::fs::symlink("/etc", root.join("to-etc")).unwrap();
    std::os::unix::fs::symlink(root.join("real"), root.join("to-real")).unwrap();
    std::fs::create_dir_all(root.join("full")).unwrap();
    std::fs::write(root.join("full/keep"), b"mine").unwrap();

    let etc_before = mounts_at(Path::new("/etc"));
    let refused = [
        ("/etc".to_string(), 8, "layers.mount_roots"),
        ("/".to_string(), 8, "root of the file system"),
        (state_dir.display().to_string(), 8, "state directory"),
        (format!("{}/mnt", state_dir.display()), 8, "state directory"),
        (root.display().to_string(), 8, "layers.mount_roots"),
        (
            root.join("to-etc").display().to_string(),
            8,
            "symbolic link",
        ),
        (
            root.join("to-real").display().to_string(),
            8,
            "symbolic link",
        ),
        (root.join("full").display().to_string(), 5, "not empty"),
        (
            root.join("missing").display().to_string(),
            3,
            "does not exist",
        ),
    ];
    for (target, code, says) in &refused {
        let run = d.cli(&["layer", "mount", "a", "--target", target]);
        assert_eq!(run.code, *code, "{target}: {run:?}");
        assert!(run.stderr.contains(says), "{target}: {run:?}");
    }
    // Refusals changed nothing: no mount recorded, not even the device activated.
    let layer = d.json(&["layer", "inspect", "a"]);
    assert!(
        layer["mounts"].as_object().is_none_or(|m| m.is_empty()),
        "{layer}"
    );
    assert!(layer["device"].is_null(), "{layer}");
    assert_eq!(
        mounts_at(Path::new("/etc")),
        etc_before,
        "/etc was mounted over"
    );
    assert_eq!(std::fs::read(root.join("full/keep")).unwrap(), b"mine");

    // Allowed: beneath the mount root, nodev and nosuid.
    let place = root.join("real");
    let mounted = d.json(&["layer", "mount", "a", "--target", place.to_str().unwrap()]);
    assert_eq!(mounted["mount_point"], place.to_str().unwrap());
    let options = mount_options_at(&place).expect("mounted");
    assert!(
        options.contains(&"nodev".to_string()) && options.contains(&"nosuid".to_string()),
        "{options:?}"
    );

    // Something mounted on top by hand is not the layer's: unmount refuses and leaves it.
    nix::mount::mount(
        Some("tmpfs"),
        &place,
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .unwrap();
    let run = d.cli(&["layer", "unmount", "a", "--target", place.to_str().unwrap()]);
    assert_eq!(run.code, 8, "{run:?}");
    assert!(run.stderr.contains("only its own mounts"), "{run:?}");
    assert_eq!(mount_options_at(&place).map(|_| ()), Some(()));
    unmount_by_hand(&place).unwrap();
    let run = d.cli(&["layer", "unmount", "a", "--target", place.to_str().unwrap()]);
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(mount_options_at(&place), None);
}

#[test]
#[ignore = "needs root and dm-thin: run with scripts/vm-test"]
fn kernel_a_mount_unmounted_by_hand_is_mounted_again_not_counted() {
    let _dm = require_dm_thin();
    let d = TestDaemon::start("remount", SMALL);
    d.json(&["layer", "create", "a"]);
    let target = PathBuf::from(d.cli(&["layer", "mount", "a"]).stdout.trim());
    std::fs::write(target.join("in-the-layer"), b"data").unwrap();
    std::fs::File::open(target.join("in-the-layer"))
        .unwrap()
        .sync_all()
        .unwrap();
    unmount_by_hand(&target).unwrap();

    // The record still lists the mount; the kernel does not. Mounting again must mount.
    let again = d.cli(&["layer", "mount", "a"]);
    assert_eq!(again.code, 0, "{again:?}");
    assert_eq!(
        std::fs::read(target.join("in-the-layer")).unwrap(),
        b"data",
        "the layer is really mounted at {}",
        target.display()
    );
    let layer = d.json(&["layer", "inspect", "a"]);
    assert_eq!(
        layer["mounts"][target.to_str().unwrap()]["refs"],
        1,
        "{layer}"
    );

    // Unmounted by hand again: unmount drops the record and succeeds.
    unmount_by_hand(&target).unwrap();
    let run = d.cli(&["layer", "unmount", "a"]);
    assert_eq!(run.code, 0, "{run:?}");
    let layer = d.json(&["layer", "inspect", "a"]);
    assert!(
        layer["mounts"].as_object().is_none_or(|m| m.is_empty()),
        "{layer}"
    );
    assert_eq!(d.cli(&["layer", "remove", "a"]).code, 0);
}

#[test]
#[ignore = "needs root and dm-thin: run with scripts/vm-test"]
fn kernel_creates_that_name_each_other_as_parent_always_answer() {
    let _dm = require_dm_thin();
    let d = TestDaemon::start("crossing", SMALL);
    d.json(&["layer", "create", "base"]);
    let (done, finished) = std::sync::mpsc::channel();
    for (name, parent) in [("x", "y"), ("y", "x")] {
        let (socket, done) = (d.socket.clone(), done.clone());
        std::thread::spawn(move || {
            let mut client = thinstack::client::Client::new(&socket);
            for _ in 0..300 {
                let request = CreateRequest {
                    name: name.into(),
                    parent: Some(parent.into()),
                    ..CreateRequest::default()
                };
                let refused = client.post::<Value>("/v1/layers", &request).unwrap_err();
                assert_eq!(
                    refused.kind(),
                    Some(thinstack::ErrorKind::NotFound),
                    "{refused}"
                );
            }
            done.send(()).unwrap();
        });
    }
    for _ in 0..2 {
        finished
            .recv_timeout(EVENTUALLY)
            .unwrap_or_else(|_| panic!("crossing creates hung:\n{}", d.log_text()));
    }
    // The daemon still serves.
    d.json(&["layer", "create", "after", "--parent", "base"]);
}

/// Start-up never deletes a layer whose record went missing: moved aside and back, the layer
/// and its file are there; lost for good, `pool doctor` names its thin device, `--repair`
/// keeps it, and `--adopt` gives it back.
#[test]
#[ignore = "needs root and dm-thin: run with scripts/vm-test"]
fn kernel_a_layer_whose_record_is_moved_aside_survives_restarts_and_can_be_adopted() {
    let _dm = require_dm_thin();
    let mut d = TestDaemon::start("aside", SMALL);
    let id = d.json(&["layer", "create", "keep"])["thin_id"]
        .as_u64()
        .unwrap();
    let mnt = PathBuf::from(d.cli(&["layer", "mount", "keep"]).stdout.trim());
    std::fs::write(mnt.join("file"), b"kept across restarts").unwrap();
    std::fs::File::open(mnt.join("file"))
        .unwrap()
        .sync_all()
        .unwrap();
    assert_eq!(d.cli(&["layer", "unmount", "keep"]).code, 0);
    let record = d.pool.config.state_dir.path().join("layers/keep.json");
    let aside = d.pool.dir.path().join("keep.json.aside");

    let restart_without_record = |d: &mut TestDaemon| {
        assert_eq!(d.stop(), 0);
        std::fs::rename(&record, &aside).unwrap();
        d.spawn();
        assert_eq!(d.cli(&["layer", "inspect", "keep"]).code, 3);
    };
    restart_without_record(&mut d);
    let listed = d.cli(&["--json", "pool", "doctor"]);
    assert_eq!(listed.code, 1, "{listed:?}");
    let finding = listed.json()["findings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["kind"] == "thin_device")
        .cloned()
        .unwrap_or_else(|| panic!("{listed:?}"));
    assert_eq!(finding["subject"], id.to_string());
    assert_eq!(finding["status"], "needs_operator");
    assert!(
        finding["detail"].as_str().unwrap().contains("--adopt"),
        "{finding}"
    );
    let repaired = d.cli(&["--json", "pool", "doctor", "--repair"]);
    assert!(repaired.stdout.contains("needs_operator"), "{repaired:?}");

    // Put back, the layer is whole.
    assert_eq!(d.stop(), 0);
    std::fs::rename(&aside, &record).unwrap();
    d.spawn();
    let mnt = PathBuf::from(d.cli(&["layer", "mount", "keep"]).stdout.trim());
    assert_eq!(
        std::fs::read(mnt.join("file")).unwrap(),
        b"kept across restarts"
    );
    assert_eq!(d.cli(&["layer", "unmount", "keep"]).code, 0);

    // Lost for good: adopted under a new name, with its size and filesystem.
    restart_without_record(&mut d);
    let id_text = id.to_string();
    let adopted = d.json(&["pool", "doctor", "--adopt", &id_text, "again"]);
    assert_eq!(adopted["thin_id"].as_u64(), Some(id), "{adopted}");
    assert_eq!(adopted["size"], "64M", "{adopted}");
    assert_eq!(adopted["filesystem"], "ext4", "{adopted}");
    let mnt = PathBuf::from(d.cli(&["layer", "mount", "again"]).stdout.trim());
    assert_eq!(
        std::fs::read(mnt.join("file")).unwrap(),
        b"kept across restarts"
    );
    assert_eq!(d.cli(&["layer", "unmount", "again"]).code, 0);
    let after = d.cli(&["pool", "doctor"]);
    assert_eq!(after.code, 0, "{after:?}");
    // The old record put back beside its adopted twin: start-up refuses, and says why.
    assert_eq!(d.stop(), 0);
    std::fs::copy(&aside, &record).unwrap();
    let (code, log) = d.start_refused();
    assert_ne!(code, 0);
    assert!(log.contains("both claim thin device"), "{log}");
    std::fs::remove_file(&record).unwrap();
    d.spawn();
    assert_eq!(
        d.json(&["layer", "remove", "again"])["removed"][0]["result"],
        "removed"
    );
}
