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
