//! The production backends on the real kernel, with loop devices standing in for disks:
//! direct-LVM from a blank disk (vgchange, restart, add-device, destroy), the safety checks on
//! a disk that holds a filesystem, LVM pool extension until the volume group is full, an
//! adopted pool (empty, non-empty, read-only), a pool on raw devices, and a pool flagged
//! `needs_check`.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};

use common::daemon::TestDaemon;
use common::disks::{lvm, lvm_ok, run_ok, volume_group_name, TestDisk, VolumeGroupGuard};
use common::require_dm_thin;
use serde_json::Value;
use thinstack::kernel::dm::Dm;
use thinstack::units::ByteSize;

const DEACTIVATE_ON_STOP: &str = "[daemon]\ndeactivate_on_shutdown = true\n";

fn lvm_config(vg: &str, disks: &[&TestDisk], extra: &str) -> String {
    let devices: Vec<String> = disks.iter().map(|d| format!("{:?}", d.name())).collect();
    format!(
        "[pool]\nbackend = \"lvm\"\n[pool.lvm]\ndevices = [{}]\nvolume_group = {vg:?}\n{extra}\n[layers]\nbase_size = \"64M\"\n{DEACTIVATE_ON_STOP}",
        devices.join(", ")
    )
}

/// Write `megabytes` MiB into `dir/name` and fsync it.
fn write_file(dir: &Path, name: &str, megabytes: usize) {
    let mut file = std::fs::File::create(dir.join(name)).unwrap();
    let chunk = vec![0x5au8; 1 << 20];
    for _ in 0..megabytes {
        file.write_all(&chunk).unwrap();
    }
    file.sync_all().unwrap();
}

fn mount(d: &TestDaemon, layer: &str) -> PathBuf {
    let run = d.cli(&["layer", "mount", layer]);
    assert_eq!(run.code, 0, "mount {layer}: {run:?}");
    PathBuf::from(run.stdout.trim())
}

fn unmount(d: &TestDaemon, layer: &str) {
    let run = d.cli(&["layer", "unmount", layer]);
    assert_eq!(run.code, 0, "unmount {layer}: {run:?}");
}

fn layer_names(d: &TestDaemon) -> Vec<String> {
    let list = d.json(&["layer", "list"]);
    list.as_array()
        .unwrap()
        .iter()
        .map(|l| l["name"].as_str().unwrap().to_string())
        .collect()
}

/// `thinstackd --check-pool` while the daemon is stopped: what it printed (it must pass).
fn check_pool_offline(d: &TestDaemon) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_thinstackd"))
        .arg("--config")
        .arg(&d.config_path)
        .arg("--check-pool")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "--check-pool failed: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

fn vg_exists(vg: &str) -> bool {
    lvm(&["vgs", vg]).status.success()
}

/// A base layer with a file, committed, and a child of it.
fn make_layers(d: &TestDaemon) {
    d.json(&["layer", "create", "base"]);
    let dir = mount(d, "base");
    std::fs::write(dir.join("hello"), b"kept").unwrap();
    unmount(d, "base");
    d.json(&["layer", "commit", "base"]);
    d.json(&["layer", "create", "child", "--parent", "base"]);
}

fn layers_intact(d: &TestDaemon) {
    assert_eq!(layer_names(d), ["base", "child"]);
    let dir = mount(d, "child");
    assert_eq!(std::fs::read(dir.join("hello")).unwrap(), b"kept");
    unmount(d, "child");
}

#[test]
#[ignore = "needs root and dm-thin: scripts/vm-test"]
fn direct_lvm_from_a_blank_disk_survives_vgchange_and_restarts_and_is_destroyed_cleanly() {
    require_dm_thin();
    let scratch = tempfile::tempdir().unwrap();
    let disk = TestDisk::new(scratch.path(), "disk1", ByteSize::mib(256));
    let second = TestDisk::new(scratch.path(), "disk2", ByteSize::mib(128));
    let vg = volume_group_name("a");
    let _guard = VolumeGroupGuard(vg.clone());
    let mut d = TestDaemon::start("lvm", &lvm_config(&vg, &[&disk], ""));

    let status = d.json(&["pool", "status"]);
    assert_eq!(status["pool"]["backend"], "lvm", "{status}");
    assert_eq!(status["pool"]["block_size"], "512K", "{status}");
    // pool.when_full = "auto" with autoextension: "queue" reached LVM and the kernel.
    assert_eq!(status["health"]["when_full"], "queue", "{status}");
    let when_full = lvm_ok(&[
        "lvs",
        "--noheadings",
        "-o",
        "lv_when_full",
        &format!("{vg}/{}", d.pool.config.pool.name),
    ]);
    assert_eq!(String::from_utf8_lossy(&when_full.stdout).trim(), "queue");
    assert!(
        disk.probe().contains("TYPE=LVM2_member"),
        "{}",
        disk.probe()
    );
    let check = d.json(&["pool", "check"]);
    assert_eq!(check["clean"], true, "{check}");
    make_layers(&d);

    // Deactivated and re-activated by hand while thinstackd is down.
    assert_eq!(d.stop(), 0, "{}", d.log_text());
    let pool_dm = thinstack::kernel::lvm::dm_name(&vg, d.pool.config.pool.name.as_str());
    lvm_ok(&["vgchange", "-an", &vg]);
    assert!(!Path::new("/dev/mapper").join(&pool_dm).exists());
    let offline = check_pool_offline(&d);
    assert!(
        offline.contains("clean") && offline.contains("(inactive)"),
        "{offline}"
    );
    lvm_ok(&["vgchange", "-ay", &vg]);
    let offline = check_pool_offline(&d);
    assert!(
        offline.contains("clean") && offline.contains("snapshot"),
        "{offline}"
    );
    d.spawn();
    layers_intact(&d);

    // After a "reboot": the VG is inactive and thinstackd activates it.
    assert_eq!(d.stop(), 0);
    lvm_ok(&["vgchange", "-an", &vg]);
    d.spawn();
    layers_intact(&d);
    assert!(d.log_text().contains("activated the LVM thin pool"));

    // The pool's own devices are never added, with or without force: a layer's device (also
    // through a symbolic link), the pool device, the disk under it.
    let layer_device = d
        .cli(&["layer", "activate", "base"])
        .stdout
        .trim()
        .to_string();
    let link = scratch.path().join("innocent-looking");
    std::os::unix::fs::symlink(&layer_device, &link).unwrap();
    let pool_device = d.json(&["pool", "status"])["pool"]["device"]
        .as_str()
        .unwrap()
        .to_string();
    for own in [
        layer_device.as_str(),
        link.to_str().unwrap(),
        pool_device.as_str(),
        disk.name().as_str(),
    ] {
        let refused = d.cli(&["pool", "add-device", own, "--force"]);
        assert_eq!(refused.code, 8, "{own}: {refused:?}");
        assert!(
            refused.stderr.contains("never adds the pool's own devices"),
            "{own}: {refused:?}"
        );
    }
    assert_eq!(
        d.json(&["layer", "deactivate", "base"])["done"],
        "deactivated"
    );
    layers_intact(&d);

    // A second disk grows the volume group.
    let added = d.json(&["pool", "add-device", &second.name()]);
    assert!(added["volume_group_free"].is_string(), "{added}");
    let pvs = lvm(&[
        "pvs",
        "--noheadings",
        "-o",
        "pv_name",
        "--select",
        &format!("vg_name={vg}"),
    ]);
    assert_eq!(String::from_utf8_lossy(&pvs.stdout).lines().count(), 2);
    let extended = d.json(&["pool", "extend", "--data", "300M"]);
    assert_eq!(extended["data"], "300M", "{extended}");

    // Settings that made the pool cannot change.
    assert_eq!(d.stop(), 0);
    let made = d.pool.config.clone();
    d.pool.config.pool.lvm.data_percent = thinstack::units::Percent::new(50).unwrap();
    d.write_config();
    let (code, stderr) = d.start_refused();
    assert_ne!(code, 0);
    assert!(
        stderr.contains("pool.lvm.data_percent was 95%, config says 50%")
            && stderr.contains("thinstack pool destroy"),
        "{stderr}"
    );
    d.pool.config = made;
    d.write_config();
    d.spawn();

    // Destroy: refused while layers exist, then everything thinstack made is gone.
    let refused = d.cli(&["pool", "destroy"]);
    assert_eq!(refused.code, 5, "{refused:?}");
    assert!(refused.stderr.contains("2 layer(s)"), "{refused:?}");
    let destroyed = d.json(&["pool", "destroy", "--force"]);
    assert_eq!(destroyed["layers_removed"], 2, "{destroyed}");
    assert_eq!(d.wait_exit(), 0, "{}", d.log_text());
    assert!(!vg_exists(&vg), "the volume group is left");
    assert_eq!(disk.probe(), "", "the disk still carries a signature");
    assert_eq!(
        second.probe(),
        "",
        "the added disk still carries a signature"
    );
    let state = d.pool.config.state_dir.path();
    assert!(!state.join("pool.json").exists());
    assert!(!Path::new("/etc/lvm/profile")
        .join(format!("thinstack-{}.profile", d.pool.config.pool.name))
        .exists());
}

#[test]
#[ignore = "needs root and dm-thin: scripts/vm-test"]
fn a_disk_with_a_filesystem_is_refused_untouched_and_taken_with_force() {
    require_dm_thin();
    let scratch = tempfile::tempdir().unwrap();
    let disk = TestDisk::new(scratch.path(), "disk", ByteSize::mib(128));
    run_ok("mkfs.ext4", &["-q", &disk.name()]);
    let fs_mount = scratch.path().join("fs");
    std::fs::create_dir(&fs_mount).unwrap();
    run_ok("mount", &[&disk.name(), fs_mount.to_str().unwrap()]);
    std::fs::write(fs_mount.join("precious"), b"data").unwrap();
    // Mounted: refused even when forced.
    let vg = volume_group_name("b");
    let _guard = VolumeGroupGuard(vg.clone());
    let mut d = TestDaemon::prepare("sig", &lvm_config(&vg, &[&disk], "force = true"));
    let (code, stderr) = d.start_refused();
    assert_ne!(code, 0);
    assert!(
        stderr.contains(&format!("{} is mounted at", disk.name())),
        "{stderr}"
    );
    run_ok("umount", &[fs_mount.to_str().unwrap()]);

    // A signature without force: refused, nothing changed.
    d.pool.config.pool.lvm.force = false;
    d.write_config();
    let before = disk.fingerprint();
    let (code, stderr) = d.start_refused();
    assert_ne!(code, 0);
    assert!(
        stderr.contains(&format!("{} is not blank: it carries ext4", disk.name()))
            && stderr.contains("force = true"),
        "{stderr}"
    );
    assert_eq!(
        disk.fingerprint(),
        before,
        "the refused disk was written to"
    );
    assert!(!vg_exists(&vg));
    assert!(!d.pool.config.state_dir.path().join("pool.json").exists());
    run_ok("mount", &[&disk.name(), fs_mount.to_str().unwrap()]);
    assert_eq!(std::fs::read(fs_mount.join("precious")).unwrap(), b"data");
    run_ok("umount", &[fs_mount.to_str().unwrap()]);

    // A disk in another volume group: refused even when forced.
    let other = TestDisk::new(scratch.path(), "other", ByteSize::mib(64));
    let other_vg = volume_group_name("o");
    let _other_guard = VolumeGroupGuard(other_vg.clone());
    lvm_ok(&["vgcreate", &other_vg, &other.name()]);
    let in_vg = TestDaemon::prepare("invg", &lvm_config(&vg, &[&other], "force = true"));
    let (code, stderr) = in_vg.start_refused();
    assert_ne!(code, 0);
    assert!(
        stderr.contains(&format!(
            "{} belongs to volume group {other_vg:?}",
            other.name()
        )),
        "{stderr}"
    );
    assert!(vg_exists(&other_vg));
    // A volume group name in use on another disk: refused, not duplicated.
    let taken = TestDaemon::prepare("taken", &lvm_config(&other_vg, &[&disk], "force = true"));
    let (code, stderr) = taken.start_refused();
    assert_ne!(code, 0);
    assert!(
        stderr.contains(&format!("volume group {other_vg} exists already")),
        "{stderr}"
    );
    assert!(disk.probe().contains("ext4"), "the disk was touched");

    // Forced: wiped and taken.
    d.pool.config.pool.lvm.force = true;
    d.write_config();
    d.spawn();
    assert!(
        d.log_text().contains("wiping signatures"),
        "{}",
        d.log_text()
    );
    assert!(disk.probe().contains("LVM2_member"));
    d.json(&["layer", "create", "base"]);
    d.json(&["pool", "destroy", "--force"]);
    assert_eq!(d.wait_exit(), 0);
    assert_eq!(disk.probe(), "");
}

#[test]
#[ignore = "needs root and dm-thin: scripts/vm-test"]
fn a_pool_creation_killed_at_any_step_is_finished_by_the_next_start() {
    require_dm_thin();
    let scratch = tempfile::tempdir().unwrap();
    let disk = TestDisk::new(scratch.path(), "disk", ByteSize::mib(128));
    let data = TestDisk::new(scratch.path(), "data", ByteSize::mib(128));
    let metadata = TestDisk::new(scratch.path(), "meta", ByteSize::mib(8));
    let devices = format!(
        "[pool]\nbackend = \"devices\"\n[pool.devices]\ndata = {:?}\nmetadata = {:?}\n[layers]\nbase_size = \"64M\"\n{DEACTIVATE_ON_STOP}",
        data.name(),
        metadata.name()
    );
    let points = thinstack::crash::Point::ALL
        .iter()
        .map(|p| p.name())
        .filter(|p| p.starts_with("lvm.") || p.starts_with("devices."));
    let mut crashes = 0;
    for point in points {
        let (vg, config) = if point.starts_with("lvm.") {
            let vg = volume_group_name("k");
            let config = lvm_config(&vg, &[&disk], "");
            (Some(vg), config)
        } else {
            (None, devices.clone())
        };
        let _guard = vg.clone().map(VolumeGroupGuard);
        let mut d = TestDaemon::prepare("crash", &config);
        let (code, stderr) = d.start_refused_with(&[("THINSTACK_CRASH_AT", point)]);
        assert_ne!(
            code, 0,
            "{point}: the daemon did not die (built without crash-points?)"
        );
        assert!(
            stderr.contains(&format!("crash point {point}#1 reached")),
            "{point}: it must die at the point, not anywhere: {stderr}"
        );
        crashes += 1;
        // The next start finishes the pool; it works and is destroyed without leftovers.
        d.spawn();
        d.json(&["layer", "create", "base"]);
        d.json(&["pool", "destroy", "--force"]);
        assert_eq!(d.wait_exit(), 0, "{point}: {}", d.log_text());
        if let Some(vg) = &vg {
            assert!(!vg_exists(vg), "{point}: volume group left");
            assert_eq!(disk.probe(), "", "{point}: the disk keeps a signature");
        }
    }
    assert_eq!(crashes, 10);
}

#[test]
#[ignore = "needs root and dm-thin: scripts/vm-test"]
fn a_loop_pool_is_destroyed_with_its_files_and_loop_devices() {
    let dm = require_dm_thin();
    let mut d = TestDaemon::start("destroy", "[layers]\nbase_size = \"64M\"\n");
    make_layers(&d);
    let mounted = mount(&d, "child");
    let refused = d.cli(&["--json", "pool", "destroy"]);
    assert_eq!(refused.code, 5, "{refused:?}");
    assert_eq!(refused.json()["error"]["kind"], "busy");
    let (data, metadata) = (d.pool.data_file(), d.pool.metadata_file());
    let loops: Vec<PathBuf> = [&data, &metadata]
        .iter()
        .map(|f| {
            thinstack::kernel::loopdev::find_attached(f)
                .unwrap()
                .unwrap()
        })
        .collect();
    let destroyed = d.json(&["pool", "destroy", "--force"]);
    assert_eq!(destroyed["layers_removed"], 2);
    assert_eq!(d.wait_exit(), 0, "{}", d.log_text());
    assert!(
        !common::mounts_under(&mounted).contains(&mounted),
        "still mounted"
    );
    assert!(!data.exists() && !metadata.exists(), "loop files left");
    for device in loops {
        let name = device.file_name().unwrap().to_string_lossy().into_owned();
        let backing = std::fs::read_to_string(format!("/sys/block/{name}/loop/backing_file"));
        assert!(
            backing.is_err(),
            "{} still bound: {backing:?}",
            device.display()
        );
    }
    let prefix = d.pool.config.pool.name.dm_prefix();
    assert!(dm.list_with_prefix(&prefix).unwrap().is_empty());
    let state = d.pool.config.state_dir.path();
    assert!(!state.join("pool.json").exists() && !state.join("txn.json").exists());
    // A new start makes a new, empty pool.
    d.spawn();
    assert_eq!(layer_names(&d), Vec::<String>::new());
}

/// Used and total data bytes, and metadata total, from `pool status`.
fn pool_space(d: &TestDaemon) -> (u64, u64, u64) {
    let status = d.json(&["pool", "status"]);
    (
        bytes(&status["data"]["used"]),
        bytes(&status["data"]["total"]),
        bytes(&status["metadata"]["total"]),
    )
}

fn bytes(v: &Value) -> u64 {
    serde_json::from_value::<ByteSize>(v.clone())
        .unwrap_or_else(|e| panic!("{v} is not a size: {e}"))
        .bytes()
}

fn volume_group_free(vg: &str) -> u64 {
    let out = lvm_ok(&[
        "vgs",
        "--noheadings",
        "--units",
        "b",
        "--nosuffix",
        "-o",
        "vg_free",
        vg,
    ]);
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

/// What runs, for a failure message (empty where `ps` is missing).
fn processes() -> String {
    std::process::Command::new("ps")
        .args(["-eo", "pid,stat,etime,wchan:30,args"])
        .output()
        .map(|out| String::from_utf8_lossy(&out.stdout).into_owned())
        .unwrap_or_default()
}

fn wait_for(what: &str, d: &TestDaemon, done: impl FnMut() -> bool) {
    common::wait_until(what, done, || {
        format!("log:\n{}\nprocesses:\n{}", d.log_text(), processes())
    });
}

#[test]
#[ignore = "needs root and dm-thin: scripts/vm-test"]
fn an_lvm_pool_is_extended_as_it_fills_and_a_full_volume_group_means_no_space() {
    require_dm_thin();
    let scratch = tempfile::tempdir().unwrap();
    let disk = TestDisk::new(scratch.path(), "disk", ByteSize::mib(256));
    let vg = volume_group_name("c");
    let _guard = VolumeGroupGuard(vg.clone());
    // Data 48M and metadata 4M (1/20 of the data share), extended at half full by 20%.
    let settings = "data_percent = 20\nmetadata_percent = 1\nchunk_size = \"64K\"\nautoextend_threshold = 50\nautoextend_percent = 20";
    let config = lvm_config(&vg, &[&disk], settings)
        // A filesystem larger than the VG can ever hold, with a small journal.
        .replace(
            "base_size = \"64M\"",
            "base_size = \"300M\"\nmkfs_args = [\"-J\", \"size=4\"]",
        )
        .replace("[pool]\n", "[pool]\nmin_free_space = \"10%\"\n");
    let d = TestDaemon::start("fill", &config);
    let (_, data_before, metadata_before) = pool_space(&d);
    d.json(&["layer", "create", "base"]);
    let dir = mount(&d, "base");

    // Past the threshold: data is extended (by thinstackd, or by dmeventd where LVM started it)
    // until under half full, and metadata keeps pace (past 80M of data, 1/20 is over 4M).
    // The writer never notices.
    write_file(&dir, "first", 32);
    wait_for("the pool to be extended", &d, || {
        let (used, total, metadata) = pool_space(&d);
        total > data_before && metadata > metadata_before && used * 2 < total
    });
    assert!(d.log_text().contains("extended the LVM thin pool"));

    // Fill in steps, each time letting the daemon catch up, until the VG has no free extents.
    let mut step = 0;
    while volume_group_free(&vg) > 0 {
        step += 1;
        assert!(
            step < 40,
            "the volume group never filled; log:\n{}",
            d.log_text()
        );
        write_file(&dir, &format!("more-{step}"), 8);
        wait_for(
            "the pool to fall below its threshold or the VG to fill",
            &d,
            || {
                let (used, total, _) = pool_space(&d);
                used * 2 < total || volume_group_free(&vg) == 0
            },
        );
    }
    // Then past 90% of what is left, never to 100% (a full pool would queue the writer).
    let (used, total, _) = pool_space(&d);
    let to_write = (total * 92 / 100).saturating_sub(used) >> 20;
    write_file(&dir, "last", to_write as usize);
    let refused = d.cli(&["layer", "create", "child", "--parent", "base"]);
    assert_eq!(refused.code, 6, "{refused:?}\n{}", d.log_text());
    assert!(refused.stderr.contains("free"), "{refused:?}");
    wait_for("the full volume group to be reported", &d, || {
        d.log_text().contains("its volume group is full")
    });
    let (used, total, metadata) = pool_space(&d);
    println!(
        "data {} -> {} ({}% used), metadata {} -> {}, {} extensions by thinstackd",
        ByteSize::from_bytes(data_before),
        ByteSize::from_bytes(total),
        used * 100 / total,
        ByteSize::from_bytes(metadata_before),
        ByteSize::from_bytes(metadata),
        d.log_text().matches("extending the pool's volumes").count()
    );
    unmount(&d, "base");
}

/// A thin pool made by "someone else" on two loop disks; removed when dropped.
struct ForeignPool {
    name: String,
    _data: TestDisk,
    _metadata: TestDisk,
}

impl ForeignPool {
    fn new(dir: &Path, name: &str, features: &str) -> ForeignPool {
        let data = TestDisk::new(dir, &format!("{name}-data"), ByteSize::mib(256));
        let metadata = TestDisk::new(dir, &format!("{name}-meta"), ByteSize::mib(16));
        let dm = Dm::open().unwrap();
        let device =
            |disk: &TestDisk| thinstack::kernel::blockdev::block_device(&disk.path).unwrap();
        let sectors = ByteSize::mib(256).sectors();
        let line = format!(
            "0 {} thin-pool {} {} 128 1024 {features}",
            *sectors,
            device(&metadata),
            device(&data)
        );
        let table = [line.parse::<thinstack::kernel::table::Line>().unwrap()];
        let dm_name = devicemapper::DmNameBuf::new(name.to_string()).unwrap();
        dm.create_device(
            &dm_name,
            None,
            &table,
            false,
            thinstack::kernel::dm::Udev::Wait,
        )
        .expect("create the foreign pool");
        ForeignPool {
            name: name.to_string(),
            _data: data,
            _metadata: metadata,
        }
    }

    fn dm_name(&self) -> devicemapper::DmNameBuf {
        devicemapper::DmNameBuf::new(self.name.clone()).unwrap()
    }

    fn status_field(&self, index: usize) -> String {
        let out = run_ok("dmsetup", &["status", &self.name]);
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .nth(index)
            .unwrap()
            .to_string()
    }
}

impl Drop for ForeignPool {
    fn drop(&mut self) {
        let _ = Dm::open()
            .unwrap()
            .remove_device(&self.dm_name(), thinstack::kernel::dm::Udev::Wait);
    }
}

fn existing_config(pool: &ForeignPool) -> String {
    format!(
        "[pool]\nbackend = \"existing\"\n[pool.existing]\ndevice = \"/dev/mapper/{}\"\n[layers]\nbase_size = \"64M\"\n",
        pool.name
    )
}

#[test]
#[ignore = "needs root and dm-thin: scripts/vm-test"]
fn an_existing_empty_pool_is_adopted_and_left_as_found_and_a_used_or_read_only_one_is_refused() {
    let dm = require_dm_thin();
    let scratch = tempfile::tempdir().unwrap();
    let foreign = ForeignPool::new(
        scratch.path(),
        &format!("foreign{}", std::process::id()),
        "1 skip_block_zeroing",
    );
    let mut d = TestDaemon::start("adopt", &existing_config(&foreign));
    let status = d.json(&["pool", "status"]);
    assert_eq!(status["pool"]["backend"], "existing", "{status}");
    assert_eq!(status["pool"]["block_size"], "64K", "{status}");
    make_layers(&d);
    let resize = d.cli(&["pool", "extend", "--data", "1G"]);
    assert_eq!(resize.code, 1, "{resize:?}");
    assert!(resize.stderr.contains("was adopted"), "{resize:?}");
    assert_eq!(d.json(&["pool", "check"])["clean"], true);

    // Destroy removes our layers and leaves the pool active, empty, at transaction id 0.
    d.json(&["pool", "destroy", "--force"]);
    assert_eq!(d.wait_exit(), 0, "{}", d.log_text());
    assert!(
        dm.exists(&foreign.dm_name()).unwrap(),
        "the adopted pool was removed"
    );
    assert_eq!(foreign.status_field(3), "0", "transaction id");
    assert!(foreign.status_field(5).starts_with("0/"), "data still used");
    // So a new thinstack adopts it again.
    let mut again = TestDaemon::start("adopt2", &existing_config(&foreign));
    again.json(&["layer", "create", "base"]);
    assert_eq!(again.stop(), 0);

    // A pool someone else uses is refused, with why.
    let used = ForeignPool::new(
        scratch.path(),
        &format!("used{}", std::process::id()),
        "1 skip_block_zeroing",
    );
    run_ok("dmsetup", &["message", &used.name, "0", "create_thin 7"]);
    let d = TestDaemon::prepare("used", &existing_config(&used));
    let (code, stderr) = d.start_refused();
    assert_ne!(code, 0);
    assert!(
        stderr.contains("is not empty") && stderr.contains("1 thin devices"),
        "{stderr}"
    );
    assert!(!d.pool.config.state_dir.path().join("pool.json").exists());

    // A read-only pool is reported, not used.
    let name = format!("ro{}", std::process::id());
    let formatted = ForeignPool::new(scratch.path(), &name, "1 skip_block_zeroing");
    let table = dm.table(&formatted.dm_name()).unwrap();
    let mut read_only = table[0].clone();
    let thinstack::kernel::table::Target::ThinPool(params) = &mut read_only.target else {
        panic!("not a thin pool: {}", table[0]);
    };
    params.feature_args.insert("read_only".to_string());
    dm.reload(
        &formatted.dm_name(),
        &[read_only],
        thinstack::kernel::dm::Udev::Wait,
    )
    .unwrap();
    let d = TestDaemon::prepare("ro", &existing_config(&formatted));
    let (code, stderr) = d.start_refused();
    assert_ne!(code, 0);
    assert!(stderr.contains("is read-only"), "{stderr}");
}

#[test]
#[ignore = "needs root and dm-thin: scripts/vm-test"]
fn a_pool_on_raw_devices_zeroes_metadata_once_and_is_reopened_after_a_reboot() {
    let dm = require_dm_thin();
    let scratch = tempfile::tempdir().unwrap();
    let data = TestDisk::new(scratch.path(), "data", ByteSize::mib(256));
    let metadata = TestDisk::new(scratch.path(), "meta", ByteSize::mib(16));
    // Leftover bytes (no signature) that the kernel would take for a damaged superblock.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&metadata.path)
        .unwrap()
        .write_all(&[0xffu8; 4096])
        .unwrap();
    let config = format!(
        "[pool]\nbackend = \"devices\"\n[pool.devices]\ndata = {:?}\nmetadata = {:?}\n[layers]\nbase_size = \"64M\"\n{DEACTIVATE_ON_STOP}",
        data.name(),
        metadata.name()
    );
    let mut d = TestDaemon::start("devices", &config);
    assert_eq!(d.json(&["pool", "status"])["pool"]["backend"], "devices");
    make_layers(&d);

    // A "reboot": the pool device is gone; it is made again over the same metadata.
    assert_eq!(d.stop(), 0);
    let pool_dm = d.pool.config.pool.name.pool_dm_name();
    dm.remove_device(&pool_dm, thinstack::kernel::dm::Udev::Wait)
        .unwrap();
    d.spawn();
    layers_intact(&d);
    let grow = d.cli(&["pool", "extend", "--data", "1G"]);
    assert_eq!(grow.code, 1, "{grow:?}");
    assert!(grow.stderr.contains("grow the device itself"), "{grow:?}");
    d.json(&["pool", "extend"]);

    d.json(&["pool", "destroy", "--force"]);
    assert_eq!(d.wait_exit(), 0);
    assert!(!dm.exists(&pool_dm).unwrap(), "the pool device is left");
    assert!(data.path.exists() && metadata.path.exists());
}

/// CRC-32C (Castagnoli), as dm-thin checksums its superblock.
fn crc32c(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in bytes {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0x82f6_3b78
            } else {
                crc >> 1
            };
        }
    }
    crc
}

/// dm-thin's superblock checksum: CRC-32C over the block after the checksum field, XORed.
fn superblock_checksum(block: &[u8]) -> u32 {
    const SUPERBLOCK_CSUM_XOR: u32 = 160774;
    crc32c(&block[4..4096]) ^ SUPERBLOCK_CSUM_XOR
}

#[test]
#[ignore = "needs root and dm-thin: scripts/vm-test"]
fn a_pool_flagged_needs_check_is_checked_and_cleared_before_use() {
    let dm = require_dm_thin();
    let test = common::TestPool::new("needs-check", "");
    let pool = common::open_pool(&test, &dm);
    pool.create_thin(&dm, thinstack::names::ThinId::new(3).unwrap())
        .unwrap();
    pool.teardown(&dm).unwrap();

    // Set the needs_check flag in the inactive metadata, as the kernel does after a failure.
    let metadata = test.metadata_file();
    let mut block = std::fs::read(&metadata).unwrap()[..4096].to_vec();
    let stored = u32::from_le_bytes(block[0..4].try_into().unwrap());
    assert_eq!(
        superblock_checksum(&block),
        stored,
        "checksum reckoned as the kernel does"
    );
    block[4] |= 1;
    let checksum = superblock_checksum(&block);
    block[0..4].copy_from_slice(&checksum.to_le_bytes());
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .open(&metadata)
        .unwrap();
    file.write_all(&block).unwrap();
    file.sync_all().unwrap();

    let pool = common::open_pool(&test, &dm);
    let status = pool.status(&dm).unwrap();
    assert!(!status.health.needs_check, "still flagged: {status:?}");
    assert!(!status.health.read_only, "{status:?}");
    let ids = thinstack::pool::thin_ids_of(&dm, &pool).unwrap();
    assert!(
        ids.contains(&thinstack::names::ThinId::new(3).unwrap()),
        "{ids:?}"
    );
    pool.teardown(&dm).unwrap();
    common::thin_check(&metadata);
    let flags = std::fs::read(&metadata).unwrap()[4];
    assert_eq!(flags & 1, 0, "the flag is still set in the metadata");
}
