//! `thinstack layer export | import`, `checkpoint` and `reset` as a user runs them: the command
//! as shipped, against two `thinstackd --sim` standing for two hosts, without root. The same
//! on the real kernel, with byte-equal devices, is in tests/kernel_transfer.rs.

mod common;

use std::path::Path;
use std::process::{Output, Stdio};

use common::daemon::command_at;
use common::sim::SimDaemon;
use serde_json::{json, Value};
use thinstack::client::Client;

fn host() -> (SimDaemon, Client) {
    let mut daemon = SimDaemon::start(|_| "[layers]\nbase_size = \"64M\"\n".to_string());
    let client = daemon.client();
    (daemon, client)
}

fn run(socket: &Path, args: &[&str]) -> Output {
    command_at(socket).args(args).output().unwrap()
}

fn ok(socket: &Path, args: &[&str]) -> String {
    let out = run(socket, args);
    assert!(
        out.status.success(),
        "thinstack {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn layer(client: &mut Client, name: &str) -> Value {
    client.get(&format!("/v1/layers/{name}")).unwrap()
}

#[test]
fn a_layer_and_its_changes_move_to_a_second_host() {
    let (a, mut ca) = host();
    let (b, mut cb) = host();
    let (sa, sb) = (a.api_socket(), b.api_socket());
    ok(&sa, &["layer", "create", "base", "--label", "role=base"]);
    ok(&sa, &["layer", "commit", "base"]);
    ok(&sa, &["layer", "create", "app", "--parent", "base"]);
    ok(&sa, &["layer", "commit", "app"]);

    // The base through a file.
    let file = a.dir().join("base.stream");
    let said = ok(
        &sa,
        &[
            "layer",
            "export",
            "base",
            "--output",
            file.to_str().unwrap(),
        ],
    );
    assert!(said.starts_with("Exported layer base to "), "{said}");
    let said = ok(
        &sb,
        &["layer", "import", "base", "--input", file.to_str().unwrap()],
    );
    assert!(said.starts_with("Imported layer base: committed"), "{said}");
    let (base_a, base_b) = (layer(&mut ca, "base"), layer(&mut cb, "base"));
    assert_eq!(base_a["content_id"], base_b["content_id"]);
    assert_eq!(base_b["labels"], json!({"role": "base"}));

    // The changes through a pipe, compressed, as `... | ssh host2 thinstack layer import`.
    let mut export = command_at(&sa)
        .args(["layer", "export", "app", "--from", "base", "--compress"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let imported = command_at(&sb)
        .args(["--json", "layer", "import", "app", "--parent", "base"])
        .stdin(export.stdout.take().unwrap())
        .output()
        .unwrap();
    assert!(export.wait().unwrap().success());
    assert!(
        imported.status.success(),
        "{}",
        String::from_utf8_lossy(&imported.stderr)
    );
    let app: Value = serde_json::from_slice(&imported.stdout).unwrap();
    assert_eq!(app["parent"], "base");
    assert_eq!(app["content_id"], layer(&mut ca, "app")["content_id"]);

    // Again: the name is taken (exit 4), and nothing changed.
    let again = run(
        &sb,
        &["layer", "import", "base", "--input", file.to_str().unwrap()],
    );
    assert_eq!(again.status.code(), Some(4));
    // A cut stream: refused (exit 1), nothing left.
    let bytes = std::fs::read(&file).unwrap();
    let cut = b.dir().join("cut.stream");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let refused = run(
        &sb,
        &["layer", "import", "half", "--input", cut.to_str().unwrap()],
    );
    assert_eq!(refused.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("truncated"), "{stderr}");
    let names: Vec<Value> = cb.get("/v1/layers").unwrap();
    assert_eq!(names.len(), 2, "{names:?}");
    // --from names no ancestor: refused (exit 1), and no file is left.
    let out = a.dir().join("app.stream");
    let other = run(
        &sa,
        &[
            "layer",
            "export",
            "app",
            "--from",
            "nope",
            "--output",
            out.to_str().unwrap(),
        ],
    );
    assert_eq!(other.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&other.stderr).contains("not an ancestor"));
    assert!(!out.exists() && !a.dir().join("app.stream.partial").exists());
}

#[test]
fn a_layer_is_checkpointed_and_reset_from_the_command_line() {
    let (a, mut ca) = host();
    let sa = a.api_socket();
    ok(&sa, &["layer", "create", "base"]);
    ok(&sa, &["layer", "commit", "base"]);
    ok(
        &sa,
        &[
            "layer", "create", "work", "--parent", "base", "--label", "job=7",
        ],
    );
    let mount = ok(&sa, &["layer", "mount", "work"]);
    let dir = Path::new(
        mount
            .trim()
            .rsplit(' ')
            .next()
            .unwrap()
            .trim_end_matches('.'),
    );
    std::fs::write(dir.join("first"), "one").unwrap();
    let said = ok(
        &sa,
        &["layer", "checkpoint", "work", "work-1", "--label", "step=1"],
    );
    assert!(said.contains("layer reset work --to work-1"), "{said}");

    // Mounted: busy (exit 5).
    let busy = run(&sa, &["layer", "reset", "work", "--to", "work-1"]);
    assert_eq!(
        busy.status.code(),
        Some(5),
        "{}",
        String::from_utf8_lossy(&busy.stderr)
    );
    ok(&sa, &["layer", "unmount", "work"]);

    ok(&sa, &["layer", "reset", "work"]);
    let work = layer(&mut ca, "work");
    assert_eq!(work["labels"], json!({"job": "7"}));
    assert_eq!(work["committed"], false);
    let checkpoint = layer(&mut ca, "work-1");
    assert_eq!(checkpoint["checkpoint_of"], "work");
    assert_eq!(checkpoint["committed"], true);
    let said = ok(&sa, &["layer", "reset", "work", "--to", "work-1"]);
    assert!(
        said.starts_with("Reset layer work to the content of checkpoint work-1"),
        "{said}"
    );
    let invalid = run(&sa, &["layer", "reset", "work", "--to", "base-x"]);
    assert_eq!(invalid.status.code(), Some(3));
}
