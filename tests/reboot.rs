//! Reboot (issue 7, item 3): records and pool survive a power cut, and the next start
//! activates again what was active. Two phases, each in its own boot, run by
//! `scripts/reboot-test` on a state directory that outlives the VM (`THINSTACK_REBOOT_DIR`):
//!
//! 1. make layers (active, mounted with a file written, inactive, committed), write down what
//!    clients were told, and cut the power (sysrq `o`: no unmount, no sync, thinstackd running).
//!    On a host that has dm-thin itself, where the machine cannot be cut, a reboot is imitated
//!    instead: SIGKILL, then every mount, dm device and loop device of the pool is taken down.
//! 2. start again: every layer is there with its thin id, what was active is active, mounts
//!    are gone from the records, every fsynced file reads back, `pool doctor` finds nothing,
//!    `pool check` is clean, and the records match `thin_ls`.
//!
//! Not named `kernel_*`: `scripts/vm-test` must not run the phases on their own.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use common::daemon::cli_at;
use common::{require_dm_thin, wait_until};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use thinstack::client::Client;

/// What clients were told before the power went.
#[derive(Debug, Serialize, Deserialize)]
struct Expected {
    pool: String,
    layers: BTreeMap<String, Told>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Told {
    thin_id: u64,
    active: bool,
    committed: bool,
    /// The file written (and fsynced) in it.
    file: Option<Vec<u8>>,
}

fn reboot_dir() -> PathBuf {
    let dir = std::env::var("THINSTACK_REBOOT_DIR")
        .expect("THINSTACK_REBOOT_DIR: run the phases with scripts/reboot-test");
    PathBuf::from(dir)
}

fn socket() -> PathBuf {
    PathBuf::from("/run/thinstack-reboot/api.sock")
}

fn config_path(dir: &Path) -> PathBuf {
    dir.join("thinstack.toml")
}

fn start_daemon(dir: &Path) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("thinstackd.log"))
        .unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_thinstackd"))
        .arg("--config")
        .arg(config_path(dir))
        .env("RUST_LOG", "info")
        .stderr(log)
        .spawn()
        .unwrap();
    wait_until(
        "thinstackd to answer",
        || Client::new(&socket()).get::<Value>("/v1/version").is_ok(),
        || std::fs::read_to_string(dir.join("thinstackd.log")).unwrap_or_default(),
    );
    child
}

fn json(args: &[&str]) -> Value {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let run = cli_at(&socket(), &all);
    assert_eq!(run.code, 0, "thinstack {args:?}: {run:?}");
    run.json()
}

fn write_synced(path: &Path, bytes: &[u8]) {
    let mut file = std::fs::File::create(path).unwrap();
    file.write_all(bytes).unwrap();
    file.sync_all().unwrap();
    std::fs::File::open(path.parent().unwrap())
        .unwrap()
        .sync_all()
        .unwrap();
}

/// Whether this runs in the test VM (virtme-ng), whose power can be cut.
fn in_test_vm() -> bool {
    std::fs::read_to_string("/proc/cmdline").is_ok_and(|line| line.contains("virtme"))
}

#[test]
#[ignore = "phase 1 of scripts/reboot-test"]
fn reboot_phase_1_make_layers_then_cut_the_power() {
    let _dm = require_dm_thin();
    let dir = reboot_dir();
    let pool = format!("reboot{}", std::process::id());
    let config = format!(
        "state_dir = {:?}\nsocket = {:?}\n[pool]\nname = {pool:?}\n[pool.loop]\ndata_size = \"2G\"\nmetadata_size = \"64M\"\n[layers]\nbase_size = \"64M\"\n",
        dir.join("state").display().to_string(),
        socket().display().to_string(),
    );
    std::fs::write(config_path(&dir), config).unwrap();
    let mut daemon = start_daemon(&dir);

    let mut told = BTreeMap::new();
    // Whether a layer is active is what the API says (a mount leaves the device active).
    let mut tell = |name: &str, active: bool, committed: bool, file: Option<Vec<u8>>| {
        let layer = json(&["layer", "inspect", name]);
        let thin_id = layer["thin_id"].as_u64().unwrap();
        assert_eq!(!layer["device"].is_null(), active, "{name}: {layer}");
        told.insert(
            name.to_string(),
            Told {
                thin_id,
                active,
                committed,
                file,
            },
        );
    };
    let content = |seed: u8| -> Vec<u8> { (0..65536u32).map(|i| (i as u8) ^ seed).collect() };

    json(&["layer", "create", "base"]);
    let target = json(&["layer", "mount", "base"])["mount_point"]
        .as_str()
        .unwrap()
        .to_string();
    write_synced(&Path::new(&target).join("file"), &content(1));
    json(&["layer", "unmount", "base"]);
    json(&["layer", "commit", "base"]);
    tell("base", true, true, Some(content(1)));

    json(&["layer", "create", "active", "--parent", "base"]);
    json(&["layer", "activate", "active"]);
    tell("active", true, false, Some(content(1)));

    json(&["layer", "create", "mounted", "--parent", "base"]);
    let target = json(&["layer", "mount", "mounted"])["mount_point"]
        .as_str()
        .unwrap()
        .to_string();
    write_synced(&Path::new(&target).join("file"), &content(2));
    tell("mounted", true, false, Some(content(2)));

    json(&["layer", "create", "idle", "--parent", "base"]);
    json(&["layer", "deactivate", "base"]);
    tell("idle", false, false, Some(content(1)));
    tell("base", false, true, Some(content(1)));

    json(&["layer", "create", "committed-active", "--parent", "base"]);
    json(&["layer", "commit", "committed-active"]);
    json(&["layer", "activate", "committed-active"]);
    tell("committed-active", true, true, Some(content(1)));

    let expected = Expected { pool, layers: told };
    write_synced(
        &dir.join("expected.json"),
        &serde_json::to_vec_pretty(&expected).unwrap(),
    );
    if in_test_vm() {
        eprintln!(
            "reboot: phase 1 done; cutting the power with thinstackd running and a layer mounted"
        );
        std::fs::write("/proc/sys/kernel/sysrq", "1").unwrap();
        write_synced(&dir.join("phase1.done"), b"power cut\n");
        std::fs::write("/proc/sysrq-trigger", "o").unwrap();
        std::thread::sleep(Duration::from_secs(60));
        panic!("the power cut did not happen");
    }
    imitate_reboot(&mut daemon, &expected.pool, &dir);
    write_synced(&dir.join("phase1.done"), b"imitated\n");
}

/// Where the machine cannot be cut: what a reboot takes away, taken away by hand.
fn imitate_reboot(daemon: &mut Child, pool: &str, dir: &Path) {
    let _ = daemon.kill();
    let _ = daemon.wait();
    for target in common::mounts_under(&dir.join("state")).into_iter().rev() {
        common::unmount_by_hand(&target).unwrap();
    }
    let dm = thinstack::kernel::dm::Dm::open().unwrap();
    let prefix = format!("thinstack-1-{pool}-");
    let mut names: Vec<_> = dm.list_with_prefix(&prefix).unwrap();
    names.sort_by_key(|n| n.to_string().ends_with("-pool")); // thin devices first
    for name in names {
        dm.remove_device(&name, thinstack::kernel::dm::Udev::Wait)
            .unwrap();
    }
    for file in ["data", "metadata"] {
        let path = dir.join("state/loop").join(file);
        if let Some(device) = thinstack::kernel::loopdev::find_attached(&path).unwrap() {
            thinstack::kernel::loopdev::detach(&device).unwrap();
        }
    }
}

#[test]
#[ignore = "phase 2 of scripts/reboot-test"]
fn reboot_phase_2_everything_is_back() {
    let _dm = require_dm_thin();
    let dir = reboot_dir();
    assert!(dir.join("phase1.done").exists(), "phase 1 did not finish");
    let expected: Expected =
        serde_json::from_slice(&std::fs::read(dir.join("expected.json")).unwrap()).unwrap();
    let mut daemon = start_daemon(&dir);

    let layers = json(&["layer", "list"]);
    let by_name: BTreeMap<String, Value> = layers
        .as_array()
        .unwrap()
        .iter()
        .map(|l| (l["name"].as_str().unwrap().to_string(), l.clone()))
        .collect();
    assert_eq!(
        by_name.keys().collect::<Vec<_>>(),
        expected.layers.keys().collect::<Vec<_>>()
    );
    for (name, told) in &expected.layers {
        let layer = &by_name[name];
        assert_eq!(layer["thin_id"].as_u64(), Some(told.thin_id), "{name}");
        assert_eq!(layer["state"], "ready", "{name}");
        assert_eq!(layer["committed"], told.committed, "{name}");
        assert_eq!(!layer["device"].is_null(), told.active, "{name}: {layer}");
        assert_eq!(
            layer["mounts"],
            serde_json::json!({}),
            "{name}: mounts end with the boot"
        );
    }
    for (name, told) in &expected.layers {
        let Some(file) = &told.file else { continue };
        let target = json(&["layer", "mount", name, "--readonly"])["mount_point"]
            .as_str()
            .unwrap()
            .to_string();
        let read = std::fs::read(Path::new(&target).join("file")).unwrap();
        assert!(read == *file, "{name}: the file differs after the reboot");
        json(&["layer", "unmount", name]);
    }
    assert_eq!(json(&["pool", "doctor"])["findings"], serde_json::json!([]));
    let check = cli_at(&socket(), &["pool", "check"]);
    assert_eq!(check.code, 0, "{check:?}");
    assert_thin_ls_agrees(&dir, &expected);

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(daemon.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert!(daemon.wait().unwrap().success());
    imitate_reboot(&mut daemon, &expected.pool, &dir);
    eprintln!(
        "reboot: {} layers back with their thin ids, {} active again, every file equal",
        expected.layers.len(),
        expected.layers.values().filter(|t| t.active).count()
    );
}

fn assert_thin_ls_agrees(dir: &Path, expected: &Expected) {
    let pool = format!("thinstack-1-{}-pool", expected.pool);
    let metadata = thinstack::kernel::loopdev::find_attached(&dir.join("state/loop/metadata"))
        .unwrap()
        .unwrap();
    let told: BTreeSet<u64> = expected.layers.values().map(|t| t.thin_id).collect();
    assert_eq!(
        common::thin_ls_ids(&pool, &metadata),
        told,
        "thin_ls vs what clients were told"
    );
}
