//! Removal answers before the device is deleted: the queue in `txn.json` owns the device
//! until the deferred work deletes it.

use std::sync::atomic::{AtomicUsize, Ordering};

use super::*;

/// An engine whose deferred work waits to be done by hand, as the daemon's watcher would do
/// it; returns how many times it was woken.
fn engine_with_watcher(f: &Fixture) -> (Engine<Sim, Sim>, Arc<AtomicUsize>) {
    let engine = f.engine();
    let wakes = Arc::new(AtomicUsize::new(0));
    let counted = wakes.clone();
    engine.set_deferred_waker(move || {
        counted.fetch_add(1, Ordering::SeqCst);
    });
    (engine, wakes)
}

#[test]
fn a_removed_layers_device_is_owned_by_the_queue_until_deleted() {
    let f = Fixture::new();
    let (engine, wakes) = engine_with_watcher(&f);
    let a = engine.create(&base("a")).unwrap().thin_id;
    let b = engine.create(&base("b")).unwrap().thin_id;
    engine.activate("a").unwrap();
    assert_eq!(engine.remove("a").unwrap(), Removal::Removed);
    assert_eq!(wakes.load(Ordering::SeqCst), 1, "the watcher is woken");
    assert!(engine.inspect("a").is_err(), "gone from the API");
    assert!(
        !f.dir.path().join("layers/a.json").exists(),
        "and the records"
    );
    assert!(f.sim.thin_ids_now().contains(&a), "the device waits");
    assert!(f.sim.active_ids().unwrap().is_empty(), "inactive already");
    assert_eq!(engine.deletions_pending(), 1);
    assert!(
        engine.orphan_thin_ids().unwrap().is_empty(),
        "not an orphan"
    );
    let err = engine.delete_orphan_thin(a).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Busy, "{err}");
    let c = engine.create(&base("c")).unwrap().thin_id;
    assert!(c != a && c != b, "a queued id is not handed out: {c}");

    // A stop before the watcher got to it: the next start keeps the queue, and owns the
    // device, without deleting it at start.
    drop(engine);
    let (engine, report) = f.open();
    assert!(report.is_clean(), "{report:?}");
    assert!(f.sim.thin_ids_now().contains(&a));
    assert_eq!(engine.deletions_pending(), 1);
    assert!(engine.process_deferred().unwrap().is_empty());
    assert_eq!(f.sim.thin_ids_now(), BTreeSet::from([b, c]));
    assert_eq!(engine.deletions_pending(), 0);
    assert_consistent(&f, engine);
}

#[test]
fn a_create_short_of_space_deletes_the_queued_devices_first() {
    let f = Fixture::with_sim(Sim::new(ByteSize::mib(100), ByteSize::gib(1)));
    let (engine, _) = engine_with_watcher(&f);
    let big = engine.create(&base("big")).unwrap().thin_id;
    f.sim.write(big, 92 << 20);
    engine.remove("big").unwrap();
    assert_eq!(engine.deletions_pending(), 1);
    engine.create(&base("next")).unwrap();
    assert_eq!(engine.deletions_pending(), 0);
    assert!(!f.sim.thin_ids_now().contains(&big));
    assert_consistent(&f, engine);
}

#[test]
fn destroying_the_pool_deletes_the_queued_devices_at_once() {
    let f = Fixture::new();
    let (engine, _) = engine_with_watcher(&f);
    engine.create(&base("base")).unwrap();
    engine.create(&child("kid", "base")).unwrap();
    assert_eq!(engine.remove_all(true).unwrap(), 2);
    assert_eq!(engine.deletions_pending(), 0);
    assert!(f.sim.thin_ids_now().is_empty());
}

#[test]
fn a_deletion_that_fails_stays_queued_and_is_retried() {
    let f = Fixture::new();
    let (engine, _) = engine_with_watcher(&f);
    let id = engine.create(&base("base")).unwrap().thin_id;
    engine.remove("base").unwrap();
    f.sim.fail_at(SimOp::Delete, 0, ErrorKind::Kernel);
    assert!(engine.process_deferred().is_err());
    assert_eq!(engine.deletions_pending(), 1);
    assert!(f.sim.thin_ids_now().contains(&id));
    engine.process_deferred().unwrap();
    assert_eq!(engine.deletions_pending(), 0);
    assert_consistent(&f, engine);
}

#[test]
fn a_queued_device_cannot_be_adopted_or_deleted_as_an_orphan() {
    let f = Fixture::new();
    let (engine, _) = engine_with_watcher(&f);
    let id = engine.create(&base("base")).unwrap().thin_id;
    engine.remove("base").unwrap();
    let err = engine.adopt(id, "back").unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Busy, "{err}");
    assert!(err.to_string().contains("queued for deletion"), "{err}");
    let err = engine.delete_orphan_thin(id).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Busy, "{err}");
    assert!(engine.inspect("back").is_err());
    engine.finish_deletions().unwrap();
    assert_consistent(&f, engine);
}

#[test]
fn one_failing_deletion_does_not_hold_up_the_others() {
    let f = Fixture::new();
    let (engine, _) = engine_with_watcher(&f);
    let a = engine.create(&base("a")).unwrap().thin_id;
    let b = engine.create(&base("b")).unwrap().thin_id;
    engine.remove("a").unwrap();
    engine.remove("b").unwrap();
    f.sim.fail_at(SimOp::Delete, 0, ErrorKind::Kernel);
    assert!(engine.finish_deletions().is_err());
    assert_eq!(engine.deletions_pending(), 1);
    let left = f.sim.thin_ids_now();
    assert_eq!(left.len(), 1, "one of {a} and {b} is gone: {left:?}");
    assert_eq!(engine.finish_deletions().unwrap(), 1);
    assert_consistent(&f, engine);
}

#[test]
fn a_record_restored_over_a_queued_device_keeps_it() {
    let f = Fixture::new();
    let (engine, _) = engine_with_watcher(&f);
    let id = engine.create(&base("base")).unwrap().thin_id;
    engine.close_records().unwrap();
    let record = std::fs::read(f.dir.path().join("layers/base.json")).unwrap();
    engine.remove("base").unwrap();
    engine.close_records().unwrap();
    drop(engine);
    // The operator puts the record back from a copy before the device was deleted.
    std::fs::write(f.dir.path().join("layers/base.json"), record).unwrap();
    let (engine, _) = f.open();
    assert_eq!(engine.finish_deletions().unwrap(), 0);
    assert_eq!(engine.deletions_pending(), 0);
    assert!(
        f.sim.thin_ids_now().contains(&id),
        "kept: the layer holds it"
    );
    assert_eq!(engine.inspect("base").unwrap().thin_id, id);
    assert_consistent(&f, engine);
}

/// The doctor lists the pool, then reads who owns each device. A queued device whose deletion
/// finishes between the two (the deletion holds the queue while it runs, so the doctor waits
/// for it) is gone, not a leftover: found by containerd's suite on rbd, where a deletion
/// takes long enough to land in that gap.
#[test]
fn a_device_deleted_while_the_doctor_looks_is_no_leftover() {
    let f = Fixture::new();
    let engine = f.engine();
    engine.create(&base("kept")).unwrap();
    let gone = engine.create(&base("gone")).unwrap().thin_id;
    let deleting = f.sim.gate(SimOp::Delete);
    let listed = f.sim.gate(SimOp::ThinIds);
    let wait = Duration::from_secs(60);
    std::thread::scope(|s| {
        // No watcher: the removal deletes the device itself, and stops at the gate.
        let removal = s.spawn(|| engine.remove("gone"));
        assert!(deleting.wait_reached(wait), "the deletion started");
        let doctor = s.spawn(|| engine.orphan_thin_ids());
        assert!(listed.wait_reached(wait), "the doctor listed the pool");
        listed.open();
        deleting.open();
        assert_eq!(removal.join().unwrap().unwrap(), Removal::Removed);
        assert_eq!(doctor.join().unwrap().unwrap(), Vec::<ThinId>::new());
    });
    assert!(!f.sim.thin_ids_now().contains(&gone));
    assert_consistent(&f, engine);
}
