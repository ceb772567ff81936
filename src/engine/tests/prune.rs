//! Prune over the sim: only unused layers go, children before parents and oldest first; a dry
//! run lists the same and changes nothing; labels and age narrow it.

use super::*;

fn names(report: &PruneReport) -> Vec<&str> {
    report.removed.iter().map(|p| p.name.as_str()).collect()
}

fn labelled(mut request: CreateLayer, key: &str, value: &str) -> CreateLayer {
    request.labels.insert(key.into(), value.into());
    request
}

#[test]
fn prune_removes_unused_leaves_then_their_parents_and_nothing_in_use() {
    let f = Fixture::new();
    let engine = f.engine();
    engine.create(&base("base")).unwrap();
    engine.commit("base").unwrap();
    engine.create(&child("old-kid", "base")).unwrap();
    engine.create(&child("new-kid", "base")).unwrap();
    engine.create(&base("mounted")).unwrap();
    engine.mount("mounted", None, false).unwrap();
    engine.create(&base("active")).unwrap();
    engine.activate("active").unwrap();
    engine.create(&base("held-parent")).unwrap();
    engine.commit("held-parent").unwrap();
    engine
        .create(&child("in-use-child", "held-parent"))
        .unwrap();
    engine.activate("in-use-child").unwrap();
    prepare(&engine, "ns", "containerds", "").unwrap();
    let everything = engine.list(&BTreeMap::new()).unwrap().len();

    let dry = engine.prune(&PruneFilter::default(), true).unwrap();
    assert_eq!(names(&dry), ["old-kid", "new-kid", "base"]);
    assert!(dry.removed.iter().all(|p| p.removal.is_none()));
    assert_eq!(dry.data_used_before, dry.data_used_after);
    assert_eq!(engine.list(&BTreeMap::new()).unwrap().len(), everything);

    let done = engine.prune(&PruneFilter::default(), false).unwrap();
    assert_eq!(
        names(&done),
        names(&dry),
        "a real run removes what the dry run listed"
    );
    assert!(done
        .removed
        .iter()
        .all(|p| p.removal == Some(Removal::Removed)));
    assert!(done.data_used_after < done.data_used_before, "{done:?}");
    let left: Vec<String> = engine
        .list(&BTreeMap::new())
        .unwrap()
        .into_iter()
        .map(|l| l.name.to_string())
        .collect();
    assert_eq!(left.len(), everything - 3, "{left:?}");
    for kept in ["mounted", "active", "held-parent", "in-use-child"] {
        assert!(
            left.iter().any(|l| l == kept),
            "{kept} was pruned: {left:?}"
        );
    }
    assert_consistent(&f, engine);
}

#[test]
fn prune_takes_only_the_labels_and_the_age_asked_for() {
    let f = Fixture::new();
    let engine = f.engine();
    engine
        .create(&labelled(base("ci-1"), "role", "ci"))
        .unwrap();
    engine
        .create(&labelled(base("ci-2"), "role", "ci"))
        .unwrap();
    engine
        .create(&labelled(base("keep"), "role", "base"))
        .unwrap();
    let ci = PruneFilter {
        labels: BTreeMap::from([("role".to_string(), "ci".to_string())]),
        older_than: None,
    };
    let young = PruneFilter {
        older_than: Some(Duration::from_secs(3600)),
        ..ci.clone()
    };
    assert!(engine.prune(&young, false).unwrap().removed.is_empty());
    let done = engine.prune(&ci, false).unwrap();
    assert_eq!(names(&done), ["ci-1", "ci-2"], "oldest first");
    assert!(engine.inspect("keep").is_ok());
    assert!(engine.prune(&ci, false).unwrap().removed.is_empty());
}
