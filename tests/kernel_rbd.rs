//! The rbd backend on a real single-node Ceph cluster and the kernel's rbd driver: the
//! library's calls cross-checked with the `rbd` command, and the layer engine on RBD images.
//! Run with `scripts/vm-test` (the cluster is started in the VM by `scripts/ceph-cluster`).

mod common;

use std::fs;

use std::collections::BTreeSet;

use common::ceph::cluster;
use common::daemon::{kill_9_while_clients_create, TestDaemon};
use common::{layer, require_dm_thin, TestPool};
use thinstack::engine::{Engine, Settings};
use thinstack::kernel::rbd::{map, Cluster, ImageFeatures, MapRequest};
use thinstack::kernel::real::RealFs;
use thinstack::kernel::PoolKernel;
use thinstack::names::ThinId;
use thinstack::pool::rbd::{image_name, RbdPool};
use thinstack::units::ByteSize;
use thinstack::ErrorKind;

fn require_rbd() {
    require_dm_thin();
    cluster();
    assert!(map::available(), "the kernel's rbd driver is not loaded");
}

/// A namespace of the test's own, so tests never see each other's images.
fn namespace(test: &str) -> String {
    format!("t{}-{test}", std::process::id())
}

#[test]
#[ignore = "kernel test: run with scripts/vm-test"]
fn images_clone_map_and_list_as_the_rbd_command_sees_them() {
    require_rbd();
    let test = cluster();
    let ns = namespace("lib");
    test.rbd(&["namespace", "create", &format!("{}/{ns}", test.pool)]);
    let connected = Cluster::connect(&test.config()).unwrap();
    let io = connected.io(&test.pool, Some(&ns)).unwrap();
    let features = ImageFeatures::default();

    io.create_image("base", 64 << 20, features).unwrap();
    let again = io.create_image("base", 64 << 20, features).unwrap_err();
    assert_eq!(again.kind(), ErrorKind::AlreadyExists, "{again}");

    // Map the base, make a filesystem, write a file.
    let request = MapRequest {
        monitors: connected.kernel_monitor_addresses().unwrap(),
        client: "admin".into(),
        secret: thinstack::kernel::rbd::secret_of(&connected).unwrap(),
        pool: test.pool.clone(),
        namespace: Some(ns.clone()),
        image: "base".into(),
        read_only: false,
        exclusive: false,
    };
    let base = map::map(&request).unwrap();
    assert!(base.node().exists());
    thinstack::kernel::fs::mkfs(thinstack::vocab::FsType::Ext4, &base.node(), &[]).unwrap();
    let mnt = tempfile::tempdir().unwrap();
    thinstack::kernel::fs::mount(
        &base.node(),
        mnt.path(),
        thinstack::vocab::FsType::Ext4,
        false,
        &[],
    )
    .unwrap();
    fs::write(mnt.path().join("from-base"), "base").unwrap();
    thinstack::kernel::fs::unmount(mnt.path(), &base.node()).unwrap();

    // Snapshot and clone it while it is mapped; the clone reads the base's file.
    {
        let image = io.open("base", None, false).unwrap();
        image.snapshot("to-child").unwrap();
        assert_eq!(image.snapshots().unwrap().len(), 1);
    }
    io.clone_image("base", "to-child", "child", features)
        .unwrap();
    map::unmap(base.id).unwrap();
    let child = map::map(&MapRequest {
        image: "child".into(),
        ..request.clone()
    })
    .unwrap();
    thinstack::kernel::fs::mount(
        &child.node(),
        mnt.path(),
        thinstack::vocab::FsType::Ext4,
        false,
        &[],
    )
    .unwrap();
    assert_eq!(
        fs::read_to_string(mnt.path().join("from-base")).unwrap(),
        "base"
    );
    fs::write(mnt.path().join("from-child"), "child").unwrap();
    thinstack::kernel::fs::unmount(mnt.path(), &child.node()).unwrap();

    // What the library lists is what the rbd command lists.
    let mut names = io.image_names().unwrap();
    names.sort();
    assert_eq!(names, ["base", "child"]);
    let listed = test.rbd(&["ls", &format!("{}/{ns}", test.pool)]);
    assert_eq!(
        listed.split_whitespace().collect::<Vec<_>>(),
        ["base", "child"]
    );
    let opened = io.open("child", None, true).unwrap();
    assert_eq!(
        opened.parent().unwrap(),
        Some(("base".into(), "to-child".into()))
    );
    assert!(
        !opened.extents(None, true).unwrap().is_empty(),
        "the child wrote objects of its own"
    );
    drop(opened);
    let base_at_snap = io.open("base", Some("to-child"), true).unwrap();
    assert_eq!(base_at_snap.children().unwrap(), ["child"]);
    drop(base_at_snap);

    // A mapped image is busy; the base with a clone cannot go, but can go to the trash.
    let busy = io.remove_image("child").unwrap_err();
    assert_eq!(busy.kind(), ErrorKind::Busy, "{busy}");
    map::unmap(child.id).unwrap();
    {
        let image = io.open("base", None, false).unwrap();
        image.remove_snapshot("to-child").unwrap();
    }
    let kept = io.remove_image("base").unwrap_err();
    assert_eq!(kept.kind(), ErrorKind::Busy, "{kept}");
    io.trash_image("base").unwrap();
    let child = map::map(&MapRequest {
        image: "child".into(),
        read_only: true,
        ..request.clone()
    })
    .unwrap();
    thinstack::kernel::fs::mount(
        &child.node(),
        mnt.path(),
        thinstack::vocab::FsType::Ext4,
        true,
        &["noload"],
    )
    .unwrap();
    assert_eq!(
        fs::read_to_string(mnt.path().join("from-base")).unwrap(),
        "base"
    );
    thinstack::kernel::fs::unmount(mnt.path(), &child.node()).unwrap();
    map::unmap(child.id).unwrap();

    io.remove_image("child").unwrap();
    for trashed in io.trashed_images().unwrap() {
        io.remove_trashed(&trashed.id).unwrap();
    }
    assert!(io.image_names().unwrap().is_empty());
    assert!(io.trashed_images().unwrap().is_empty());
}

#[test]
#[ignore = "kernel test: run with scripts/vm-test"]
fn the_engine_makes_commits_mounts_and_removes_layers_on_rbd_images() {
    require_rbd();
    let test = cluster();
    // The pool makes its namespace itself.
    let ns = namespace("engine");
    let t = TestPool::new(
        "rbd-engine",
        &format!("{}[layers]\nbase_size = \"64M\"\n", test.pool_toml(&ns)),
    );
    let pool = RbdPool::open(&t.config).unwrap();
    let (engine, report) = Engine::open(pool, RealFs, Settings::from_config(&t.config)).unwrap();
    assert!(report.is_clean(), "{report:?}");

    engine.create(&layer("base", None)).unwrap();
    let mnt = engine.mount("base", None, false).unwrap();
    fs::write(mnt.join("from-base"), "base").unwrap();
    engine.unmount("base", None).unwrap();
    engine.commit("base").unwrap();
    engine.create(&layer("app", Some("base"))).unwrap();
    let mnt = engine.mount("app", None, false).unwrap();
    assert_eq!(fs::read_to_string(mnt.join("from-base")).unwrap(), "base");
    fs::write(mnt.join("from-app"), "app").unwrap();

    // The images are the rbd command's too, one per layer, the child a clone of the base.
    let listed = test.rbd(&["ls", &format!("{}/{ns}", test.pool)]);
    assert_eq!(listed.split_whitespace().count(), 2, "{listed}");

    let busy = engine.remove("base").unwrap_err();
    assert_eq!(busy.kind(), ErrorKind::Busy, "{busy}");

    // A checkpoint of the mounted layer (a snapshot of a mapped image, its filesystem frozen
    // for the moment), then a reset to it: the layer reads what it held at the checkpoint.
    engine
        .checkpoint("app", "app-cp", &Default::default())
        .unwrap();
    fs::write(mnt.join("after-checkpoint"), "gone after the reset").unwrap();
    engine.unmount("app", None).unwrap();
    engine.deactivate("app").unwrap();
    engine.reset("app", Some("app-cp")).unwrap();
    engine.finish_discard("app").unwrap();
    let mnt = engine.mount("app", None, false).unwrap();
    assert_eq!(fs::read_to_string(mnt.join("from-app")).unwrap(), "app");
    assert!(
        !mnt.join("after-checkpoint").exists(),
        "the reset kept a later file"
    );
    engine.unmount("app", None).unwrap();
    engine.remove("app").unwrap();
    engine.remove("app-cp").unwrap();
    engine.remove("base").unwrap();
    engine.finish_deletions().unwrap();
    assert_eq!(engine.deletions_pending(), 0);
    drop(engine);

    // Every image is gone, the trash too, and nothing of the pool is mapped.
    let pool = RbdPool::open(&t.config).unwrap();
    assert!(pool.thin_ids().unwrap().is_empty());
    assert!(pool.active_ids().unwrap().is_empty());
    let trash = test.rbd(&["trash", "ls", &format!("{}/{ns}", test.pool)]);
    assert!(trash.trim().is_empty(), "left in the trash: {trash}");
}

/// A parent image whose snapshot for a clone was removed while the clone lived keeps that
/// snapshot in its snapshot trash (until the clone goes), and librbd lists it among the
/// image's snapshots under a uuid name, which no removal by name finds. Removing the parent
/// then goes as with any clone alive (to the pool's trash, purged with the clone): found by
/// containerd's suite on rbd, where the removal once took that "not found" for "gone already"
/// and left the image with no owner.
#[test]
#[ignore = "kernel test: run with scripts/vm-test"]
fn a_parent_whose_snapshot_is_in_the_snapshot_trash_is_removed_whole() {
    require_rbd();
    let test = cluster();
    let ns = namespace("trashed-snapshot");
    let t = TestPool::new("rbd-trashed-snapshot", &test.pool_toml(&ns));
    let pool = RbdPool::open(&t.config).unwrap();
    let (parent, clone) = (ThinId::new(1).unwrap(), ThinId::new(2).unwrap());
    pool.create_thin(parent).unwrap();
    pool.resize(parent, ByteSize::mib(64)).unwrap();
    pool.snapshot(parent, clone).unwrap();
    let spec = |id: ThinId| format!("{}/{ns}/{}", test.pool, image_name(&t.config.pool.name, id));
    // As a clone's removal cut short after its first step leaves it.
    test.rbd(&["snap", "rm", &format!("{}@to-{clone}", spec(parent))]);
    let snapshots = test.rbd(&["snap", "ls", "--all", &spec(parent)]);
    assert!(snapshots.contains("trash"), "{snapshots}");

    pool.delete_thin(parent).unwrap();
    assert_eq!(
        pool.thin_ids().unwrap(),
        BTreeSet::from([clone]),
        "the parent waits in the trash"
    );
    pool.delete_thin(clone).unwrap();
    assert!(pool.thin_ids().unwrap().is_empty());
    let trash = test.rbd(&["trash", "ls", &format!("{}/{ns}", test.pool)]);
    assert!(trash.trim().is_empty(), "left in the trash: {trash}");
}

/// An engine over an rbd pool in `namespace` of the test cluster, with its own state directory.
fn rbd_engine(test: &str, namespace: &str) -> (TestPool, Engine<RbdPool, RealFs>) {
    let t = TestPool::new(
        test,
        &format!(
            "{}[layers]\nbase_size = \"64M\"\n",
            cluster().pool_toml(namespace)
        ),
    );
    let pool = RbdPool::open(&t.config).unwrap();
    let (engine, report) = Engine::open(pool, RealFs, Settings::from_config(&t.config)).unwrap();
    assert!(report.is_clean(), "{report:?}");
    (t, engine)
}

/// Every byte of a layer's device (activated for the read, then deactivated).
fn device_bytes(engine: &Engine<RbdPool, RealFs>, name: &str) -> Vec<u8> {
    let node = engine.activate(name).unwrap();
    let bytes = fs::read(&node).unwrap_or_else(|e| panic!("reading {}: {e}", node.display()));
    engine.deactivate(name).unwrap();
    bytes
}

#[test]
#[ignore = "kernel test: run with scripts/vm-test"]
fn a_chain_of_20_mounts_and_reads_the_base_and_moves_to_a_second_pool_byte_for_byte() {
    require_rbd();
    // Past 16 parents the kernel's driver maps nothing: the pool flattens the 17th.
    let (_a, here) = rbd_engine("rbd-chain-a", &namespace("chain-a"));
    here.create(&layer("l0", None)).unwrap();
    let mnt = here.mount("l0", None, false).unwrap();
    fs::write(mnt.join("base-file"), "written in the base").unwrap();
    here.unmount("l0", None).unwrap();
    here.commit("l0").unwrap();
    for depth in 1..20 {
        let (name, parent) = (format!("l{depth}"), format!("l{}", depth - 1));
        here.create(&layer(&name, Some(&parent))).unwrap();
        if depth % 6 == 0 || depth == 19 {
            let mnt = here.mount(&name, None, false).unwrap();
            fs::write(
                mnt.join(format!("file-{depth}")),
                format!("written at {depth}"),
            )
            .unwrap();
            here.unmount(&name, None).unwrap();
        }
        here.commit(&name).unwrap();
    }
    let mnt = here.mount("l19", None, true).unwrap();
    assert_eq!(
        fs::read_to_string(mnt.join("base-file")).unwrap(),
        "written in the base"
    );
    for depth in [6, 12, 18, 19] {
        assert_eq!(
            fs::read_to_string(mnt.join(format!("file-{depth}"))).unwrap(),
            format!("written at {depth}")
        );
    }
    here.unmount("l19", None).unwrap();

    // The base, then the top's changes since the base (across the flattened layer), into a
    // second pool, as a second host would take them: equal devices, byte for byte.
    let (_b, there) = rbd_engine("rbd-chain-b", &namespace("chain-b"));
    let (base_stream, _) = here.export("l0", None, false, || Ok(Vec::new())).unwrap();
    let request = |name: &str, parent: Option<&str>| thinstack::engine::ImportLayer {
        name: name.into(),
        parent: parent.map(Into::into),
    };
    there
        .import(&request("l0", None), base_stream.as_slice())
        .unwrap();
    let (top_stream, _) = here
        .export("l19", Some("l0"), false, || Ok(Vec::new()))
        .unwrap();
    there
        .import(&request("top", Some("l0")), top_stream.as_slice())
        .unwrap();
    assert!(
        device_bytes(&here, "l19") == device_bytes(&there, "top"),
        "the imported top differs from the exported one"
    );
    assert!(device_bytes(&here, "l0") == device_bytes(&there, "l0"));
}

#[test]
#[ignore = "kernel test: run with scripts/vm-test"]
fn thinstackd_serves_an_rbd_pool_and_a_kill_9_under_load_loses_no_layer() {
    require_rbd();
    let ns = namespace("daemon");
    let extra = format!(
        "{}[layers]\nbase_size = \"64M\"\n",
        cluster().pool_toml(&ns)
    );
    let mut d = TestDaemon::start("rbd-daemon", &extra);
    let status = d.json(&["pool", "status"]);
    assert_eq!(status["pool"]["backend"], "rbd", "{status}");
    d.json(&["layer", "create", "base"]);
    let mounted = d.cli(&["layer", "mount", "base"]);
    assert_eq!(mounted.code, 0, "{mounted:?}");
    let target = std::path::PathBuf::from(mounted.stdout.trim());
    fs::write(target.join("hello"), vec![7u8; 4 << 20]).unwrap();
    nix::unistd::sync();
    let used = d.json(&["layer", "usage", "base"]);
    assert!(used["mapped_bytes"].as_u64().unwrap() >= 4 << 20, "{used}");
    assert_eq!(d.cli(&["layer", "unmount", "base"]).code, 0);
    assert_eq!(d.json(&["layer", "commit", "base"])["committed"], true);
    let resized = d.cli(&[
        "layer", "create", "big", "--parent", "base", "--size", "96M",
    ]);
    assert_eq!(resized.code, 0, "{resized:?}");

    // Two clients make children until the daemon is killed.
    let told = kill_9_while_clients_create(&mut d, 2, "base", 6);
    d.spawn();
    for name in &told {
        assert_eq!(
            d.json(&["layer", "inspect", name])["state"],
            "ready",
            "{name}"
        );
    }
    // Records and images agree: one image per layer, and none of a layer that is not.
    let layers: BTreeSet<String> = d
        .json(&["layer", "list"])
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["name"].as_str().unwrap().to_string())
        .collect();
    let images = cluster().rbd(&["ls", &format!("{}/{ns}", cluster().pool)]);
    assert_eq!(
        images.split_whitespace().count(),
        layers.len(),
        "{images} vs {layers:?}"
    );
    let doctor = d.cli(&["pool", "doctor"]);
    assert_eq!(doctor.code, 0, "{doctor:?}");

    // Destroy removes every image, the pool's object, and its record.
    let destroyed = d.json(&["pool", "destroy", "--force"]);
    assert_eq!(
        destroyed["layers_removed"].as_u64().unwrap() as usize,
        layers.len(),
        "{destroyed}"
    );
    assert_eq!(d.wait_exit(), 0, "{}", d.log_text());
    let images = cluster().rbd(&["ls", &format!("{}/{ns}", cluster().pool)]);
    assert!(images.trim().is_empty(), "left: {images}");
    let trash = cluster().rbd(&["trash", "ls", &format!("{}/{ns}", cluster().pool)]);
    assert!(trash.trim().is_empty(), "left in the trash: {trash}");
    assert!(!d.pool.config.state_dir.path().join("pool.json").exists());
}
