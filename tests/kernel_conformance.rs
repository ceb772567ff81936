//! The rules the Sim models, checked on the real kernel (see `kernel::conformance`).

mod common;

use common::{open_pool, require_dm_thin, TestPool};
use thinstack::kernel::conformance::check_rules;
use thinstack::kernel::dm::Dm;
use thinstack::kernel::real::RealFs;
use thinstack::pool::RealPool;

/// Verify that the real kernel follows every rule the Sim enforces.
#[test]
#[ignore = "needs root and dm-thin: run with scripts/vm-test"]
fn kernel_follows_the_rules_the_sim_models() {
    let dm = require_dm_thin();
    let t = TestPool::new("rules", "");
    let pool = RealPool::new(Dm::open().unwrap(), open_pool(&t, &dm), t.config.clone());
    check_rules(&pool, &RealFs, 100, &t.mount_point("rules"));
}

/// The thin ids read in-process from a metadata snapshot are `thin_dump`'s, on a btree of
/// several levels (a leaf holds 127 ids) with holes from deletions and snapshots among them.
#[test]
#[ignore = "needs root and dm-thin: run with scripts/vm-test"]
fn kernel_thin_ids_read_in_process_are_the_ones_thin_dump_lists() {
    use thinstack::kernel::PoolKernel;
    use thinstack::names::ThinId;
    use thinstack::pool::{thin_ids_by_thin_dump, thin_ids_of};

    let dm = require_dm_thin();
    let t = TestPool::new("metaids", "");
    let pool = open_pool(&t, &dm);
    let real = RealPool::new(Dm::open().unwrap(), open_pool(&t, &dm), t.config.clone());
    let id = |n: u32| ThinId::new(n).unwrap();
    assert!(thin_ids_of(&dm, &pool).unwrap().is_empty());
    for n in 1..=400 {
        match n % 3 {
            0 => real.snapshot(id((n - 1) * 7), id(n)).unwrap(),
            _ => real.create_thin(id(n * 7)).unwrap(),
        }
    }
    for n in (5..400).step_by(5) {
        let _ = real.delete_thin(id(n * 7));
    }
    let in_process = thin_ids_of(&dm, &pool).unwrap();
    assert!(in_process.len() > 254, "{} ids", in_process.len());
    assert_eq!(in_process, thin_ids_by_thin_dump(&dm, &pool).unwrap());
    assert_eq!(in_process, real.thin_ids().unwrap());
}

/// The delta read in-process from a metadata snapshot is `thin_delta`'s: between an origin
/// whose mappings span several leaves and its snapshot, which rewrote blocks, discarded some
/// and mapped new ones; both ways round, without a base, and against an empty device.
#[test]
#[ignore = "needs root and dm-thin: run with scripts/vm-test"]
fn kernel_delta_read_in_process_is_the_one_thin_delta_reports() {
    use thinstack::kernel::{DeltaKind, PoolKernel};
    use thinstack::names::ThinId;
    use thinstack::pool::{thin_delta_by_tool, thin_delta_of};
    use thinstack::units::ByteSize;

    let dm = require_dm_thin();
    let t = TestPool::new("metadelta", "");
    let pool = open_pool(&t, &dm);
    let real = RealPool::new(Dm::open().unwrap(), open_pool(&t, &dm), t.config.clone());
    let id = |n: u32| ThinId::new(n).unwrap();
    let block = real.details().block_size.bytes();
    let size = ByteSize::mib(256);
    let write = |thin: u32, offsets: &mut dyn Iterator<Item = u64>, zero: Option<(u64, u64)>| {
        real.activate(id(thin), size, false).unwrap();
        let mut device = real.open_thin(id(thin)).unwrap();
        let mut data = thinstack::kernel::device_io::AlignedBuf::new(block as usize);
        for offset in offsets {
            data.fill((offset / block % 251) as u8 ^ thin as u8);
            device.write_at(offset, &data).unwrap();
        }
        if let Some((offset, length)) = zero {
            device.zero(offset, length).unwrap();
        }
        device.sync().unwrap();
        drop(device);
        real.deactivate(id(thin)).unwrap();
    };
    real.create_thin(id(1)).unwrap();
    // 64 MiB mapped whole (several leaves of 254 mappings), and a few blocks far off.
    let far = [200u64 << 20, (200 << 20) + 7 * block];
    write(
        1,
        &mut (0..64 << 20).step_by(block as usize).chain(far),
        None,
    );
    real.snapshot(id(1), id(2)).unwrap();
    // Every 5th MiB rewritten, 1 MiB discarded, new blocks past what the origin maps.
    let rewrites = (0..64u64 << 20).step_by(5 << 20).chain([230 << 20]);
    write(2, &mut rewrites.into_iter(), Some((33 << 20, 1 << 20)));
    real.snapshot(id(2), id(3)).unwrap();
    real.create_thin(id(4)).unwrap();

    let pairs = [
        (Some(1), 2),
        (Some(2), 1),
        (None, 1),
        (None, 2),
        (Some(1), 3),
        (Some(2), 3),
        (None, 4),
        (Some(1), 4),
        (Some(4), 2),
    ];
    for (base, thin) in pairs {
        let base = base.map(id);
        let in_process = thin_delta_of(&dm, &pool, base, id(thin)).unwrap();
        let by_tool = thin_delta_by_tool(&dm, &pool, base, id(thin)).unwrap();
        assert_eq!(in_process, by_tool, "delta of {thin} from {base:?}");
    }
    let changed = thin_delta_of(&dm, &pool, Some(id(1)), id(2)).unwrap();
    assert!(
        changed.iter().any(|r| r.kind == DeltaKind::Data),
        "{changed:?}"
    );
    assert!(
        changed.iter().any(|r| r.kind == DeltaKind::Unmapped),
        "{changed:?}"
    );
    assert!(thin_delta_of(&dm, &pool, Some(id(2)), id(3))
        .unwrap()
        .is_empty());
}
