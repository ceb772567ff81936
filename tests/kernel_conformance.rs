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
