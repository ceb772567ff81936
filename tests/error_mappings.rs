//! What each error kind becomes on each surface: the API's HTTP status, containerd's gRPC code
//! and the `thinstack` command's exit code, as one table (issue 17). The table is a `match`
//! without a wildcard arm, so a new kind does not compile until it has a row; and every kind in
//! `ErrorKind::ALL` is checked against all three mappings.

use thinstack::client::exit_code_of;
use thinstack::ErrorKind;
use tonic::Code;

/// (HTTP status, gRPC code, exit code) for each kind.
fn row(kind: ErrorKind) -> (u16, Code, u8) {
    match kind {
        ErrorKind::NotFound => (404, Code::NotFound, 3),
        ErrorKind::AlreadyExists => (409, Code::AlreadyExists, 4),
        ErrorKind::Busy => (409, Code::FailedPrecondition, 5),
        ErrorKind::NoSpace => (507, Code::ResourceExhausted, 6),
        ErrorKind::Invalid => (400, Code::InvalidArgument, 1),
        ErrorKind::Unsupported => (409, Code::FailedPrecondition, 1),
        ErrorKind::Permission => (403, Code::PermissionDenied, 8),
        ErrorKind::Inconsistent => (500, Code::FailedPrecondition, 1),
        ErrorKind::Kernel => (500, Code::Internal, 1),
        ErrorKind::Command => (500, Code::Internal, 1),
        ErrorKind::Io => (500, Code::Internal, 1),
    }
}

/// The kind's place in `ErrorKind::ALL`; no wildcard arm, so a new kind must be placed.
fn position(kind: ErrorKind) -> usize {
    match kind {
        ErrorKind::NotFound => 0,
        ErrorKind::AlreadyExists => 1,
        ErrorKind::Busy => 2,
        ErrorKind::NoSpace => 3,
        ErrorKind::Invalid => 4,
        ErrorKind::Unsupported => 5,
        ErrorKind::Permission => 6,
        ErrorKind::Inconsistent => 7,
        ErrorKind::Kernel => 8,
        ErrorKind::Command => 9,
        ErrorKind::Io => 10,
    }
}

#[test]
fn all_lists_every_kind_once() {
    for (at, kind) in ErrorKind::ALL.iter().enumerate() {
        assert_eq!(
            position(*kind),
            at,
            "{kind} is out of place in ErrorKind::ALL"
        );
    }
}

#[test]
fn every_kind_has_its_http_status_grpc_code_and_exit_code() {
    let mut wrong = Vec::new();
    for kind in ErrorKind::ALL {
        let (http, grpc, exit) = row(kind);
        let served = (
            thinstack::api::status_of(kind),
            thinstack::containerd::service::code_of(kind),
            exit_code_of(Some(kind)),
        );
        if served != (http, grpc, exit) {
            wrong.push(format!(
                "{kind}: serves {served:?}, the table says {:?}",
                (http, grpc, exit)
            ));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn an_unreachable_daemon_is_exit_code_7() {
    assert_eq!(exit_code_of(None), 7);
}
