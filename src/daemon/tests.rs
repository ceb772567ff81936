//! The daemon's routing and its OpenAPI document (no kernel needed).

use std::collections::BTreeSet;

use serde_json::Value;

use super::routes::{resolve, Resolved, OPENAPI, ROUTES};

/// Every (method, path) the OpenAPI document describes.
fn documented() -> BTreeSet<(String, String)> {
    let document: Value = serde_json::from_str(OPENAPI).expect("openapi.json is JSON");
    assert!(
        document["openapi"].as_str().unwrap_or("").starts_with("3."),
        "an OpenAPI 3 document"
    );
    let mut routes = BTreeSet::new();
    for (path, item) in document["paths"].as_object().expect("paths") {
        for method in item.as_object().expect("path item").keys() {
            if ["get", "post", "put", "delete", "patch"].contains(&method.as_str()) {
                routes.insert((method.to_uppercase(), path.clone()));
            }
        }
    }
    routes
}

#[test]
fn the_openapi_document_describes_exactly_the_served_routes() {
    let served: BTreeSet<(String, String)> = ROUTES
        .iter()
        .map(|r| (r.method.to_string(), r.path.to_string()))
        .collect();
    let documented = documented();
    let undocumented: Vec<_> = served.difference(&documented).collect();
    let unserved: Vec<_> = documented.difference(&served).collect();
    assert!(
        undocumented.is_empty(),
        "served but not in openapi.json: {undocumented:?}"
    );
    assert!(
        unserved.is_empty(),
        "in openapi.json but not served: {unserved:?}"
    );
}

#[test]
fn every_documented_operation_has_an_id_and_error_responses() {
    let document: Value = serde_json::from_str(OPENAPI).unwrap();
    for (path, item) in document["paths"].as_object().unwrap() {
        for (method, operation) in item.as_object().unwrap() {
            assert!(
                operation["operationId"].is_string(),
                "{method} {path}: operationId"
            );
            let responses = operation["responses"].as_object().unwrap();
            assert!(
                responses.contains_key("default"),
                "{method} {path}: default error response"
            );
        }
    }
}

#[test]
fn every_operation_documents_the_refusals_of_slow_and_surplus_clients() {
    let document: Value = serde_json::from_str(OPENAPI).unwrap();
    let unavailable = &document["components"]["responses"]["Unavailable"];
    assert!(
        unavailable["headers"]["Retry-After"].is_object(),
        "a 503 says when to retry"
    );
    for response in ["Unavailable", "RequestTimeout"] {
        assert_eq!(
            document["components"]["responses"][response]["content"]["application/json"]["schema"]
                ["$ref"],
            "#/components/schemas/Error",
            "{response}: the JSON error body"
        );
    }
    for (path, item) in document["paths"].as_object().unwrap() {
        for (method, operation) in item.as_object().unwrap() {
            let responses = &operation["responses"];
            assert_eq!(
                responses["503"]["$ref"], "#/components/responses/Unavailable",
                "{method} {path}: 503"
            );
            if method != "get" {
                assert_eq!(
                    responses["408"]["$ref"], "#/components/responses/RequestTimeout",
                    "{method} {path}: 408"
                );
            }
        }
    }
}

#[test]
fn paths_resolve_to_routes_with_their_layer_name() {
    match resolve("POST", "/v1/layers/base/commit") {
        Resolved::Route(route, name) => {
            assert_eq!(route.path, "/v1/layers/{name}/commit");
            assert_eq!(name, Some("base"));
        }
        _ => panic!("commit route not found"),
    }
    assert!(matches!(
        resolve("GET", "/v1/layers"),
        Resolved::Route(_, None)
    ));
    match resolve("PUT", "/v1/layers/base") {
        Resolved::WrongMethod(methods) => assert_eq!(methods, ["GET", "DELETE"]),
        _ => panic!("PUT should be a wrong method"),
    }
    for missing in [
        "/v1/layers/base/commit/x",
        "/v1/layers//commit",
        "/v2/layers",
        "/",
        "",
    ] {
        assert!(
            matches!(resolve("GET", missing), Resolved::NoPath),
            "{missing}"
        );
    }
}

#[test]
fn space_warnings_are_logged_once_per_crossing() {
    use super::background::level_after;
    assert_eq!(level_after(50, 0), 0);
    assert_eq!(level_after(81, 0), 1);
    assert_eq!(level_after(85, 1), 1);
    assert_eq!(level_after(95, 1), 2);
    assert_eq!(level_after(70, 2), 0, "falling back re-arms the warnings");
    // An rbd pool has no dm-thin metadata: 0 of 0 is no area, not a full one.
    let none = crate::vocab::Space::new(0, 0);
    assert_eq!(super::background::level_after_space(&none, 0), 0);
}

#[test]
fn notifying_a_socket_nobody_reads_never_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify.sock");
    let receiver = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
    let started = std::time::Instant::now();
    // Far more than the socket's queue holds (net.unix.max_dgram_qlen, 10 by default).
    for _ in 0..100 {
        super::notify_socket(path.to_str().unwrap(), "READY=1");
    }
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
    let mut buffer = [0u8; 64];
    let n = receiver.recv(&mut buffer).unwrap();
    assert_eq!(&buffer[..n], b"READY=1");
}
