//! HTTP/1.1 over the Unix socket: accept, route, run each operation on a blocking thread,
//! and stop gracefully.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::UnixListener;
use tokio::sync::RwLock;

use super::routes::{self, Call, Resolved};
use super::Daemon;
use crate::api::{status_of, ErrorBody, ErrorDetail, MAX_BODY_BYTES};
use crate::error::{Error, ErrorKind};

/// How long a client may take to send a request's head.
const HEADER_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Operations in flight hold this for reading; shutdown takes it for writing, so it waits for
/// every operation, including those whose client went away.
type InFlight = Arc<RwLock<()>>;

/// Serve until `shutdown` resolves, then finish what is in flight.
pub async fn serve(
    daemon: Arc<Daemon>,
    listener: UnixListener,
    shutdown: impl Future<Output = ()>,
) {
    let graceful = GracefulShutdown::new();
    let in_flight: InFlight = Arc::default();
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors, say: wait rather than spin.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let (daemon, in_flight) = (daemon.clone(), in_flight.clone());
        let service = service_fn(move |request| handle(daemon.clone(), in_flight.clone(), request));
        // A client that stalls inside a request head cannot hold a connection (or shutdown).
        let connection = http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_READ_TIMEOUT)
            .serve_connection(TokioIo::new(stream), service);
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
    let _all_done = in_flight.write().await;
}

async fn handle(
    daemon: Arc<Daemon>,
    in_flight: InFlight,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let started = Instant::now();
    let method = request.method().as_str().to_string();
    let path = request.uri().path().to_string();
    // A task of its own: a request received whole is carried out whole, even when the client
    // goes away and hyper drops this future.
    let task = answer(daemon, in_flight, method.clone(), path.clone(), request);
    let (status, body) = tokio::spawn(task).await.unwrap_or_else(|e| {
        tracing::error!(%method, %path, error = %e, "request task failed");
        bug_reply()
    });
    tracing::debug!(%method, %path, status, elapsed_ms = started.elapsed().as_millis() as u64, "request");
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() =
        hyper::StatusCode::from_u16(status).unwrap_or(hyper::StatusCode::INTERNAL_SERVER_ERROR);
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    if status == 405 {
        // RFC 9110: a 405 names the methods the resource takes.
        if let Resolved::WrongMethod(methods) = routes::resolve(&method, &path) {
            if let Ok(allow) = hyper::header::HeaderValue::from_str(&methods.join(", ")) {
                response.headers_mut().insert(hyper::header::ALLOW, allow);
            }
        }
    }
    Ok(response)
}

/// Status and JSON body for a request.
async fn answer(
    daemon: Arc<Daemon>,
    in_flight: InFlight,
    method: String,
    path: String,
    request: Request<Incoming>,
) -> (u16, Vec<u8>) {
    let route = match routes::resolve(&method, &path) {
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
            return error_reply(404, ErrorKind::NotFound, message);
        }
        Resolved::WrongMethod(methods) => {
            let message = format!("{path} takes {}, not {method}", methods.join(", "));
            return error_reply(405, ErrorKind::Invalid, message);
        }
    };
    let query: Vec<(String, String)> = request
        .uri()
        .query()
        .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default();
    let declared = request
        .headers()
        .get(hyper::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(declared) = declared.filter(|&n| n > MAX_BODY_BYTES as u64) {
        // Refused before reading, so a huge body costs nothing.
        let message = format!(
            "request body of {declared} bytes is too large; bodies are at most {MAX_BODY_BYTES} bytes"
        );
        return error_reply(413, ErrorKind::Invalid, message);
    }
    let body = match Limited::new(request.into_body(), MAX_BODY_BYTES)
        .collect()
        .await
    {
        Ok(collected) => collected.to_bytes(),
        Err(e) => {
            let message = format!(
                "could not read the request body ({e}); bodies are at most {MAX_BODY_BYTES} bytes"
            );
            return error_reply(413, ErrorKind::Invalid, message);
        }
    };
    let guard = in_flight.read_owned().await;
    let (route, name) = route;
    // Engine operations block (ioctls, mkfs): a blocking thread each.
    let result = tokio::task::spawn_blocking(move || {
        let _in_flight = guard;
        let call = Call {
            name: name.as_deref(),
            query,
            body: &body,
        };
        route.call(&daemon, &call)
    })
    .await;
    match result {
        Ok(Ok((status, value))) => (status, serde_json::to_vec(&value).unwrap_or_default()),
        Ok(Err(e)) => {
            let message = full_message(&e);
            if matches!(
                e.kind(),
                ErrorKind::Invalid | ErrorKind::NotFound | ErrorKind::AlreadyExists
            ) {
                tracing::debug!(%method, %path, error = %message, "request refused");
            } else {
                tracing::warn!(%method, %path, error = %message, "request failed");
            }
            error_reply(status_of(e.kind()), e.kind(), message)
        }
        Err(panic) => {
            tracing::error!(%method, %path, error = %panic, "request handler panicked");
            bug_reply()
        }
    }
}

/// The answer when a request's task failed: a bug of ours, not the caller's.
fn bug_reply() -> (u16, Vec<u8>) {
    let message = "thinstackd hit a bug handling this request; see its log".to_string();
    error_reply(500, ErrorKind::Inconsistent, message)
}

fn error_reply(status: u16, kind: ErrorKind, message: String) -> (u16, Vec<u8>) {
    let body = ErrorBody {
        error: ErrorDetail { kind, message },
    };
    (status, serde_json::to_vec(&body).unwrap_or_default())
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
