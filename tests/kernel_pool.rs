//! Kernel tests of the loop-backed pool through the library API, on a real dm-thin kernel.
//! Run with `scripts/vm-test` (root, dm-thin; a VM when the host lacks it).

mod common;

use std::fs;
use std::path::Path;

use common::{open_pool, require_dm_thin, thin_check, TestPool};
use thinstack::kernel::dm::Udev;
use thinstack::kernel::fs::mkfs;
use thinstack::names::ThinId;
use thinstack::units::ByteSize;
use thinstack::vocab::FsType;
use thinstack::{ErrorKind, Pool};

fn id(n: u32) -> ThinId {
    ThinId::new(n).unwrap()
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// Verify the whole path of issue 2 on both filesystems: pool, thin devices, mkfs, mount, write,
/// snapshot of a mounted origin, copy-on-write isolation both ways, teardown, `thin_check`,
/// re-open from the same files with the data intact.
#[test]
#[ignore = "needs root and dm-thin: run with scripts/vm-test"]
fn kernel_pool_snapshot_and_reopen_ext4_and_xfs() {
    let dm = require_dm_thin();
    let mut t = TestPool::new("e2e", "");
    let pool = open_pool(&t, &dm);
    assert!(pool.was_created());

    let cases = [
        (FsType::Ext4, id(1), id(11), ByteSize::mib(256)),
        (FsType::Xfs, id(2), id(12), ByteSize::mib(320)),
    ];
    for (fs_type, origin, snap, size) in cases {
        pool.create_thin(&dm, origin).unwrap();
        let dev = pool.activate_thin(&dm, origin, size, false).unwrap();
        mkfs(fs_type, &dev.node, &[]).unwrap();
        let origin_mnt = t.mount_point(&format!("{fs_type}-origin"));
        t.mount(&dev.node, &origin_mnt, fs_type, false);
        // Written but not synced: the suspend around create_snap must flush it.
        fs::write(
            origin_mnt.join("file"),
            format!("before snapshot on {fs_type}"),
        )
        .unwrap();

        pool.snapshot(&dm, origin, snap).unwrap();
        // The origin was resumed: it takes writes again.
        fs::write(origin_mnt.join("origin-only"), "origin").unwrap();
        fs::write(origin_mnt.join("file"), "changed on origin").unwrap();

        let snap_dev = pool.activate_thin(&dm, snap, size, false).unwrap();
        let snap_mnt = t.mount_point(&format!("{fs_type}-snap"));
        t.mount(&snap_dev.node, &snap_mnt, fs_type, false);
        assert_eq!(
            read(&snap_mnt.join("file")),
            format!("before snapshot on {fs_type}")
        );
        assert!(
            !snap_mnt.join("origin-only").exists(),
            "origin write leaked into the snapshot"
        );
        fs::write(snap_mnt.join("snap-only"), "snap").unwrap();
        assert!(
            !origin_mnt.join("snap-only").exists(),
            "snapshot write leaked into the origin"
        );
        assert_eq!(read(&origin_mnt.join("file")), "changed on origin");

        for mnt in [&origin_mnt, &snap_mnt] {
            t.unmount(mnt);
        }
        assert!(pool.thin_mapped(&dm, snap).unwrap().bytes() > 0);
        pool.deactivate_thin(&dm, snap).unwrap();
        pool.deactivate_thin(&dm, origin).unwrap();
    }

    let status = pool.status(&dm).unwrap();
    assert!(status.data.used.bytes() > 0, "{status:?}");
    assert!(!status.health.failed && !status.health.read_only && !status.health.out_of_space);
    pool.teardown(&dm).unwrap();
    thin_check(&t.metadata_file());

    // Re-open from the same files: the metadata is read, not re-made, so the data is there.
    let pool = open_pool(&t, &dm);
    for (fs_type, origin, snap, size) in cases {
        for (thin, file, expected) in [
            (origin, "file", "changed on origin".to_string()),
            (snap, "file", format!("before snapshot on {fs_type}")),
            (snap, "snap-only", "snap".to_string()),
        ] {
            let dev = pool.activate_thin(&dm, thin, size, true).unwrap();
            let mnt = t.mount_point(&format!("{fs_type}-reopen-{thin}"));
            t.mount(&dev.node, &mnt, fs_type, true);
            assert_eq!(
                read(&mnt.join(file)),
                expected,
                "{fs_type} thin {thin} {file}"
            );
            t.unmount(&mnt);
            pool.deactivate_thin(&dm, thin).unwrap();
        }
    }
    pool.teardown(&dm).unwrap();
    thin_check(&t.metadata_file());
}

/// Verify that opening a pool that is already active adopts it (same loop devices, same dm
/// device) instead of creating a second one, as after a daemon restart.
#[test]
#[ignore = "needs root and dm-thin: run with scripts/vm-test"]
fn kernel_reopen_adopts_an_active_pool() {
    let dm = require_dm_thin();
    let t = TestPool::new("adopt", "");
    let first = open_pool(&t, &dm);
    first.create_thin(&dm, id(5)).unwrap();
    let backing = first.loop_backing().unwrap().clone();

    let second = open_pool(&t, &dm);
    assert!(!second.was_created());
    assert_eq!(second.loop_backing(), Some(&backing));
    assert_eq!(
        second.status(&dm).unwrap().data.total,
        first.status(&dm).unwrap().data.total
    );
    // The adopted pool knows the thin device made through the first handle.
    assert_eq!(
        second.create_thin(&dm, id(5)).unwrap_err().kind(),
        ErrorKind::AlreadyExists
    );
    second.teardown(&dm).unwrap();
    assert_eq!(
        thinstack::kernel::loopdev::find_attached(&backing.data_file).unwrap(),
        None
    );
}

/// Verify that kernel failures come back as what happened, not as a bare ioctl failure.
#[test]
#[ignore = "needs root and dm-thin: run with scripts/vm-test"]
fn kernel_errors_say_what_happened() {
    let dm = require_dm_thin();
    let mut t = TestPool::new("errors", "");
    let pool = open_pool(&t, &dm);

    pool.create_thin(&dm, id(1)).unwrap();
    let err = pool.create_thin(&dm, id(1)).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::AlreadyExists, "{err}");

    let err = pool.delete_thin(&dm, id(77)).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
    assert!(err.to_string().contains("no such thin device"), "{err}");

    let dev = pool
        .activate_thin(&dm, id(1), ByteSize::mib(64), false)
        .unwrap();
    mkfs(FsType::Ext4, &dev.node, &[]).unwrap();
    let mnt = t.mount_point("busy");
    t.mount(&dev.node, &mnt, FsType::Ext4, false);
    let err = pool.deactivate_thin(&dm, id(1)).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Busy, "{err}");
    assert!(err.to_string().contains("device is busy"), "{err}");

    let err = pool.teardown(&dm).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Busy, "{err}");
    assert!(err.to_string().contains("deactivate them first"), "{err}");

    // teardown consumed the handle; open it again to finish.
    let pool = open_pool(&t, &dm);
    t.unmount(&mnt);
    pool.deactivate_thin(&dm, id(1)).unwrap();
    pool.delete_thin(&dm, id(1)).unwrap();
    pool.teardown(&dm).unwrap();

    // A block size other than the one the pool was made with is refused before any change.
    let mut changed = t.config.clone();
    changed.pool.block_size = thinstack::config::BlockSize::new(ByteSize::mib(1)).unwrap();
    let err = Pool::open(&changed, &dm).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Invalid, "{err}");
    assert!(
        err.to_string()
            .contains("pool.block_size was 64K, config says 1M"),
        "{err}"
    );
    assert_eq!(
        thinstack::kernel::loopdev::find_attached(&t.metadata_file()).unwrap(),
        None
    );
    thin_check(&t.metadata_file());
}

/// Verify that a table naming a target the kernel cannot load is reported as a missing target
/// (the path a kernel without dm-thin-pool takes), that nothing is left behind, and that
/// removing a device that does not exist says so.
#[test]
#[ignore = "needs root and dm-thin: run with scripts/vm-test"]
fn kernel_missing_target_and_missing_device_are_named() {
    let dm = require_dm_thin();
    let t = TestPool::new("missing", "");
    let name = t.config.pool.name.thin_dm_name(id(9));
    let table = ["0 2048 thin-nope x"
        .parse::<thinstack::kernel::table::Line>()
        .unwrap()];
    let err = dm
        .create_device(&name, None, &table, false, Udev::NoWait)
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unsupported, "{err}");
    assert!(
        err.to_string()
            .contains("the kernel lacks the device-mapper thin-nope target"),
        "{err}"
    );
    assert!(
        !dm.exists(&name).unwrap(),
        "the half-made device was left behind"
    );

    // Both ways of removing (the crate's, and thinstack's own ioctl without a udev cookie)
    // translate the kernel's answer.
    for udev in [Udev::Wait, Udev::NoWait] {
        let err = dm.remove_device(&name, udev).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::NotFound, "{udev:?}: {err}");
        assert!(
            err.to_string().contains("no such device"),
            "{udev:?}: {err}"
        );
        let err = dm.resume(&name, udev).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::NotFound, "{udev:?}: {err}");
    }
}
