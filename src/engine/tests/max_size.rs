//! containerd's `containerd.io/snapshot/max-size` label over the sim: a root gets that size,
//! a child is grown to it, and a smaller or malformed one is refused, leaving nothing.

use super::*;

fn sized(e: &Engine<Sim, Sim>, key: &str, parent: &str, size: &str) -> Result<SnapshotMount> {
    let new = NewSnapshot {
        namespace: "ns",
        key,
        parent,
        kind: SnapshotKind::Active,
        labels: BTreeMap::from([(MAX_SIZE_LABEL.to_string(), size.to_string())]),
    };
    e.snapshot_create(new, ROOT)
}

fn size_of(e: &Engine<Sim, Sim>, key: &str) -> ByteSize {
    let name = e.snapshot_layer("ns", key).unwrap();
    e.inspect(name.as_str()).unwrap().size
}

#[test]
fn the_max_size_label_sizes_roots_and_grows_children() {
    let f = Fixture::new();
    let e = f.engine();
    sized(&e, "root", "", "2147483648").unwrap();
    assert_eq!(size_of(&e, "root"), ByteSize::gib(2));
    e.snapshot_commit("ns", "root", "base", BTreeMap::new())
        .unwrap();

    // Rounded down to whole 4 KiB blocks.
    sized(&e, "big", "base", "3221229000").unwrap();
    assert_eq!(size_of(&e, "big"), ByteSize::gib(3));
    prepare(&e, "ns", "plain", "base").unwrap();
    assert_eq!(
        size_of(&e, "plain"),
        ByteSize::gib(2),
        "the parent's, without the label"
    );

    let layers = e.list(&BTreeMap::new()).unwrap().len();
    for (bad, why) in [
        ("1073741824", "smaller than its parent"),
        ("10G", "is not a size in bytes"),
        ("-5", "is not a size in bytes"),
        ("4095", "smaller than one 4 KiB block"),
    ] {
        let err = sized(&e, "bad", "base", bad).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Invalid, "{bad}: {err}");
        assert!(err.to_string().contains(why), "{bad}: {err}");
    }
    assert_eq!(e.list(&BTreeMap::new()).unwrap().len(), layers);
    assert!(e.snapshot_layer("ns", "bad").is_err(), "the key stays free");
    assert_consistent(&f, e);
}
