//! Permissions (issue 7): the API socket refuses a client that is not root unless it is in the
//! configured group, and the state directory and records are not readable by others.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use common::daemon::{Run, TestDaemon};
use common::require_dm_thin;

/// `nobody` and its group `nogroup` exist on every Debian system; `daemon` (gid 1) too.
const NOBODY: u32 = 65534;
const NOGROUP: u32 = 65534;
const OTHER_GROUP: u32 = 1;

/// `thinstack --json pool status` as uid `nobody`, with primary group `gid` and the
/// supplementary groups `groups` only.
fn status_as_nobody(socket: &Path, gid: u32, groups: &[u32]) -> Run {
    let mut command = Command::new("setpriv");
    command
        .arg(format!("--reuid={NOBODY}"))
        .arg(format!("--regid={gid}"));
    if groups.is_empty() {
        command.arg("--clear-groups");
    } else {
        let list: Vec<String> = groups.iter().map(u32::to_string).collect();
        command.arg(format!("--groups={}", list.join(",")));
    }
    let out = command
        .arg(env!("CARGO_BIN_EXE_thinstack"))
        .arg("--socket")
        .arg(socket)
        .args(["--json", "pool", "status"])
        .output()
        .expect("setpriv (util-linux)");
    Run::from(out)
}

/// A socket path outside the test's private (0700) directory, in a directory the daemon makes,
/// so only the socket's own mode decides who may connect.
fn public_socket(test: &str) -> PathBuf {
    PathBuf::from(format!("/run/thinstack-{test}-{}", std::process::id())).join("api.sock")
}

fn refused(run: &Run) -> bool {
    run.code == 7 && run.stderr.contains("Permission denied")
}

#[test]
#[ignore = "needs root and dm-thin: run with scripts/vm-test"]
fn the_socket_admits_root_and_the_configured_group_only() {
    require_dm_thin();
    let mut d = TestDaemon::prepare("perm-socket", "");
    let socket = public_socket("perm");
    d.socket = socket.clone();
    d.pool.config.socket = thinstack::config::AbsolutePath::new(&socket).unwrap();
    d.write_config();
    d.spawn();

    // Root only (the default): mode 0600, owned by root.
    let meta = std::fs::metadata(&socket).unwrap();
    assert_eq!((meta.mode() & 0o777, meta.uid()), (0o600, 0));
    let dir_mode = std::fs::metadata(socket.parent().unwrap()).unwrap().mode() & 0o777;
    assert_eq!(
        dir_mode & 0o005,
        0o005,
        "others cannot reach the socket's directory"
    );
    let run = status_as_nobody(&socket, NOGROUP, &[]);
    assert!(refused(&run), "nobody was not refused: {run:?}");
    assert_eq!(d.cli(&["pool", "status"]).code, 0);

    // Shared with a group: members get in, as primary or supplementary group; others do not.
    d.stop();
    d.pool.config.daemon.socket_group = "nogroup".into();
    d.write_config();
    d.spawn();
    let meta = std::fs::metadata(&socket).unwrap();
    assert_eq!((meta.mode() & 0o777, meta.gid()), (0o660, NOGROUP));
    let member = status_as_nobody(&socket, NOGROUP, &[]);
    assert_eq!(
        member.code, 0,
        "a member of the group was refused: {member:?}"
    );
    assert!(member.json()["pool"]["name"].is_string(), "{member:?}");
    let supplementary = status_as_nobody(&socket, OTHER_GROUP, &[NOGROUP]);
    assert_eq!(supplementary.code, 0, "{supplementary:?}");
    let outsider = status_as_nobody(&socket, OTHER_GROUP, &[]);
    assert!(refused(&outsider), "a non-member got in: {outsider:?}");
    d.stop();
    let _ = std::fs::remove_dir_all(socket.parent().unwrap());
}

#[test]
#[ignore = "needs root and dm-thin: run with scripts/vm-test"]
fn the_state_directory_and_records_are_not_readable_by_others() {
    require_dm_thin();
    let d = TestDaemon::start("perm-state", "");
    assert_eq!(d.cli(&["layer", "create", "base", "--size", "64M"]).code, 0);
    assert_eq!(d.cli(&["layer", "mount", "base"]).code, 0);
    let state = d.pool.config.state_dir.path().to_path_buf();
    let mode = std::fs::metadata(&state).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700, "{}", state.display());
    let mut files = 0;
    for path in walk(&state) {
        let meta = std::fs::symlink_metadata(&path).unwrap();
        if meta.is_file() {
            files += 1;
            assert_eq!(
                meta.mode() & 0o077,
                0,
                "{} is mode {:o}: readable or writable by others",
                path.display(),
                meta.mode() & 0o777
            );
        }
    }
    // pool.json, txn.json, the layer's record, the two loop files at least.
    assert!(files >= 5, "only {files} files under {}", state.display());
    assert_eq!(d.cli(&["layer", "unmount", "base"]).code, 0);
}

/// Every path under `dir`, not following symlinks and not entering mount points.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let device = std::fs::metadata(dir).unwrap().dev();
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(dir) = todo.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            if meta.is_dir() && meta.dev() == device {
                todo.push(path.clone());
            }
            out.push(path);
        }
    }
    out
}
