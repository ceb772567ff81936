//! The rules the engine relies on, as one check that runs against any kernel: the [`Sim`] in
//! unit tests and the real kernel in `tests/kernel_conformance.rs`. A rule the Sim models but
//! the real kernel breaks fails there, so the Sim cannot drift from the kernel unnoticed.
//!
//! [`Sim`]: crate::kernel::sim::Sim

use std::path::Path;

use crate::error::ErrorKind;
use crate::kernel::{DeltaKind, DeltaRun, FsKernel, PoolKernel};
use crate::names::ThinId;
use crate::units::ByteSize;
use crate::vocab::FsType;

fn expect_kind<T: std::fmt::Debug>(what: &str, result: crate::Result<T>, kind: ErrorKind) {
    match result {
        Err(e) if e.kind() == kind => {}
        Err(e) => panic!("{what}: expected {kind}, got {} ({e})", e.kind()),
        Ok(v) => panic!("{what}: expected {kind}, got Ok({v:?})"),
    }
}

/// Check every rule on `pool` and `fs`, using thin ids `base..base+5` and the empty directory
/// `mount_point`. Panics with the rule that broke.
pub fn check_rules(pool: &impl PoolKernel, fs: &impl FsKernel, base: u32, mount_point: &Path) {
    let id = |n: u32| ThinId::new(base + n).expect("test ids fit 24 bits");
    let (a, b, missing) = (id(0), id(1), id(2));
    let size = ByteSize::mib(64);

    pool.create_thin(a).expect("create_thin");
    expect_kind(
        "create_thin of an existing id",
        pool.create_thin(a),
        ErrorKind::AlreadyExists,
    );
    expect_kind(
        "delete of a missing id",
        pool.delete_thin(missing),
        ErrorKind::NotFound,
    );
    expect_kind(
        "snapshot of a missing origin",
        pool.snapshot(missing, b),
        ErrorKind::NotFound,
    );
    assert!(
        pool.thin_ids().expect("thin_ids").contains(&a),
        "thin_ids lists a new device"
    );

    let txn = pool.usage().expect("usage").transaction_id;
    expect_kind(
        "set_transaction_id from a wrong old value",
        pool.set_transaction_id(txn + 5, txn + 6),
        ErrorKind::Invalid,
    );
    pool.set_transaction_id(txn, txn + 1)
        .expect("set_transaction_id");
    assert_eq!(pool.usage().expect("usage").transaction_id, txn + 1);

    let node = pool.activate(a, size, false).expect("activate");
    assert_eq!(
        pool.active_node(a).expect("active_node"),
        Some(node.clone())
    );
    assert!(pool.active_ids().expect("active_ids").contains(&a));
    assert_eq!(
        pool.active_read_only(a).expect("active_read_only"),
        Some(false)
    );
    expect_kind(
        "activating an active device",
        pool.activate(a, size, false),
        ErrorKind::AlreadyExists,
    );
    expect_kind(
        "delete of an active device",
        pool.delete_thin(a),
        ErrorKind::Busy,
    );

    fs.mkfs(FsType::Ext4, &node, &[]).expect("mkfs");
    fs.mount(&node, mount_point, FsType::Ext4, false, &[])
        .expect("mount");
    assert!(fs.is_mounted(mount_point).expect("is_mounted"));
    assert_eq!(
        fs.mounts_of(&node).expect("mounts_of"),
        [(mount_point.to_path_buf(), false)]
    );
    expect_kind(
        "deactivating a mounted device",
        pool.deactivate(a),
        ErrorKind::Busy,
    );
    pool.snapshot(a, b).expect("snapshot of a mounted origin");
    let other = pool.activate(b, size, true).expect("activate the snapshot");
    expect_kind(
        "unmounting another device's mount",
        fs.unmount(mount_point, &other),
        ErrorKind::Permission,
    );
    pool.deactivate(b).expect("deactivate the snapshot");
    let usage = pool.thin_usage().expect("thin_usage");
    assert!(
        usage[&b].mapped.bytes() > 0,
        "a snapshot maps its origin's blocks: {usage:?}"
    );
    // Not "nothing alone": the origin is mounted, and each block it rewrites since (its
    // journal) leaves the snapshot the old copy for itself.
    assert!(
        usage[&b].shared().bytes() > 0 && usage[&b].exclusive < usage[&b].mapped,
        "a snapshot shares its origin's blocks: {usage:?}"
    );
    fs.unmount(mount_point, &node).expect("unmount");
    assert!(!fs.is_mounted(mount_point).expect("is_mounted"));
    assert!(fs.mounts_of(&node).expect("mounts_of").is_empty());
    expect_kind(
        "unmounting where nothing is mounted",
        fs.unmount(mount_point, &node),
        ErrorKind::Permission,
    );
    assert!(
        pool.mapped(a).expect("mapped").bytes() > 0,
        "mkfs maps blocks"
    );

    pool.deactivate(a).expect("deactivate");
    expect_kind(
        "deactivating an inactive device",
        pool.deactivate(a),
        ErrorKind::NotFound,
    );
    assert_eq!(pool.active_node(a).expect("active_node"), None);
    assert_eq!(pool.active_read_only(a).expect("active_read_only"), None);
    let node = pool.activate(a, size, true).expect("activate read-only");
    assert_eq!(
        pool.active_read_only(a).expect("active_read_only"),
        Some(true)
    );
    expect_kind(
        "mounting a read-only device read-write",
        fs.mount(&node, mount_point, FsType::Ext4, false, &[]),
        ErrorKind::Permission,
    );
    pool.deactivate(a).expect("deactivate");
    for thin in [b, a] {
        pool.delete_thin(thin).expect("delete");
    }
    let left = pool.thin_ids().expect("thin_ids");
    assert!(
        !left.contains(&a) && !left.contains(&b),
        "deleted ids are gone: {left:?}"
    );
    check_block_rules(pool, id(3), id(4));
    check_growth_lifts_the_guard(pool);
}

/// What export and import rely on: a device reads back what was written, a snapshot shares
/// its origin's blocks until written, zeroing whole blocks unmaps them, a device active
/// read-only refuses writes, and `thin_delta` reports exactly the blocks that differ (and,
/// without a base, the blocks mapped), in the pool's block size.
fn check_block_rules(pool: &impl PoolKernel, origin: ThinId, snapshot: ThinId) {
    let size = ByteSize::mib(64);
    let block = pool.details().block_size.bytes();
    let bytes = |fill: u8| vec![fill; block as usize];
    pool.create_thin(origin).expect("create_thin");
    pool.activate(origin, size, false).expect("activate");
    let mut device = pool.open_thin(origin).expect("open_thin");
    device.write_at(block, &bytes(1)).expect("write");
    device.write_at(2 * block, &bytes(2)).expect("write");
    device.sync().expect("sync");
    let mut back = bytes(0);
    device.read_at(2 * block, &mut back).expect("read");
    assert_eq!(back, bytes(2), "a device reads back what was written");
    drop(device);
    pool.deactivate(origin).expect("deactivate");

    pool.snapshot(origin, snapshot).expect("snapshot");
    pool.activate(snapshot, size, false).expect("activate");
    let mut device = pool.open_thin(snapshot).expect("open_thin");
    device.read_at(block, &mut back).expect("read");
    assert_eq!(back, bytes(1), "a snapshot reads its origin's blocks");
    device.write_at(2 * block, &bytes(3)).expect("write");
    device.write_at(10 * block, &bytes(4)).expect("write");
    device.zero(block, block).expect("zero");
    device.read_at(block, &mut back).expect("read");
    assert_eq!(back, bytes(0), "a zeroed block reads as zeros");
    device.sync().expect("sync");
    drop(device);
    pool.deactivate(snapshot).expect("deactivate");

    let run = |first: u64, blocks: u64, kind| DeltaRun {
        offset: first * block,
        length: blocks * block,
        kind,
    };
    assert_eq!(
        pool.thin_delta(Some(origin), snapshot).expect("thin_delta"),
        [
            run(1, 1, DeltaKind::Unmapped),
            run(2, 1, DeltaKind::Data),
            run(10, 1, DeltaKind::Data),
        ],
        "thin_delta against the origin"
    );
    assert_eq!(
        pool.thin_delta(None, snapshot).expect("thin_delta"),
        [run(2, 1, DeltaKind::Data), run(10, 1, DeltaKind::Data)],
        "thin_delta without a base: what it maps"
    );
    pool.activate(origin, size, true)
        .expect("activate read-only");
    let mut device = pool.open_thin(origin).expect("open_thin");
    expect_kind(
        "writing a device active read-only",
        device.write_at(0, &bytes(5)),
        ErrorKind::Permission,
    );
    drop(device);
    pool.deactivate(origin).expect("deactivate");
    for thin in [snapshot, origin] {
        pool.delete_thin(thin).expect("delete");
    }
}

/// The read-only guard makes the pool read-only; a pool only grows, and growth (a reload of
/// the pool's table) lifts the guard, so whoever grows it guards it again if it must.
fn check_growth_lifts_the_guard(pool: &impl PoolKernel) {
    let data = pool.usage().expect("usage").data.total;
    assert!(
        pool.set_read_only_guard(true).expect("guard on"),
        "the guard changed nothing"
    );
    assert!(pool.read_only_guard().expect("read_only_guard"));
    let health = pool.usage().expect("usage").health;
    assert!(
        health.read_only && health.metadata_guard,
        "a guarded pool: {health:?}"
    );
    let step = ByteSize::mib(64).bytes();
    expect_kind(
        "shrinking the data",
        pool.extend(Some(ByteSize::from_bytes(data.bytes() - step)), None),
        ErrorKind::Invalid,
    );
    assert!(
        pool.read_only_guard().expect("read_only_guard"),
        "a refused extension lifted the guard"
    );
    let grown = ByteSize::from_bytes(data.bytes() + step);
    assert_eq!(pool.extend(Some(grown), None).expect("extend").0, grown);
    assert_eq!(pool.usage().expect("usage").data.total, grown);
    assert!(
        !pool.read_only_guard().expect("read_only_guard"),
        "growth left the guard on"
    );
}
