//! The crate's modules depend downwards only, with no cycles (issue 17):
//!
//! bin → daemon, client, containerd → api → doctor, audit → engine, pool → records, config →
//! kernel → error, names, units, vocab, crash.
//!
//! Read from the sources: every `crate::<module>` a module names (in `use` lines, paths and doc
//! links alike), so an escape hatch around the seam cannot hide in a full path.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Each top-level module's layer; a module may name modules of its own layer or below.
const LAYERS: &[(&str, u32)] = &[
    ("error", 0),
    ("names", 0),
    ("units", 0),
    ("vocab", 0),
    ("crash", 0),
    ("stream", 0),
    ("kernel", 1),
    ("records", 2),
    ("config", 2),
    ("engine", 3),
    ("pool", 3),
    ("audit", 4),
    ("doctor", 4),
    ("api", 5),
    ("metrics", 5),
    ("client", 6),
    ("containerd", 6),
    ("daemon", 6),
];

fn layer(module: &str) -> u32 {
    LAYERS
        .iter()
        .find(|(name, _)| *name == module)
        .unwrap_or_else(|| panic!("module {module} has no layer in tests/layering.rs: give it one"))
        .1
}

/// Top-level module → the crate modules its files name.
fn dependencies() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let modules: BTreeSet<String> = LAYERS.iter().map(|(m, _)| m.to_string()).collect();
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in rust_files(&src) {
        let relative = file.strip_prefix(&src).unwrap();
        let first = relative.components().next().unwrap().as_os_str();
        let first = first.to_string_lossy();
        let module = first.trim_end_matches(".rs");
        if module == "bin" || module == "lib" {
            continue;
        }
        let text = std::fs::read_to_string(&file).unwrap();
        let named = edges.entry(module.to_string()).or_default();
        for target in named_modules(&text) {
            if target != module && modules.contains(&target) {
                named.insert(target);
            }
        }
    }
    edges
}

/// The modules `text` names as `crate::m` or inside `use crate::{m, ...}`.
fn named_modules(text: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    for (at, _) in text.match_indices("crate::") {
        let rest = &text[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let group = &group[..group.find('}').unwrap_or(group.len())];
            for item in group.split(',') {
                let name: String = item
                    .trim()
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                found.insert(name);
            }
        } else {
            found.insert(
                rest.chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect(),
            );
        }
    }
    found
}

fn rust_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(rust_files(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            files.push(path);
        }
    }
    files
}

#[test]
fn modules_depend_downwards_only() {
    let mut upward = Vec::new();
    for (module, targets) in dependencies() {
        for target in targets {
            if layer(&target) > layer(&module) {
                upward.push(format!("{module} → {target}"));
            }
        }
    }
    assert!(
        upward.is_empty(),
        "modules that name a module above them: {}",
        upward.join(", ")
    );
}

#[test]
fn no_module_cycles() {
    let edges = dependencies();
    // Depth-first, three colours: a grey module met again closes a cycle.
    fn visit(
        module: &str,
        edges: &BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<String, bool>,
        path: &mut Vec<String>,
    ) {
        match state.get(module) {
            Some(true) => return,
            Some(false) => {
                let start = path.iter().position(|m| m == module).unwrap();
                panic!("a cycle: {} → {module}", path[start..].join(" → "));
            }
            None => {}
        }
        state.insert(module.to_string(), false);
        path.push(module.to_string());
        for target in edges.get(module).into_iter().flatten() {
            visit(target, edges, state, path);
        }
        path.pop();
        state.insert(module.to_string(), true);
    }
    let mut state = BTreeMap::new();
    for module in edges.keys() {
        visit(module, &edges, &mut state, &mut Vec::new());
    }
}

#[test]
fn the_checker_sees_full_paths_and_groups() {
    let text = "use crate::{error::Result, units};\nfn f() { crate::pool::x(); }\n/// [`crate::engine::E`]";
    let found = named_modules(text);
    for module in ["error", "units", "pool", "engine"] {
        assert!(found.contains(module), "{module} not seen in {found:?}");
    }
}
