//! No command line is ever built by a shell (issue 7): thinstack runs programs only through
//! `kernel::cmd`, by absolute path with separate arguments. This reads the sources and fails
//! on any other way to start a process, or any shell.

use std::path::{Path, PathBuf};

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn processes_are_started_only_by_kernel_cmd_and_never_through_a_shell() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&root, &mut files);
    assert!(files.len() > 20, "found only {} source files", files.len());
    let shells = [
        "\"sh\"",
        "\"/bin/sh\"",
        "\"bash\"",
        "\"/bin/bash\"",
        "\"dash\"",
        "\"/bin/dash\"",
    ];
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        let relative = file.strip_prefix(&root).unwrap();
        for shell in shells {
            assert!(
                !text.contains(shell),
                "src/{} mentions {shell}: commands must not go through a shell",
                relative.display()
            );
        }
        let spawns = text.matches("Command::new(").count();
        let allowed = usize::from(relative == Path::new("kernel/cmd.rs"));
        assert_eq!(
            spawns,
            allowed,
            "src/{} starts processes itself; use kernel::cmd",
            relative.display()
        );
    }
}
