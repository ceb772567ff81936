//! Two hosts on one rbd pool (two engines, then two daemons, each with its own state directory,
//! in one machine): the layers of one are the other's, a name is taken once, a layer written
//! on one is refused to the other, and a SIGKILL of one loses nothing the other sees.
//! Run with `scripts/vm-test` (the cluster is started in the VM by `scripts/ceph-cluster`).

mod common;

use std::collections::BTreeSet;
use std::fs;

use common::ceph::cluster;
use common::{require_dm_thin, TestPool};
use thinstack::engine::{CreateLayer, Engine, Settings};
use thinstack::kernel::rbd::map;
use thinstack::kernel::real::RealFs;
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

fn layer(name: &str, parent: Option<&str>) -> CreateLayer {
    CreateLayer {
        name: name.into(),
        parent: parent.map(Into::into),
        ..CreateLayer::default()
    }
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
}
