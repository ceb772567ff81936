//! One request: route it, read its body within `daemon.request_timeout`, run the operation
//! (blocking, on the connection's thread), answer with JSON, and audit it when it changes
//! something.

use std::convert::Infallible;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ALLOW, CONNECTION, CONTENT_LENGTH, CONTENT_TYPE, RETRY_AFTER};
use hyper::{Request, Response, StatusCode};
use tokio::sync::OwnedSemaphorePermit;

use super::connections::RETRY_AFTER_SECONDS;
use super::event_stream;
use super::in_flight::{InFlight, STOPPING};
use super::layer_stream::{self, StreamedBody};
use super::routes::{self, Action, Call, Resolved, Route};
use super::Daemon;
use crate::api::{status_of, ErrorBody, ErrorDetail, MAX_BODY_BYTES};
use crate::audit::{self, Peer};
use crate::error::{Error, ErrorKind};
use crate::metrics::Interface;
use crate::units::Timeout;

/// What every request of one connection shares.
#[derive(Clone)]
pub struct Context {
    /// The daemon.
    pub daemon: Arc<Daemon>,
    /// Operations in flight, which the stop waits for.
    pub in_flight: InFlight,
    /// The client, for the audit.
    pub peer: Peer,
}

/// An answer, with what the audit and the response's headers need.
struct Reply {
    status: u16,
    body: Vec<u8>,
    /// A body that streams, in place of `body`.
    stream: Option<StreamedBody>,
    content_type: &'static str,
    /// The error message, when the request failed.
    error: Option<String>,
    /// The layer the request named, in its path or (create) its body.
    layer: Option<String>,
    /// Close the connection after answering (the request was not read whole).
    close: bool,
    /// The operation's place among those in flight, held until the request is audited: the
    /// stop waits for it, so an operation whose client was cut is still audited before exit.
    in_flight: Option<OwnedSemaphorePermit>,
}

impl Reply {
    fn ok(status: u16, body: Vec<u8>) -> Reply {
        Reply {
            status,
            body,
            content_type: JSON,
            stream: None,
            error: None,
            layer: None,
            close: false,
            in_flight: None,
        }
    }

    fn error(status: u16, kind: ErrorKind, message: String) -> Reply {
        let body = ErrorBody {
            error: ErrorDetail {
                kind,
                message: message.clone(),
            },
        };
        Reply {
            status,
            body: serde_json::to_vec(&body).unwrap_or_default(),
            content_type: JSON,
            stream: None,
            error: Some(message),
            layer: None,
            close: false,
            in_flight: None,
        }
    }

    /// The answer when a request's task failed: a bug of ours, not the caller's.
    fn bug() -> Reply {
        let message = "thinstackd hit a bug handling this request; see its log".to_string();
        Reply::error(500, ErrorKind::Inconsistent, message)
    }

    fn closing(mut self) -> Reply {
        self.close = true;
        self
    }
}

/// Answer one request.
pub async fn handle(
    context: Context,
    request: Request<Incoming>,
) -> Result<Response<StreamedBody>, Infallible> {
    let started = Instant::now();
    let method = request.method().as_str().to_string();
    let path = request.uri().path().to_string();
    // A request received whole is carried out whole (and audited), even when the client goes
    // away and hyper drops this future. An export or an import awaits all along, so it runs
    // as a task of its own. Any other request awaits only until its body is read: from there
    // to its audit line nothing awaits, so nothing can drop it midway, and it runs here on the
    // connection's task, with no hand-off to another task and back. (One dropped while its
    // body is still coming, by the stop's cut, did nothing and leaves no audit line.)
    let task = answer_and_audit(context, method.clone(), path.clone(), request);
    let reply = if streams(&method, &path) {
        tokio::spawn(task).await.unwrap_or_else(|e| {
            tracing::error!(%method, %path, error = %e, "request task failed");
            Reply::bug()
        })
    } else {
        task.await
    };
    tracing::debug!(%method, %path, status = reply.status, elapsed_ms = started.elapsed().as_millis() as u64, "request");
    Ok(response_of(&method, &path, reply))
}

/// Whether the request is for a route that streams its body in or out (export, import).
fn streams(method: &str, path: &str) -> bool {
    match routes::resolve(method, path) {
        Resolved::Route(route, _) => !matches!(route.action, Action::Call(_)),
        _ => false,
    }
}

/// The HTTP response for `reply`.
fn response_of(method: &str, path: &str, reply: Reply) -> Response<StreamedBody> {
    let body = match reply.stream {
        Some(stream) => stream,
        None => Full::new(Bytes::from(reply.body))
            .map_err(|never| match never {})
            .boxed(),
    };
    let mut response = Response::new(body);
    *response.status_mut() =
        StatusCode::from_u16(reply.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(reply.content_type));
    if reply.close {
        headers.insert(CONNECTION, HeaderValue::from_static("close"));
    }
    if reply.status == 503 {
        headers.insert(RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECONDS));
    }
    if reply.status == 405 {
        // RFC 9110: a 405 names the methods the resource takes.
        if let Resolved::WrongMethod(methods) = routes::resolve(method, path) {
            if let Ok(allow) = HeaderValue::from_str(&methods.join(", ")) {
                headers.insert(ALLOW, allow);
            }
        }
    }
    response
}

const JSON: &str = "application/json";

/// Methods whose requests change something, and so are audited.
fn changes_something(method: &str) -> bool {
    matches!(method, "POST" | "PUT" | "PATCH" | "DELETE")
}

async fn answer_and_audit(
    context: Context,
    method: String,
    path: String,
    request: Request<Incoming>,
) -> Reply {
    let peer = context.peer;
    let mut reply = answer(context, &method, &path, request).await;
    if changes_something(&method) {
        let operation = match routes::resolve(&method, &path) {
            Resolved::Route(route, _) => format!("{method} {}", route.path),
            _ => format!("{method} {path}"),
        };
        audit::Entry {
            peer,
            operation: &operation,
            layer: reply.layer.as_deref(),
            namespace: None,
            status: &reply.status.to_string(),
            error: reply.error.as_deref(),
        }
        .log();
    }
    // Only now may the stop go on: the audit line is written.
    reply.in_flight = None;
    reply
}

/// Status and JSON body for a request.
async fn answer(context: Context, method: &str, path: &str, request: Request<Incoming>) -> Reply {
    let (route, name) = match routes::resolve(method, path) {
        // A name arrives percent-encoded; decoded, the engine checks it (and names it in errors).
        Resolved::Route(route, name) => (
            route,
            name.map(|n| {
                percent_encoding::percent_decode_str(n)
                    .decode_utf8_lossy()
                    .into_owned()
            }),
        ),
        Resolved::NoPath => {
            let message = format!("there is no route {path}; the routes are in /v1/openapi.json");
            return Reply::error(404, ErrorKind::NotFound, message);
        }
        Resolved::WrongMethod(methods) => {
            let message = format!("{path} takes {}, not {method}", methods.join(", "));
            return Reply::error(405, ErrorKind::Invalid, message);
        }
    };
    let query: Vec<(String, String)> = request
        .uri()
        .query()
        .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default();
    let timeout = context.daemon.config.daemon.request_timeout;
    match route.action {
        Action::Call(_) => {}
        Action::Export | Action::Import => {
            let name = name.unwrap_or_default();
            let reply = stream_layer(context, route, name.clone(), query, request).await;
            return Reply {
                layer: Some(name),
                ..reply
            };
        }
    }
    let body = match read_body(request, timeout, context.peer).await {
        Ok(body) => body,
        Err(reply) => {
            return Reply {
                layer: name,
                ..reply
            }
        }
    };
    let layer = name.clone().or_else(|| layer_named_in(&body));
    // From here to the audit line nothing awaits (see `handle`).
    let reply = run(context, method, path, route, name, query, body);
    Reply { layer, ..reply }
}

/// The whole body, read within `timeout` (a client that stalls mid-body cannot hold its
/// connection, or the daemon's stop), or the error to answer.
async fn read_body(
    request: Request<Incoming>,
    timeout: Timeout,
    peer: Peer,
) -> Result<Bytes, Reply> {
    let declared = request
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(declared) = declared.filter(|&n| n > MAX_BODY_BYTES as u64) {
        // Refused before reading, so a huge body costs nothing.
        let message = format!(
            "request body of {declared} bytes is too large; bodies are at most {MAX_BODY_BYTES} bytes"
        );
        return Err(Reply::error(413, ErrorKind::Invalid, message).closing());
    }
    let collect = Limited::new(request.into_body(), MAX_BODY_BYTES).collect();
    match tokio::time::timeout(timeout.duration(), collect).await {
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(e)) if e.is::<LengthLimitError>() => {
            let message =
                format!("request body too large ({e}); bodies are at most {MAX_BODY_BYTES} bytes");
            Err(Reply::error(413, ErrorKind::Invalid, message).closing())
        }
        Ok(Err(e)) => {
            let message = format!(
                "could not read the request body ({e}); nothing was done: send the request again"
            );
            Err(Reply::error(400, ErrorKind::Invalid, message).closing())
        }
        Err(_) => {
            tracing::warn!(uid = peer.uid(), pid = peer.pid(), request_timeout = %timeout, "a client did not send its request body in time: answered 408 and closed its connection");
            let message = format!(
                "the request body did not arrive within {timeout} (daemon.request_timeout); nothing was done: send the whole request at once"
            );
            Err(Reply::error(408, ErrorKind::Invalid, message).closing())
        }
    }
}

/// Serve a layer's export or import ([`layer_stream`]), timed as every operation is.
async fn stream_layer(
    context: Context,
    route: &'static Route,
    name: String,
    query: Vec<(String, String)>,
    request: Request<Incoming>,
) -> Reply {
    let started = Instant::now();
    let daemon = context.daemon.clone();
    let (reply, error) = match route.action {
        Action::Export => {
            let exported = layer_stream::export(daemon, &context.in_flight, name, query).await;
            match exported {
                Ok(stream) => (
                    Reply {
                        content_type: crate::stream::MEDIA_TYPE,
                        stream: Some(stream),
                        ..Reply::ok(200, Vec::new())
                    },
                    None,
                ),
                Err(e) => (error_reply(route.method, route.path, &e), Some(e.kind())),
            }
        }
        _ => {
            let Some(in_flight) = context.in_flight.enter() else {
                return Reply::error(503, ErrorKind::Busy, STOPPING.to_string()).closing();
            };
            let timeout = daemon.config.daemon.request_timeout;
            let (imported, read_whole) =
                layer_stream::import(daemon, name, query, request.into_body(), timeout).await;
            let reply = match &imported {
                Ok(layer) => Reply::ok(201, serde_json::to_vec(layer).unwrap_or_default()),
                Err(e) => error_reply(route.method, route.path, e),
            };
            let reply = Reply {
                in_flight: Some(in_flight),
                close: !read_whole,
                ..reply
            };
            (reply, imported.err().map(|e| e.kind()))
        }
    };
    let operation = format!("{} {}", route.method, route.path);
    context
        .daemon
        .metrics
        .observe(Interface::Http, &operation, started.elapsed(), error);
    reply
}

/// The answer to an operation that failed, logged: a refusal of what the client asked
/// quietly, a failure loudly.
fn error_reply(method: &str, path: &str, e: &Error) -> Reply {
    let message = full_message(e);
    if matches!(
        e.kind(),
        ErrorKind::Invalid | ErrorKind::NotFound | ErrorKind::AlreadyExists
    ) {
        tracing::debug!(%method, %path, error = %message, "request refused");
    } else {
        tracing::warn!(%method, %path, error = %message, "request failed");
    }
    Reply::error(status_of(e.kind()), e.kind(), message)
}

/// The `name` a create's body gives its new layer, for the audit.
fn layer_named_in(body: &[u8]) -> Option<String> {
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    value.get("name")?.as_str().map(str::to_string)
}

/// Carry out the route's operation, unless the daemon is stopping. The reply holds the
/// operation's place in flight.
///
/// Engine operations block (on ioctls, on mkfs), so this worker thread first hands its other
/// tasks to another (`block_in_place`) and then runs the operation itself: with
/// `spawn_blocking`, a blocking thread would be woken to run it and this task woken again for
/// the answer, two hand-offs on every request (0.3 to 0.4 ms each, emulated).
fn run(
    context: Context,
    method: &str,
    path: &str,
    route: &'static Route,
    name: Option<String>,
    query: Vec<(String, String)>,
    body: Bytes,
) -> Reply {
    let Some(in_flight) = context.in_flight.enter() else {
        return Reply::error(503, ErrorKind::Busy, STOPPING.to_string()).closing();
    };
    let daemon = context.daemon;
    let closing = daemon.closing.subscribe();
    let call = Call {
        name: name.as_deref(),
        query,
        body: &body,
    };
    let result = tokio::task::block_in_place(|| {
        // A panic is a bug of ours: answered 500 and audited like any failure, not carried
        // up through the request's task.
        catch_unwind(AssertUnwindSafe(|| call_and_observe(&daemon, route, &call)))
    });
    let reply = reply_of(method, path, result, closing);
    Reply {
        in_flight: Some(in_flight),
        ..reply
    }
}

/// The route's operation, timed in the daemon's operation metrics.
fn call_and_observe(
    daemon: &Daemon,
    route: &'static Route,
    call: &Call,
) -> crate::error::Result<routes::Reply> {
    let started = Instant::now();
    let result = route.call(daemon, call);
    let operation = format!("{} {}", route.method, route.path);
    let error = result.as_ref().err().map(Error::kind);
    daemon
        .metrics
        .observe(Interface::Http, &operation, started.elapsed(), error);
    result
}

/// The reply for an operation's outcome (a panic is a bug of ours).
fn reply_of(
    method: &str,
    path: &str,
    result: std::thread::Result<crate::error::Result<routes::Reply>>,
    closing: tokio::sync::watch::Receiver<bool>,
) -> Reply {
    match result {
        Ok(Ok((status, routes::Body::Json(value)))) => {
            Reply::ok(status, serde_json::to_vec(&value).unwrap_or_default())
        }
        Ok(Ok((status, routes::Body::Text(content_type, text)))) => Reply {
            content_type,
            ..Reply::ok(status, text.into_bytes())
        },
        Ok(Ok((status, routes::Body::Events(events, count)))) => Reply {
            content_type: event_stream::CONTENT_TYPE,
            stream: Some(event_stream::body(events, count, closing)),
            ..Reply::ok(status, Vec::new())
        },
        Ok(Err(e)) => error_reply(method, path, &e),
        Err(panic) => {
            let error = panic_message(panic.as_ref());
            tracing::error!(%method, %path, %error, "request handler panicked");
            Reply::bug()
        }
    }
}

/// What a panic said, when it said it with a string (as `panic!` and `expect` do).
fn panic_message(payload: &(dyn std::any::Any + Send)) -> &str {
    payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("a panic without a message")
}

/// The message with its causes, for people reading the client's output.
pub fn full_message(e: &Error) -> String {
    let mut message = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        let text = cause.to_string();
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        source = cause.source();
    }
    message
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::server::conn::http1;
    use hyper::service::service_fn;
    use hyper_util::rt::{TokioIo, TokioTimer};
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A connection served by hyper whose requests only read their body within `timeout`.
    fn serve_bodies(timeout: Timeout) -> tokio::net::UnixStream {
        let (server, client) = tokio::net::UnixStream::pair().unwrap();
        let service = service_fn(move |request: Request<Incoming>| async move {
            let reply = match read_body(request, timeout, Peer::default()).await {
                Ok(body) => Reply::ok(200, body.to_vec()),
                Err(reply) => reply,
            };
            Ok::<_, Infallible>(response_of("POST", "/v1/layers", reply))
        });
        let connection = http1::Builder::new()
            .timer(TokioTimer::new())
            .serve_connection(TokioIo::new(server), service);
        tokio::spawn(connection);
        client
    }

    #[tokio::test]
    async fn a_body_that_stalls_is_answered_408_and_the_connection_closed() {
        let mut client = serve_bodies(Timeout::secs(1));
        let started = Instant::now();
        client
            .write_all(
                b"POST /v1/layers HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n{\"name\":",
            )
            .await
            .unwrap();
        let mut answer = String::new();
        let read =
            tokio::time::timeout(Duration::from_secs(30), client.read_to_string(&mut answer));
        read.await.expect("answered and closed").unwrap();
        assert!(answer.starts_with("HTTP/1.1 408 "), "{answer}");
        assert!(answer.contains("connection: close\r\n"), "{answer}");
        assert!(answer.contains("daemon.request_timeout"), "{answer}");
        assert!(started.elapsed() >= Duration::from_secs(1));
    }

    #[tokio::test]
    async fn a_body_sent_whole_is_read() {
        let mut client = serve_bodies(Timeout::secs(30));
        client
            .write_all(b"POST /v1/layers HTTP/1.1\r\nhost: x\r\ncontent-length: 4\r\nconnection: close\r\n\r\nbody")
            .await
            .unwrap();
        let mut answer = String::new();
        client.read_to_string(&mut answer).await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
        assert!(answer.ends_with("\r\n\r\nbody"), "{answer}");
    }

    #[test]
    fn a_panics_message_is_logged_whichever_way_it_was_given() {
        let text = std::panic::catch_unwind(|| panic!("stuck")).unwrap_err();
        let formatted = std::panic::catch_unwind(|| panic!("stuck at {}", 3)).unwrap_err();
        assert_eq!(panic_message(text.as_ref()), "stuck");
        assert_eq!(panic_message(formatted.as_ref()), "stuck at 3");
        assert_eq!(panic_message(&7u8), "a panic without a message");
    }

    #[test]
    fn the_audit_takes_a_creates_layer_from_its_body() {
        assert_eq!(layer_named_in(br#"{"name":"web"}"#).as_deref(), Some("web"));
        assert_eq!(layer_named_in(b"not json"), None);
        assert!(changes_something("DELETE") && !changes_something("GET"));
    }
}
