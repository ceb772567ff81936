//! `GET /v1/events` and `thinstack events` on a live `thinstackd --sim`, without root: each
//! change arrives as one JSON line, in order, after the stream's `subscribed` line.

mod common;

use std::process::{Command, Stdio};

use common::sim::SimDaemon;
use common::{wait_until, EventLines};
use serde_json::json;
use thinstack::client::Client;

fn start() -> (SimDaemon, Client) {
    let mut daemon = SimDaemon::start(|_| "[layers]\nbase_size = \"64M\"\n".to_string());
    let client = daemon.client();
    (daemon, client)
}

fn post(client: &mut Client, path: &str, body: serde_json::Value) {
    client
        .post::<serde_json::Value>(path, &body)
        .unwrap_or_else(|e| panic!("POST {path}: {e}"));
}

fn pair(kind: &str, layer: &str) -> (String, String) {
    (kind.to_string(), layer.to_string())
}

#[test]
fn every_change_arrives_as_one_line_in_order() {
    let (daemon, mut client) = start();
    let events = EventLines::subscribe(&daemon.api_socket());
    post(&mut client, "/v1/layers", json!({"name": "base"}));
    post(&mut client, "/v1/layers/base/mount", json!({}));
    post(&mut client, "/v1/layers/base/unmount", json!({}));
    post(&mut client, "/v1/layers/base/commit", json!({}));
    post(
        &mut client,
        "/v1/layers",
        json!({"name": "app", "parent": "base"}),
    );
    post(
        &mut client,
        "/v1/layers/app/resize",
        json!({"size": "128M"}),
    );
    post(&mut client, "/v1/pool/extend", json!({"data": "200G"}));
    client
        .delete::<serde_json::Value>("/v1/layers/app")
        .unwrap();
    assert_eq!(
        events.kinds(8),
        [
            pair("layer_created", "base"),
            pair("layer_mounted", "base"),
            pair("layer_unmounted", "base"),
            pair("layer_committed", "base"),
            pair("layer_created", "app"),
            pair("layer_resized", "app"),
            pair("pool_extended", ""),
            pair("layer_removed", "app"),
        ]
    );
    // Details ride along.
    let other = EventLines::subscribe(&daemon.api_socket());
    post(
        &mut client,
        "/v1/layers/base/mount",
        json!({"readonly": true}),
    );
    let mounted = other.next();
    assert_eq!(mounted["read_only"], true, "{mounted}");
    assert!(
        mounted["target"].as_str().unwrap().ends_with("/mnt/base"),
        "{mounted}"
    );
    assert!(mounted["time_ns"].as_u64().unwrap() > 0, "{mounted}");
}

#[test]
fn thinstack_events_prints_changes_until_its_count() {
    let (daemon, mut client) = start();
    let mut child = Command::new(env!("CARGO_BIN_EXE_thinstack"))
        .arg("--socket")
        .arg(daemon.api_socket())
        .args(["events", "--count", "2"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    // Its subscription is not visible from here: make changes until it has seen two and ended.
    let made = std::cell::Cell::new(0);
    wait_until(
        "thinstack events --count 2 to end",
        || {
            let name = format!("ping-{}", made.get());
            post(&mut client, "/v1/layers", json!({ "name": name }));
            made.set(made.get() + 1);
            child.try_wait().unwrap().is_some()
        },
        || format!("{} layers made", made.get()),
    );
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success(), "{output:?}");
    let text = String::from_utf8_lossy(&output.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "subscribed, then two events: {text}");
    assert!(lines[0].ends_with(" subscribed"), "{text}");
    assert!(lines[1].contains(" layer_created ping-"), "{text}");
}
