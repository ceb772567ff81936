//! The real `thinstackd` against slow, idle and surplus clients: a request body that stalls is
//! answered 408 within `daemon.request_timeout`; beyond `daemon.max_connections` a client gets
//! a 503; SIGTERM cuts stalled connections after `daemon.shutdown_timeout` and still finishes
//! the operations already started; and every change is audited with the client's uid and pid.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use common::daemon::TestDaemon;
use common::require_dm_thin;
use serde_json::Value;
use thinstack::api::CreateRequest;
use thinstack::client::{Client, ClientError};
use thinstack::error::ErrorKind as ApiErrorKind;

const SMALL: &str = "[layers]\nbase_size = \"64M\"\n";

/// Poll `condition` every 50 ms until it holds or `limit` passes; whether it held. Things run
/// 10-50 times slower under emulation, so limits are generous and nothing waits a fixed time.
fn wait_for(limit: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if condition() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One response from a raw connection: status, head (lower case) and body.
fn read_response(stream: &mut UnixStream) -> (u16, String, String) {
    let mut bytes = Vec::new();
    let mut byte = [0u8; 1];
    while !bytes.ends_with(b"\r\n\r\n") {
        match stream.read(&mut byte) {
            Ok(0) => panic!(
                "the connection closed mid-answer: {:?}",
                String::from_utf8_lossy(&bytes)
            ),
            Ok(_) => bytes.push(byte[0]),
            Err(e) => panic!("reading an answer: {e}"),
        }
    }
    let head = String::from_utf8_lossy(&bytes).to_ascii_lowercase();
    let status = head[9..12].parse().expect("a status code");
    let length: usize = head
        .lines()
        .find_map(|line| line.strip_prefix("content-length:"))
        .map(|n| n.trim().parse().unwrap())
        .expect("a Content-Length");
    let mut body = vec![0u8; length];
    stream.read_exact(&mut body).expect("the body");
    (status, head, String::from_utf8(body).unwrap())
}

/// A connection that sent a request and read its answer: proof that the daemon admitted it.
/// `None` when it was refused (the 503 of a full daemon).
fn admitted_connection(socket: &Path) -> Option<UnixStream> {
    let mut stream = UnixStream::connect(socket).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(120)))
        .unwrap();
    stream
        .write_all(b"GET /v1/version HTTP/1.1\r\nHost: thinstack\r\n\r\n")
        .unwrap();
    let (status, _, _) = read_response(&mut stream);
    (status == 200).then_some(stream)
}

/// A create whose body never arrives whole: Content-Length 100, and only its first bytes sent.
fn stall_in_body(socket: &Path, name: &str) -> UnixStream {
    let mut stream = UnixStream::connect(socket).unwrap();
    let start = format!("{{\"name\": \"{name}\"");
    let head = "POST /v1/layers HTTP/1.1\r\nHost: thinstack\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n";
    stream.write_all(head.as_bytes()).unwrap();
    stream.write_all(start.as_bytes()).unwrap();
    stream
}

fn layer_names(d: &TestDaemon) -> Vec<String> {
    let layers = d.json(&["layer", "list"]);
    let names = layers.as_array().unwrap().iter();
    names
        .map(|l| l["name"].as_str().unwrap().to_string())
        .collect()
}

/// The daemon's audit lines so far.
fn audit_lines(d: &TestDaemon) -> Vec<String> {
    let log = d.log_text();
    let lines = log.lines().filter(|line| line.contains(" audit "));
    lines.map(str::to_string).collect()
}

/// The one audit line holding every one of `parts`, waited for (the daemon writes it as it
/// answers, so it may land a moment after the answer).
fn audit_line(d: &TestDaemon, parts: &[&str]) -> String {
    let found = || {
        audit_lines(d)
            .into_iter()
            .find(|line| parts.iter().all(|part| line.contains(part)))
    };
    let mut line = None;
    wait_for(common::EVENTUALLY, || {
        line = found();
        line.is_some()
    });
    line.unwrap_or_else(|| {
        panic!(
            "no audit line with {parts:?}; the audit lines:\n{}\nthe log:\n{}",
            audit_lines(d).join("\n"),
            d.log_text()
        )
    })
}

#[test]
#[ignore = "needs root and dm-thin: run with scripts/vm-test"]
fn kernel_server_a_stalled_request_body_is_answered_408_and_others_are_served_meanwhile() {
    let _dm = require_dm_thin();
    let extra = format!("{SMALL}[daemon]\nrequest_timeout = \"2s\"\n");
    let d = TestDaemon::start("body408", &extra);
    let started = Instant::now();
    let mut stalled = stall_in_body(&d.socket, "stalled");
    stalled
        .set_read_timeout(Some(Duration::from_secs(120)))
        .unwrap();

    // The daemon serves others while that client stalls.
    assert_eq!(d.json(&["layer", "create", "other"])["name"], "other");

    // The stalled client is answered 408 and its connection closed.
    let mut answer = String::new();
    let read = stalled.read_to_string(&mut answer);
    assert!(
        read.is_ok(),
        "the daemon should answer and close the stalled connection: {read:?}\n{}",
        d.log_text()
    );
    assert!(answer.starts_with("HTTP/1.1 408 "), "{answer}");
    assert!(answer.contains("daemon.request_timeout"), "{answer}");
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "not before the timeout"
    );

    // Nothing was done for it; it is logged and audited.
    assert_eq!(layer_names(&d), ["other"]);
    assert!(
        d.log_text()
            .contains("did not send its request body in time"),
        "{}",
        d.log_text()
    );
    audit_line(
        &d,
        &[
            // No layer: its name was in the body that never came.
            "operation=\"POST /v1/layers\"",
            "status=408",
            "outcome=\"failed\"",
        ],
    );
}

#[test]
#[ignore = "needs root and dm-thin: run with scripts/vm-test"]
fn kernel_server_beyond_max_connections_a_client_gets_503_until_one_closes() {
    let _dm = require_dm_thin();
    // Idle connections must outlive the test's waits: request_timeout also closes idle ones.
    let extra = format!("{SMALL}[daemon]\nmax_connections = 4\nrequest_timeout = \"10m\"\n");
    let d = TestDaemon::start("cap", &extra);

    // Four idle connections, each admitted (the start-up probe's may still be closing, so a
    // refused one is tried again).
    let mut idle = Vec::new();
    let filled = wait_for(Duration::from_secs(120), || {
        if let Some(stream) = admitted_connection(&d.socket) {
            idle.push(stream);
        }
        idle.len() == 4
    });
    assert!(filled, "four connections admitted:\n{}", d.log_text());

    // A fifth is refused at once with a 503 that says why and what to do.
    let mut fifth = UnixStream::connect(&d.socket).unwrap();
    fifth
        .set_read_timeout(Some(Duration::from_secs(120)))
        .unwrap();
    fifth
        .write_all(b"GET /v1/version HTTP/1.1\r\nHost: thinstack\r\n\r\n")
        .unwrap();
    let (status, head, body) = read_response(&mut fifth);
    assert_eq!(status, 503, "{head}{body}");
    assert!(head.contains("\r\nretry-after: 1\r\n"), "{head}");
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["error"]["kind"], "busy");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("4 connections open") && message.contains("daemon.max_connections"),
        "{message}"
    );
    drop(fifth);

    // The command line says so too, with the exit code of "busy".
    let run = d.cli(&["layer", "list"]);
    assert_eq!(run.code, 5, "{run:?}");
    assert!(run.stderr.contains("daemon.max_connections"), "{run:?}");
    assert!(d.log_text().contains("refused a connection"));

    // Once one closes, a new client is served.
    drop(idle.pop());
    let served = wait_for(common::EVENTUALLY, || {
        Client::new(&d.socket).get::<Value>("/v1/version").is_ok()
    });
    assert!(served, "served once a connection closed:\n{}", d.log_text());
}

#[test]
#[ignore = "needs root and dm-thin: run with scripts/vm-test"]
fn kernel_server_sigterm_cuts_a_stalled_client_after_shutdown_timeout() {
    let _dm = require_dm_thin();
    // A long request_timeout, so it is the stop that ends the stalled client.
    let extra = format!("{SMALL}[daemon]\nshutdown_timeout = \"3s\"\nrequest_timeout = \"10m\"\n");
    let mut d = TestDaemon::start("cut", &extra);
    let mut stalled = stall_in_body(&d.socket, "stalled");
    // Accepted in order: once a later connection is served, the stalled one was accepted.
    let idle = admitted_connection(&d.socket).expect("admitted");

    let signalled = Instant::now();
    d.sigterm();
    assert_eq!(
        d.wait_exit_within(common::EVENTUALLY),
        0,
        "{}",
        d.log_text()
    );
    assert!(
        signalled.elapsed() >= Duration::from_secs(3),
        "open connections get shutdown_timeout"
    );
    let log = d.log_text();
    assert!(
        log.contains("daemon.shutdown_timeout (3s) passed: cut"),
        "the log says connections were cut:\n{log}"
    );
    // The stalled client's connection is closed (or reset), not left hanging.
    stalled
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut rest = Vec::new();
    let read = stalled.read_to_end(&mut rest);
    assert!(
        !matches!(&read, Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)),
        "{read:?}"
    );
    drop(idle);
}

#[test]
#[ignore = "needs root and dm-thin: run with scripts/vm-test"]
fn kernel_server_an_operation_in_flight_at_sigterm_still_completes() {
    let _dm = require_dm_thin();
    // mkfs -c reads the whole (thin, mostly unprovisioned) device with badblocks, so the
    // create stays in flight long enough to send SIGTERM during it.
    let extra = "[layers]\nbase_size = \"1G\"\nmkfs_args = [\"-c\"]\n[daemon]\nshutdown_timeout = \"3s\"\nrequest_timeout = \"10m\"\n";
    let mut d = TestDaemon::start("inflight", extra);
    let _stalled = stall_in_body(&d.socket, "stalled");
    let socket = d.socket.clone();
    let creator = std::thread::spawn(move || {
        let request = CreateRequest {
            name: "slow".into(),
            ..CreateRequest::default()
        };
        Client::new(&socket).post::<Value>("/v1/layers", &request)
    });
    let mut watcher = d.client();
    let creating = wait_for(Duration::from_secs(300), || {
        let layers: Value = watcher.get("/v1/layers").unwrap();
        let slow = layers
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["name"] == "slow");
        slow.is_some_and(|l| l["state"] == "creating") || creator.is_finished()
    });
    assert!(creating, "the create never started:\n{}", d.log_text());
    assert!(
        !creator.is_finished(),
        "the create finished before SIGTERM could be sent; the test needs it slower"
    );
    drop(watcher);

    d.sigterm();
    let code = d.wait_exit_within(Duration::from_secs(600));
    assert_eq!(code, 0, "{}", d.log_text());
    let log = d.log_text();
    assert!(
        log.contains("passed: cut"),
        "the stalled client was cut:\n{log}"
    );
    // Its client may have been cut before the answer; then the stop waited for it.
    if creator.join().unwrap().is_err() {
        assert!(
            log.contains("waiting for operations already started to finish"),
            "{log}"
        );
    }

    // The create finished whole, and was audited although its client may be gone.
    audit_line(&d, &["layer=\"slow\"", "status=201", "outcome=\"ok\""]);
    d.spawn();
    assert_eq!(d.json(&["layer", "inspect", "slow"])["state"], "ready");
    assert_eq!(layer_names(&d), ["slow"]);
    assert_eq!(d.stop(), 0);
}

#[test]
#[ignore = "needs root and dm-thin: run with scripts/vm-test"]
fn kernel_server_changes_are_audited_with_the_clients_uid_and_pid() {
    let _dm = require_dm_thin();
    let mut d = TestDaemon::start("audit", SMALL);

    // A create by a thinstack process of its own.
    let cli = std::process::Command::new(env!("CARGO_BIN_EXE_thinstack"))
        .arg("--socket")
        .arg(&d.socket)
        .args(["layer", "create", "audited"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let cli_pid = cli.id();
    assert!(cli.wait_with_output().unwrap().status.success());
    let uid = nix::unistd::geteuid().as_raw();
    audit_line(
        &d,
        &[
            &format!("uid={uid} "),
            &format!("pid={cli_pid} "),
            "operation=\"POST /v1/layers\"",
            "layer=\"audited\"",
            "status=201",
            "outcome=\"ok\"",
        ],
    );

    // A remove by this process, and a remove that fails.
    let mut client = d.client();
    client.delete::<Value>("/v1/layers/audited").unwrap();
    let missing = client.delete::<Value>("/v1/layers/missing").unwrap_err();
    assert!(
        matches!(
            missing,
            ClientError::Api {
                status: 404,
                kind: ApiErrorKind::NotFound,
                ..
            }
        ),
        "{missing:?}"
    );
    let me = std::process::id();
    audit_line(
        &d,
        &[
            &format!("uid={uid} "),
            &format!("pid={me} "),
            "operation=\"DELETE /v1/layers/{name}\"",
            "layer=\"audited\"",
            "status=200",
            "outcome=\"ok\"",
        ],
    );
    let failed = audit_line(
        &d,
        &[
            &format!("pid={me} "),
            "layer=\"missing\"",
            "status=404",
            "outcome=\"failed\"",
        ],
    );
    assert!(
        failed.contains("error=") && failed.contains("missing"),
        "{failed}"
    );

    // Reading changes nothing and is not audited.
    client.get::<Value>("/v1/layers").unwrap();
    drop(client);
    assert_eq!(d.stop(), 0);
    let lines = audit_lines(&d);
    assert!(
        lines.iter().all(|line| !line.contains("operation=\"GET")),
        "{lines:?}"
    );
    assert_eq!(lines.len(), 3, "{lines:?}");
}
