//! Two hosts on one rbd pool (two engines, then two daemons, each with its own state directory,
//! in one machine): the layers of one are the other's, a name is taken once, a layer written
//! on one is refused to the other, and a SIGKILL of one loses nothing the other sees.
//! Run with `scripts/vm-test` (the cluster is started in the VM by `scripts/ceph-cluster`).

mod common;

use std::collections::BTreeSet;
use std::fs;

use common::ceph::cluster;
use common::daemon::TestDaemon;
use common::{layer, require_dm_thin, wait_until, TestPool};
use thinstack::engine::{Engine, Settings};
use thinstack::kernel::rbd::map;
use thinstack::kernel::real::RealFs;
use thinstack::kernel::PoolKernel;
use thinstack::pool::rbd::RbdPool;
use thinstack::ErrorKind;

type RbdEngine = Engine<RbdPool, RealFs>;

fn require_rbd() {
    require_dm_thin();
    cluster();
    assert!(map::available(), "the kernel's rbd driver is not loaded");
}

/// The configuration of host `host` of pool `shared` in namespace `ns`: each host is a Ceph
/// client of its own, as hosts are (and as two daemons on one machine must be, to tell their
/// mappings apart).
fn host_toml(ns: &str, host: &str) -> String {
    let pool =
        cluster()
            .pool_toml_as(ns, host)
            .replacen("[pool]\n", "[pool]\nname = \"shared\"\n", 1);
    format!("{pool}[layers]\nbase_size = \"64M\"\n")
}

fn open(t: &TestPool) -> RbdEngine {
    let pool = RbdPool::open(&t.config).unwrap();
    let (engine, report) = Engine::open(pool, RealFs, Settings::from_config(&t.config)).unwrap();
    assert!(report.is_clean(), "{report:?}");
    engine
}

fn names(engine: &RbdEngine) -> BTreeSet<String> {
    engine
        .list(&Default::default())
        .unwrap()
        .iter()
        .map(|l| l.name.to_string())
        .collect()
}

#[test]
#[ignore = "kernel test: run with scripts/vm-test"]
fn two_engines_share_layers_names_and_ids_through_the_pool_catalog() {
    require_rbd();
    let ns = format!("t{}-hosts", std::process::id());
    let (ta, tb) = (
        TestPool::new("host-a", &host_toml(&ns, "host-a")),
        TestPool::new("host-b", &host_toml(&ns, "host-b")),
    );
    let (a, b) = (open(&ta), open(&tb));

    // A base made and committed on A is B's parent; B's child reads A's file.
    a.create(&layer("base", None)).unwrap();
    let mnt = a.mount("base", None, false).unwrap();
    fs::write(mnt.join("from-a"), "written on host a").unwrap();
    a.unmount("base", None).unwrap();
    a.commit("base").unwrap();
    assert!(b.inspect("base").unwrap().committed);
    b.create(&layer("kid", Some("base"))).unwrap();
    let mnt = b.mount("kid", None, true).unwrap();
    assert_eq!(
        fs::read_to_string(mnt.join("from-a")).unwrap(),
        "written on host a"
    );
    b.unmount("kid", None).unwrap();
    assert_eq!(
        a.inspect("kid").unwrap().parent.unwrap().as_str(),
        "base",
        "A sees B's child"
    );

    // A name is taken once: a create of a name the other host has is refused, and two hosts
    // racing for names each get some, never both the same.
    let taken = b.create(&layer("base", None)).unwrap_err();
    assert_eq!(taken.kind(), ErrorKind::AlreadyExists, "{taken}");
    let race: Vec<String> = (0..6).map(|i| format!("race-{i}")).collect();
    let outcomes: Vec<Vec<thinstack::Result<_>>> = std::thread::scope(|s| {
        let handles: Vec<_> = [&a, &b]
            .into_iter()
            .map(|engine| {
                let race = &race;
                s.spawn(move || {
                    race.iter()
                        .map(|n| engine.create(&layer(n, Some("base"))))
                        .collect()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (i, name) in race.iter().enumerate() {
        let won = outcomes.iter().filter(|o| o[i].is_ok()).count();
        assert_eq!(won, 1, "{name}: made by {won} hosts");
        for outcome in &outcomes {
            if let Err(e) = &outcome[i] {
                assert_eq!(e.kind(), ErrorKind::AlreadyExists, "{name}: {e}");
            }
        }
    }
    assert_eq!(names(&a), names(&b));
    // One image per layer: the ids came from the catalog, distinct across hosts.
    let images = cluster().rbd(&["ls", &format!("{}/{ns}", cluster().pool)]);
    assert_eq!(
        images.split_whitespace().count(),
        names(&a).len(),
        "{images}"
    );

    // A layer removed on one host is gone from the other, also after the other restarts.
    a.remove("race-0").unwrap();
    assert!(!names(&b).contains("race-0"));
    drop(b);
    let b = open(&tb);
    assert!(!names(&b).contains("race-0"));
    assert_eq!(names(&a), names(&b));

    // A destroy on B only takes B out; on A, the last host, it removes everything.
    for layer in b.list(&Default::default()).unwrap() {
        if layer.device.is_some() {
            b.deactivate(layer.name.as_str()).unwrap();
        }
    }
    let others = b.leaving_shared_pool().unwrap().expect("A shares the pool");
    assert_eq!(others.len(), 1, "{others:?}");
    b.kernel().destroy().unwrap();
    b.forget_pool().unwrap();
    drop(b);
    let images = cluster().rbd(&["ls", &format!("{}/{ns}", cluster().pool)]);
    assert_eq!(
        images.split_whitespace().count(),
        names(&a).len(),
        "{images}"
    );
    assert_eq!(a.leaving_shared_pool().unwrap(), None);
    a.remove_all(true).unwrap();
    // An image a closed client watched a moment ago is busy until the watch times out.
    wait_until(
        "the removed layers' images to be deleted",
        || {
            let _ = a.finish_deletions();
            a.deletions_pending() == 0
        },
        || format!("{} deletions pending", a.deletions_pending()),
    );
    a.kernel().destroy().unwrap();
    let images = cluster().rbd(&["ls", &format!("{}/{ns}", cluster().pool)]);
    assert!(images.trim().is_empty(), "left: {images}");
}

/// The exit codes of `thinstack` for an existing name and a busy layer (README, "Exit codes").
const ALREADY_EXISTS: i32 = 4;
const BUSY: i32 = 5;

fn layer_names(d: &TestDaemon) -> BTreeSet<String> {
    d.json(&["layer", "list"])
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["name"].as_str().unwrap().to_string())
        .collect()
}

#[test]
#[ignore = "kernel test: run with scripts/vm-test"]
fn two_daemons_race_for_names_refuse_each_others_written_layers_and_outlive_a_sigkill() {
    require_rbd();
    let ns = format!("t{}-daemons", std::process::id());
    let mut a = TestDaemon::start("host-a", &host_toml(&ns, "host-a"));
    let mut b = TestDaemon::start("host-b", &host_toml(&ns, "host-b"));
    a.json(&["layer", "create", "base"]);
    a.json(&["layer", "commit", "base"]);

    // The name race, through the two sockets at once: each name is made once, and the loser
    // hears "already exists".
    let names: Vec<String> = (0..8).map(|i| format!("race-{i}")).collect();
    let codes: Vec<Vec<i32>> = std::thread::scope(|s| {
        let handles: Vec<_> = [&a, &b]
            .into_iter()
            .map(|d| {
                let names = &names;
                s.spawn(move || {
                    names
                        .iter()
                        .map(|n| d.cli(&["layer", "create", n, "--parent", "base"]).code)
                        .collect()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (i, name) in names.iter().enumerate() {
        let mut got = [codes[0][i], codes[1][i]];
        got.sort();
        assert_eq!(got, [0, ALREADY_EXISTS], "{name}: exit codes {got:?}");
    }
    assert_eq!(layer_names(&a), layer_names(&b));

    // A layer A writes is refused to B: to mount, to activate, to snapshot.
    a.json(&["layer", "create", "work", "--parent", "base"]);
    let mounted = a.cli(&["layer", "mount", "work"]);
    assert_eq!(mounted.code, 0, "{mounted:?}");
    let on_a = std::path::PathBuf::from(mounted.stdout.trim());
    fs::write(on_a.join("from-a"), "written on host a").unwrap();
    nix::unistd::sync();
    for args in [
        &["layer", "mount", "work"][..],
        &["layer", "activate", "work"],
        &["layer", "create", "snap", "--parent", "work"],
    ] {
        let refused = b.cli(args);
        assert_eq!(refused.code, BUSY, "{args:?}: {refused:?}");
        assert!(refused.stderr.contains("written by host"), "{refused:?}");
    }

    // A SIGKILL of A: its kernel still has the layer mapped, so B is still refused; A's next
    // start has every layer and takes its own lock back; once A lets go, B writes it.
    a.kill9();
    assert_eq!(b.cli(&["layer", "activate", "work"]).code, BUSY);
    a.spawn();
    assert_eq!(layer_names(&a), layer_names(&b));
    assert_eq!(a.cli(&["layer", "unmount", "work"]).code, 0);
    assert_eq!(a.cli(&["layer", "deactivate", "work"]).code, 0);
    let mounted = b.cli(&["layer", "mount", "work"]);
    assert_eq!(mounted.code, 0, "{mounted:?}");
    let on_b = std::path::PathBuf::from(mounted.stdout.trim());
    assert_eq!(
        fs::read_to_string(on_b.join("from-a")).unwrap(),
        "written on host a"
    );

    // B dies holding it: an operator on A breaks the lock (fencing B's client), and A writes.
    b.kill9();
    assert_eq!(a.cli(&["layer", "activate", "work"]).code, BUSY);
    let broken = a.json(&["layer", "break-lock", "work"]);
    assert_eq!(broken["name"], "work", "{broken}");
    let b_host = fs::read_to_string(b.pool.config.state_dir.path().join("rbd-host")).unwrap();
    assert_eq!(broken["holder"], b_host.trim(), "{broken}");
    assert!(
        !broken["fenced"].as_array().unwrap().is_empty(),
        "B's kernel client was not fenced: {broken}"
    );
    let mounted = a.cli(&["layer", "mount", "work"]);
    assert_eq!(mounted.code, 0, "{mounted:?}");
    let on_a = std::path::PathBuf::from(mounted.stdout.trim());
    fs::write(on_a.join("after-break"), "written on host a again").unwrap();
    assert_eq!(a.cli(&["layer", "unmount", "work"]).code, 0);
    assert_eq!(a.cli(&["layer", "deactivate", "work"]).code, 0);
    let nothing = a.cli(&["layer", "break-lock", "work"]);
    assert_eq!(nothing.code, 3, "no holder is not_found: {nothing:?}");

    // Doctor on A finds nothing half made.
    let doctor = a.cli(&["pool", "doctor"]);
    assert_eq!(doctor.code, 0, "{doctor:?}");
}
