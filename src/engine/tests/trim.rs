//! Trim over the sim, whose mounts keep files: what deleted files held stays taken from the
//! pool until a trim, mounted or not, gives it back; committed layers cannot be trimmed.

use super::*;

const K: u64 = 1024;

fn used(engine: &Engine<Sim, Sim>) -> u64 {
    engine.status().unwrap().data.used.bytes()
}

#[test]
fn trim_gives_back_what_deleted_files_held_mounted_or_not() {
    let f = Fixture::with_sim(Sim::with_files(ByteSize::gib(100), ByteSize::gib(1)));
    let engine = f.engine();
    engine.create(&base("app")).unwrap();
    let formatted = used(&engine);
    let dir = engine.mount("app", None, false).unwrap();
    std::fs::write(dir.join("big"), vec![1u8; 50 * K as usize]).unwrap();
    std::fs::write(dir.join("small"), vec![2u8; 20 * K as usize]).unwrap();
    engine.unmount("app", None).unwrap();
    assert_eq!(used(&engine), formatted + 70 * K);

    // Deleted in a mount: the filesystem freed it, the pool has not, until the trim.
    let dir = engine.mount("app", None, false).unwrap();
    std::fs::remove_file(dir.join("big")).unwrap();
    let trimmed = engine.trim("app").unwrap();
    assert_eq!(trimmed.given_back, ByteSize::from_bytes(50 * K));
    assert_eq!(used(&engine), formatted + 20 * K);
    assert!(dir.join("small").exists(), "a trim leaves the files");
    engine.unmount("app", None).unwrap();

    // Deleted, then unmounted: the trim mounts it privately.
    let dir = engine.mount("app", None, false).unwrap();
    std::fs::remove_file(dir.join("small")).unwrap();
    engine.unmount("app", None).unwrap();
    assert_eq!(
        used(&engine),
        formatted + 20 * K,
        "still mapped after the unmount"
    );
    let trimmed = engine.trim("app").unwrap();
    assert_eq!(trimmed.given_back, ByteSize::from_bytes(20 * K));
    assert_eq!(used(&engine), formatted);
    assert!(f.sim.mounts_now().is_empty(), "the private mount is gone");
    assert_consistent(&f, engine);
}

#[test]
fn trim_refuses_committed_layers_and_read_only_mounts() {
    let f = Fixture::with_sim(Sim::with_files(ByteSize::gib(100), ByteSize::gib(1)));
    let engine = f.engine();
    engine.create(&base("base")).unwrap();
    engine.commit("base").unwrap();
    let err = engine.trim("base").unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Invalid, "{err}");
    assert!(err.to_string().contains("committed"), "{err}");
    engine.create(&base("ro")).unwrap();
    engine.mount("ro", None, true).unwrap();
    assert_eq!(engine.trim("ro").unwrap_err().kind(), ErrorKind::Busy);
    assert_eq!(engine.trim("nope").unwrap_err().kind(), ErrorKind::NotFound);
}
