//! `pool.max_overcommit` over the sim: creates and resizes past the limit are refused with the
//! figures and change nothing; the figures follow creates, resizes and removals.

use super::*;

/// An engine over a 100G sim pool with `max_overcommit` as given, and `capacity` as the most
/// the pool may grow to.
fn engine_limited(f: &Fixture, limit: f64, capacity: Option<ByteSize>) -> Engine<Sim, Sim> {
    let settings = Settings {
        max_overcommit: Ratio::new(limit).unwrap(),
        data_capacity: capacity,
        ..f.settings()
    };
    Engine::open(f.sim.clone(), f.sim.clone(), settings)
        .unwrap()
        .0
}

fn sized(mut request: CreateLayer, gib: u64) -> CreateLayer {
    request.size = Some(ByteSize::gib(gib));
    request
}

fn figures(engine: &Engine<Sim, Sim>) -> Overcommit {
    engine.status().unwrap().overcommit
}

#[test]
fn a_create_past_the_limit_is_refused_with_the_figures_and_changes_nothing() {
    let f = Fixture::new();
    let engine = engine_limited(&f, 2.0, None);
    engine.create(&sized(base("base"), 60)).unwrap();
    engine.create(&child("kid", "base")).unwrap();
    let before = figures(&engine);
    assert_eq!(before.virtual_size, ByteSize::gib(120));
    assert_eq!(before.capacity, ByteSize::gib(100));
    assert!((before.ratio - 1.2).abs() < 1e-9, "{before:?}");
    assert_eq!(before.limit, Some(2.0));
    let ids = f.sim.thin_ids_now();

    let err = engine.create(&sized(child("big", "base"), 90)).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NoSpace, "{err}");
    let text = err.to_string();
    for figure in [
        "210.0G of virtual size",
        "120.0G now",
        "plus 90.0G",
        "100.0G of pool data",
        "2.10 times",
        "pool.max_overcommit 2",
    ] {
        assert!(text.contains(figure), "{figure:?} missing from: {text}");
    }
    assert!(
        engine.inspect("big").is_err(),
        "a refused create left a layer"
    );
    assert_eq!(
        f.sim.thin_ids_now(),
        ids,
        "a refused create touched the pool"
    );
    assert_eq!(figures(&engine), before);

    // Up to the limit exactly is allowed.
    engine.create(&sized(child("fits", "base"), 80)).unwrap();
    assert!((figures(&engine).ratio - 2.0).abs() < 1e-9);
    assert_consistent(&f, engine);
}

#[test]
fn a_resize_past_the_limit_is_refused_and_a_removal_gives_room_back() {
    let f = Fixture::new();
    let engine = engine_limited(&f, 1.5, None);
    engine.create(&sized(base("base"), 50)).unwrap();
    engine.create(&child("kid", "base")).unwrap();
    let err = engine.resize("kid", ByteSize::gib(101)).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NoSpace, "{err}");
    assert!(err.to_string().contains("plus 51.0G"), "{err}");
    assert_eq!(engine.inspect("kid").unwrap().size, ByteSize::gib(50));
    assert_eq!(figures(&engine).virtual_size, ByteSize::gib(100));
    engine.resize("kid", ByteSize::gib(100)).unwrap();
    assert_eq!(figures(&engine).virtual_size, ByteSize::gib(150));

    let refused = engine.create(&child("more", "base")).unwrap_err();
    assert_eq!(refused.kind(), ErrorKind::NoSpace);
    engine.remove("kid").unwrap();
    assert_eq!(figures(&engine).virtual_size, ByteSize::gib(50));
    engine.create(&child("more", "base")).unwrap();
    assert_consistent(&f, engine);
}

#[test]
fn where_the_pool_grows_by_itself_its_largest_size_is_the_capacity() {
    let f = Fixture::new();
    let engine = engine_limited(&f, 1.0, Some(ByteSize::gib(400)));
    engine.create(&sized(base("base"), 300)).unwrap();
    let now = figures(&engine);
    assert_eq!(now.capacity, ByteSize::gib(400));
    assert!((now.ratio - 0.75).abs() < 1e-9);
    // A maximum below the pool's size now (grown by hand past it) counts the size now.
    drop(engine);
    let engine = engine_limited(&f, 1.0, Some(ByteSize::gib(10)));
    assert_eq!(figures(&engine).capacity, ByteSize::gib(100));
    assert_eq!(
        figures(&engine).virtual_size,
        ByteSize::gib(300),
        "the figure is rebuilt from the records at open"
    );
}

#[test]
fn a_create_that_fails_gives_its_reservation_back() {
    let f = Fixture::new();
    let engine = engine_limited(&f, 2.0, None);
    engine.create(&sized(base("base"), 60)).unwrap();
    f.sim.fail_at(SimOp::Snapshot, 0, ErrorKind::Kernel);
    engine.create(&sized(child("kid", "base"), 60)).unwrap_err();
    f.sim.fail_at(SimOp::Activate, 0, ErrorKind::Kernel);
    engine.create(&sized(child("kid", "base"), 70)).unwrap_err();
    assert_eq!(figures(&engine).virtual_size, ByteSize::gib(60));
    // 140G is all that is left, and all of it is still there to take.
    engine.create(&sized(base("rest"), 140)).unwrap();
    assert_consistent(&f, engine);
}

#[test]
fn without_a_limit_nothing_is_refused_for_overcommit() {
    let f = Fixture::new();
    let engine = f.engine();
    engine.create(&sized(base("base"), 1000)).unwrap();
    engine.create(&child("kid", "base")).unwrap();
    let now = figures(&engine);
    assert_eq!(now.limit, None);
    assert!((now.ratio - 20.0).abs() < 1e-9, "{now:?}");
}
