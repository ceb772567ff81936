//! `/metrics` of a live `thinstackd --sim`, without root: on the API socket and over TCP
//! (`daemon.metrics_listen`), its figures following what was done, and its output passing
//! `promtool check metrics`; the shipped alert rules pass `promtool check rules` and their
//! unit tests (`promtool test rules`). promtool comes with Debian's `prometheus` package,
//! which `scripts/setup` installs: without it these tests fail, they do not skip.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;

use common::sim::SimDaemon;
use common::{promtool, promtool_check_metrics, sample};
use thinstack::client::{Client, ClientError};
use thinstack::ErrorKind;

/// A port on loopback that was free a moment ago.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A daemon serving metrics on a free port, and the port. A port free a moment ago can be
/// taken before the daemon binds it (by any process's outgoing connection): then the daemon
/// exits saying so, and another port is tried.
fn start() -> (SimDaemon, Client, u16) {
    let mut tries = 0;
    loop {
        let port = free_port();
        let mut daemon = SimDaemon::start(|_| {
            format!(
                "[pool]\nmax_overcommit = 3\n[pool.loop]\ndata_size = \"10G\"\nautoextend_threshold = \"100%\"\n[layers]\nbase_size = \"8G\"\n[daemon]\nmetrics_listen = \"127.0.0.1:{port}\"\n"
            )
        });
        match daemon.client_unless_exited() {
            Ok(client) => return (daemon, client, port),
            Err(exited) if exited.contains("cannot serve metrics on") && tries < 5 => {
                tries += 1;
            }
            Err(exited) => panic!("{exited}"),
        }
    }
}

fn post(client: &mut Client, path: &str, body: serde_json::Value) -> Result<(), ClientError> {
    client.post::<serde_json::Value>(path, &body).map(|_| ())
}

/// `GET /metrics` over TCP, as a scraper sends it.
fn scrape_tcp(port: u16) -> (String, String) {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("metrics over TCP");
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: scraper\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    let (head, body) = answer.split_once("\r\n\r\n").expect("an HTTP answer");
    (head.to_string(), body.to_string())
}

#[test]
fn metrics_follow_the_pool_and_the_operations_and_pass_promtool() {
    let (daemon, mut client, port) = start();
    post(
        &mut client,
        "/v1/layers",
        serde_json::json!({"name": "base"}),
    )
    .unwrap();
    post(&mut client, "/v1/layers/base/commit", serde_json::json!({})).unwrap();
    post(
        &mut client,
        "/v1/layers",
        serde_json::json!({"name": "app", "parent": "base"}),
    )
    .unwrap();
    post(
        &mut client,
        "/v1/layers/app/activate",
        serde_json::json!({}),
    )
    .unwrap();
    let taken = post(
        &mut client,
        "/v1/layers",
        serde_json::json!({"name": "app"}),
    )
    .unwrap_err();
    assert_eq!(taken.kind(), Some(ErrorKind::AlreadyExists));
    // 8G + 8G of 10G: a third 8G layer would make 2.4 of the limit 3, a fourth 3.2.
    post(
        &mut client,
        "/v1/layers",
        serde_json::json!({"name": "third", "parent": "base"}),
    )
    .unwrap();
    let refused = post(
        &mut client,
        "/v1/layers",
        serde_json::json!({"name": "fourth", "parent": "base"}),
    )
    .unwrap_err();
    assert_eq!(refused.kind(), Some(ErrorKind::NoSpace), "{refused}");

    let text = client.get_text("/metrics").unwrap();
    let gib = (1u64 << 30) as f64;
    assert_eq!(sample(&text, "thinstack_pool_data_size_bytes"), 10.0 * gib);
    assert_eq!(
        sample(&text, "thinstack_pool_virtual_size_bytes"),
        24.0 * gib
    );
    assert!((sample(&text, "thinstack_pool_overcommit_ratio") - 2.4).abs() < 1e-9);
    assert_eq!(sample(&text, "thinstack_pool_overcommit_limit_ratio"), 3.0);
    assert_eq!(sample(&text, "thinstack_pool_block_size_bytes"), 65536.0);
    assert!(sample(&text, "thinstack_pool_data_used_bytes") > 0.0);
    assert!(sample(&text, "thinstack_pool_metadata_size_bytes") > 0.0);
    assert!(sample(&text, "thinstack_pool_data_low_water_mark_bytes") > 0.0);
    assert!(sample(&text, "thinstack_pool_metadata_low_water_mark_bytes") > 0.0);
    assert!(sample(&text, "thinstack_pool_transaction_id") >= 3.0);
    assert_eq!(sample(&text, r#"thinstack_pool_health{state="ok"}"#), 1.0);
    assert_eq!(
        sample(&text, r#"thinstack_pool_health{state="read_only"}"#),
        0.0
    );
    assert_eq!(sample(&text, r#"thinstack_layers{state="ready"}"#), 3.0);
    assert_eq!(sample(&text, r#"thinstack_layers{state="committed"}"#), 1.0);
    assert_eq!(sample(&text, r#"thinstack_layers{state="active"}"#), 1.0);
    assert_eq!(sample(&text, r#"thinstack_layers{state="creating"}"#), 0.0);
    let creates = r#"thinstack_operation_duration_seconds_count{interface="http",operation="POST /v1/layers"}"#;
    assert_eq!(sample(&text, creates), 5.0);
    let exists = r#"thinstack_operation_errors_total{interface="http",operation="POST /v1/layers",kind="already_exists"}"#;
    assert_eq!(sample(&text, exists), 1.0);
    let full = r#"thinstack_operation_errors_total{interface="http",operation="POST /v1/layers",kind="no_space"}"#;
    assert_eq!(sample(&text, full), 1.0);
    assert!(
        !text.contains("\"base\"") && !text.contains("\"app\""),
        "a layer's name is a label:\n{text}"
    );
    assert_eq!(sample(&text, "thinstack_thin_devices_deleting"), 0.0);
    promtool_check_metrics(&text);

    // A removal answers before its device is deleted; the watcher deletes it after.
    let _: serde_json::Value = client.delete("/v1/layers/third").unwrap();
    common::wait_until(
        "the removed layer's device to be deleted",
        || {
            let text = client.get_text("/metrics").unwrap();
            sample(&text, "thinstack_thin_devices_deleting") == 0.0
                && sample(&text, r#"thinstack_layers{state="ready"}"#) == 2.0
        },
        || daemon.log(),
    );

    // The same over TCP, for a scraper, and nothing but /metrics there.
    let (head, body) = scrape_tcp(port);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4"),
        "{head}"
    );
    assert_eq!(sample(&body, r#"thinstack_layers{state="ready"}"#), 2.0);
    promtool_check_metrics(&body);
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .write_all(b"GET /v1/layers HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 404"), "{answer}");
}

#[test]
fn the_shipped_alert_rules_pass_promtool_and_fire_as_their_tests_say() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let checked = promtool(
        &["check", "rules", "configs/thinstack-alerts.yml"],
        "",
        root,
    );
    assert!(checked.contains("SUCCESS: 8 rules found"), "{checked}");
    let tested = promtool(
        &["test", "rules", "alerts_test.yml"],
        "",
        &root.join("tests/promtool"),
    );
    assert!(tested.contains("SUCCESS"), "{tested}");
}
