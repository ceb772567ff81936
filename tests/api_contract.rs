//! The API's contract, without root (issue 17): every route of `openapi.json`, driven over a
//! real Unix socket against `thinstackd --sim`, and every response, errors included, validated
//! against the schema the document gives for its status.
//!
//! Three routes cannot succeed on the sim, and are held to their error responses here: adding
//! a disk needs an LVM pool, adopting needs a thin device no record owns, and breaking a writer
//! lock needs a pool shared by hosts (the kernel tests drive all three to success).

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

mod common;

use common::sim::SimDaemon;

const OPENAPI: &str = include_str!("../src/daemon/openapi.json");

/// Routes that cannot succeed on the sim (see the module's comment).
const NO_SUCCESS_ON_THE_SIM: &[(&str, &str)] = &[
    ("POST", "/v1/pool/add-device"),
    ("POST", "/v1/pool/adopt"),
    ("POST", "/v1/layers/{name}/break-lock"),
];

/// `thinstackd --sim`, with a mount root, answering on its API socket.
struct Api {
    daemon: SimDaemon,
}

impl Api {
    fn start() -> Api {
        let daemon = SimDaemon::start(|dir| {
            std::fs::create_dir(dir.join("roots")).unwrap();
            format!(
                "[layers]\nbase_size = \"64M\"\nmount_roots = [{:?}]\n",
                dir.join("roots")
            )
        });
        let mut api = Api { daemon };
        let started = Instant::now();
        while api.try_request("GET", "/v1/version", None).is_none() {
            api.daemon.still_starting(started, "thinstackd --sim");
            std::thread::sleep(Duration::from_millis(20));
        }
        api
    }

    fn try_request(&self, method: &str, path: &str, body: Option<&Value>) -> Option<Reply> {
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        self.try_send(method, path, "application/json", body.as_bytes())
    }

    /// `body` sent as it is, with `content_type`.
    fn try_send(&self, method: &str, path: &str, content_type: &str, body: &[u8]) -> Option<Reply> {
        let mut stream = UnixStream::connect(self.daemon.api_socket()).ok()?;
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: thinstack\r\nConnection: close\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        stream.write_all(head.as_bytes()).ok()?;
        stream.write_all(body).ok()?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).ok()?;
        Some(Reply::parse(&raw))
    }

    fn request(&self, method: &str, path: &str, body: Option<&Value>) -> Reply {
        self.try_request(method, path, body)
            .unwrap_or_else(|| panic!("{method} {path}: no answer from thinstackd --sim"))
    }
}

/// An HTTP answer: its status and its body (JSON, or `Null` when empty).
struct Reply {
    status: u16,
    body: Value,
    text: String,
    content_type: String,
    /// The body's bytes (a layer stream is not text).
    bytes: Vec<u8>,
}

impl Reply {
    fn parse(raw: &[u8]) -> Reply {
        let at = raw
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .expect("an HTTP head");
        let head = String::from_utf8_lossy(&raw[..at]).into_owned();
        let body = &raw[at + 4..];
        let status = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .expect("a status line");
        let chunked = head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked");
        let bytes = if chunked {
            unchunk(body)
        } else {
            body.to_vec()
        };
        let body = String::from_utf8_lossy(&bytes).into_owned();
        let content_type = head
            .lines()
            .find_map(|line| {
                let (name, value) = line.split_once(':')?;
                name.eq_ignore_ascii_case("content-type")
                    .then(|| value.trim().to_string())
            })
            .unwrap_or_default();
        let value = if body.is_empty() {
            Value::Null
        } else if content_type != "application/json" {
            Value::String(body.clone())
        } else {
            serde_json::from_str(&body)
                .unwrap_or_else(|e| panic!("a body that is not JSON ({e}): {body}"))
        };
        Reply {
            status,
            body: value,
            text: body,
            content_type,
            bytes,
        }
    }
}

fn unchunk(mut rest: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let line = rest
            .windows(2)
            .position(|w| w == b"\r\n")
            .expect("a chunk size");
        let size = std::str::from_utf8(&rest[..line]).expect("a chunk size line");
        let size = usize::from_str_radix(size.trim(), 16).expect("a hex chunk size");
        if size == 0 {
            return out;
        }
        let after = &rest[line + 2..];
        out.extend_from_slice(&after[..size]);
        rest = &after[size + 2..];
    }
}

/// The document, and what the test exercised of it.
struct Contract {
    document: Value,
    /// (method, path template) → statuses seen.
    seen: BTreeMap<(String, String), BTreeSet<u16>>,
}

impl Contract {
    fn new() -> Contract {
        Contract {
            document: serde_json::from_str(OPENAPI).unwrap(),
            seen: BTreeMap::new(),
        }
    }

    /// Every (method, path template) the document describes.
    fn operations(&self) -> BTreeSet<(String, String)> {
        let mut all = BTreeSet::new();
        for (path, item) in self.document["paths"].as_object().unwrap() {
            for method in item.as_object().unwrap().keys() {
                if ["get", "post", "put", "patch", "delete"].contains(&method.as_str()) {
                    all.insert((method.to_uppercase(), path.clone()));
                }
            }
        }
        all
    }

    /// Send `request` ("METHOD /path?query") and check the answer: its status must be
    /// `expected`, and its body must match the schema the document gives for that status (or
    /// its default) on the route the path falls under.
    fn call(&mut self, daemon: &Api, request: &str, body: Option<Value>, expected: u16) -> Value {
        let (method, actual) = request.split_once(' ').unwrap();
        let reply = daemon.request(method, actual, body.as_ref());
        self.check(request, reply, expected)
    }

    /// Check `reply` to `request` as [`Contract::call`] does.
    fn check(&mut self, request: &str, reply: Reply, expected: u16) -> Value {
        let (method, actual) = request.split_once(' ').unwrap();
        let template = self.template_of(actual);
        assert_eq!(
            reply.status, expected,
            "{request}: status {} (wanted {expected}): {}",
            reply.status, reply.text
        );
        self.validate(method, &template, &reply);
        self.seen
            .entry((method.to_string(), template))
            .or_default()
            .insert(reply.status);
        reply.body
    }

    /// The document's path template `actual` falls under (`/v1/layers/a/mount` under
    /// `/v1/layers/{name}/mount`); a template without parameters goes first.
    fn template_of(&self, actual: &str) -> String {
        let path = actual.split('?').next().unwrap();
        let segments: Vec<&str> = path.split('/').collect();
        let mut matching: Vec<&String> = self.document["paths"]
            .as_object()
            .unwrap()
            .keys()
            .filter(|template| {
                let parts: Vec<&str> = template.split('/').collect();
                parts.len() == segments.len()
                    && parts
                        .iter()
                        .zip(&segments)
                        .all(|(t, s)| t == s || t.starts_with('{'))
            })
            .collect();
        matching.sort_by_key(|template| template.contains('{'));
        matching
            .first()
            .unwrap_or_else(|| panic!("{path} is under no path of openapi.json"))
            .to_string()
    }

    fn validate(&self, method: &str, template: &str, reply: &Reply) {
        let operation = &self.document["paths"][template][method.to_lowercase()];
        assert!(
            operation.is_object(),
            "{method} {template} is not in openapi.json"
        );
        let responses = &operation["responses"];
        let mut response = &responses[reply.status.to_string()];
        if response.is_null() {
            response = &responses["default"];
        }
        assert!(
            !response.is_null(),
            "{method} {template}: status {} is not documented, and there is no default",
            reply.status
        );
        if let Some(reference) = response["$ref"].as_str() {
            response = self.resolve(reference);
        }
        let content = &response["content"];
        if let Some(other) = content
            .as_object()
            .and_then(|types| types.keys().find(|t| *t != "application/json"))
        {
            assert_eq!(
                &reply.content_type, other,
                "{method} {template} {}: the content type the document gives",
                reply.status
            );
            return;
        }
        let schema = &content["application/json"]["schema"];
        if schema.is_null() {
            assert!(
                reply.body.is_null(),
                "{method} {template} {}: a body where the document has none: {}",
                reply.status,
                reply.text
            );
            return;
        }
        let mut full = schema.clone();
        let object = full.as_object_mut().unwrap();
        object.insert(
            "$schema".into(),
            json!("https://json-schema.org/draft/2020-12/schema"),
        );
        object.insert("components".into(), self.document["components"].clone());
        let validator = jsonschema::validator_for(&full).unwrap_or_else(|e| {
            panic!("{method} {template}: the document's schema does not compile: {e}")
        });
        let errors: Vec<String> = validator
            .iter_errors(&reply.body)
            .map(|e| format!("{e} (at {})", e.instance_path()))
            .collect();
        assert!(
            errors.is_empty(),
            "{method} {template} {}: the body does not match the document:\n{}\nbody: {}",
            reply.status,
            errors.join("\n"),
            reply.text
        );
    }

    fn resolve(&self, reference: &str) -> &Value {
        let path = reference.strip_prefix("#/").expect("a local reference");
        path.split('/')
            .fold(&self.document, |value, key| &value[key])
    }
}

#[test]
fn every_route_answers_as_the_document_says() {
    let daemon = Api::start();
    let mut c = Contract::new();
    let d = &daemon;
    let none = || None;
    let empty = || Some(json!({}));

    // The document and the daemon.
    c.call(d, "GET /v1/openapi.json", none(), 200);
    c.call(d, "GET /v1/version", none(), 200);
    let metrics = c.call(d, "GET /metrics", none(), 200);
    assert!(
        metrics
            .as_str()
            .unwrap()
            .contains("thinstack_pool_data_size_bytes "),
        "{metrics}"
    );
    c.call(d, "GET /metrics?x=1", none(), 400);
    let status = c.call(d, "GET /v1/pool", none(), 200);
    assert_eq!(status["pool"]["backend"], "sim", "{status}");

    // Layers: made, found, refused.
    let base = json!({"name": "base", "labels": {"role": "base"}});
    c.call(d, "POST /v1/layers", Some(base.clone()), 201);
    c.call(d, "POST /v1/layers", Some(base.clone()), 409);
    let again = json!({"name": "base", "labels": {"role": "base"}, "exists_ok": true});
    c.call(d, "POST /v1/layers", Some(again), 200);
    c.call(d, "POST /v1/layers", Some(json!({"name": "../x"})), 400);
    c.call(
        d,
        "POST /v1/layers",
        Some(json!({"name": "x", "parent": "nope"})),
        404,
    );
    c.call(
        d,
        "POST /v1/layers",
        Some(json!({"name": "x", "size": "12Q"})),
        400,
    );
    c.call(d, "GET /v1/layers", none(), 200);
    c.call(d, "GET /v1/layers?label=role%3Dbase", none(), 200);
    c.call(d, "GET /v1/layers?label=nolabel", none(), 400);
    let with_usage = c.call(d, "GET /v1/layers?usage=true", none(), 200);
    assert!(
        with_usage[0]["usage"]["exclusive_bytes"].is_u64(),
        "{with_usage}"
    );
    c.call(d, "GET /v1/layers?usage=maybe", none(), 400);
    c.call(d, "GET /v1/layers/base", none(), 200);
    c.call(d, "GET /v1/layers/nope", none(), 404);

    // Mounts: the default place, a mount root, and places no client may use.
    let mounted = c.call(d, "POST /v1/layers/base/mount", empty(), 200);
    let point = PathBuf::from(mounted["mount_point"].as_str().unwrap());
    std::fs::write(point.join("hello"), "from base").unwrap();
    c.call(d, "POST /v1/layers/base/unmount", empty(), 200);
    c.call(d, "POST /v1/layers/base/unmount", empty(), 400);
    let outside = Some(json!({"target": "/etc"}));
    c.call(d, "POST /v1/layers/base/mount", outside, 403);
    c.call(d, "POST /v1/layers/nope/mount", empty(), 404);
    c.call(
        d,
        "POST /v1/layers/base/mount",
        Some(json!({"bogus": 1})),
        400,
    );

    // Commit, children, usage, activation, resize.
    c.call(d, "POST /v1/layers/base/commit", none(), 200);
    c.call(d, "POST /v1/layers/nope/commit", none(), 404);
    let kid = json!({"name": "kid", "parent": "base"});
    c.call(d, "POST /v1/layers", Some(kid), 201);
    let target = d.daemon.dir().join("roots/kid");
    std::fs::create_dir(&target).unwrap();
    let at_target = || Some(json!({ "target": target }));
    c.call(d, "POST /v1/layers/kid/mount", at_target(), 200);
    let seen = std::fs::read_to_string(target.join("hello")).unwrap();
    assert_eq!(
        seen, "from base",
        "the child does not hold its parent's file"
    );
    c.call(d, "POST /v1/layers/kid/unmount", at_target(), 200);
    c.call(d, "GET /v1/layers/kid/usage", none(), 200);
    c.call(d, "GET /v1/layers/nope/usage", none(), 404);
    c.call(d, "POST /v1/layers/kid/activate", none(), 200);
    c.call(d, "POST /v1/layers/nope/activate", none(), 404);
    c.call(d, "POST /v1/layers/kid/deactivate", none(), 200);
    c.call(d, "POST /v1/layers/nope/deactivate", none(), 404);
    // A pool of one host has no writer locks.
    c.call(d, "POST /v1/layers/kid/break-lock", none(), 409);
    c.call(
        d,
        "POST /v1/layers/kid/resize",
        Some(json!({"size": "128M"})),
        200,
    );
    c.call(
        d,
        "POST /v1/layers/kid/resize",
        Some(json!({"size": "1M"})),
        400,
    );
    c.call(
        d,
        "POST /v1/layers/base/resize",
        Some(json!({"size": "1G"})),
        400,
    );
    let trimmed = c.call(d, "POST /v1/layers/kid/trim", none(), 200);
    assert!(trimmed["given_back_bytes"].is_u64(), "{trimmed}");
    c.call(d, "POST /v1/layers/base/trim", none(), 400);
    c.call(d, "POST /v1/layers/nope/trim", none(), 404);

    // Layer data: a checkpoint and a reset to it; an export and its import.
    let checkpoint = Some(json!({"name": "kid-cp", "labels": {"at": "start"}}));
    let taken = c.call(d, "POST /v1/layers/kid/checkpoint", checkpoint, 201);
    assert_eq!(taken["checkpoint_of"], "kid", "{taken}");
    c.call(
        d,
        "POST /v1/layers/base/checkpoint",
        Some(json!({"name": "x"})),
        400,
    );
    let to = Some(json!({"to": "kid-cp"}));
    let reset = c.call(d, "POST /v1/layers/kid/reset", to, 200);
    assert_eq!(reset["name"], "kid", "{reset}");
    c.call(d, "POST /v1/layers/base/reset", empty(), 400);
    let exported = d.request("GET", "/v1/layers/base/export?compress=true", None);
    let stream = exported.bytes.clone();
    c.check("GET /v1/layers/base/export?compress=true", exported, 200);
    c.call(d, "GET /v1/layers/nope/export", none(), 404);
    c.call(d, "GET /v1/layers/base/export?from=kid", none(), 400);
    let octets = "application/octet-stream";
    let imported = d
        .try_send("POST", "/v1/layers/copy/import", octets, &stream)
        .unwrap();
    let copy = c.check("POST /v1/layers/copy/import", imported, 201);
    assert_eq!(copy["content_id"], taken_content_id(d), "{copy}");
    let garbage = d
        .try_send("POST", "/v1/layers/junk/import", octets, b"not a stream")
        .unwrap();
    c.check("POST /v1/layers/junk/import", garbage, 400);
    c.call(d, "DELETE /v1/layers/copy", none(), 200);

    // The pool.
    c.call(
        d,
        "POST /v1/pool/extend",
        Some(json!({"data": "200G"})),
        200,
    );
    c.call(d, "POST /v1/pool/extend", empty(), 400);
    c.call(d, "POST /v1/pool/extend", Some(json!({"data": "1G"})), 400);
    let null = Some(json!({"device": "/dev/null"}));
    c.call(d, "POST /v1/pool/add-device", null, 409);
    c.call(d, "POST /v1/pool/add-device", empty(), 400);
    c.call(d, "POST /v1/pool/check", none(), 200);
    c.call(d, "POST /v1/pool/doctor", empty(), 200);
    c.call(
        d,
        "POST /v1/pool/doctor",
        Some(json!({"repair": true})),
        200,
    );
    c.call(
        d,
        "POST /v1/pool/doctor",
        Some(json!({"repair": "yes"})),
        400,
    );
    let unknown = Some(json!({"thin_id": 99, "name": "x"}));
    c.call(d, "POST /v1/pool/adopt", unknown, 404);
    let owned = Some(json!({"thin_id": 1, "name": "x"}));
    c.call(d, "POST /v1/pool/adopt", owned, 409);

    // Events: a stream that ends after one event, here the creation of a layer.
    let events = std::thread::scope(|scope| {
        let waiting = scope.spawn(|| d.request("GET", "/v1/events?count=1", None));
        let started = Instant::now();
        // Its subscription is not visible from here: make a change until it has seen one.
        while !waiting.is_finished() {
            assert!(started.elapsed() < common::EVENTUALLY, "no event arrived");
            d.request("POST", "/v1/layers/base/unmount", Some(&json!({})));
            std::thread::sleep(Duration::from_millis(20));
            d.request(
                "POST",
                "/v1/layers/base/mount",
                Some(&json!({"readonly": true})),
            );
        }
        waiting.join().unwrap()
    });
    let lines = c.check("GET /v1/events?count=1", events, 200);
    let lines: Vec<Value> = lines
        .as_str()
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert_eq!(lines[0]["type"], "subscribed");
    assert!(
        lines[1]["type"].as_str().unwrap().starts_with("layer_"),
        "{lines:?}"
    );
    c.call(d, "GET /v1/events?count=0", none(), 400);

    // Prune: a dry run, then one that finds nothing unused with that label; bad filters.
    let dry = Some(json!({"dry_run": true}));
    let listed = c.call(d, "POST /v1/pool/prune", dry, 200);
    assert_eq!(listed["dry_run"], true, "{listed}");
    let none_such = Some(json!({"labels": {"no": "such"}, "older_than": "1h"}));
    let pruned = c.call(d, "POST /v1/pool/prune", none_such, 200);
    assert_eq!(pruned["removed"], json!([]), "{pruned}");
    let bad_age = Some(json!({"older_than": "soon"}));
    c.call(d, "POST /v1/pool/prune", bad_age, 400);
    c.call(d, "POST /v1/pool/prune", Some(json!({"all": true})), 400);

    // Removal, then the pool goes.
    c.call(d, "DELETE /v1/layers/base", none(), 409);
    c.call(d, "DELETE /v1/layers/kid", none(), 200);
    c.call(d, "DELETE /v1/layers/nope", none(), 404);
    c.call(
        d,
        "POST /v1/pool/destroy",
        Some(json!({"force": false})),
        409,
    );
    c.call(
        d,
        "POST /v1/pool/destroy",
        Some(json!({"force": true})),
        200,
    );

    // Every route was driven: to success (but the two the sim cannot do), and to an error
    // wherever a client can send something wrong.
    let mut missing = Vec::new();
    for (method, path) in c.operations() {
        let statuses = c.seen.get(&(method.clone(), path.clone()));
        let success = statuses.is_some_and(|s| s.iter().any(|code| *code < 300));
        let error = statuses.is_some_and(|s| s.iter().any(|code| *code >= 400));
        let inputs = path.contains('{') || method != "GET" || path == "/v1/layers";
        if !success && !NO_SUCCESS_ON_THE_SIM.contains(&(method.as_str(), path.as_str())) {
            missing.push(format!("{method} {path}: no success"));
        }
        if inputs && !error && !path.ends_with("/check") {
            missing.push(format!("{method} {path}: no error"));
        }
    }
    assert!(missing.is_empty(), "not driven:\n{}", missing.join("\n"));
}

/// The content id of layer `base`.
fn taken_content_id(daemon: &Api) -> Value {
    daemon.request("GET", "/v1/layers/base", None).body["content_id"].clone()
}

/// The checker itself: a body that breaks its schema fails the check.
#[test]
#[should_panic(expected = "does not match the document")]
fn a_body_off_its_schema_fails_the_check() {
    let c = Contract::new();
    let reply = Reply::parse(b"HTTP/1.1 200 OK\r\nContent-Length: 13\r\n\r\n{\"api\": true}");
    c.validate("GET", "/v1/version", &reply);
}
