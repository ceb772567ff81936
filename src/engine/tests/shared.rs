//! Two hosts on one shared pool (sim kernels on one pool and one catalog, each host with its
//! own state directory): what one host makes, commits or removes the other sees; a name is
//! taken once; and a crash of one host at any point is settled by its next start.

use super::*;
use crate::kernel::catalog::SimCatalog;

struct Hosts {
    sim: Sim,
    catalog: Arc<SimCatalog>,
    dirs: [tempfile::TempDir; 2],
}

const A: usize = 0;
const B: usize = 1;
const NAMES: [&str; 2] = ["host-a", "host-b"];

impl Hosts {
    fn new() -> Self {
        Hosts {
            sim: Sim::default(),
            catalog: Arc::new(SimCatalog::default()),
            dirs: [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()],
        }
    }

    fn try_open(&self, host: usize) -> Result<Engine<Sim, Sim>> {
        let kernel = self.sim.on_host(NAMES[host], &self.catalog);
        let settings = Settings::for_tests(self.dirs[host].path());
        Engine::open(kernel, self.sim.clone(), settings).map(|(engine, _)| engine)
    }

    fn open(&self, host: usize) -> Engine<Sim, Sim> {
        self.try_open(host).unwrap()
    }

    /// Each entry's (name, state, thin id), from the catalog itself.
    fn catalog_entries(&self) -> BTreeMap<String, (String, u32)> {
        self.catalog
            .entries_now()
            .into_iter()
            .map(|(name, raw)| {
                let v: serde_json::Value = serde_json::from_str(&raw).unwrap();
                let state = v["state"].as_str().unwrap().to_string();
                (name, (state, v["thin_id"].as_u64().unwrap() as u32))
            })
            .collect()
    }
}

fn names(engine: &Engine<Sim, Sim>) -> Vec<String> {
    engine
        .list(&BTreeMap::new())
        .unwrap()
        .iter()
        .map(|l| l.name.to_string())
        .collect()
}

#[test]
fn a_layer_committed_on_one_host_is_a_parent_on_the_other() {
    let hosts = Hosts::new();
    let (a, b) = (hosts.open(A), hosts.open(B));
    a.create(&base("base")).unwrap();
    assert!(!b.inspect("base").unwrap().committed);
    a.commit("base").unwrap();
    assert!(b.inspect("base").unwrap().committed, "B sees A's commit");
    let kid = b.create(&child("kid", "base")).unwrap();
    assert_ne!(kid.thin_id, a.inspect("base").unwrap().thin_id);
    let seen_on_a = a.inspect("kid").unwrap();
    assert_eq!(
        seen_on_a.parent.as_ref().map(LayerName::as_str),
        Some("base")
    );
    assert_eq!(a.inspect("base").unwrap().children.len(), 1);
    assert_eq!(names(&a), names(&b));
    let entries = hosts.catalog_entries();
    assert_eq!(entries["base"].0, "ready");
    assert_eq!(entries["kid"], ("ready".to_string(), kid.thin_id.value()));
}

#[test]
fn a_name_is_taken_once_across_hosts() {
    let hosts = Hosts::new();
    let (a, b) = (hosts.open(A), hosts.open(B));
    a.create(&base("x")).unwrap();
    let taken = b.create(&base("x")).unwrap_err();
    assert_eq!(taken.kind(), ErrorKind::AlreadyExists, "{taken}");
    // Racing: each name goes to one host, the other hears AlreadyExists.
    let race: Vec<String> = (0..20).map(|i| format!("race-{i}")).collect();
    let outcomes: Vec<Vec<Result<Layer>>> = std::thread::scope(|s| {
        let handles: Vec<_> = [&a, &b]
            .into_iter()
            .map(|engine| s.spawn(|| race.iter().map(|n| engine.create(&base(n))).collect()))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (i, name) in race.iter().enumerate() {
        let won = outcomes.iter().filter(|o| o[i].is_ok()).count();
        assert_eq!(won, 1, "{name}: {won} hosts made it");
        for outcome in &outcomes {
            if let Err(e) = &outcome[i] {
                assert_eq!(e.kind(), ErrorKind::AlreadyExists, "{name}: {e}");
            }
        }
    }
    assert_eq!(names(&a), names(&b));
    // Every image has one layer: the thin ids are the catalog's, distinct across hosts.
    let ids: BTreeSet<u32> = hosts.catalog_entries().values().map(|e| e.1).collect();
    assert_eq!(ids.len(), 21);
    assert_eq!(hosts.sim.thin_ids_now().len(), 21);
}

#[test]
fn a_layer_removed_on_one_host_goes_from_the_other_unless_active_there() {
    let hosts = Hosts::new();
    let (a, b) = (hosts.open(A), hosts.open(B));
    a.create(&base("gone")).unwrap();
    a.create(&base("kept")).unwrap();
    assert_eq!(names(&b), ["gone", "kept"]);
    b.remove("gone").unwrap();
    assert_eq!(names(&a), ["kept"]);
    assert!(!hosts.catalog_entries().contains_key("gone"));
    // A restart of A (its record of "gone" was dropped) does not bring it back.
    drop(a);
    let a = hosts.open(A);
    assert_eq!(names(&a), ["kept"]);
    assert_eq!(names(&b), ["kept"]);
}

/// Host A crashes at every pass of every point of an operation; its next start (and B's next
/// read) leave records and catalog agreeing: every entry ready, each host listing the same
/// layers, each entry's thin id in the pool.
#[test]
fn a_crash_of_one_host_at_any_point_is_settled_by_its_next_start() {
    type Op = fn(&Engine<Sim, Sim>);
    let operations: [(&str, Op); 4] = [
        ("create base", |e| {
            e.create(&base("new")).unwrap();
        }),
        ("create child", |e| {
            e.create(&child("new", "base")).unwrap();
        }),
        ("commit", |e| {
            e.commit("base").unwrap();
        }),
        ("remove", |e| {
            e.remove("base").unwrap();
        }),
    ];
    let mut crashed = BTreeSet::new();
    for (what, op) in operations {
        for &point in Point::ALL {
            for nth in 1.. {
                let hosts = Hosts::new();
                hosts.open(B).create(&base("base")).unwrap();
                let a = hosts.open(A);
                crate::crash::arm_nth(point, nth);
                let outcome = catch_unwind(AssertUnwindSafe(|| op(&a)));
                crate::crash::disarm();
                drop(a);
                match outcome {
                    Ok(()) => break,
                    Err(p) if crate::crash::is_crash(p.as_ref(), point) => {}
                    Err(p) => std::panic::resume_unwind(p),
                }
                crashed.insert(point);
                let at = format!("{what} cut at {point}#{nth}");
                let a = hosts
                    .try_open(A)
                    .unwrap_or_else(|e| panic!("{at}: A's start failed: {e}"));
                let b = hosts.open(B);
                assert_eq!(names(&a), names(&b), "{at}");
                let entries = hosts.catalog_entries();
                let pool = hosts.sim.thin_ids_now();
                for (name, (state, id)) in &entries {
                    assert_eq!(state, "ready", "{at}: {name} left {state}");
                    assert!(pool.contains(&ThinId::new(*id).unwrap()), "{at}: {name}");
                }
                let listed: Vec<&String> = entries.keys().collect();
                assert_eq!(names(&a).iter().collect::<Vec<_>>(), listed, "{at}");
            }
        }
    }
    assert!(crashed.contains(&Point::SharedPublished));
    assert!(crashed.contains(&Point::SharedRecordDropped));
}

#[test]
fn an_image_another_host_is_making_is_no_leftover_to_the_doctor() {
    let hosts = Hosts::new();
    let (a, b) = (hosts.open(A), hosts.open(B));
    a.create(&base("base")).unwrap();
    // A dies with its new layer's image made, the layer not yet ready.
    crate::crash::arm(Point::CreateActivated);
    let cut = catch_unwind(AssertUnwindSafe(|| a.create(&base("half"))));
    crate::crash::disarm();
    assert!(cut.is_err());
    drop(a);
    assert_eq!(hosts.catalog_entries()["half"].0, "creating");
    assert!(
        b.orphan_thin_ids().unwrap().is_empty(),
        "B took the image A is making for a leftover"
    );
    assert_eq!(names(&b), ["base"], "a layer being made is not listed");
    // A's next start rolls it back: its image and its entry go.
    let a = hosts.open(A);
    assert_eq!(names(&a), ["base"]);
    assert!(!hosts.catalog_entries().contains_key("half"));
    assert_eq!(hosts.sim.thin_ids_now().len(), 1);
    assert!(b.orphan_thin_ids().unwrap().is_empty());
}

#[test]
fn a_destroy_on_one_host_of_several_only_takes_that_host_out() {
    let hosts = Hosts::new();
    let (a, b) = (hosts.open(A), hosts.open(B));
    a.create(&base("kept")).unwrap();
    b.activate("kept").unwrap();
    let busy = b.leaving_shared_pool().unwrap_err();
    assert_eq!(busy.kind(), ErrorKind::Busy, "{busy}");
    b.deactivate("kept").unwrap();
    assert_eq!(
        b.leaving_shared_pool().unwrap(),
        Some(vec![NAMES[A].to_string()])
    );
    b.kernel().destroy().unwrap();
    b.forget_pool().unwrap();
    drop(b);
    // A's layers, and the pool, are as they were.
    assert_eq!(names(&a), ["kept"]);
    assert_eq!(hosts.sim.thin_ids_now().len(), 1);
    // The last host destroys it whole.
    assert_eq!(a.leaving_shared_pool().unwrap(), None);
    assert_eq!(a.remove_all(true).unwrap(), 1);
    a.kernel().destroy().unwrap();
    assert!(hosts.sim.thin_ids_now().is_empty());
    assert!(hosts.catalog_entries().is_empty());
}

/// A full read of the catalog that left before this host made a layer (the read, then the
/// create, then the pass over the records): the layer is not taken for one removed elsewhere
/// (its record dropped, its image left with no owner). containerd's suite on rbd met this.
#[test]
fn a_read_older_than_a_layer_made_here_drops_no_layer() {
    let hosts = Hosts::new();
    let a = hosts.open(A);
    a.create(&base("base")).unwrap();
    let before = hosts.catalog.read_now();
    a.create(&child("new", "base")).unwrap();
    a.commit("base").unwrap();
    hosts.catalog.stale_read_once(before);
    assert_eq!(names(&a), ["base", "new"]);
    assert!(a.inspect("base").unwrap().committed);
    assert!(a.orphan_thin_ids().unwrap().is_empty());
    assert_eq!(hosts.catalog_entries().len(), 2);
    // Changes still go through: what this host knows of each entry is what it wrote.
    a.commit("new").unwrap();
}
