//! True usage over the sim, whose mounts keep files: what a layer maps, what it holds alone
//! and what it shares, as a child rewrites some of its parent's data and adds its own.

use super::*;

const K: u64 = 1024;

fn write(dir: &Path, file: &str, byte: u8, bytes: u64) {
    std::fs::write(dir.join(file), vec![byte; bytes as usize]).unwrap();
}

/// `n` KiB more than `formatted`.
fn plus(n: u64, formatted: ByteSize) -> ByteSize {
    ByteSize::from_bytes(n * K + formatted.bytes())
}

fn kib(n: u64) -> ByteSize {
    ByteSize::from_bytes(n * K)
}

#[test]
fn a_child_that_rewrites_and_adds_data_holds_exactly_that_alone() {
    let f = Fixture::with_sim(Sim::with_files(ByteSize::gib(100), ByteSize::gib(1)));
    let engine = f.engine();
    engine.create(&base("base")).unwrap();
    let formatted = engine.usage("base").unwrap().mapped;
    let dir = engine.mount("base", None, false).unwrap();
    write(&dir, "kept", b'a', 90 * K);
    write(&dir, "rewritten", b'b', 10 * K);
    engine.unmount("base", None).unwrap();
    engine.commit("base").unwrap();
    let alone = engine.usage("base").unwrap();
    assert_eq!(alone.mapped, plus(100, formatted));
    assert_eq!(alone.exclusive, alone.mapped, "nothing shares it yet");

    engine.create(&child("app", "base")).unwrap();
    let dir = engine.mount("app", None, false).unwrap();
    write(&dir, "rewritten", b'c', 10 * K);
    write(&dir, "added", b'd', 10 * K);
    engine.unmount("app", None).unwrap();

    let app = engine.usage("app").unwrap();
    assert_eq!(app.mapped, plus(110, formatted));
    assert_eq!(app.exclusive, kib(20), "the rewritten and the added data");
    assert_eq!(app.shared(), plus(90, formatted));
    let base_now = engine.usage("base").unwrap();
    assert_eq!(
        base_now.exclusive,
        kib(10),
        "only its old copy of the rewritten file"
    );
    let listed = engine.usage_all(&BTreeMap::new()).unwrap();
    assert_eq!(listed[&LayerName::new("app").unwrap()], app);
    assert_eq!(listed[&LayerName::new("base").unwrap()], base_now);
    let used = engine.status().unwrap().data.used;
    assert_eq!(
        used,
        plus(120, formatted),
        "the pool counts shared data once"
    );

    // Removing the child gives back what it held alone, and the parent's data is its own again.
    engine.remove("app").unwrap();
    assert_eq!(engine.status().unwrap().data.used, plus(100, formatted));
    assert_eq!(
        engine.usage("base").unwrap().exclusive,
        plus(100, formatted)
    );
    assert_consistent(&f, engine);
}

#[test]
fn usage_by_label_covers_the_ready_layers_that_carry_it() {
    let f = Fixture::new();
    let engine = f.engine();
    let mut labelled = base("a");
    labelled.labels.insert("role".into(), "ci".into());
    engine.create(&labelled).unwrap();
    engine.create(&base("b")).unwrap();
    let role = BTreeMap::from([("role".to_string(), "ci".to_string())]);
    let usage = engine.usage_all(&role).unwrap();
    assert_eq!(
        usage.keys().map(LayerName::as_str).collect::<Vec<_>>(),
        ["a"]
    );
    assert!(engine.usage("nope").is_err());
}
