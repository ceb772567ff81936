//! Export and import over the sim: a layer moved to a second pool, whole or as the changes
//! since a base the second pool holds, arrives equal byte for byte, keeps its content id,
//! and a stream that is cut short, changed or meant for another base leaves nothing behind.

use super::*;
use crate::kernel::PoolKernel;

const BLOCK: u64 = 64 << 10;
/// How far into each device the comparisons read (past everything the tests write).
const COMPARED: usize = 4 << 20;

fn thin(engine: &Engine<Sim, Sim>, name: &str) -> ThinId {
    engine.inspect(name).unwrap().thin_id
}

fn write(f: &Fixture, engine: &Engine<Sim, Sim>, name: &str, block: u64, byte: u8) {
    let id = thin(engine, name);
    f.sim
        .write_blocks(id, block * BLOCK, &[byte; BLOCK as usize])
        .unwrap();
}

fn bytes(f: &Fixture, engine: &Engine<Sim, Sim>, name: &str) -> Vec<u8> {
    f.sim.read_blocks(thin(engine, name), 0, COMPARED).unwrap()
}

fn export(engine: &Engine<Sim, Sim>, name: &str, from: Option<&str>) -> Vec<u8> {
    export_with(engine, name, from, false)
}

fn export_with(
    engine: &Engine<Sim, Sim>,
    name: &str,
    from: Option<&str>,
    compress: bool,
) -> Vec<u8> {
    engine
        .export(name, from, compress, || Ok(Vec::new()))
        .unwrap()
        .0
}

fn import(
    engine: &Engine<Sim, Sim>,
    name: &str,
    parent: Option<&str>,
    stream: &[u8],
) -> Result<Layer> {
    let request = ImportLayer {
        name: name.into(),
        parent: parent.map(Into::into),
    };
    engine.import(&request, stream).map(|(layer, _)| layer)
}

/// A pool with a committed base (blocks 1 to 3 written) and a committed child "app" that
/// rewrote block 2, wrote block 40 and discarded block 3.
fn source() -> (Fixture, Engine<Sim, Sim>) {
    let f = Fixture::new();
    let e = f.engine();
    e.create(&base("base")).unwrap();
    for block in 1..=3 {
        write(&f, &e, "base", block, block as u8);
    }
    e.commit("base").unwrap();
    e.create(&CreateLayer {
        labels: BTreeMap::from([("tier".into(), "web".into())]),
        ..child("app", "base")
    })
    .unwrap();
    write(&f, &e, "app", 2, 0xaa);
    write(&f, &e, "app", 40, 0xbb);
    e.activate("app").unwrap();
    let mut device = f.sim.open_thin(thin(&e, "app")).unwrap();
    device.zero(3 * BLOCK, BLOCK).unwrap();
    e.commit("app").unwrap();
    (f, e)
}

#[test]
fn a_layer_moves_to_another_pool_whole_then_as_changes() {
    let (a, ea) = source();
    let b = Fixture::new();
    let eb = b.engine();

    let whole = export(&ea, "base", None);
    let imported = import(&eb, "base", None, &whole).unwrap();
    assert_eq!(bytes(&b, &eb, "base"), bytes(&a, &ea, "base"));
    assert_eq!(imported.content_id, ea.inspect("base").unwrap().content_id);
    assert!(imported.committed);
    assert_eq!(imported.fs_uuid, ea.inspect("base").unwrap().fs_uuid);

    let changes = export(&ea, "app", Some("base"));
    let (_, summary) = eb
        .import(
            &ImportLayer {
                name: "app".into(),
                parent: Some("base".into()),
            },
            &changes[..],
        )
        .unwrap();
    assert_eq!(bytes(&b, &eb, "app"), bytes(&a, &ea, "app"));
    assert_eq!(summary.data_bytes, 2 * BLOCK, "only the two blocks written");
    assert_eq!(summary.unmapped_bytes, BLOCK, "and the one discarded");
    let app = eb.inspect("app").unwrap();
    assert_eq!(app.labels["tier"], "web");
    assert_eq!(app.parent.as_ref().map(LayerName::as_str), Some("base"));
    assert_eq!(app.content_id, ea.inspect("app").unwrap().content_id);

    // The filesystem travels with the blocks: the sim's superblock is in block 0.
    eb.activate("app").unwrap();
    let found = b.sim.probe(&eb.activate("app").unwrap()).unwrap().unwrap();
    assert_eq!(found.uuid, app.fs_uuid);
    assert_consistent(&b, eb);
}

#[test]
fn a_compressed_stream_is_smaller_and_imports_the_same() {
    let (a, ea) = source();
    let plain = export(&ea, "base", None);
    let compressed = export_with(&ea, "base", None, true);
    assert!(
        compressed.len() * 4 < plain.len(),
        "{} vs {}",
        compressed.len(),
        plain.len()
    );
    let b = Fixture::new();
    let eb = b.engine();
    import(&eb, "base", None, &compressed).unwrap();
    assert_eq!(bytes(&b, &eb, "base"), bytes(&a, &ea, "base"));
}

#[test]
fn streams_that_are_cut_changed_or_meant_for_another_base_leave_nothing() {
    let (_a, ea) = source();
    let whole = export(&ea, "base", None);
    let changes = export(&ea, "app", Some("base"));
    let b = Fixture::new();
    let eb = b.engine();
    eb.create(&base("other")).unwrap();
    eb.commit("other").unwrap();
    let before = (b.sim.thin_ids_now(), eb.list(&BTreeMap::new()).unwrap());
    let kind = |r: Result<Layer>| r.unwrap_err().kind();

    let cut = &whole[..whole.len() - 10];
    assert_eq!(kind(import(&eb, "x", None, cut)), ErrorKind::Invalid);
    let mut changed = whole.clone();
    let middle = changed.len() / 2;
    changed[middle] ^= 1;
    assert_eq!(kind(import(&eb, "x", None, &changed)), ErrorKind::Invalid);
    let err = import(&eb, "x", Some("other"), &changes).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Invalid);
    assert!(err.to_string().contains("content"), "{err}");
    assert_eq!(kind(import(&eb, "x", None, &changes)), ErrorKind::Invalid);
    assert_eq!(
        kind(import(&eb, "x", Some("other"), &whole)),
        ErrorKind::Invalid
    );
    assert_eq!(
        kind(import(&eb, "other", None, &whole)),
        ErrorKind::AlreadyExists
    );
    assert_eq!(
        kind(import(&eb, "x", None, &b"not a stream"[..])),
        ErrorKind::Invalid
    );

    assert_eq!(
        (b.sim.thin_ids_now(), eb.list(&BTreeMap::new()).unwrap()),
        before
    );
    assert_consistent(&b, eb);
}

#[test]
fn only_what_cannot_change_is_exported() {
    let (_a, ea) = source();
    let kind = |r: Result<(Vec<u8>, crate::stream::Summary)>| r.unwrap_err().kind();
    let export = |name: &str, from: Option<&str>| ea.export(name, from, false, || Ok(Vec::new()));
    ea.create(&child("work", "app")).unwrap();
    ea.mount("work", None, false).unwrap();
    assert_eq!(kind(export("work", None)), ErrorKind::Busy);
    ea.unmount("work", None).unwrap();
    ea.activate("work").unwrap();
    assert_eq!(kind(export("work", None)), ErrorKind::Busy);
    ea.deactivate("work").unwrap();
    // Unmounted and inactive, a writable layer is exported (from a committed ancestor too).
    export("work", Some("base")).unwrap();
    assert_eq!(kind(export("app", Some("work"))), ErrorKind::Invalid);
    assert_eq!(kind(export("app", Some("app"))), ErrorKind::Invalid);
    ea.create(&child("draft", "app")).unwrap();
    ea.create(&child("leaf", "draft")).unwrap();
    let err = export("leaf", Some("draft")).unwrap_err();
    assert!(err.to_string().contains("not committed"), "{err}");
    assert_eq!(kind(export("nope", None)), ErrorKind::NotFound);
}

#[test]
fn a_crash_at_any_step_of_an_import_is_rolled_back_on_open() {
    let (_a, ea) = source();
    let whole = export(&ea, "base", None);
    let op = |e: &mut Engine<Sim, Sim>| {
        import(e, "copy", None, &whole).unwrap();
    };
    let check = |f: &Fixture, point: Point, nth: u32| {
        let (engine, report) = f.open();
        match engine.inspect("copy") {
            // Past the point where it counts as made, it is there whole.
            Ok(copy) => assert!(copy.committed, "{point}#{nth}: {report:?}"),
            Err(e) => assert_eq!(e.kind(), ErrorKind::NotFound, "{point}#{nth}"),
        }
        assert_consistent(f, engine);
    };
    let crashed = crash_everywhere(&|_| {}, &op, &check);
    require_points(&crashed, |p| p.name().starts_with("import."));
}
