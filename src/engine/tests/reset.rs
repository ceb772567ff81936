//! Checkpoints and resets over the sim: content comes back, the layer keeps its name and
//! labels, refusals change nothing, and a crash at any step leaves the old content or the new,
//! never a lost layer or an unowned device.

use super::*;

const BLOCK: u64 = 64 << 10;

fn thin(engine: &Engine<Sim, Sim>, name: &str) -> ThinId {
    engine.inspect(name).unwrap().thin_id
}

fn write(f: &Fixture, engine: &Engine<Sim, Sim>, name: &str, byte: u8) {
    f.sim
        .write_blocks(thin(engine, name), 3 * BLOCK, &[byte; 100])
        .unwrap();
}

fn byte(f: &Fixture, engine: &Engine<Sim, Sim>, name: &str) -> u8 {
    f.sim.read_blocks(thin(engine, name), 3 * BLOCK, 1).unwrap()[0]
}

/// A committed base holding 1s, and a writable child "work" holding 2s.
fn setup(f: &Fixture) {
    let e = f.engine();
    e.create(&base("base")).unwrap();
    write(f, &e, "base", 1);
    e.commit("base").unwrap();
    e.create(&CreateLayer {
        labels: BTreeMap::from([("team".into(), "ci".into())]),
        ..child("work", "base")
    })
    .unwrap();
    write(f, &e, "work", 2);
}

#[test]
fn a_layer_goes_back_to_a_checkpoint_or_to_its_parent() {
    let f = Fixture::new();
    setup(&f);
    let engine = f.engine();
    let taken = engine
        .checkpoint("work", "work-cp", &BTreeMap::new())
        .unwrap();
    assert!(taken.committed && taken.content_id.is_some());
    assert_eq!(
        taken.checkpoint_of.as_ref().map(LayerName::as_str),
        Some("work")
    );
    assert_eq!(taken.parent.as_ref().map(LayerName::as_str), Some("base"));
    assert!(
        engine.inspect("work").unwrap().children.is_empty(),
        "a checkpoint is no child: the layer stays free to reset"
    );
    write(&f, &engine, "work", 3);

    let old_thin = thin(&engine, "work");
    let reset = engine.reset("work", Some("work-cp")).unwrap();
    assert_eq!(byte(&f, &engine, "work"), 2, "back to the checkpoint");
    assert_ne!(reset.thin_id, old_thin);
    engine.finish_discard("work").unwrap();
    assert!(
        !f.sim.thin_ids_now().contains(&old_thin),
        "old device deleted"
    );
    assert_eq!(reset.labels["team"], "ci");
    assert!(!reset.committed);

    engine.reset("work", None).unwrap();
    engine.finish_discard("work").unwrap();
    assert_eq!(byte(&f, &engine, "work"), 1, "back to the parent");
    assert_eq!(
        byte(&f, &engine, "work-cp"),
        2,
        "the checkpoint is untouched"
    );
    assert_consistent(&f, engine);
}

#[test]
fn a_mounted_layer_is_checkpointed_and_an_active_one_comes_back_active() {
    let f = Fixture::new();
    setup(&f);
    let engine = f.engine();
    engine.mount("work", None, false).unwrap();
    engine.checkpoint("work", "cp", &BTreeMap::new()).unwrap();
    engine.unmount("work", None).unwrap();
    engine.activate("work").unwrap();
    let reset = engine.reset("work", Some("cp")).unwrap();
    assert!(reset.device.is_some(), "active before, active after");
    assert_eq!(f.sim.active_read_only(reset.thin_id).unwrap(), Some(false));
    engine.finish_discard("work").unwrap();
    assert_consistent(&f, engine);
}

/// The old device outlives the reset's answer; whatever comes first deletes it, and none
/// loses it: the daemon's call after the answer, the next reset, the deferred work's round,
/// a removal of the layer, the next start.
#[test]
fn the_device_a_reset_replaced_is_deleted_by_whatever_comes_first() {
    let f = Fixture::new();
    setup(&f);
    let engine = f.engine();
    let discarding = |engine: &Engine<Sim, Sim>| {
        let name = LayerName::new("work").unwrap();
        engine.record(&name).unwrap().discarding
    };
    let first = thin(&engine, "work");
    engine.reset("work", None).unwrap();
    assert_eq!(discarding(&engine), Some(first), "named until it is gone");
    assert!(f.sim.thin_ids_now().contains(&first), "not waited for");

    let second = thin(&engine, "work");
    engine.reset("work", None).unwrap();
    assert!(!f.sim.thin_ids_now().contains(&first), "by the next reset");
    assert_eq!(discarding(&engine), Some(second));

    engine.process_deferred().unwrap();
    assert!(!f.sim.thin_ids_now().contains(&second), "by the round");
    assert_eq!(discarding(&engine), None);
    engine.finish_discard("work").unwrap();

    let third = thin(&engine, "work");
    engine.reset("work", None).unwrap();
    drop(engine);
    let (engine, report) = f.open();
    assert_eq!(report.resets_settled.len(), 1, "{report:?}");
    assert!(!f.sim.thin_ids_now().contains(&third), "by the next start");

    let fourth = thin(&engine, "work");
    engine.reset("work", None).unwrap();
    let last = thin(&engine, "work");
    engine.remove("work").unwrap();
    let left = f.sim.thin_ids_now();
    assert!(
        !left.contains(&fourth) && !left.contains(&last),
        "by the removal: {left:?}"
    );
    assert_consistent(&f, engine);
}

#[test]
fn refused_resets_and_checkpoints_change_nothing() {
    let f = Fixture::new();
    setup(&f);
    let engine = f.engine();
    engine.create(&base("other")).unwrap();
    engine.commit("other").unwrap();
    let before = f.sim.thin_ids_now();
    let kind = |r: Result<Layer>| r.unwrap_err().kind();

    assert_eq!(
        kind(engine.reset("work", Some("other"))),
        ErrorKind::Invalid
    );
    assert_eq!(kind(engine.reset("base", Some("work"))), ErrorKind::Invalid);
    assert_eq!(kind(engine.reset("other", None)), ErrorKind::Invalid);
    assert_eq!(kind(engine.reset("work", Some("work"))), ErrorKind::Invalid);
    assert_eq!(kind(engine.reset("nope", None)), ErrorKind::NotFound);
    assert_eq!(
        kind(engine.checkpoint("base", "cp", &BTreeMap::new())),
        ErrorKind::Invalid
    );
    assert_eq!(
        kind(engine.checkpoint("work", "other", &BTreeMap::new())),
        ErrorKind::AlreadyExists
    );

    engine.mount("work", None, false).unwrap();
    assert_eq!(kind(engine.reset("work", None)), ErrorKind::Busy);
    engine.unmount("work", None).unwrap();

    engine.activate("work").unwrap();
    f.sim.hold(thin(&engine, "work"));
    assert_eq!(kind(engine.reset("work", None)), ErrorKind::Busy);
    f.sim.release(thin(&engine, "work"));
    engine.deactivate("work").unwrap();

    engine.create(&child("grandchild", "work")).unwrap();
    assert_eq!(kind(engine.reset("work", None)), ErrorKind::Busy);
    engine.remove("grandchild").unwrap();

    assert_eq!(f.sim.thin_ids_now(), before);
    assert_eq!(byte(&f, &engine, "work"), 2);
    assert_consistent(&f, engine);
}

#[test]
fn a_failed_snapshot_leaves_the_layer_as_it_was() {
    let f = Fixture::new();
    setup(&f);
    let engine = f.engine();
    let before = engine.inspect("work").unwrap();
    f.sim.fail_at(SimOp::Snapshot, 0, ErrorKind::NoSpace);
    let err = engine.reset("work", None).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NoSpace);
    assert_eq!(engine.inspect("work").unwrap(), before);
    assert_eq!(byte(&f, &engine, "work"), 2);
    assert_consistent(&f, engine);
}

/// The layer's spare, made by the deferred work after a reset.
fn spare(engine: &Engine<Sim, Sim>) -> Option<ThinId> {
    engine.inspect("work").unwrap().reset_spare
}

/// After a reset, the deferred round makes a spare (a snapshot of the parent); the next reset
/// to the parent takes it without a pool message, and the round makes the next one.
#[test]
fn a_reset_takes_the_spare_the_one_before_left() {
    let f = Fixture::new();
    setup(&f);
    let engine = f.engine();
    engine.reset("work", None).unwrap();
    assert_eq!(spare(&engine), None, "made after the answer, not by it");
    engine.process_deferred().unwrap();
    let made = spare(&engine).expect("a spare after the round");
    assert!(f.sim.thin_ids_now().contains(&made));
    write(&f, &engine, "work", 5);

    let old = thin(&engine, "work");
    let before = f.sim.thin_ids_now();
    let reset = engine.reset("work", None).unwrap();
    assert_eq!(reset.thin_id, made, "the spare, taken");
    assert_eq!(reset.reset_spare, None);
    assert_eq!(
        f.sim.thin_ids_now(),
        before,
        "no snapshot made, nothing deleted yet"
    );
    assert_eq!(byte(&f, &engine, "work"), 1, "back to the parent");
    assert_eq!(reset.labels["team"], "ci");

    engine.process_deferred().unwrap();
    let next = spare(&engine).expect("the next spare");
    let ids = f.sim.thin_ids_now();
    assert!(!ids.contains(&old) && ids.contains(&next), "{ids:?}");
    assert_consistent(&f, engine);
}

/// A spare is the parent's content, whatever the layer did meanwhile; a reset to a
/// checkpoint leaves it for the next reset to the parent; removal leaves no device.
#[test]
fn a_spare_holds_the_parent_and_goes_with_its_layer() {
    let f = Fixture::new();
    setup(&f);
    let engine = f.engine();
    engine.checkpoint("work", "cp", &BTreeMap::new()).unwrap();
    engine.reset("work", None).unwrap();
    engine.process_deferred().unwrap();
    let made = spare(&engine).unwrap();
    write(&f, &engine, "work", 7);
    engine.reset("work", Some("cp")).unwrap();
    assert_eq!(byte(&f, &engine, "work"), 2, "the checkpoint's content");
    assert_eq!(spare(&engine), Some(made), "kept for the parent");
    engine.reset("work", None).unwrap();
    assert_eq!(thin(&engine, "work"), made);
    assert_eq!(byte(&f, &engine, "work"), 1);
    engine.process_deferred().unwrap();
    assert!(spare(&engine).is_some());
    engine.remove("work").unwrap();
    assert_consistent(&f, engine);
    let engine = f.engine();
    let left = f.sim.thin_ids_now();
    let owned: BTreeSet<ThinId> = ["base", "cp"].iter().map(|n| thin(&engine, n)).collect();
    assert_eq!(left, owned, "nothing of work's left");
}

/// A committed layer is never reset: the commit lets its spare go, and the device is deleted.
#[test]
fn a_commit_lets_the_spare_go() {
    let f = Fixture::new();
    setup(&f);
    let engine = f.engine();
    engine.reset("work", None).unwrap();
    engine.process_deferred().unwrap();
    let made = spare(&engine).unwrap();
    let committed = engine.commit("work").unwrap();
    assert_eq!(committed.reset_spare, None);
    assert!(
        !f.sim.thin_ids_now().contains(&made),
        "the spare's device deleted"
    );
    assert_consistent(&f, engine);
}

/// With a daemon, the commit names the spare as the device to discard and wakes the round,
/// which deletes it.
#[test]
fn a_commit_leaves_the_spare_to_the_round_when_a_daemon_runs_it() {
    let f = Fixture::new();
    setup(&f);
    let engine = f.engine();
    let wakes = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = wakes.clone();
    engine.set_deferred_waker(move || {
        counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    });
    engine.reset("work", None).unwrap();
    engine.process_deferred().unwrap();
    let made = spare(&engine).unwrap();
    assert_eq!(engine.commit("work").unwrap().reset_spare, None);
    assert_eq!(wakes.load(std::sync::atomic::Ordering::SeqCst), 1);
    assert!(f.sim.thin_ids_now().contains(&made), "until the round");
    engine.process_deferred().unwrap();
    assert!(
        !f.sim.thin_ids_now().contains(&made),
        "deleted by the round"
    );
    assert_consistent(&f, engine);
}

/// A commit while a reset's old device still waits to be deleted keeps the spare; the round
/// that deletes the old device lets the spare go too, and so does a start.
#[test]
fn a_spare_a_commit_could_not_let_go_goes_with_the_round_or_the_start() {
    for by_start in [false, true] {
        let f = Fixture::new();
        setup(&f);
        let engine = f.engine();
        engine.checkpoint("work", "cp", &BTreeMap::new()).unwrap();
        engine.reset("work", None).unwrap();
        engine.process_deferred().unwrap();
        let made = spare(&engine).unwrap();
        engine.reset("work", Some("cp")).unwrap();
        let committed = engine.commit("work").unwrap();
        assert_eq!(committed.reset_spare, Some(made), "the slot was taken");
        let engine = if by_start {
            drop(engine);
            let (engine, report) = f.open();
            assert_eq!(report.spares_dropped, [LayerName::new("work").unwrap()]);
            engine
        } else {
            engine.process_deferred().unwrap();
            engine
        };
        assert_eq!(spare(&engine), None, "by start: {by_start}");
        assert!(
            !f.sim.thin_ids_now().contains(&made),
            "by start: {by_start}"
        );
        assert_eq!(
            byte(&f, &engine, "work"),
            2,
            "the checkpoint's content, committed"
        );
        assert_consistent(&f, engine);
    }
}

/// A writable parent may still change, so a child of one gets no spare: its resets snapshot.
#[test]
fn a_writable_parent_gives_no_spare() {
    let f = Fixture::new();
    setup(&f);
    let engine = f.engine();
    engine.create(&child("kid", "work")).unwrap();
    engine.reset("kid", None).unwrap();
    engine.process_deferred().unwrap();
    assert_eq!(engine.inspect("kid").unwrap().reset_spare, None);
    write(&f, &engine, "work", 9);
    engine.reset("kid", None).unwrap();
    assert_eq!(byte(&f, &engine, "kid"), 9, "the parent as it is now");
    engine.finish_discard("kid").unwrap();
    assert_consistent(&f, engine);
}

/// A crash at any step of a reset that takes a spare and of the round that makes the next
/// leaves the layer with its old content or the parent's, and no device unowned.
#[test]
fn a_crash_while_a_spare_is_made_or_taken_is_settled_on_open() {
    let setup_with_spare = |f: &Fixture| {
        setup(f);
        let engine = f.engine();
        engine.reset("work", None).unwrap();
        engine.process_deferred().unwrap();
        assert!(spare(&engine).is_some());
        write(f, &engine, "work", 2);
    };
    let op = |e: &mut Engine<Sim, Sim>| {
        e.reset("work", None).unwrap();
        e.process_deferred().unwrap();
    };
    let check = |f: &Fixture, point: Point, nth: u32| {
        let (engine, report) = f.open();
        let content = byte(f, &engine, "work");
        assert!(
            content == 1 || content == 2,
            "at {point}#{nth}: work holds {content}; {report:?}"
        );
        assert_consistent(f, engine);
        // The next reset works, with a spare or without.
        let engine = f.engine();
        engine.reset("work", None).unwrap();
        assert_eq!(byte(f, &engine, "work"), 1, "at {point}#{nth}");
        engine.process_deferred().unwrap();
        assert_consistent(f, engine);
    };
    let mut crashed = crash_everywhere(&setup_with_spare, &op, &check);
    // A removal takes the spare with the layer: gone whole, or there whole.
    let remove = |e: &mut Engine<Sim, Sim>| {
        e.remove("work").unwrap();
        e.finish_deletions().unwrap();
    };
    let removed = |f: &Fixture, point: Point, nth: u32| {
        let (engine, report) = f.open();
        if let Ok(work) = engine.inspect("work") {
            assert_eq!(byte(f, &engine, "work"), 2, "at {point}#{nth}; {report:?}");
            assert!(work.reset_spare.is_some(), "at {point}#{nth}");
        }
        assert_consistent(f, engine);
    };
    crashed.extend(crash_everywhere(&setup_with_spare, &remove, &removed));
    // A commit lets the spare go: committed without it (its device deleted at the latest by
    // the next round), or not committed and still holding it.
    let commit = |e: &mut Engine<Sim, Sim>| {
        e.commit("work").unwrap();
    };
    let committed = |f: &Fixture, point: Point, nth: u32| {
        let (engine, report) = f.open();
        let work = engine.inspect("work").unwrap();
        assert_eq!(byte(f, &engine, "work"), 2, "at {point}#{nth}; {report:?}");
        assert_eq!(
            work.committed,
            work.reset_spare.is_none(),
            "at {point}#{nth}"
        );
        engine.process_deferred().unwrap();
        assert_consistent(f, engine);
        let engine = f.engine();
        let owned: BTreeSet<ThinId> = ["base", "work"].iter().map(|n| thin(&engine, n)).collect();
        let spare = engine.inspect("work").unwrap().reset_spare;
        assert_eq!(
            f.sim.thin_ids_now(),
            owned.into_iter().chain(spare).collect(),
            "at {point}#{nth}: no device but the layers' and a spare still held"
        );
    };
    crashed.extend(crash_everywhere(&setup_with_spare, &commit, &committed));
    require_points(&crashed, |p| {
        [
            Point::ResetSwitched,
            Point::ResetSpareClaimed,
            Point::ResetSpareMade,
            Point::RemoveQueued,
            Point::CommitDone,
        ]
        .contains(p)
    });
}

#[test]
fn a_crash_at_any_step_of_a_reset_or_checkpoint_is_settled_on_open() {
    type Op = fn(&mut Engine<Sim, Sim>);
    let operations: [(&str, Op); 2] = [
        ("reset", |e| {
            e.reset("work", None).unwrap();
        }),
        ("checkpoint", |e| {
            e.checkpoint("work", "cp", &BTreeMap::new()).unwrap();
        }),
    ];
    let mut crashed = BTreeSet::new();
    for (what, op) in operations {
        let check = |f: &Fixture, point: Point, nth: u32| {
            let (engine, report) = f.open();
            let work = engine.inspect("work").unwrap_or_else(|e| {
                panic!("{what} at {point}#{nth}: the layer is lost ({e}); {report:?}")
            });
            let content = byte(f, &engine, "work");
            assert!(
                content == 2 || (what == "reset" && content == 1),
                "{what} at {point}#{nth}: work holds {content}"
            );
            assert_eq!(work.labels["team"], "ci");
            assert_consistent(f, engine);
        };
        crashed.extend(crash_everywhere(&setup, &op, &check));
    }
    // The spare's points are the next test's.
    require_points(&crashed, |p| {
        let name = p.name();
        (name.starts_with("reset.") && !name.starts_with("reset.spare_"))
            || name.starts_with("checkpoint.")
    });
}
