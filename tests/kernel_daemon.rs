//! The real `thinstackd` and `thinstack` binaries on the real kernel: every command with its
//! exit code and `--json` output, 8 clients at once, `kill -9` while clients create layers, a
//! second daemon on the same state directory, and a clean SIGTERM.

mod common;

use std::collections::BTreeSet;
use std::time::Instant;

use common::daemon::{kill_9_while_clients_create, TestDaemon};
use common::{open_engine_with, require_dm_thin, teardown_and_check, wait_until};
use serde_json::{json, Value};
use thinstack::api::CreateRequest;
use thinstack::client::ClientError;
use thinstack::kernel::PoolKernel;

const SMALL: &str = "[layers]\nbase_size = \"64M\"\n";

/// Stop the daemon, open the pool in-process, and check that records and pool agree exactly:
/// nothing left to repair, every pool thin id owned by a record and the other way round.
/// Returns the layer names; tears the pool down and runs thin_check.
fn stop_and_check_agreement(d: &mut TestDaemon) -> BTreeSet<String> {
    assert_eq!(d.stop(), 0, "thinstackd exit code; log:\n{}", d.log_text());
    check_agreement(d)
}

/// [`stop_and_check_agreement`] after the daemon stopped.
fn check_agreement(d: &TestDaemon) -> BTreeSet<String> {
    let (engine, report) = open_engine_with(&d.pool.config);
    assert!(report.is_clean(), "records and pool disagreed: {report:?}");
    let layers = engine.list(&Default::default()).unwrap();
    let owned: BTreeSet<_> = layers.iter().map(|l| l.thin_id).collect();
    assert_eq!(
        engine.kernel().thin_ids().unwrap(),
        owned,
        "pool thin ids vs records"
    );
    let names = layers.iter().map(|l| l.name.to_string()).collect();
    for layer in &layers {
        for target in layer.mounts.keys() {
            let _ = engine.unmount(layer.name.as_str(), Some(target));
        }
        let _ = engine.deactivate(layer.name.as_str());
    }
    drop(engine);
    teardown_and_check(&d.pool);
    names
}

#[test]
#[ignore = "needs root and dm-thin: run with scripts/vm-test"]
fn kernel_daemon_every_command_with_exit_codes_and_json() {
    let _dm = require_dm_thin();
    let mut d = TestDaemon::start("cli", SMALL);

    assert_eq!(d.notifications(), ["READY=1"], "tells systemd it is ready");
    let mode = std::fs::metadata(&d.socket).unwrap().permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
        0o600,
        "root-only socket"
    );
    let status = d.json(&["pool", "status"]);
    assert_eq!(status["layers"], 0);
    assert_eq!(status["health"]["failed"], false);
    let human = d.cli(&["pool", "status"]);
    assert_eq!(human.code, 0);
    assert!(human.stdout.contains("Data space"), "{human:?}");

    // create, with its refusals
    let base = d.json(&["layer", "create", "base", "--label", "role=base"]);
    assert_eq!(base["name"], "base");
    assert_eq!(base["size"], "64M");
    assert_eq!(base["labels"]["role"], "base");
    let again = d.cli(&["layer", "create", "base"]);
    assert_eq!(again.code, 4, "already exists: {again:?}");
    assert!(again.stderr.contains("base"), "names the layer: {again:?}");
    assert_eq!(
        d.json(&["layer", "create", "base", "--exists-ok"])["name"],
        "base"
    );
    let kid = d.json(&["layer", "create", "kid", "--parent", "base"]);
    assert_eq!(kid["parent"], "base");
    let orphan = d.cli(&["layer", "create", "x", "--parent", "nope"]);
    assert_eq!(orphan.code, 3, "parent not found: {orphan:?}");
    let bad = d.cli(&["--json", "layer", "create", "../etc"]);
    assert_eq!(bad.code, 1, "invalid name: {bad:?}");
    assert_eq!(bad.json()["error"]["kind"], "invalid");
    let usage = d.cli(&["layer", "create", "y", "--size", "ten"]);
    assert_eq!(usage.code, 2, "usage error: {usage:?}");

    // list and inspect
    assert_eq!(d.json(&["layer", "list"]).as_array().unwrap().len(), 2);
    let labelled = d.json(&["layer", "list", "--label", "role=base"]);
    assert_eq!(labelled.as_array().unwrap().len(), 1);
    let table = d.cli(&["layer", "list"]);
    assert!(table.stdout.starts_with("NAME"), "{table:?}");
    assert_eq!(table.stdout.lines().count(), 3, "{table:?}");
    let inspected = d.json(&["layer", "inspect", "kid"]);
    assert_eq!(inspected["parent"], "base");
    assert_eq!(
        d.json(&["layer", "inspect", "base"])["children"],
        json!(["kid"])
    );
    assert_eq!(d.cli(&["layer", "inspect", "nope"]).code, 3);
    // A name that is not a name reaches the daemon intact and is refused by what it is.
    let slash = d.cli(&["layer", "inspect", "a/../b"]);
    assert_eq!(slash.code, 1, "{slash:?}");
    assert!(slash.stderr.contains("a/../b"), "{slash:?}");

    // mount, write, usage; commit refused while mounted read-write
    let mounted = d.cli(&["layer", "mount", "kid"]);
    assert_eq!(mounted.code, 0, "{mounted:?}");
    let mount_point = std::path::PathBuf::from(mounted.stdout.trim());
    std::fs::write(mount_point.join("hello"), vec![7u8; 4 << 20]).unwrap();
    nix::unistd::sync();
    let used = d.json(&["layer", "usage", "kid"]);
    assert!(used["mapped_bytes"].as_u64().unwrap() >= 4 << 20, "{used}");
    let busy = d.cli(&["layer", "commit", "kid"]);
    assert_eq!(busy.code, 5, "commit while mounted rw: {busy:?}");
    assert_eq!(d.cli(&["layer", "unmount", "kid"]).code, 0);
    assert_eq!(d.json(&["layer", "commit", "kid"])["committed"], true);

    // activate prints the device; deactivate
    let activated = d.cli(&["layer", "activate", "kid"]);
    assert_eq!(activated.code, 0, "{activated:?}");
    let device = activated.stdout.trim().to_string();
    assert!(std::path::Path::new(&device).exists(), "{device}");
    assert_eq!(
        d.json(&["layer", "inspect", "kid"])["device"],
        device.as_str()
    );
    assert_eq!(
        d.json(&["layer", "deactivate", "kid"])["done"],
        "deactivated"
    );

    // read-only mount at a chosen place
    let target = d.pool.mount_point("ro");
    let target_text = target.display().to_string();
    let ro = d.json(&[
        "layer",
        "mount",
        "kid",
        "--target",
        &target_text,
        "--readonly",
    ]);
    assert_eq!(ro["mount_point"], target_text.as_str());
    assert_eq!(std::fs::read(target.join("hello")).unwrap().len(), 4 << 20);
    assert_eq!(
        d.cli(&["layer", "unmount", "kid", "--target", &target_text])
            .code,
        0
    );

    // resize, then removal refused with children and done recursively
    assert_eq!(
        d.json(&["layer", "resize", "base", "--size", "128M"])["size"],
        "128M"
    );
    assert_eq!(d.cli(&["layer", "remove", "base"]).code, 5);
    let removed = d.json(&["layer", "remove", "base", "--recursive"]);
    assert_eq!(
        removed,
        json!({"removed": [{"name": "kid", "result": "removed"}, {"name": "base", "result": "removed"}]})
    );
    assert_eq!(d.cli(&["layer", "inspect", "base"]).code, 3);

    // the pool grows
    let extended = d.json(&["pool", "extend", "--data", "5G", "--metadata", "80M"]);
    assert_eq!(extended, json!({"data": "5G", "metadata": "80M"}));
    let status = d.json(&["pool", "status"]);
    assert_eq!(status["data"]["total"], "5G");
    assert_eq!(
        d.cli(&["pool", "extend", "--data", "1G"]).code,
        1,
        "shrinking is refused"
    );

    // completions and help
    let completions = d.cli(&["completions", "bash"]);
    assert_eq!(completions.code, 0);
    assert!(completions.stdout.contains("thinstack"));
    assert_eq!(d.cli(&["layer", "--help"]).code, 0);

    // the API itself: errors are JSON with the promised statuses
    let mut client = d.client();
    let openapi: Value = client.get("/v1/openapi.json").unwrap();
    assert!(openapi["paths"]["/v1/layers"].is_object());
    let expect_api_error =
        |result: Result<Value, ClientError>, status: u16, kind: &str| match result {
            Err(ClientError::Api {
                status: s, kind: k, ..
            }) => {
                assert_eq!((s, k.to_string().as_str()), (status, kind))
            }
            other => panic!("expected {status} {kind}, got {other:?}"),
        };
    expect_api_error(client.get("/v1/nothing"), 404, "not_found");
    expect_api_error(client.call("PUT", "/v1/layers/x", None), 405, "invalid");
    {
        // A 405 names the methods the resource takes (RFC 9110).
        use std::io::{Read, Write};
        let mut raw = std::os::unix::net::UnixStream::connect(&d.socket).unwrap();
        raw.write_all(b"PUT /v1/layers/x HTTP/1.1\r\nHost: thinstack\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut answer = String::new();
        raw.read_to_string(&mut answer).unwrap();
        let head = answer.to_ascii_lowercase();
        assert!(head.starts_with("http/1.1 405"), "{answer}");
        assert!(head.contains("\r\nallow: get, delete\r\n"), "{answer}");
    }
    expect_api_error(
        client.call("POST", "/v1/layers", Some(b"{\"name\": 5}".to_vec())),
        400,
        "invalid",
    );
    // A body over the limit is refused from its Content-Length, before it is read.
    {
        use std::io::{Read, Write};
        let mut raw = std::os::unix::net::UnixStream::connect(&d.socket).unwrap();
        let head = "POST /v1/layers HTTP/1.1\r\nHost: x\r\nContent-Length: 2097152\r\n\r\n";
        raw.write_all(head.as_bytes()).unwrap();
        let mut answer = [0u8; 1024];
        let n = raw.read(&mut answer).unwrap();
        let answer = String::from_utf8_lossy(&answer[..n]);
        assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
        assert!(answer.contains("\"kind\":\"invalid\""), "{answer}");
    }
    expect_api_error(client.get("/v1/layers?colour=red"), 400, "invalid");
    // A size that overflows is refused before anything is made.
    let huge = CreateRequest {
        name: "huge".into(),
        ..CreateRequest::default()
    };
    let mut huge = serde_json::to_value(&huge).unwrap();
    huge["size"] = json!("99999999999P");
    let refused = client.call::<Value>("POST", "/v1/layers", Some(huge.to_string().into_bytes()));
    expect_api_error(refused, 400, "invalid");
    assert_eq!(d.cli(&["layer", "inspect", "huge"]).code, 3);

    // A client that disconnects once its create has started: the create finishes whole all
    // the same. (One that disconnects before the daemon starts its request changes nothing.)
    {
        use std::io::Write;
        let body = r#"{"name": "abandoned", "size": "1G"}"#;
        let mut raw = std::os::unix::net::UnixStream::connect(&d.socket).unwrap();
        let request = format!(
            "POST /v1/layers HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        raw.write_all(request.as_bytes()).unwrap();
        wait_until(
            "the abandoned create to start",
            || d.cli(&["layer", "inspect", "abandoned"]).code == 0,
            || d.log_text(),
        );
        drop(raw);
        wait_until(
            "the abandoned create to finish",
            || {
                let run = d.cli(&["--json", "layer", "inspect", "abandoned"]);
                run.code == 0 && run.json()["state"] == "ready"
            },
            || d.log_text(),
        );
        assert_eq!(
            d.json(&["layer", "remove", "abandoned"])["removed"][0]["result"],
            "removed"
        );
    }

    // SIGTERM: exit 0, socket gone, mounted layers stay mounted
    d.json(&["layer", "create", "stay"]);
    let stay = d.cli(&["layer", "mount", "stay"]).stdout.trim().to_string();
    assert_eq!(d.stop(), 0, "{}", d.log_text());
    assert_eq!(d.notifications(), ["STOPPING=1"]);
    assert!(!d.socket.exists(), "the socket is removed at exit");
    assert!(
        common::mounts_under(std::path::Path::new(&stay)).len() == 1,
        "layer stays mounted"
    );
    let down = d.cli(&["pool", "status"]);
    assert_eq!(down.code, 7, "daemon unreachable: {down:?}");
    assert!(
        down.stderr.contains(&d.socket.display().to_string()),
        "{down:?}"
    );
    d.spawn();
    let after = d.json(&["layer", "inspect", "stay"]);
    assert_eq!(after["mounts"].as_object().unwrap().len(), 1, "{after}");
    assert_eq!(d.cli(&["layer", "unmount", "stay"]).code, 0);
    let names = stop_and_check_agreement(&mut d);
    assert_eq!(names, BTreeSet::from(["stay".to_string()]));
}

#[test]
#[ignore = "needs root and dm-thin: run with scripts/vm-test"]
fn kernel_daemon_eight_clients_create_and_remove_25_children_each() {
    let _dm = require_dm_thin();
    let mut d = TestDaemon::start("clients", SMALL);
    d.json(&["layer", "create", "base"]);
    d.json(&["layer", "commit", "base"]);
    let started = Instant::now();
    std::thread::scope(|s| {
        for client in 0..8 {
            let d = &d;
            s.spawn(move || {
                for n in 0..25 {
                    let name = format!("c{client}-{n}");
                    let made = d.json(&["layer", "create", &name, "--parent", "base"]);
                    assert_eq!(made["name"], name.as_str());
                }
                for n in 0..25 {
                    let name = format!("c{client}-{n}");
                    let removed = d.json(&["layer", "remove", &name]);
                    assert_eq!(removed["removed"][0]["result"], "removed");
                }
            });
        }
    });
    eprintln!(
        "8 clients x 25 creates + 25 removes through the CLI: {:.1} s",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(d.json(&["layer", "list"]).as_array().unwrap().len(), 1);
    let names = stop_and_check_agreement(&mut d);
    assert_eq!(names, BTreeSet::from(["base".to_string()]));
}

#[test]
#[ignore = "needs root and dm-thin: run with scripts/vm-test"]
fn kernel_daemon_kill_9_while_clients_create_layers() {
    let _dm = require_dm_thin();
    let mut d = TestDaemon::start("kill9", SMALL);
    d.json(&["layer", "create", "base"]);
    let told = kill_9_while_clients_create(&mut d, 4, "base", 30);
    assert!(
        told.len() >= 30,
        "only {} layers made before the kill",
        told.len()
    );
    d.spawn();
    for name in &told {
        let layer = d.json(&["layer", "inspect", name]);
        assert_eq!(layer["state"], "ready", "{name}");
    }
    // Clients reconnecting succeed.
    d.json(&["layer", "create", "after", "--parent", "base"]);
    let names = stop_and_check_agreement(&mut d);
    for name in &told {
        assert!(names.contains(name), "{name} was reported made but is gone");
    }
    eprintln!(
        "kill -9 after {} creates: all there, {} layers in all",
        told.len(),
        names.len()
    );
}

#[test]
#[ignore = "needs root and dm-thin: run with scripts/vm-test"]
fn kernel_second_daemon_on_the_same_state_directory_exits_at_once() {
    let _dm = require_dm_thin();
    let mut d = TestDaemon::start("second", SMALL);
    d.json(&["layer", "create", "base"]);
    // It must not wait for the lock: it exits by itself while the first one runs.
    let mut second = std::process::Command::new(env!("CARGO_BIN_EXE_thinstackd"))
        .arg("--config")
        .arg(&d.config_path)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_until(
        "the second daemon to exit by itself",
        || second.try_wait().unwrap().is_some(),
        || d.log_text(),
    );
    let second = second.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(
        !second.status.success(),
        "a second daemon must fail: {stderr}"
    );
    assert!(
        stderr.contains("in use by another thinstack process"),
        "clear message: {stderr}"
    );
    // The first daemon is untouched.
    assert_eq!(d.json(&["layer", "inspect", "base"])["state"], "ready");
    stop_and_check_agreement(&mut d);
}

#[test]
#[ignore = "needs root and dm-thin: run with scripts/vm-test"]
fn kernel_daemon_background_retries_deferred_removals_and_grows_the_pool() {
    let _dm = require_dm_thin();
    let mut d = TestDaemon::start(
        "background",
        "[pool.loop]\ndata_size = \"256M\"\nautoextend_threshold = \"50%\"\n\
         autoextend_percent = \"50%\"\ndata_size_max = \"1G\"\n\
         [pool]\nmin_free_space = \"0%\"\nmax_overcommit = 2\n[layers]\nbase_size = \"64M\"\n\
         [daemon]\ndeactivate_on_shutdown = true\n",
    );
    // A removal deferred while someone holds the device is done once it is released.
    d.json(&["layer", "create", "held"]);
    let device = d
        .cli(&["layer", "activate", "held"])
        .stdout
        .trim()
        .to_string();
    let holder = std::fs::File::open(&device).unwrap();
    let removed = d.json(&["layer", "remove", "held"]);
    assert_eq!(removed["removed"][0]["result"], "deferred");
    assert_eq!(d.json(&["pool", "status"])["deferred_deletions"], 1);
    drop(holder);
    wait_until(
        "the deferred removal of 'held'",
        || d.cli(&["layer", "inspect", "held"]).code == 3,
        || d.log_text(),
    );
    assert_eq!(d.json(&["pool", "status"])["deferred_deletions"], 0);

    // Writing past the threshold makes the daemon grow the loop file and the pool.
    d.json(&["layer", "create", "fill", "--size", "900M"]);
    let mnt = d.cli(&["layer", "mount", "fill"]).stdout.trim().to_string();
    let chunk = vec![0x5au8; 1 << 20];
    let mut file = std::fs::File::create(std::path::Path::new(&mnt).join("fill")).unwrap();
    for _ in 0..160 {
        std::io::Write::write_all(&mut file, &chunk).unwrap();
    }
    file.sync_all().unwrap();
    drop(file);
    // The watcher logs the extension once the reload returned, which is after the pool shows
    // its new size: wait for the log line itself, then check the size it reports.
    wait_until(
        "the watcher to extend the pool",
        || d.log_text().contains("pool was filling up; extended it"),
        || d.log_text(),
    );
    let total = d.json(&["pool", "status"])["data"]["total"].clone();
    assert_eq!(total, "384M", "grown by 50% once:\n{}", d.log_text());
    let file_size = std::fs::metadata(d.pool.data_file()).unwrap().len();
    assert_eq!(file_size, 384 << 20, "the data file grew");

    // The overcommit limit counts the most the pool may grow to (1G): 900M + 1200M is over 2x.
    let refused = d.cli(&["layer", "create", "big", "--size", "1200M"]);
    assert_eq!(refused.code, 6, "{refused:?}");
    assert!(
        refused.stderr.contains("pool.max_overcommit 2"),
        "{refused:?}"
    );
    // The metrics a scraper reads show the extension, the pool and the refusal.
    let metrics = d.cli(&["pool", "metrics"]);
    assert_eq!(metrics.code, 0, "{metrics:?}");
    let text = &metrics.stdout;
    for line in [
        "thinstack_pool_autoextensions_total{area=\"data\"} 1",
        "thinstack_pool_data_size_bytes 402653184",
        "thinstack_pool_virtual_size_bytes 943718400",
        "thinstack_pool_overcommit_limit_ratio 2.0",
        "thinstack_layers{state=\"mounted\"} 1",
        "thinstack_pool_health{state=\"ok\"} 1",
        "thinstack_operation_errors_total{interface=\"http\",operation=\"POST /v1/layers\",kind=\"no_space\"} 1",
    ] {
        assert!(text.lines().any(|l| l == line), "{line:?} missing from:\n{text}");
    }
    common::promtool_check_metrics(text);
    // deactivate_on_shutdown: the daemon unmounts and deactivates every layer as it stops.
    assert_eq!(d.stop(), 0, "{}", d.log_text());
    let dm = thinstack::kernel::dm::Dm::open().unwrap();
    let left = dm
        .list_with_prefix(&d.pool.config.pool.name.dm_prefix())
        .unwrap();
    let pool_name = d.pool.config.pool.name.pool_dm_name().to_string();
    assert!(
        left.iter().all(|n| n.to_string() == pool_name),
        "devices left active: {left:?}"
    );
    assert!(common::mounts_under(std::path::Path::new(&mnt)).is_empty());
    let names = check_agreement(&d);
    assert_eq!(names, BTreeSet::from(["fill".to_string()]));
}

/// Write `mib` MiB of `byte` into `device` from `offset_mib` on, and flush it to the pool.
fn write_device(device: &str, offset_mib: u64, mib: u64, byte: u8) {
    use std::io::{Seek, SeekFrom, Write};
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .open(device)
        .unwrap();
    file.seek(SeekFrom::Start(offset_mib << 20)).unwrap();
    let chunk = vec![byte; 1 << 20];
    for _ in 0..mib {
        file.write_all(&chunk).unwrap();
    }
    file.sync_all().unwrap();
}

#[test]
#[ignore = "needs root and dm-thin: run with scripts/vm-test"]
fn kernel_daemon_usage_counts_what_a_child_holds_alone() {
    let _dm = require_dm_thin();
    let d = TestDaemon::start("usage", "[layers]\nbase_size = \"1G\"\n");
    let events = common::EventLines::subscribe(&d.socket);
    const MIB: i64 = 1 << 20;
    let block = 64 * 1024;
    let bytes = |usage: &Value, field: &str| usage[format!("{field}_bytes")].as_i64().unwrap();
    // Raw writes where ext4's mkfs wrote nothing, so the figures are exactly the data: block
    // groups 2 (256M-384M) and 6 (768M-896M) of a 1G filesystem hold no backup superblock, its
    // inode tables sit in group 0 (flex_bg) and its journal in the middle (512M).
    d.json(&["layer", "create", "base"]);
    let formatted = bytes(&d.json(&["layer", "usage", "base"]), "mapped");
    let device = d
        .cli(&["layer", "activate", "base"])
        .stdout
        .trim()
        .to_string();
    write_device(&device, 260, 100, 0xaa);
    d.json(&["layer", "deactivate", "base"]);
    d.json(&["layer", "commit", "base"]);
    let base = d.json(&["layer", "usage", "base"]);
    assert_eq!(bytes(&base, "mapped"), formatted + 100 * MIB, "{base}");
    assert_eq!(bytes(&base, "exclusive"), bytes(&base, "mapped"), "{base}");

    // The child rewrites 10M of the base's data and adds 10M of its own.
    d.json(&["layer", "create", "app", "--parent", "base"]);
    let device = d
        .cli(&["layer", "activate", "app"])
        .stdout
        .trim()
        .to_string();
    write_device(&device, 260, 10, 0xbb);
    write_device(&device, 780, 10, 0xcc);
    let app = d.json(&["layer", "usage", "app"]);
    let exclusive = bytes(&app, "exclusive");
    assert!(
        (exclusive - 20 * MIB).abs() <= block,
        "exclusive {exclusive}, not 20M within a block: {app}"
    );
    assert_eq!(bytes(&app, "mapped"), formatted + 110 * MIB, "{app}");
    assert_eq!(
        bytes(&app, "shared"),
        bytes(&app, "mapped") - exclusive,
        "{app}"
    );
    let base = d.json(&["layer", "usage", "base"]);
    assert_eq!(bytes(&base, "exclusive"), 10 * MIB, "{base}");

    // `layer list --usage` reads the same figures for every layer at once.
    let listed = d.json(&["layer", "list", "--usage"]);
    let listed_app = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["name"] == "app")
        .unwrap();
    assert_eq!(listed_app["usage"], app);
    let table = d.cli(&["layer", "list", "--usage"]).stdout;
    assert!(
        table.contains("EXCLUSIVE") && table.contains("20.0M"),
        "{table}"
    );
    eprintln!("usage figures: formatted {formatted} B; app {app}; base {base}");

    // Prune takes nothing in use; once the child is released, the child and then its parent.
    let dry = d.json(&["layer", "prune", "--dry-run"]);
    assert_eq!(dry["removed"].as_array().unwrap().len(), 0, "{dry}");
    d.json(&["layer", "deactivate", "app"]);
    let dry = d.json(&["layer", "prune", "--dry-run"]);
    let order: Vec<&str> = dry["removed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["name"].as_str().unwrap())
        .collect();
    assert_eq!(order, ["app", "base"], "{dry}");
    assert_eq!(d.json(&["layer", "list"]).as_array().unwrap().len(), 2);
    let pruned = d.json(&["layer", "prune"]);
    let given_back = pruned["given_back_bytes"].as_i64().unwrap();
    assert!(given_back >= 120 * MIB, "{pruned}");
    assert_eq!(d.json(&["layer", "list"]).as_array().unwrap().len(), 0);
    eprintln!("prune gave back {given_back} B: {pruned}");
    // What a script waiting on events saw of all this.
    let seen = events.kinds(5);
    let expected = [
        ("layer_created", "base"),
        ("layer_committed", "base"),
        ("layer_created", "app"),
        ("layer_removed", "app"),
        ("layer_removed", "base"),
    ]
    .map(|(kind, layer)| (kind.to_string(), layer.to_string()));
    assert_eq!(seen, expected);
}

#[test]
#[ignore = "needs root and dm-thin: run with scripts/vm-test"]
fn kernel_daemon_trim_gives_back_what_deleted_files_held() {
    let _dm = require_dm_thin();
    let d = TestDaemon::start("trim", "[layers]\nbase_size = \"512M\"\n");
    const MIB: i64 = 1 << 20;
    let used = || {
        let status = d.json(&["pool", "status"]);
        let text = status["data"]["used"].as_str().unwrap().to_string();
        text.parse::<thinstack::units::ByteSize>().unwrap().bytes() as i64
    };
    let fill = |dir: &str, name: &str, mib: usize| {
        let path = std::path::Path::new(dir).join(name);
        std::fs::write(&path, vec![0x5au8; mib << 20]).unwrap();
        std::fs::File::open(&path).unwrap().sync_all().unwrap();
    };
    let delete = |dir: &str, name: &str| {
        std::fs::remove_file(std::path::Path::new(dir).join(name)).unwrap();
        nix::unistd::sync();
    };
    d.json(&["layer", "create", "scratch"]);
    let dir = d
        .cli(&["layer", "mount", "scratch"])
        .stdout
        .trim()
        .to_string();
    fill(&dir, "a", 100);
    let full = used();
    delete(&dir, "a");
    assert!(
        used() > full - 10 * MIB,
        "the pool keeps deleted blocks until a trim"
    );
    // Mounted: trimmed where it is mounted.
    let trimmed = d.json(&["layer", "trim", "scratch"]);
    let back = trimmed["given_back_bytes"].as_i64().unwrap();
    assert!(back >= 95 * MIB, "{trimmed}");
    assert!(
        trimmed["trimmed_bytes"].as_i64().unwrap() >= back,
        "{trimmed}"
    );
    eprintln!("mounted trim: {trimmed}");

    // Unmounted: trimmed at a private mount, and the device left inactive as it was.
    fill(&dir, "b", 50);
    delete(&dir, "b");
    d.json(&["layer", "unmount", "scratch"]);
    d.json(&["layer", "deactivate", "scratch"]);
    let trimmed = d.json(&["layer", "trim", "scratch"]);
    assert!(
        trimmed["given_back_bytes"].as_i64().unwrap() >= 45 * MIB,
        "{trimmed}"
    );
    assert!(d.json(&["layer", "inspect", "scratch"])["device"].is_null());
    eprintln!("unmounted trim: {trimmed}");
    // A committed layer's device is read-only.
    d.json(&["layer", "commit", "scratch"]);
    assert_eq!(d.cli(&["layer", "trim", "scratch"]).code, 1);
}
