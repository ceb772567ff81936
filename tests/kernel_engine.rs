//! The layer engine on the real kernel, for ext4 and xfs. Run with `scripts/vm-test`.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use common::{layer, open_engine, require_dm_thin, teardown_and_check, TestPool};
use thinstack::engine::{CreateLayer, Removal};
use thinstack::kernel::PoolKernel;
use thinstack::units::ByteSize;
use thinstack::vocab::FsType;
use thinstack::ErrorKind;

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// Bytes the filesystem mounted at `path` can hold.
fn fs_size(path: &Path) -> u64 {
    let stat = nix::sys::statvfs::statvfs(path).unwrap();
    stat.blocks() * stat.fragment_size()
}

/// A small base size each filesystem accepts (mkfs.xfs needs 300M).
fn small_base_size(fs_type: FsType) -> &'static str {
    match fs_type {
        FsType::Xfs => "320M",
        FsType::Ext4 => "64M",
    }
}

fn config_for(fs_type: FsType) -> String {
    format!("[layers]\nfilesystem = \"{fs_type}\"\nbase_size = \"320M\"\n")
}

/// Verify every operation on one filesystem: create, a snapshot of a mounted and written-to
/// layer holding exactly what was written before it, commit (read-only afterwards), growth of
/// device and filesystem, usage, refusal to remove a parent, removal, clean metadata.
fn lifecycle(fs_type: FsType) {
    let _dm = require_dm_thin();
    let t = TestPool::new(&format!("life-{fs_type}"), &config_for(fs_type));
    let (engine, report) = open_engine(&t);
    assert!(report.is_clean(), "{report:?}");

    let base = engine.create(&layer("base", None)).unwrap();
    assert_eq!(base.filesystem, fs_type);
    assert!(!base.fs_uuid.is_empty());
    let mnt = engine.mount("base", None, false).unwrap();
    fs::write(mnt.join("before"), "written before the snapshot").unwrap();

    // The snapshot is taken while base is mounted: the suspend freezes and flushes it.
    let kid = engine.create(&layer("kid", Some("base"))).unwrap();
    fs::write(mnt.join("after"), "written after the snapshot").unwrap();
    fs::write(mnt.join("before"), "changed after the snapshot").unwrap();
    let kid_mnt = engine.mount("kid", None, false).unwrap();
    assert_eq!(read(&kid_mnt.join("before")), "written before the snapshot");
    assert!(!kid_mnt.join("after").exists());
    assert_eq!(kid.fs_uuid, base.fs_uuid);

    // Two users of one mount: the first unmount leaves it mounted.
    assert_eq!(engine.mount("kid", None, false).unwrap(), kid_mnt);
    engine.unmount("kid", None).unwrap();
    assert!(
        kid_mnt.join("before").exists(),
        "still mounted for the second user"
    );
    engine.unmount("kid", None).unwrap();
    assert!(
        !kid_mnt.join("before").exists(),
        "unmounted by the last user"
    );

    // Commit: refused while mounted read-write, then read-only for good.
    let err = engine.commit("base").unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Busy, "{err}");
    engine.unmount("base", None).unwrap();
    let committed = engine.commit("base").unwrap();
    assert!(committed.committed);
    let mnt = engine.mount("base", None, false).unwrap();
    let write = fs::write(mnt.join("new"), "x").unwrap_err();
    assert_eq!(write.raw_os_error(), Some(nix::libc::EROFS), "{write}");
    assert_eq!(read(&mnt.join("after")), "written after the snapshot");
    engine.unmount("base", None).unwrap();

    // A larger child grows its device and filesystem; resize grows further.
    let big = engine
        .create(&CreateLayer {
            size: Some(ByteSize::mib(640)),
            ..layer("big", Some("base"))
        })
        .unwrap();
    assert_eq!(big.size, ByteSize::mib(640));
    let big_mnt = engine.mount("big", None, false).unwrap();
    let grown = fs_size(&big_mnt);
    assert!(
        grown > 500 << 20,
        "filesystem of {grown} bytes did not grow to 640M"
    );
    assert_eq!(read(&big_mnt.join("after")), "written after the snapshot");
    engine.resize("big", ByteSize::mib(960)).unwrap();
    assert!(
        fs_size(&big_mnt) > grown + (200 << 20),
        "online resize did not grow"
    );
    engine.unmount("big", None).unwrap();
    let err = engine.resize("big", ByteSize::mib(320)).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Invalid, "{err}");

    assert!(engine.usage("kid").unwrap().mapped.bytes() > 0);
    let status = engine.status().unwrap();
    assert_eq!(status.pool.name, t.config.pool.name.as_str());
    assert_eq!(status.pool.block_size, ByteSize::from_bytes(64 << 10));
    assert_eq!(status.base_size, ByteSize::mib(320));
    assert_eq!(status.filesystem, fs_type);
    assert_eq!(status.layers, 3);
    assert_eq!(status.deferred_deletions, 0);
    assert!(status.transaction_id >= 3, "{status:?}");
    assert!(status.data.used.bytes() > 0 && status.metadata.used.bytes() > 0);
    assert_eq!(status.data.total, ByteSize::gib(4));
    assert!(!status.health.failed && !status.health.out_of_space && !status.health.read_only);
    assert_eq!(engine.list(&BTreeMap::new()).unwrap().len(), 3);
    let err = engine.remove("base").unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Busy, "{err}");
    assert!(err.to_string().contains("has children"), "{err}");

    let device = engine.activate("kid").unwrap();
    assert!(device.exists());
    engine.deactivate("kid").unwrap();
    for name in ["kid", "big", "base"] {
        assert_eq!(engine.remove(name).unwrap(), Removal::Removed, "{name}");
    }
    assert!(engine.kernel().usage().unwrap().transaction_id > 0);
    drop(engine);
    let (engine, report) = open_engine(&t);
    assert!(report.is_clean(), "{report:?}");
    assert!(engine.list(&BTreeMap::new()).unwrap().is_empty());
    drop(engine);
    teardown_and_check(&t);
}

#[test]
#[ignore = "needs root and dm-thin: run with scripts/vm-test"]
fn kernel_engine_lifecycle_ext4() {
    lifecycle(FsType::Ext4);
}

#[test]
#[ignore = "needs root and dm-thin: run with scripts/vm-test"]
fn kernel_engine_lifecycle_xfs() {
    lifecycle(FsType::Xfs);
}

/// Verify that removing a layer another mount holds ends in deferred deletion, which completes
/// once the mount is gone, and that it survives a re-open in between.
fn busy_removal_is_deferred(fs_type: FsType) {
    let _dm = require_dm_thin();
    let mut t = TestPool::new(&format!("deferred-{fs_type}"), &config_for(fs_type));
    let (engine, _) = open_engine(&t);
    engine.create(&layer("base", None)).unwrap();
    let device = engine.activate("base").unwrap();
    let foreign = t.mount_point("foreign");
    t.mount(&device, &foreign, fs_type, false);

    assert_eq!(engine.remove("base").unwrap(), Removal::Deferred);
    assert_eq!(engine.status().unwrap().deferred_deletions, 1);
    assert!(engine.process_deferred().unwrap().is_empty(), "still busy");
    drop(engine);
    let (engine, report) = open_engine(&t);
    assert_eq!(report.still_deferred.len(), 1, "{report:?}");

    t.unmount(&foreign);
    let removed = engine.process_deferred().unwrap();
    assert_eq!(removed.len(), 1);
    assert!(engine.list(&BTreeMap::new()).unwrap().is_empty());
    assert!(engine.kernel().thin_ids().unwrap().is_empty());
    drop(engine);
    teardown_and_check(&t);
}

#[test]
#[ignore = "needs root and dm-thin: run with scripts/vm-test"]
fn kernel_engine_busy_removal_is_deferred_ext4() {
    busy_removal_is_deferred(FsType::Ext4);
}

#[test]
#[ignore = "needs root and dm-thin: run with scripts/vm-test"]
fn kernel_engine_busy_removal_is_deferred_xfs() {
    busy_removal_is_deferred(FsType::Xfs);
}

/// Verify the space guard on a 100M pool with min_free_space 10%: creating layers (each
/// writing data) ends in a clear no-space error, never in a kernel hang.
fn space_guard(fs_type: FsType) {
    let _dm = require_dm_thin();
    let base_size = small_base_size(fs_type);
    let t = TestPool::new(
        &format!("space-{fs_type}"),
        &format!(
            "[pool]\nmin_free_space = \"10%\"\n[pool.loop]\ndata_size = \"100M\"\n[layers]\nfilesystem = \"{fs_type}\"\nbase_size = \"{base_size}\"\n"
        ),
    );
    let (engine, _) = open_engine(&t);
    engine.create(&layer("l0", None)).unwrap();
    let chunk = vec![0x5au8; 4 << 20];
    let mut refused = None;
    for i in 1..100 {
        let name = format!("l{i}");
        match engine.create(&layer(&name, Some(&format!("l{}", i - 1)))) {
            Ok(_) => {
                let mnt = engine.mount(&name, None, false).unwrap();
                fs::write(mnt.join("data"), &chunk).unwrap();
                engine.unmount(&name, None).unwrap();
                engine.deactivate(&name).unwrap();
            }
            Err(e) => {
                refused = Some((i, e));
                break;
            }
        }
    }
    let (at, err) = refused.expect("the pool never refused a layer");
    assert_eq!(err.kind(), ErrorKind::NoSpace, "{err}");
    let text = err.to_string();
    assert!(
        text.contains("minimum of 10%") && text.contains("pool extend"),
        "{text}"
    );
    let usage = engine.pool_usage().unwrap();
    assert!(!usage.health.out_of_space, "{usage:?}");
    eprintln!("{fs_type}: space guard refused layer {at}: {text}");
    drop(engine);
    teardown_and_check(&t);
}

#[test]
#[ignore = "needs root and dm-thin: run with scripts/vm-test"]
fn kernel_engine_space_guard_refuses_before_the_pool_fills_ext4() {
    space_guard(FsType::Ext4);
}

#[test]
#[ignore = "needs root and dm-thin: run with scripts/vm-test"]
fn kernel_engine_space_guard_refuses_before_the_pool_fills_xfs() {
    space_guard(FsType::Xfs);
}

/// Verify a chain of 128 layers, each a snapshot of the one before with one file added: the
/// top layer shows all 128 files.
fn chain_of_128_layers(fs_type: FsType) {
    let _dm = require_dm_thin();
    let base_size = small_base_size(fs_type);
    let t = TestPool::new(
        &format!("chain-{fs_type}"),
        &format!("[layers]\nfilesystem = \"{fs_type}\"\nbase_size = \"{base_size}\"\n"),
    );
    let (engine, _) = open_engine(&t);
    let started = std::time::Instant::now();
    for i in 0..128 {
        let name = format!("layer{i:03}");
        let parent = (i > 0).then(|| format!("layer{:03}", i - 1));
        engine.create(&layer(&name, parent.as_deref())).unwrap();
        let mnt = engine.mount(&name, None, false).unwrap();
        fs::write(mnt.join(format!("file{i:03}")), format!("layer {i}")).unwrap();
        engine.unmount(&name, None).unwrap();
        engine.deactivate(&name).unwrap();
        engine.commit(&name).unwrap();
    }
    eprintln!(
        "{fs_type}: 128 layers in {:.1}s",
        started.elapsed().as_secs_f64()
    );
    let top = engine.mount("layer127", None, true).unwrap();
    for i in 0..128 {
        assert_eq!(read(&top.join(format!("file{i:03}"))), format!("layer {i}"));
    }
    let files = fs::read_dir(&top).unwrap().filter(|e| {
        e.as_ref()
            .unwrap()
            .file_name()
            .to_string_lossy()
            .starts_with("file")
    });
    assert_eq!(files.count(), 128);
    engine.unmount("layer127", None).unwrap();
    drop(engine);
    let (engine, report) = open_engine(&t);
    assert!(report.is_clean(), "{report:?}");
    assert_eq!(engine.list(&BTreeMap::new()).unwrap().len(), 128);
    drop(engine);
    teardown_and_check(&t);
}

#[test]
#[ignore = "needs root and dm-thin: run with scripts/vm-test"]
fn kernel_engine_chain_of_128_layers_ext4() {
    chain_of_128_layers(FsType::Ext4);
}

#[test]
#[ignore = "needs root and dm-thin: run with scripts/vm-test"]
fn kernel_engine_chain_of_128_layers_xfs() {
    chain_of_128_layers(FsType::Xfs);
}

/// Verify that an open keeps a thin device no record owns (made behind the engine's back: it
/// may be a layer whose record was lost) and flags a layer whose thin device was deleted
/// behind its back, which can then be removed.
#[test]
#[ignore = "needs root and dm-thin: run with scripts/vm-test"]
fn kernel_engine_unowned_devices_kept_and_lost_devices_flagged() {
    let _dm = require_dm_thin();
    let t = TestPool::new("orphans", "[layers]\nbase_size = \"64M\"\n");
    let (engine, _) = open_engine(&t);
    engine.create(&layer("kept", None)).unwrap();
    let lost = engine.create(&layer("lost", None)).unwrap().thin_id;
    let orphan = thinstack::names::ThinId::new(4242).unwrap();
    engine.kernel().create_thin(orphan).unwrap();
    engine.kernel().delete_thin(lost).unwrap();
    drop(engine);

    let (engine, report) = open_engine(&t);
    assert!(report.orphans_deleted.is_empty(), "{report:?}");
    assert_eq!(report.unowned_kept, [orphan], "{report:?}");
    let missing: Vec<String> = report.missing.iter().map(|n| n.to_string()).collect();
    assert_eq!(missing, ["lost"], "{report:?}");
    assert!(
        engine.kernel().thin_ids().unwrap().contains(&orphan),
        "kept"
    );
    // It holds no filesystem, so it cannot be adopted; the operator deletes it.
    let err = engine.adopt(orphan, "x").unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Invalid, "{err}");
    engine.delete_orphan_thin(orphan).unwrap();
    let err = engine.mount("lost", None, false).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Inconsistent, "{err}");
    assert_eq!(engine.remove("lost").unwrap(), Removal::Removed);
    drop(engine);
    let (engine, report) = open_engine(&t);
    assert!(report.is_clean(), "{report:?}");
    assert_eq!(engine.list(&BTreeMap::new()).unwrap().len(), 1);
    drop(engine);
    teardown_and_check(&t);
}

/// Bytes the data file really occupies on disk (it is sparse).
fn allocated(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    fs::metadata(path).unwrap().blocks() * 512
}

/// Verify that removing a layer gives its space back to the host: the discard before delete
/// goes through the pool and the loop device into the sparse data file as punched holes.
#[test]
#[ignore = "needs root and dm-thin: run with scripts/vm-test"]
fn kernel_engine_remove_gives_loop_file_space_back() {
    let _dm = require_dm_thin();
    let t = TestPool::new("discard", "[layers]\nbase_size = \"256M\"\n");
    let (engine, _) = open_engine(&t);
    engine.create(&layer("base", None)).unwrap();
    let mnt = engine.mount("base", None, false).unwrap();
    fs::write(mnt.join("big"), vec![0xa5u8; 64 << 20]).unwrap();
    engine.unmount("base", None).unwrap();
    engine.deactivate("base").unwrap();
    let before = allocated(&t.data_file());
    assert!(before >= 64 << 20, "data file holds {before} bytes");
    assert_eq!(engine.remove("base").unwrap(), Removal::Removed);
    let after = allocated(&t.data_file());
    eprintln!("data file: {before} bytes allocated before removal, {after} after");
    assert!(
        after + (60 << 20) <= before,
        "only {} bytes came back",
        before - after
    );
    drop(engine);
    teardown_and_check(&t);
}

/// Verify what a reboot leaves: no dm devices, no loop devices, no mounts. The next open
/// re-activates layers that were active (read-only when committed) and drops the mount records.
#[test]
#[ignore = "needs root and dm-thin: run with scripts/vm-test"]
fn kernel_engine_reactivates_after_a_reboot() {
    let _dm = require_dm_thin();
    let t = TestPool::new("reboot", &config_for(FsType::Ext4));
    let (engine, _) = open_engine(&t);
    engine.create(&layer("base", None)).unwrap();
    let mnt = engine.mount("base", None, false).unwrap();
    fs::write(mnt.join("kept"), "across the reboot").unwrap();
    engine.create(&layer("kid", Some("base"))).unwrap();
    engine.commit("kid").unwrap();
    engine.activate("kid").unwrap();
    drop(engine);

    // The "reboot": mounts, dm devices and loop devices are gone; the files stay.
    common::unmount_by_hand(&mnt).unwrap();
    teardown_and_check(&t);

    let (engine, report) = open_engine(&t);
    let mut reactivated: Vec<String> = report.reactivated.iter().map(|n| n.to_string()).collect();
    reactivated.sort();
    assert_eq!(reactivated, ["base", "kid"], "{report:?}");
    assert_eq!(
        report.stale_mounts,
        std::slice::from_ref(&mnt),
        "{report:?}"
    );
    let kid = engine.inspect("kid").unwrap();
    assert_eq!(
        engine.kernel().active_read_only(kid.thin_id).unwrap(),
        Some(true)
    );
    let mnt = engine.mount("base", None, false).unwrap();
    assert_eq!(read(&mnt.join("kept")), "across the reboot");
    engine.unmount("base", None).unwrap();
    drop(engine);
    teardown_and_check(&t);
}

/// Every walk over parents and children is a loop: a chain 500 layers deep is removed
/// recursively in one call on the real kernel. The depth that blew the old recursive walk's
/// stack, 20,000, is the sim's test (`a_chain_20000_deep_is_removed_recursively`); here each
/// layer costs about a quarter second under emulation, so 2,000 took 494 s of CI's hour.
#[test]
#[ignore = "needs root and dm-thin: run with scripts/vm-test"]
fn kernel_engine_a_chain_500_deep_is_removed_recursively() {
    const DEPTH: usize = 500;
    let _dm = require_dm_thin();
    let t = TestPool::new("deep", "[layers]\nbase_size = \"64M\"\n");
    let (engine, _) = open_engine(&t);
    let started = std::time::Instant::now();
    engine.create(&layer("d0", None)).unwrap();
    for n in 1..DEPTH {
        let (name, parent) = (format!("d{n}"), format!("d{}", n - 1));
        engine.create(&layer(&name, Some(&parent))).unwrap();
    }
    let made = started.elapsed();
    let removed = engine.remove_recursive("d0").unwrap();
    assert_eq!(removed.len(), DEPTH);
    assert!(removed.iter().all(|(_, r)| *r == Removal::Removed));
    eprintln!(
        "a chain of {DEPTH}: made in {:.1}s, removed in {:.1}s",
        made.as_secs_f64(),
        (started.elapsed() - made).as_secs_f64()
    );
    assert!(engine.list(&BTreeMap::new()).unwrap().is_empty());
    assert!(engine.kernel().thin_ids().unwrap().is_empty());
    drop(engine);
    teardown_and_check(&t);
}
