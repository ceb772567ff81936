//! The rbd backend with `pool.rbd.map = "nbd"`: layers served by rbd-nbd processes, on the
//! test VM's single-node Ceph cluster. A chain deeper than the kernel's rbd driver maps needs
//! no flatten, and a mapping (a process) outlives the daemon that made it, which finds it
//! again at its next start. Run with `scripts/vm-test`.

mod common;

use std::fs;
use std::path::{Path, PathBuf};

use common::ceph::cluster;
use common::daemon::TestDaemon;
use common::{layer, require_dm_thin, TestPool};
use thinstack::engine::{Engine, Settings};
use thinstack::kernel::real::RealFs;
use thinstack::pool::rbd::{image_name, RbdPool};

fn require_nbd() {
    require_dm_thin();
    cluster();
    assert!(
        thinstack::kernel::rbd::nbd::available(),
        "the kernel's nbd driver is not loaded"
    );
}

/// An rbd pool's TOML in a namespace of the test's own, mapped with rbd-nbd.
fn nbd_pool_toml(test: &str, flatten_depth: u32) -> String {
    let namespace = format!("t{}-{test}", std::process::id());
    format!(
        "{}map = \"nbd\"\nflatten_depth = {flatten_depth}\n[layers]\nbase_size = \"64M\"\n",
        cluster().pool_toml(&namespace)
    )
}

/// The `rbd info` of a layer's image.
fn rbd_info(t: &TestPool, id: thinstack::names::ThinId) -> String {
    let test = cluster();
    let rbd = &t.config.pool.rbd;
    let image = image_name(&t.config.pool.name, id);
    test.rbd(&["info", &format!("{}/{}/{image}", test.pool, rbd.namespace)])
}

#[test]
#[ignore = "kernel test: run with scripts/vm-test"]
fn with_nbd_a_chain_of_20_maps_unflattened_and_reads_the_base() {
    require_nbd();
    let t = TestPool::new("nbd-chain", &nbd_pool_toml("nbd-chain", 24));
    let pool = RbdPool::open(&t.config).unwrap();
    let (engine, report) = Engine::open(pool, RealFs, Settings::from_config(&t.config)).unwrap();
    assert!(report.is_clean(), "{report:?}");

    engine.create(&layer("l0", None)).unwrap();
    let mnt = engine.mount("l0", None, false).unwrap();
    fs::write(mnt.join("base-file"), "written in the base").unwrap();
    engine.unmount("l0", None).unwrap();
    engine.commit("l0").unwrap();
    for depth in 1..20 {
        let (name, parent) = (format!("l{depth}"), format!("l{}", depth - 1));
        engine.create(&layer(&name, Some(&parent))).unwrap();
        engine.commit(&name).unwrap();
    }
    let top = engine.inspect("l19").unwrap();
    // 19 parents, none flattened: the kernel's rbd driver would refuse to map this image.
    let info = rbd_info(&t, top.thin_id);
    assert!(info.contains("parent:"), "l19 was flattened: {info}");
    let node = engine.activate("l19").unwrap();
    assert!(
        node.to_string_lossy().starts_with("/dev/nbd"),
        "mapped at {}",
        node.display()
    );
    let mnt = engine.mount("l19", None, true).unwrap();
    assert_eq!(
        fs::read_to_string(mnt.join("base-file")).unwrap(),
        "written in the base"
    );
    engine.unmount("l19", None).unwrap();
    engine.deactivate("l19").unwrap();
    assert!(
        !served(&node),
        "{} is still served after the deactivate",
        node.display()
    );
    for depth in (0..20).rev() {
        engine.remove(&format!("l{depth}")).unwrap();
    }
    engine.finish_deletions().unwrap();
    assert_eq!(engine.deletions_pending(), 0);
}

#[test]
#[ignore = "kernel test: run with scripts/vm-test"]
fn an_nbd_mapping_outlives_a_stop_and_a_kill_9_of_the_daemon_and_is_found_again() {
    require_nbd();
    let mut d = TestDaemon::start("nbd-daemon", &nbd_pool_toml("nbd-daemon", 16));
    d.json(&["layer", "create", "base"]);
    let mounted = d.cli(&["layer", "mount", "base"]);
    assert_eq!(mounted.code, 0, "{mounted:?}");
    let target = PathBuf::from(mounted.stdout.trim());
    let node = PathBuf::from(
        d.json(&["layer", "inspect", "base"])["device"]
            .as_str()
            .expect("an active layer's device")
            .to_string(),
    );
    assert!(node.to_string_lossy().starts_with("/dev/nbd"), "{node:?}");
    let server = server_pid(&node).expect("an rbd-nbd process serves the layer");
    assert_ne!(
        session_of(server),
        session_of(std::process::id()),
        "rbd-nbd shares the daemon's session: a signal to it would reach the mapping"
    );

    // A stop, then a crash: each time the mounted layer still takes writes and reads them.
    for (round, end) in ["stop", "kill -9"].iter().enumerate() {
        if *end == "stop" {
            assert_eq!(d.stop(), 0, "{}", d.log_text());
        } else {
            d.kill9();
        }
        let file = target.join(format!("after-{round}"));
        fs::write(&file, vec![round as u8; 1 << 20]).unwrap();
        nix::unistd::sync();
        assert_eq!(fs::read(&file).unwrap().len(), 1 << 20);
        assert_eq!(server_pid(&node), Some(server), "after a {end}");
        d.spawn();
        let inspected = d.json(&["layer", "inspect", "base"]);
        assert_eq!(
            inspected["device"],
            node.to_string_lossy().as_ref(),
            "{inspected}"
        );
        assert_eq!(
            inspected["mounts"].as_object().map(|m| m.len()),
            Some(1),
            "{inspected}"
        );
    }
    let doctor = d.cli(&["pool", "doctor"]);
    assert_eq!(doctor.code, 0, "{doctor:?}");

    // Busy while mounted; then the unmount and deactivate end the process.
    let busy = d.cli(&["layer", "deactivate", "base"]);
    assert_eq!(busy.code, 5, "{busy:?}");
    assert_eq!(server_pid(&node), Some(server));
    assert_eq!(d.cli(&["layer", "unmount", "base"]).code, 0);
    let deactivated = d.cli(&["layer", "deactivate", "base"]);
    assert_eq!(deactivated.code, 0, "{deactivated:?}");
    assert!(!served(&node), "{} is still served", node.display());
    assert!(
        !Path::new(&format!("/proc/{server}")).exists(),
        "rbd-nbd (pid {server}) outlived its unmap"
    );
    assert_eq!(d.json(&["layer", "commit", "base"])["committed"], true);
    d.json(&["layer", "remove", "base"]);
}

/// The pid of the process serving nbd device `node`, if one does.
fn server_pid(node: &Path) -> Option<u32> {
    let name = node.file_name()?.to_str()?;
    fs::read_to_string(format!("/sys/block/{name}/pid"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

fn served(node: &Path) -> bool {
    server_pid(node).is_some()
}

/// The session id of process `pid` (`/proc/<pid>/stat`'s sixth field).
fn session_of(pid: u32) -> u32 {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after_name = &stat[stat.rfind(')').unwrap() + 2..];
    after_name.split(' ').nth(3).unwrap().parse().unwrap()
}
