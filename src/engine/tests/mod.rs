//! The engine on the in-memory kernel: every operation, its refusals, failures injected into
//! every kernel step, and a crash at every crash point followed by a re-open.

use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::crash::Point;
use crate::kernel::sim::{Sim, SimOp};

mod deletions;
mod max_size;
mod overcommit;
mod prune;
mod reset;
mod shared;
mod transfer;
mod trim;
mod usage;

struct Fixture {
    sim: Sim,
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Self {
        Fixture::with_sim(Sim::default())
    }

    /// Records on tmpfs where there is one: for tests of thousands of operations, whose time
    /// would otherwise go to fsync.
    fn on_tmpfs() -> Self {
        let shm = Path::new("/dev/shm");
        let dir = if shm.is_dir() {
            tempfile::tempdir_in(shm)
        } else {
            tempfile::tempdir()
        };
        Fixture {
            sim: Sim::default(),
            dir: dir.unwrap(),
        }
    }

    fn with_sim(sim: Sim) -> Self {
        Fixture {
            sim,
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn settings(&self) -> Settings {
        Settings::for_tests(self.dir.path())
    }

    fn open(&self) -> (Engine<Sim, Sim>, ReconcileReport) {
        Engine::open(self.sim.clone(), self.sim.clone(), self.settings()).unwrap()
    }

    fn engine(&self) -> Engine<Sim, Sim> {
        self.open().0
    }
}

fn base(name: &str) -> CreateLayer {
    CreateLayer {
        name: name.into(),
        ..CreateLayer::default()
    }
}

fn child(name: &str, parent: &str) -> CreateLayer {
    CreateLayer {
        name: name.into(),
        parent: Some(parent.into()),
        ..CreateLayer::default()
    }
}

/// Records and pool agree exactly: every layer ready, every thin id owned, nothing else active.
/// Takes the engine under test (if any) to close it first: the state directory is locked.
fn assert_consistent(f: &Fixture, engine: impl Sized) {
    drop(engine);
    let (engine, report) = f.open();
    assert!(
        report.is_clean(),
        "a second open still repaired: {report:?}"
    );
    // What the daemon's first round does after a start: the devices removals queued go.
    engine.finish_deletions().unwrap();
    assert_eq!(engine.deletions_pending(), 0);
    let layers = engine.list(&BTreeMap::new()).unwrap();
    for layer in &layers {
        assert_eq!(layer.state, LayerState::Ready, "{layer:?}");
    }
    // Each layer's own device, and a spare made ahead for its next reset.
    let owned: BTreeSet<ThinId> = layers
        .iter()
        .flat_map(|l| std::iter::once(l.thin_id).chain(l.reset_spare))
        .collect();
    assert_eq!(f.sim.thin_ids_now(), owned, "pool ids vs record ids");
    let active = f.sim.active_ids().unwrap();
    assert!(
        active.is_subset(&owned),
        "active devices without a layer: {active:?}"
    );
    for layer in layers.iter().filter(|l| l.device.is_some()) {
        let read_only = f.sim.active_read_only(layer.thin_id).unwrap();
        assert_eq!(
            read_only,
            Some(layer.committed),
            "{} read-only flag",
            layer.name
        );
    }
    assert_eq!(
        f.sim.usage().unwrap().transaction_id,
        engine.transaction_id()
    );
    // A clean stop, as the daemon's: the record files alone hold every record.
    engine.close_records().unwrap();
}

#[test]
fn layers_are_created_snapshotted_committed_and_listed() {
    let f = Fixture::new();
    let engine = f.engine();
    let labels = BTreeMap::from([("role".to_string(), "base".to_string())]);
    let made = engine
        .create(&CreateLayer {
            labels: labels.clone(),
            ..base("base")
        })
        .unwrap();
    assert_eq!(made.size, ByteSize::gib(1));
    assert_eq!(made.state, LayerState::Ready);
    assert!(made.fs_uuid.starts_with("sim-ext4"));
    assert_eq!(made.device, None, "a new layer is left inactive");
    engine.commit("base").unwrap();
    let kid = engine.create(&child("kid", "base")).unwrap();
    assert_eq!(kid.parent.as_ref().map(LayerName::as_str), Some("base"));
    assert_eq!(
        kid.fs_uuid, made.fs_uuid,
        "a snapshot keeps its origin's filesystem"
    );
    assert!(!kid.committed);
    assert_eq!(
        engine.inspect("base").unwrap().children,
        std::slice::from_ref(&kid.name)
    );
    assert_eq!(engine.list(&BTreeMap::new()).unwrap().len(), 2);
    assert_eq!(engine.list(&labels).unwrap()[0].name.as_str(), "base");
    assert_consistent(&f, engine);
}

#[test]
fn status_shows_what_docker_info_showed() {
    let f = Fixture::new();
    let engine = f.engine();
    engine.create(&base("base")).unwrap();
    let kid = engine.create(&child("kid", "base")).unwrap();
    engine.activate("kid").unwrap();
    f.sim.hold(kid.thin_id);
    assert_eq!(engine.remove("kid").unwrap(), Removal::Deferred);
    let status = engine.status().unwrap();
    assert_eq!(status.layers, 2);
    assert_eq!(status.deferred_deletions, 1);
    assert_eq!(status.base_size, ByteSize::gib(1));
    assert_eq!(status.min_free_space.value(), 10);
    assert!(status.transaction_id >= 2);
    assert!(status.data.used.bytes() > 0);
}

#[test]
fn bad_requests_are_refused_and_change_nothing() {
    let f = Fixture::new();
    let engine = f.engine();
    engine.create(&base("base")).unwrap();
    let cases = [
        (base("base"), ErrorKind::AlreadyExists, "exists already"),
        (base("../etc"), ErrorKind::Invalid, "layer names are"),
        (child("c", "nope"), ErrorKind::NotFound, "no layer named"),
        (
            CreateLayer {
                size: Some(ByteSize::mib(512)),
                ..child("c", "base")
            },
            ErrorKind::Invalid,
            "can only grow",
        ),
        (
            CreateLayer {
                filesystem: Some(FsType::Xfs),
                size: Some(ByteSize::mib(100)),
                ..base("x")
            },
            ErrorKind::Invalid,
            "at least 300M",
        ),
        (
            CreateLayer {
                filesystem: Some(FsType::Xfs),
                ..child("c", "base")
            },
            ErrorKind::Invalid,
            "keeps its parent's filesystem",
        ),
        (
            CreateLayer {
                labels: BTreeMap::from([("".into(), "v".into())]),
                ..base("l")
            },
            ErrorKind::Invalid,
            "label key",
        ),
    ];
    let before = f.sim.thin_ids_now();
    for (request, kind, text) in cases {
        let err = engine.create(&request).unwrap_err();
        assert_eq!(err.kind(), kind, "{request:?}: {err}");
        assert!(err.to_string().contains(text), "{request:?}: {err}");
    }
    assert_eq!(f.sim.thin_ids_now(), before);
    assert_consistent(&f, engine);
}

#[test]
fn a_larger_child_grows_device_and_filesystem() {
    let f = Fixture::new();
    let engine = f.engine();
    engine.create(&base("base")).unwrap();
    let big = engine
        .create(&CreateLayer {
            size: Some(ByteSize::gib(2)),
            ..child("big", "base")
        })
        .unwrap();
    assert_eq!(big.size, ByteSize::gib(2));
    assert!(f.sim.mounts_now().is_empty(), "the growth mount is gone");
    let resized = engine.resize("big", ByteSize::gib(3)).unwrap();
    assert_eq!(resized.size, ByteSize::gib(3));
    let err = engine.resize("big", ByteSize::gib(1)).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Invalid);
    assert_consistent(&f, engine);
}

#[test]
fn mounts_are_reference_counted_and_committed_layers_read_only() {
    let f = Fixture::new();
    let engine = f.engine();
    engine.create(&base("base")).unwrap();
    let target = engine.mount("base", None, false).unwrap();
    assert_eq!(target, f.dir.path().join("mnt/base"));
    assert_eq!(engine.mount("base", None, false).unwrap(), target);
    assert_eq!(engine.inspect("base").unwrap().mounts[&target].refs, 2);
    let err = engine.commit("base").unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Busy);
    assert!(
        err.to_string().contains("unmount it before committing"),
        "{err}"
    );
    let err = engine.deactivate("base").unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Busy);
    engine.unmount("base", None).unwrap();
    assert!(
        f.sim.is_mounted(&target).unwrap(),
        "one user still holds it"
    );
    engine.unmount("base", None).unwrap();
    assert!(!f.sim.is_mounted(&target).unwrap());
    engine.commit("base").unwrap();
    engine.mount("base", None, false).unwrap();
    assert!(engine.inspect("base").unwrap().mounts[&target].read_only);
    engine.unmount("base", Some(&target)).unwrap();
    let err = engine.unmount("base", None).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Invalid);
    engine.deactivate("base").unwrap();
    assert_consistent(&f, engine);
}

#[test]
fn removal_is_refused_with_children_and_deferred_while_busy() {
    let f = Fixture::new();
    let engine = f.engine();
    engine.create(&base("base")).unwrap();
    engine.create(&child("kid", "base")).unwrap();
    let err = engine.remove("base").unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Busy);
    assert!(err.to_string().contains("has children (kid)"), "{err}");

    let kid_id = engine.inspect("kid").unwrap().thin_id;
    engine.activate("kid").unwrap();
    f.sim.hold(kid_id);
    assert_eq!(engine.remove("kid").unwrap(), Removal::Deferred);
    assert_eq!(engine.deferred_count(), 1);
    assert!(engine.process_deferred().unwrap().is_empty());
    f.sim.release(kid_id);
    let removed = engine.process_deferred().unwrap();
    assert_eq!(
        removed.iter().map(LayerName::as_str).collect::<Vec<_>>(),
        ["kid"]
    );
    assert_eq!(engine.remove("base").unwrap(), Removal::Removed);
    assert!(f.sim.thin_ids_now().is_empty());
    assert_consistent(&f, engine);
}

#[test]
fn creation_is_refused_below_min_free_space() {
    let f = Fixture::with_sim(Sim::new(ByteSize::mib(100), ByteSize::gib(1)));
    let engine = f.engine();
    engine.create(&base("base")).unwrap();
    let id = engine.inspect("base").unwrap().thin_id;
    f.sim.write(id, 92 << 20);
    let err = engine.create(&child("kid", "base")).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NoSpace);
    let text = err.to_string();
    assert!(
        text.contains("of data free") && text.contains("minimum of 10%"),
        "{text}"
    );
    assert!(text.contains("thinstack pool extend"), "{text}");
    assert_consistent(&f, engine);
}

#[test]
fn a_failure_in_any_kernel_step_leaves_nothing_behind() {
    for op in [
        SimOp::CreateThin,
        SimOp::SetTransactionId,
        SimOp::Activate,
        SimOp::Mkfs,
        SimOp::Deactivate,
    ] {
        let f = Fixture::new();
        let engine = f.engine();
        f.sim.fail_at(op, 0, ErrorKind::Kernel);
        let err = engine.create(&base("base")).unwrap_err();
        assert!(
            err.to_string().contains("creating layer \"base\""),
            "{op:?}: {err}"
        );
        // A failed set_transaction_id leaves the intent; the next open settles it.
        assert_consistent(&f, engine);
        let (engine, _) = f.open();
        assert!(engine.list(&BTreeMap::new()).unwrap().is_empty(), "{op:?}");
    }
}

/// How a crash ends the process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cut {
    /// The process dies (`kill -9`): what it wrote stays in the page cache.
    Kill,
    /// The power goes: what was written but not synced is lost, and the host reboots.
    Power,
}

/// Run `op` with the `nth` pass of `point` armed; the panic there stands for the process
/// dying, as `cut` says. Returns whether it crashed there. Any other panic fails the test:
/// only a crash at the point counts.
fn cut_at(
    cut: Cut,
    point: Point,
    nth: u32,
    f: &Fixture,
    op: impl FnOnce(&mut Engine<Sim, Sim>),
) -> bool {
    let mut engine = f.engine();
    crate::crash::arm_nth(point, nth);
    let outcome = catch_unwind(AssertUnwindSafe(|| op(&mut engine)));
    crate::crash::disarm();
    let durable = engine.durable_journal_len();
    drop(engine);
    if cut == Cut::Power {
        let journal = std::fs::OpenOptions::new()
            .write(true)
            .open(f.dir.path().join("journal"))
            .unwrap();
        journal.set_len(durable).unwrap();
        f.sim.reboot();
    }
    match outcome {
        Ok(()) => false,
        Err(payload) if crate::crash::is_crash(payload.as_ref(), point) => true,
        Err(payload) => std::panic::resume_unwind(payload),
    }
}

/// Crash `op` at every pass of every point it reaches, each on a fresh fixture made by
/// `setup`, once as a kill and once as a power cut, and run `check` after each; returns the
/// points crashed.
fn crash_everywhere(
    setup: &dyn Fn(&Fixture),
    op: &dyn Fn(&mut Engine<Sim, Sim>),
    check: &dyn Fn(&Fixture, Point, u32),
) -> BTreeSet<Point> {
    let mut crashed = BTreeSet::new();
    for cut in [Cut::Kill, Cut::Power] {
        for &point in Point::ALL {
            for nth in 1.. {
                let f = Fixture::new();
                setup(&f);
                if !cut_at(cut, point, nth, &f, op) {
                    break; // no such pass of this point in this operation
                }
                crashed.insert(point);
                let checked = catch_unwind(AssertUnwindSafe(|| check(&f, point, nth)));
                if let Err(failure) = checked {
                    eprintln!("the check failed after a {cut:?} cut at {point}#{nth}");
                    std::panic::resume_unwind(failure);
                }
            }
        }
    }
    crashed
}

/// Fail, naming them, unless every point in `wanted` was crashed.
fn require_points(crashed: &BTreeSet<Point>, wanted: impl Fn(&Point) -> bool) {
    let missing: Vec<&str> = Point::ALL
        .iter()
        .filter(|p| wanted(p) && !crashed.contains(p))
        .map(|p| p.name())
        .collect();
    assert!(
        missing.is_empty(),
        "crash points never crashed: {missing:?}"
    );
}

/// A kill, or a power cut (what was written but not synced is lost: the operation under
/// way may be, never what an answer said was done), at any point.
#[test]
fn a_crash_at_any_point_is_reconciled_on_open() {
    type Setup = fn(&Fixture);
    type Op = fn(&mut Engine<Sim, Sim>);
    let setup_base: Setup = |f| {
        f.engine().create(&base("base")).unwrap();
    };
    let setup_active: Setup = |f| {
        let e = f.engine();
        e.create(&base("base")).unwrap();
        e.activate("base").unwrap();
    };
    let operations: [(&str, Setup, Op); 7] = [
        (
            "create base",
            |_| {},
            |e| {
                e.create(&base("base")).unwrap();
            },
        ),
        ("create child", setup_base, |e| {
            e.create(&child("kid", "base")).unwrap();
        }),
        ("create larger child", setup_base, |e| {
            e.create(&CreateLayer {
                size: Some(ByteSize::gib(2)),
                ..child("kid", "base")
            })
            .unwrap();
        }),
        ("commit active", setup_active, |e| {
            e.commit("base").unwrap();
        }),
        ("remove", setup_base, |e| {
            e.remove("base").unwrap();
        }),
        ("remove active", setup_active, |e| {
            e.remove("base").unwrap();
        }),
        ("resize", setup_base, |e| {
            e.resize("base", ByteSize::gib(2)).unwrap();
        }),
    ];
    let mut crashed = BTreeSet::new();
    for (what, setup, op) in operations {
        let check = |f: &Fixture, point: Point, nth: u32| {
            let opened = catch_unwind(AssertUnwindSafe(|| f.open()));
            let Ok((engine, report)) = opened else {
                panic!("re-open after a crash in {what} at {point}#{nth} failed");
            };
            assert_consistent(f, engine);
            // The base layer made before the crash survives every crash but its own removal.
            let (engine, _) = f.open();
            let names: Vec<String> = engine
                .list(&BTreeMap::new())
                .unwrap()
                .iter()
                .map(|l| l.name.to_string())
                .collect();
            if !what.starts_with("remove") && what != "create base" {
                assert!(
                    names.contains(&"base".to_string()),
                    "{what} at {point}#{nth}: base lost; {report:?}"
                );
            }
        };
        crashed.extend(crash_everywhere(&setup, &op, &check));
    }
    // Every point of these operations, by name (containerd's commit, resets, checkpoints,
    // imports and pool creation have tests of their own).
    require_points(&crashed, |p| {
        !p.name().starts_with("snapshot_commit.")
            && !p.name().starts_with("reset.")
            && !p.name().starts_with("checkpoint.")
            && !p.name().starts_with("import.")
            && !p.name().starts_with("lvm.")
            && !p.name().starts_with("devices.")
            && !p.name().starts_with("rbd.")
            && !p.name().starts_with("shared.")
    });
}

#[test]
fn after_a_reboot_active_layers_come_back_and_stale_mounts_go() {
    let f = Fixture::new();
    let engine = f.engine();
    engine.create(&base("base")).unwrap();
    engine.create(&child("kid", "base")).unwrap();
    engine.activate("base").unwrap();
    engine.mount("kid", None, false).unwrap();
    drop(engine);
    f.sim.reboot();
    let (engine, report) = f.open();
    let mut reactivated: Vec<&str> = report.reactivated.iter().map(LayerName::as_str).collect();
    reactivated.sort();
    assert_eq!(reactivated, ["base", "kid"]);
    assert_eq!(report.stale_mounts, [f.dir.path().join("mnt/kid")]);
    assert!(engine.inspect("kid").unwrap().mounts.is_empty());
    assert!(engine.inspect("base").unwrap().device.is_some());
}

#[test]
fn unowned_thin_devices_are_kept_and_lost_devices_flagged() {
    let f = Fixture::new();
    let engine = f.engine();
    engine.create(&base("base")).unwrap();
    engine.create(&base("other")).unwrap();
    let other = engine.inspect("other").unwrap().thin_id;
    drop(engine);
    let orphan = ThinId::new(4242).unwrap();
    f.sim.create_thin(orphan).unwrap();
    f.sim.delete_thin(other).unwrap();
    let (engine, report) = f.open();
    assert!(report.orphans_deleted.is_empty(), "{report:?}");
    assert_eq!(report.unowned_kept, [orphan]);
    assert!(f.sim.thin_ids_now().contains(&orphan), "kept");
    assert_eq!(engine.orphan_thin_ids().unwrap(), [orphan]);
    assert_eq!(
        report
            .missing
            .iter()
            .map(LayerName::as_str)
            .collect::<Vec<_>>(),
        ["other"]
    );
    let err = engine.mount("other", None, false).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Inconsistent);
    assert_eq!(engine.remove("other").unwrap(), Removal::Removed);
    // Kept until the operator decides (here: deletes it, as `pool doctor` can).
    engine.delete_orphan_thin(orphan).unwrap();
    assert_consistent(&f, engine);
}

#[test]
fn thin_ids_of_existing_layers_are_never_handed_out_again() {
    let f = Fixture::new();
    let engine = f.engine();
    let a = engine.create(&base("a")).unwrap().thin_id;
    let b = engine.create(&base("b")).unwrap().thin_id;
    engine.remove("a").unwrap();
    let c = engine.create(&base("c")).unwrap().thin_id;
    assert!(
        c > b && a < b,
        "ids are handed out in increasing order: {a} {b} {c}"
    );
    engine.close_records().unwrap();
    drop(engine);
    // Without txn.json the counter starts at 1 again; ids the layers own are skipped.
    std::fs::remove_file(f.dir.path().join("txn.json")).unwrap();
    let engine = f.engine();
    let d = engine.create(&base("d")).unwrap().thin_id;
    assert!(d != b && d != c, "id {d} was reused");
    assert_consistent(&f, engine);
}

#[test]
fn mount_targets_outside_mnt_and_the_mount_roots_are_not_permitted() {
    let f = Fixture::new();
    let roots = tempfile::tempdir().unwrap();
    let settings = Settings {
        mount_roots: vec![roots.path().to_path_buf()],
        ..f.settings()
    };
    let (engine, _) = Engine::open(f.sim.clone(), f.sim.clone(), settings).unwrap();
    engine.create(&base("base")).unwrap();
    let state = f.dir.path().display().to_string();
    for bad in [
        "/".to_string(),
        "/etc".to_string(),
        state.clone(),
        format!("{state}/layers"),
        format!("{state}/mnt"),
        format!("{state}/mnt/.grow-1"),
        roots.path().display().to_string(),
    ] {
        let err = engine
            .mount("base", Some(Path::new(&bad)), false)
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Permission, "{bad}: {err}");
    }
    for bad in ["relative", "/tmp/../etc"] {
        let err = engine
            .mount("base", Some(Path::new(bad)), false)
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Invalid, "{bad}: {err}");
    }
    assert!(
        f.sim.mounts_now().is_empty(),
        "a refused mount changes nothing"
    );
    assert!(engine.inspect("base").unwrap().mounts.is_empty());
    let allowed = roots.path().join("vm1/rootfs/");
    let target = engine.mount("base", Some(&allowed), false).unwrap();
    assert_eq!(
        target,
        roots.path().join("vm1/rootfs"),
        "kept in plain form"
    );
    engine.unmount("base", Some(&allowed)).unwrap();
}

#[test]
fn a_recorded_mount_that_is_gone_is_mounted_again_not_counted() {
    let f = Fixture::new();
    let engine = f.engine();
    engine.create(&base("a")).unwrap();
    let target = engine.mount("a", None, false).unwrap();
    let node = f
        .sim
        .active_node(engine.inspect("a").unwrap().thin_id)
        .unwrap()
        .unwrap();
    FsKernel::unmount(&f.sim, &target, &node).unwrap(); // by hand
                                                        // Mounting again really mounts (one user), instead of counting a second user of nothing.
    assert_eq!(engine.mount("a", None, false).unwrap(), target);
    assert!(f.sim.is_mounted(&target).unwrap());
    assert_eq!(engine.inspect("a").unwrap().mounts[&target].refs, 1);
    // Unmounted by hand again: the unmount drops the record and succeeds.
    FsKernel::unmount(&f.sim, &target, &node).unwrap();
    engine.unmount("a", None).unwrap();
    assert!(engine.inspect("a").unwrap().mounts.is_empty());
    // Something else mounted where the layer was: thinstack neither counts it nor unmounts it.
    engine.create(&base("b")).unwrap();
    engine.mount("a", None, false).unwrap();
    FsKernel::unmount(&f.sim, &target, &node).unwrap();
    let other = engine.activate("b").unwrap();
    f.sim
        .mount(&other, &target, FsType::Ext4, false, &[])
        .unwrap();
    let err = engine.mount("a", None, false).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Busy, "{err}");
    assert_eq!(f.sim.mounts_now(), std::slice::from_ref(&target));
    assert!(engine.inspect("a").unwrap().mounts.is_empty());
}

#[test]
fn clients_on_many_threads_create_and_remove_children_of_one_parent() {
    let f = Fixture::new();
    let engine = f.engine();
    engine.create(&base("base")).unwrap();
    engine.commit("base").unwrap();
    engine.create(&child("pin", "base")).unwrap();
    std::thread::scope(|s| {
        for client in 0..8 {
            let engine = &engine;
            s.spawn(move || {
                for n in 0..25 {
                    let name = format!("c{client}-{n}");
                    engine.create(&child(&name, "base")).unwrap();
                    engine.commit(&name).unwrap();
                }
                for n in 0..25 {
                    let name = format!("c{client}-{n}");
                    assert_eq!(engine.remove(&name).unwrap(), Removal::Removed);
                }
            });
        }
        // Removing the parent meanwhile is refused, never half done.
        let err = engine.remove("base").unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Busy, "{err}");
    });
    assert_eq!(engine.list(&BTreeMap::new()).unwrap().len(), 2);
    assert_eq!(engine.transaction_id(), 2 + 200 * 2);
    assert_consistent(&f, engine);
}

#[test]
fn a_layer_and_its_descendants_are_removed_children_first() {
    let f = Fixture::new();
    let engine = f.engine();
    engine.create(&base("base")).unwrap();
    engine.create(&child("a", "base")).unwrap();
    engine.create(&child("b", "a")).unwrap();
    engine.create(&child("c", "base")).unwrap();
    let done = engine.remove_recursive("base").unwrap();
    let names: Vec<&str> = done.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["b", "a", "c", "base"]);
    assert!(done.iter().all(|(_, r)| *r == Removal::Removed));
    let err = engine.remove_recursive("base").unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound);
    assert_consistent(&f, engine);
}

#[test]
fn a_child_racing_its_parents_removal_either_wins_whole_or_loses_whole() {
    let f = Fixture::new();
    let engine = f.engine();
    for round in 0..40 {
        engine.create(&base("base")).unwrap();
        let (created, removed) = std::thread::scope(|s| {
            let created = s.spawn(|| engine.create(&child("kid", "base")));
            let removed = s.spawn(|| engine.remove("base"));
            (created.join().unwrap(), removed.join().unwrap())
        });
        match (created, removed) {
            (Ok(_), Err(e)) => {
                assert_eq!(e.kind(), ErrorKind::Busy, "round {round}: {e}");
                engine.remove_recursive("base").unwrap();
            }
            (Err(e), Ok(Removal::Removed)) => {
                assert_eq!(e.kind(), ErrorKind::NotFound, "round {round}: {e}")
            }
            other => panic!("round {round}: {other:?}"),
        }
        assert!(engine.list(&BTreeMap::new()).unwrap().is_empty());
    }
    assert_consistent(&f, engine);
}

#[test]
fn a_layer_named_as_its_own_parent_is_refused_not_deadlocked() {
    let f = Fixture::new();
    let engine = f.engine();
    engine.create(&base("a")).unwrap();
    for name in ["a", "b"] {
        let err = engine.create(&child(name, name)).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Invalid, "{err}");
        assert!(err.to_string().contains("snapshot of itself"), "{err}");
    }
    // The layer is not left locked.
    engine.commit("a").unwrap();
    assert_eq!(engine.list(&BTreeMap::new()).unwrap().len(), 1);
}

// ----- leftovers (pool doctor) -------------------------------------------------------------

#[test]
fn thin_devices_no_record_owns_are_found_and_deleted_but_owned_ones_never() {
    let f = Fixture::new();
    let engine = f.engine();
    let a = engine.create(&base("a")).unwrap();
    let foreign = ThinId::new(500).unwrap();
    f.sim.create_thin(foreign).unwrap();
    f.sim.activate(foreign, ByteSize::mib(8), false).unwrap();
    assert_eq!(engine.orphan_thin_ids().unwrap(), [foreign]);

    let err = engine.delete_orphan_thin(a.thin_id).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::AlreadyExists, "{err}");
    f.sim.hold(foreign);
    let err = engine.delete_orphan_thin(foreign).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Busy, "{err}");
    f.sim.release(foreign);
    engine.delete_orphan_thin(foreign).unwrap();

    assert!(engine.orphan_thin_ids().unwrap().is_empty());
    assert_eq!(f.sim.thin_ids_now(), BTreeSet::from([a.thin_id]));
    // The deleted id is never handed out while this engine runs.
    let b = engine.create(&base("b")).unwrap();
    assert_ne!(b.thin_id, foreign);
    assert_consistent(&f, engine);
}

#[test]
fn mount_records_whose_mount_is_gone_are_listed_then_dropped() {
    let f = Fixture::new();
    let engine = f.engine();
    engine.create(&base("a")).unwrap();
    let target = engine.mount("a", None, false).unwrap();
    assert!(engine.stale_mount_records(false).unwrap().is_empty());
    let node = f
        .sim
        .active_node(engine.inspect("a").unwrap().thin_id)
        .unwrap()
        .unwrap();
    FsKernel::unmount(&f.sim, &target, &node).unwrap(); // behind thinstack's back

    let stale = engine.stale_mount_records(false).unwrap();
    assert_eq!(stale, [(LayerName::new("a").unwrap(), target.clone())]);
    assert_eq!(
        engine.inspect("a").unwrap().mounts.len(),
        1,
        "listing changed the record"
    );
    assert_eq!(engine.stale_mount_records(true).unwrap().len(), 1);
    assert!(engine.inspect("a").unwrap().mounts.is_empty());
    assert!(engine.stale_mount_records(false).unwrap().is_empty());
}

#[test]
fn mounts_the_records_do_not_know_are_found_and_unmounted() {
    let f = Fixture::new();
    let engine = f.engine();
    engine.create(&base("a")).unwrap();
    let node = engine.activate("a").unwrap();
    let name = LayerName::new("a").unwrap();
    let by_hand = Path::new("/mnt/by-hand");
    f.sim
        .mount(&node, by_hand, FsType::Ext4, false, &[])
        .unwrap();
    let recorded = engine.mount("a", None, false).unwrap();

    assert!(!engine.unrecorded_mount(&name, &recorded, true).unwrap());
    assert!(engine.unrecorded_mount(&name, by_hand, false).unwrap());
    assert!(f.sim.mounts_now().contains(&by_hand.to_path_buf()));
    assert!(engine.unrecorded_mount(&name, by_hand, true).unwrap());
    assert_eq!(f.sim.mounts_now(), [recorded]);
    assert!(!engine.unrecorded_mount(&name, by_hand, false).unwrap());
}

#[test]
fn stale_mount_points_are_only_empty_directories_of_no_layer() {
    let f = Fixture::new();
    let engine = f.engine();
    engine.create(&base("a")).unwrap();
    engine.mount("a", None, false).unwrap();
    engine.unmount("a", None).unwrap();
    let mnt = f.dir.path().join("mnt");
    for dir in ["ghost", ".grow-77", "full"] {
        std::fs::create_dir(mnt.join(dir)).unwrap();
    }
    std::fs::write(mnt.join("full/file"), b"keep").unwrap();
    // A growth mount a crash left: layer a's device at `.grow-<its id>`.
    let id = engine.inspect("a").unwrap().thin_id;
    assert_ne!(id.value(), 77);
    let growth = mnt.join(format!(".grow-{id}"));
    std::fs::create_dir(&growth).unwrap();
    let node = engine.activate("a").unwrap();
    f.sim
        .mount(&node, &growth, FsType::Ext4, false, &[])
        .unwrap();

    let stale = engine.stale_mount_points().unwrap();
    assert_eq!(
        stale,
        [
            StalePoint::GrowthMount(growth.clone()),
            StalePoint::Directory(mnt.join(".grow-77")),
            StalePoint::Directory(mnt.join("ghost")),
        ]
    );
    for point in &stale {
        engine.remove_stale_point(point).unwrap();
    }
    assert!(engine.stale_mount_points().unwrap().is_empty());
    assert!(f.sim.mounts_now().is_empty());
    assert!(mnt.join("a").is_dir() && mnt.join("full/file").exists());
    assert!(!mnt.join("ghost").exists() && !growth.exists());
}

#[test]
fn a_layer_the_kernel_has_active_or_mounted_without_a_record_is_recorded_at_open() {
    let f = Fixture::new();
    let engine = f.engine();
    let a = engine.create(&base("a")).unwrap();
    engine.create(&base("b")).unwrap();
    drop(engine);
    // As a crash between the kernel step and the record leaves them.
    let node = f.sim.activate(a.thin_id, a.size, false).unwrap();
    f.sim
        .mount(&node, Path::new("/mnt/x"), FsType::Ext4, true, &[])
        .unwrap();

    let (engine, report) = f.open();
    assert_eq!(report.adopted, ["a: active, mounted at /mnt/x"]);
    let a = engine.inspect("a").unwrap();
    assert_eq!(a.mounts.len(), 1);
    assert!(a.mounts[Path::new("/mnt/x")].read_only);
    assert_eq!(engine.deactivate("a").unwrap_err().kind(), ErrorKind::Busy);
    engine.unmount("a", None).unwrap();
    engine.deactivate("a").unwrap();
    drop(engine);
    assert!(f.open().1.is_clean());
}

// ----- containerd snapshots ------------------------------------------------------------------

const ROOT: SnapshotRoot = SnapshotRoot {
    size: ByteSize::gib(1),
    filesystem: FsType::Ext4,
};

fn prepare(e: &Engine<Sim, Sim>, ns: &str, key: &str, parent: &str) -> Result<SnapshotMount> {
    snapshot(e, ns, key, parent, SnapshotKind::Active)
}

fn snapshot(
    e: &Engine<Sim, Sim>,
    ns: &str,
    key: &str,
    parent: &str,
    kind: SnapshotKind,
) -> Result<SnapshotMount> {
    let new = NewSnapshot {
        namespace: ns,
        key,
        parent,
        kind,
        labels: BTreeMap::from([("l".to_string(), key.to_string())]),
    };
    e.snapshot_create(new, ROOT)
}

fn thin_of(e: &Engine<Sim, Sim>, ns: &str, key: &str) -> ThinId {
    let name = e.snapshot_layer(ns, key).unwrap();
    e.record(&name).unwrap().thin_id
}

#[test]
fn snapshot_keys_are_any_string_and_each_namespace_is_its_own_key_space() {
    let f = Fixture::new();
    let e = f.engine();
    let key = "/var/lib/containerd/../x y/\u{e9}=1";
    let mount = prepare(&e, "default", key, "").unwrap();
    assert!(!mount.read_only);
    assert!(f
        .sim
        .active_node(thin_of(&e, "default", key))
        .unwrap()
        .is_some());
    prepare(&e, "other", key, "").unwrap();
    let err = prepare(&e, "default", key, "").unwrap_err();
    assert_eq!(err.kind(), ErrorKind::AlreadyExists, "{err}");
    let info = e.snapshot_stat("default", key).unwrap();
    assert_eq!(info.kind, SnapshotKind::Active);
    assert_eq!(info.created_ns, info.updated_ns);
    assert_eq!(e.snapshot_list("default").len(), 1);
    assert_eq!(e.snapshot_list("nowhere").len(), 0);
    // The layer names are thinstack's own.
    for layer in e.list(&BTreeMap::new()).unwrap() {
        assert!(layer.name.as_str().starts_with("ctd-"), "{}", layer.name);
    }
    let err = e.snapshot_stat("third", key).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound);
}

#[test]
fn snapshot_parents_must_be_committed_and_exist() {
    let f = Fixture::new();
    let e = f.engine();
    prepare(&e, "ns", "active", "").unwrap();
    let err = prepare(&e, "ns", "child", "active").unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Invalid, "{err}");
    let err = prepare(&e, "ns", "child", "absent").unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
    // Another namespace's snapshot is not a parent here.
    prepare(&e, "other", "a", "").unwrap();
    e.snapshot_commit("other", "a", "c", BTreeMap::new())
        .unwrap();
    let err = prepare(&e, "ns", "child", "c").unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
    // Nothing was left by the refusals.
    assert_eq!(e.list(&BTreeMap::new()).unwrap().len(), 2);
}

#[test]
fn an_unmounted_active_snapshot_is_committed_in_place() {
    let f = Fixture::new();
    let e = f.engine();
    prepare(&e, "ns", "a", "").unwrap();
    let id = thin_of(&e, "ns", "a");
    let labels = BTreeMap::from([("k".to_string(), "v".to_string())]);
    e.snapshot_commit("ns", "a", "c", labels.clone()).unwrap();
    assert_eq!(thin_of(&e, "ns", "c"), id);
    assert!(f.sim.active_node(id).unwrap().is_none());
    let err = e.snapshot_stat("ns", "a").unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound);
    let info = e.snapshot_stat("ns", "c").unwrap();
    assert_eq!(info.kind, SnapshotKind::Committed);
    assert_eq!(info.labels, labels);
    assert_eq!(info.parent, "");
    // A committed snapshot is committed once, and its name is taken.
    let err = e
        .snapshot_commit("ns", "c", "d", BTreeMap::new())
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Busy, "{err}");
    prepare(&e, "ns", "b", "c").unwrap();
    let err = e
        .snapshot_commit("ns", "b", "c", BTreeMap::new())
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::AlreadyExists, "{err}");
    assert_eq!(e.snapshot_stat("ns", "b").unwrap().parent, "c");
    // A view is read-only and cannot be committed.
    let view = snapshot(&e, "ns", "v", "c", SnapshotKind::View).unwrap();
    assert!(view.read_only);
    let err = e
        .snapshot_commit("ns", "v", "w", BTreeMap::new())
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Busy, "{err}");
}

#[test]
fn a_mounted_active_snapshot_is_committed_from_a_snapshot_and_released_later() {
    let f = Fixture::new();
    let e = f.engine();
    prepare(&e, "ns", "base", "").unwrap();
    e.snapshot_commit("ns", "base", "p", BTreeMap::new())
        .unwrap();
    prepare(&e, "ns", "a", "p").unwrap();
    let active = thin_of(&e, "ns", "a");
    f.sim.hold(active); // containerd has it mounted
    e.snapshot_commit("ns", "a", "c", BTreeMap::new()).unwrap();
    let committed = thin_of(&e, "ns", "c");
    assert_ne!(committed, active);
    assert_eq!(e.snapshot_stat("ns", "c").unwrap().parent, "p");
    // The key is free at once; the device waits for its user.
    assert_eq!(
        e.snapshot_stat("ns", "a").unwrap_err().kind(),
        ErrorKind::NotFound
    );
    assert!(f.sim.thin_ids().unwrap().contains(&active));
    prepare(&e, "ns", "a", "c").unwrap();
    e.snapshot_remove("ns", "a").unwrap();
    // The removed active snapshot does not hold its parent.
    e.snapshot_remove("ns", "c").unwrap();
    e.snapshot_remove("ns", "p").unwrap();
    f.sim.release(active);
    e.process_deferred().unwrap();
    assert!(e.list(&BTreeMap::new()).unwrap().is_empty());
    assert!(f.sim.thin_ids().unwrap().is_empty());
}

#[test]
fn a_snapshot_with_children_is_not_removed() {
    let f = Fixture::new();
    let e = f.engine();
    prepare(&e, "ns", "a", "").unwrap();
    e.snapshot_commit("ns", "a", "c", BTreeMap::new()).unwrap();
    snapshot(&e, "ns", "v", "c", SnapshotKind::View).unwrap();
    let err = e.snapshot_remove("ns", "c").unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Busy);
    assert!(err.message().contains("cannot remove"), "{err}");
    assert!(err.message().contains("\"v\""), "{err}");
    e.snapshot_remove("ns", "v").unwrap();
    e.snapshot_remove("ns", "c").unwrap();
    let err = e.snapshot_remove("ns", "c").unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound);
}

#[test]
fn snapshot_updates_change_labels_only() {
    let f = Fixture::new();
    let e = f.engine();
    prepare(&e, "ns", "a", "").unwrap();
    let before = e.snapshot_stat("ns", "a").unwrap();
    let labels = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    let all = e
        .snapshot_update("ns", "a", &labels(&[("x", "1"), ("y", "2")]), &[])
        .unwrap();
    assert_eq!(all.labels, labels(&[("x", "1"), ("y", "2")]));
    assert_eq!(all.created_ns, before.created_ns);
    assert!(all.updated_ns > before.updated_ns);
    let some = e
        .snapshot_update(
            "ns",
            "a",
            &labels(&[("x", "9"), ("z", "3")]),
            &["labels.x".into(), "labels.y".into()],
        )
        .unwrap();
    assert_eq!(some.labels, labels(&[("x", "9")]));
    let err = e
        .snapshot_update("ns", "a", &labels(&[]), &["parent".into()])
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Invalid, "{err}");
    let long = "v".repeat(4096);
    let err = e
        .snapshot_update("ns", "a", &labels(&[("k", &long)]), &[])
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Invalid, "{err}");
    // Refusals changed nothing; the rest survives a re-open.
    drop(e);
    let e = f.engine();
    assert_eq!(e.snapshot_stat("ns", "a").unwrap().labels, some.labels);
}

#[test]
fn a_crash_inside_a_snapshot_commit_loses_neither_the_key_nor_the_name() {
    type Op = fn(&mut Engine<Sim, Sim>);
    let operations: [(&str, Op); 2] = [
        ("in place", |e| {
            e.snapshot_commit("ns", "a", "c", BTreeMap::new()).unwrap();
        }),
        ("mounted", |e| {
            let id = thin_of(e, "ns", "a");
            e.kernel().hold(id);
            e.snapshot_commit("ns", "a", "c", BTreeMap::new()).unwrap();
        }),
    ];
    let mut crashed = BTreeSet::new();
    for (what, op) in operations {
        let setup = |f: &Fixture| {
            let e = f.engine();
            prepare(&e, "ns", "a", "").unwrap();
        };
        let check = |f: &Fixture, point: Point, nth: u32| {
            // containerd lets go of the active snapshot's device.
            for id in f.sim.active_ids().unwrap() {
                f.sim.release(id);
            }
            let (engine, _) = f.open();
            let active = engine.snapshot_stat("ns", "a").is_ok();
            let committed = engine.snapshot_stat("ns", "c").is_ok();
            assert!(active || committed, "{what} at {point}#{nth}: both gone");
            assert_consistent(f, engine);
        };
        crashed.extend(crash_everywhere(&setup, &op, &check));
    }
    require_points(&crashed, |p| p.name().starts_with("snapshot_commit."));
}

#[test]
fn creates_that_name_each_other_as_parent_never_deadlock() {
    let f = Fixture::new();
    let engine = Arc::new(f.engine());
    engine.create(&base("base")).unwrap();
    let (done, finished) = std::sync::mpsc::channel();
    for (first, second) in [("x", "y"), ("y", "x")] {
        let (engine, done) = (engine.clone(), done.clone());
        std::thread::spawn(move || {
            // Neither parent exists, so each create is refused at once, and fast: many rounds
            // of the two crossing in the few instructions between taking the two locks.
            for _ in 0..20_000 {
                let err = engine.create(&child(first, second)).unwrap_err();
                assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
            }
            done.send(()).unwrap();
        });
    }
    for _ in 0..2 {
        finished
            .recv_timeout(Duration::from_secs(120))
            .expect("crossing creates deadlocked");
    }
    assert_eq!(engine.list(&BTreeMap::new()).unwrap().len(), 1);
}

#[test]
fn a_layer_whose_record_was_moved_aside_survives_restarts_and_comes_back() {
    let f = Fixture::new();
    let engine = f.engine();
    engine.create(&base("keep")).unwrap();
    let id = engine.inspect("keep").unwrap().thin_id;
    engine.close_records().unwrap();
    drop(engine);
    let record = f.dir.path().join("layers/keep.json");
    let aside = f.dir.path().join("keep.json.aside");
    std::fs::rename(&record, &aside).unwrap();
    for _ in 0..2 {
        let (engine, report) = f.open();
        assert_eq!(report.unowned_kept, [id], "{report:?}");
        assert!(
            f.sim.thin_ids_now().contains(&id),
            "start-up deleted a layer's device"
        );
        // Its id is never handed out again while it is unowned.
        let new = engine.create(&base("new")).unwrap();
        assert_ne!(new.thin_id, id);
        engine.remove("new").unwrap();
    }
    std::fs::rename(&aside, &record).unwrap();
    let (engine, report) = f.open();
    assert!(report.unowned_kept.is_empty(), "{report:?}");
    assert_eq!(engine.inspect("keep").unwrap().thin_id, id);
    engine.mount("keep", None, false).unwrap();
}

#[test]
fn a_thin_device_whose_record_is_lost_is_adopted_as_a_layer_again() {
    let f = Fixture::new();
    let engine = f.engine();
    let made = engine
        .create(&CreateLayer {
            size: Some(ByteSize::mib(512)),
            filesystem: Some(FsType::Xfs),
            ..base("lost")
        })
        .unwrap();
    engine.create(&base("other")).unwrap();
    engine.close_records().unwrap();
    drop(engine);
    std::fs::remove_file(f.dir.path().join("layers/lost.json")).unwrap();
    let (engine, report) = f.open();
    assert_eq!(report.unowned_kept, [made.thin_id]);

    let kind = |r: Result<Layer>| r.unwrap_err().kind();
    let owned = engine.inspect("other").unwrap().thin_id;
    assert_eq!(kind(engine.adopt(owned, "x")), ErrorKind::AlreadyExists);
    assert_eq!(
        kind(engine.adopt(made.thin_id, "other")),
        ErrorKind::AlreadyExists
    );
    assert_eq!(
        kind(engine.adopt(ThinId::new(999).unwrap(), "x")),
        ErrorKind::NotFound
    );
    let bare = ThinId::new(4000).unwrap();
    f.sim.create_thin(bare).unwrap();
    assert_eq!(kind(engine.adopt(bare, "x")), ErrorKind::Invalid);
    assert!(
        f.sim.active_ids().unwrap().is_empty(),
        "probing leaves nothing active"
    );

    let back = engine.adopt(made.thin_id, "back").unwrap();
    assert_eq!(
        (
            back.thin_id,
            back.size,
            back.filesystem,
            back.fs_uuid.as_str()
        ),
        (
            made.thin_id,
            made.size,
            made.filesystem,
            made.fs_uuid.as_str()
        )
    );
    assert_eq!(back.labels[adopt::ADOPTED_LABEL], made.thin_id.to_string());
    engine.mount("back", None, false).unwrap();
    engine.unmount("back", None).unwrap();
    engine.delete_orphan_thin(bare).unwrap();
    assert_consistent(&f, engine);

    // The lost record found again beside its adopted twin: nothing starts, and why is said.
    let lost = serde_json::json!({"name": "lost"});
    let mut record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(f.dir.path().join("layers/back.json")).unwrap())
            .unwrap();
    record["name"] = lost["name"].clone();
    std::fs::write(f.dir.path().join("layers/lost.json"), record.to_string()).unwrap();
    let err = Engine::open(f.sim.clone(), f.sim.clone(), f.settings())
        .err()
        .expect("two owners of one device");
    assert_eq!(err.kind(), ErrorKind::Inconsistent, "{err}");
    assert!(err.to_string().contains("both claim thin device"), "{err}");
}

#[test]
fn a_read_only_pool_serves_reads_and_refuses_writes_saying_how_to_lift_it() {
    let f = Fixture::new();
    let engine = f.engine();
    engine.create(&base("a")).unwrap();
    engine.commit("a").unwrap();
    // A create cut short: its record says creating, its device half made.
    crate::crash::arm(Point::PoolStepMessageSent);
    let cut = catch_unwind(AssertUnwindSafe(|| engine.create(&child("cut", "a"))));
    crate::crash::disarm();
    assert!(cut.is_err(), "the crash point was reached");
    drop(engine);

    f.sim.set_read_only(true);
    let (engine, report) = f.open();
    assert_eq!(report.awaiting_writable, [LayerName::new("cut").unwrap()]);
    for (what, refused) in [
        ("create", engine.create(&child("b", "a")).map(drop)),
        ("remove", engine.remove("a").map(drop)),
        ("resize", engine.resize("a", ByteSize::gib(2)).map(drop)),
    ] {
        let err = refused.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::NoSpace, "{what}: {err}");
        assert!(
            err.to_string().contains("pool extend --metadata"),
            "{what}: {err}"
        );
    }
    // Reads go on: inspect, list, status, a read-only mount.
    assert_eq!(engine.list(&BTreeMap::new()).unwrap().len(), 2);
    assert!(engine.status().unwrap().health.metadata_guard);
    engine.mount("a", None, true).unwrap();
    engine.unmount("a", None).unwrap();
    assert!(engine.process_deferred().unwrap().is_empty());
    // Writable again without a restart: the cut create's intent is still unsettled, so no
    // pool change goes ahead of it; a restart settles it.
    f.sim.set_read_only(false);
    let err = engine.create(&child("b", "a")).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Inconsistent, "{err}");
    assert!(err.to_string().contains("restart thinstackd"), "{err}");
    drop(engine);

    let (engine, report) = f.open();
    assert_eq!(report.rolled_back, [LayerName::new("cut").unwrap()]);
    engine.create(&child("b", "a")).unwrap();
    assert_consistent(&f, engine);
}

#[test]
fn a_chain_20000_deep_is_removed_recursively() {
    let f = Fixture::on_tmpfs();
    let engine = f.engine();
    engine.create(&base("c0")).unwrap();
    const DEPTH: usize = 20_000;
    for n in 1..DEPTH {
        engine
            .create(&child(&format!("c{n}"), &format!("c{}", n - 1)))
            .unwrap();
    }
    let removed = engine.remove_recursive("c0").unwrap();
    assert_eq!(removed.len(), DEPTH);
    assert_eq!(
        removed[0].0.as_str(),
        format!("c{}", DEPTH - 1),
        "deepest first"
    );
    assert!(engine.list(&BTreeMap::new()).unwrap().is_empty());
    assert!(f.sim.thin_ids_now().is_empty());
}

#[test]
fn a_layer_whose_reactivation_fails_at_start_is_degraded_and_the_others_are_served() {
    let f = Fixture::new();
    let engine = f.engine();
    for name in ["a", "b"] {
        engine.create(&base(name)).unwrap();
        engine.activate(name).unwrap();
    }
    drop(engine);
    f.sim.reboot();
    // The first reactivation (layer a, in name order) fails.
    f.sim.fail_at(SimOp::Activate, 0, ErrorKind::Kernel);
    let (engine, report) = f.open();
    assert_eq!(report.reactivated, [LayerName::new("b").unwrap()]);
    let a = engine.inspect("a").unwrap();
    let reason = a.degraded.clone().expect("a is degraded");
    assert!(reason.contains("reactivating its device"), "{reason}");
    assert_eq!(engine.degraded_layers().len(), 1);
    for refused in [
        engine.mount("a", None, false).map(drop),
        engine.activate("a").map(drop),
        engine.remove("a").map(drop),
        engine.create(&child("kid", "a")).map(drop),
    ] {
        let err = refused.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Inconsistent, "{err}");
        assert!(err.to_string().contains("degraded"), "{err}");
    }
    // Every other layer is served.
    engine.mount("b", None, false).unwrap();
    engine.unmount("b", None).unwrap();
    // Repaired, it is whole again.
    engine.repair_degraded(&a.name).unwrap();
    assert!(engine.inspect("a").unwrap().degraded.is_none());
    assert!(engine.inspect("a").unwrap().device.is_some(), "reactivated");
    engine.mount("a", None, false).unwrap();
}

#[test]
fn a_resize_records_its_size_only_once_the_kernel_and_the_filesystem_took_it() {
    let f = Fixture::new();
    let engine = f.engine();
    engine.create(&base("a")).unwrap();
    f.sim.fail_at(SimOp::Grow, 0, ErrorKind::NoSpace);
    let err = engine.resize("a", ByteSize::gib(2)).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NoSpace, "{err}");
    assert_eq!(
        engine.inspect("a").unwrap().size,
        ByteSize::gib(1),
        "not taken"
    );
    drop(engine);
    // The next start settles the intent by the filesystem: it did not grow.
    let (engine, report) = f.open();
    assert_eq!(report.resizes_settled, ["a: 1G"]);
    assert_eq!(engine.inspect("a").unwrap().size, ByteSize::gib(1));
    assert_eq!(
        engine.resize("a", ByteSize::gib(2)).unwrap().size,
        ByteSize::gib(2)
    );
    assert_consistent(&f, engine);
}

#[test]
fn an_idempotent_create_takes_the_existing_layer_only_with_the_same_parent() {
    let f = Fixture::new();
    let engine = f.engine();
    let (made, new) = engine.create_or_existing(&base("base"), true).unwrap();
    assert!(new);
    engine.commit("base").unwrap();
    engine.create(&base("other")).unwrap();
    engine.commit("other").unwrap();
    let (kid, _) = engine
        .create_or_existing(&child("kid", "base"), true)
        .unwrap();

    let (again, new) = engine
        .create_or_existing(&child("kid", "base"), true)
        .unwrap();
    assert!(!new, "made a second kid");
    assert_eq!(again.thin_id, kid.thin_id);
    let elsewhere = engine
        .create_or_existing(&child("kid", "other"), true)
        .unwrap_err();
    assert_eq!(elsewhere.kind(), ErrorKind::AlreadyExists, "{elsewhere}");
    assert!(elsewhere.to_string().contains("with parent"), "{elsewhere}");
    let strict = engine
        .create_or_existing(&child("kid", "base"), false)
        .unwrap_err();
    assert_eq!(strict.kind(), ErrorKind::AlreadyExists);
    assert_eq!(engine.inspect("base").unwrap().thin_id, made.thin_id);
}

/// A create that fails, and whose undo fails too, leaves the layer degraded, listed with why,
/// not silently blocking its name; the doctor's repair finishes the undo.
#[test]
fn a_failed_undo_of_a_create_leaves_the_layer_degraded_until_repaired() {
    let f = Fixture::new();
    let engine = f.engine();
    f.sim.fail_at(SimOp::Mkfs, 0, ErrorKind::Kernel);
    f.sim.fail_at(SimOp::Deactivate, 0, ErrorKind::Busy);
    engine.create(&base("base")).unwrap_err();
    let degraded = engine.degraded_layers();
    assert_eq!(degraded.len(), 1, "{degraded:?}");
    assert!(degraded[0].1.contains("undo"), "{degraded:?}");
    let refused = engine.create(&base("base")).unwrap_err();
    assert_eq!(refused.kind(), ErrorKind::Inconsistent, "{refused}");
    assert!(refused.to_string().contains("degraded"), "{refused}");

    let name = LayerName::new("base").unwrap();
    engine.repair_degraded(&name).unwrap();
    assert!(engine.degraded_layers().is_empty());
    engine.create(&base("base")).unwrap();
    assert_consistent(&f, engine);
}
