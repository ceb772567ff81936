//! `daemon.metrics_listen`: `/metrics`, and nothing else, over TCP for a Prometheus scraper.
//! Everything else stays on the Unix socket, whose permissions say who may use it; here
//! anyone who can connect reads the figures (never a layer's name), so it is off by default.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderValue, ALLOW, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::watch;

use super::Daemon;
use crate::error::{Error, ErrorKind, Result};

/// Bind `address` (start-up fails, saying why, when it cannot be had).
pub async fn bind(address: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(address).await.map_err(|e| {
        let kind = match e.kind() {
            std::io::ErrorKind::AddrInUse => ErrorKind::Busy,
            std::io::ErrorKind::PermissionDenied => ErrorKind::Permission,
            _ => ErrorKind::Io,
        };
        Error::new(
            kind,
            format!(
                "cannot serve metrics on {address} (daemon.metrics_listen): {e}; pick a free address and port, or leave the key out"
            ),
        )
    })
}

/// Serve `/metrics` on `listener` until `stopping` turns true.
pub async fn serve(
    daemon: Arc<Daemon>,
    listener: TcpListener,
    mut stopping: watch::Receiver<bool>,
) {
    let timeout = daemon.config.daemon.request_timeout.duration();
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a metrics connection failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = stopped(&mut stopping) => return,
        };
        let daemon = daemon.clone();
        let service = service_fn(move |request| answer(daemon.clone(), request));
        let connection = http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(timeout)
            .serve_connection(TokioIo::new(stream), service);
        let mut stop = stopping.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = connection => {}
                () = stopped(&mut stop) => {}
            }
        });
    }
}

/// Resolves once `stopping` turns true (or its sender is gone).
async fn stopped(stopping: &mut watch::Receiver<bool>) {
    let _ = stopping.wait_for(|stop| *stop).await;
}

async fn answer(
    daemon: Arc<Daemon>,
    request: Request<hyper::body::Incoming>,
) -> std::result::Result<Response<Full<Bytes>>, Infallible> {
    let (status, content_type, body) = match (request.method(), request.uri().path()) {
        (&Method::GET, "/metrics") => {
            let text = tokio::task::spawn_blocking(move || daemon.render_metrics())
                .await
                .unwrap_or_else(|e| format!("# rendering the metrics failed: {e}\n"));
            (StatusCode::OK, crate::metrics::CONTENT_TYPE, text)
        }
        (_, "/metrics") => (
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "/metrics takes GET\n".to_string(),
        ),
        (_, path) => (
            StatusCode::NOT_FOUND,
            "text/plain",
            format!("{path}: this address serves only GET /metrics; the API is on thinstackd's Unix socket\n"),
        ),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    if status == StatusCode::METHOD_NOT_ALLOWED {
        response
            .headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET"));
    }
    Ok(response)
}
