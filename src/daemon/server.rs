//! HTTP/1.1 over the Unix socket: accept (at most `daemon.max_connections` at once), serve each
//! connection, and stop within bounds: open connections get `daemon.shutdown_timeout` to
//! finish and are cut after it, while operations already started always finish.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{watch, OwnedSemaphorePermit};

use super::connections::Connections;
use super::handler::{self, Context};
use super::in_flight::InFlight;
use super::Daemon;
use crate::audit::Peer;
use crate::units::Timeout;

/// Serve until `shutdown` resolves, then stop: see the module's description.
pub async fn serve(
    daemon: Arc<Daemon>,
    listener: UnixListener,
    shutdown: impl Future<Output = ()>,
) {
    let settings = daemon.config.daemon.clone();
    let connections = Connections::new(settings.max_connections);
    let in_flight = InFlight::new();
    let graceful = GracefulShutdown::new();
    // Turned true when the shutdown timeout passes: every connection still open ends then.
    let (cut, cut_signal) = watch::channel(false);
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors, say: wait rather than spin.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let peer = Peer::of(&stream);
        let Some(permit) = connections.admit() else {
            connections.refuse(stream, peer);
            continue;
        };
        let context = Context {
            daemon: daemon.clone(),
            in_flight: in_flight.clone(),
            peer,
        };
        let connection = Connection {
            stream,
            permit,
            request_timeout: settings.request_timeout,
        };
        connection.spawn(context, &graceful, cut_signal.clone());
    }
    drop(listener);
    close_connections(graceful, &connections, &cut, settings.shutdown_timeout).await;
    in_flight.drain().await;
}

/// An accepted connection, with its place under the cap.
struct Connection {
    stream: UnixStream,
    permit: OwnedSemaphorePermit,
    request_timeout: Timeout,
}

impl Connection {
    /// Serve the connection on a task of its own until it closes or is cut.
    fn spawn(self, context: Context, graceful: &GracefulShutdown, mut cut: watch::Receiver<bool>) {
        let service = service_fn(move |request| handler::handle(context.clone(), request));
        // A client that stalls inside a request head cannot hold a connection (or the stop);
        // hyper counts an idle kept-alive connection as waiting for a head, so that ends too.
        let connection = http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(self.request_timeout.duration())
            .serve_connection(TokioIo::new(self.stream), service);
        let connection = graceful.watch(connection);
        let permit = self.permit;
        tokio::spawn(async move {
            let _open = permit;
            tokio::select! {
                served = connection => if let Err(e) = served {
                    tracing::debug!(error = %e, "connection ended with an error");
                },
                // Dropping the connection closes the socket. An operation runs whole before
                // this can be polled again (see `handler::handle`), and an export or import
                // runs on in its own task, so an operation started still finishes whole.
                _ = cut.wait_for(|cut| *cut) => {}
            }
        });
    }
}

/// Let open connections finish what they are doing for up to `timeout`, then cut those left:
/// idle clients, and clients that stall sending a request.
async fn close_connections(
    graceful: GracefulShutdown,
    connections: &Connections,
    cut: &watch::Sender<bool>,
    timeout: Timeout,
) {
    let open = connections.open();
    if open > 0 {
        tracing::info!(connections = open, shutdown_timeout = %timeout, "waiting for open connections to finish");
    }
    if tokio::time::timeout(timeout.duration(), graceful.shutdown())
        .await
        .is_err()
    {
        let left = connections.open();
        tracing::warn!(
            connections = left,
            "daemon.shutdown_timeout ({timeout}) passed: cut {left} connections still open (idle or stalled clients); operations already started still finish"
        );
        let _ = cut.send(true);
    }
}
