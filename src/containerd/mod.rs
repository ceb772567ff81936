//! containerd's snapshot service (`containerd.services.snapshots.v1.Snapshots`), so containerd
//! can use thinstack as a proxy snapshotter.

mod change;
pub mod filter;
mod incoming;
pub mod service;

pub use service::{EngineHolder, SnapshotService};

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UnixListener;
use tokio::sync::{watch, Semaphore};

use crate::error::{Error, Result};
use crate::units::Timeout;
use proto::containerd::services::snapshots::v1::snapshots_server::SnapshotsServer;

/// How often an idle connection is pinged (HTTP/2 PING), and how long the answer may take:
/// a peer that died without closing its socket is dropped instead of holding a place under
/// the cap. A peer that is alive but stalls mid-request is not caught by this: it holds one
/// stream (of at most [`MAX_STREAMS`]) until the stop cuts it.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(60);
/// See [`KEEPALIVE_INTERVAL`].
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// Requests at once on one connection. Each running request holds a blocking thread, so
/// containerd's own parallelism (a handful of unpacks) is well below this.
const MAX_STREAMS: u32 = 256;

/// The bounds the service is served within, from `[daemon]`.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections open at once; more are closed at once.
    pub max_connections: u32,
    /// After the stop, how long open connections get before they are cut.
    pub shutdown_timeout: Timeout,
}

/// Serve the snapshot service on `listener` until `stop` completes; then let open connections
/// finish for up to `limits.shutdown_timeout`.
///
/// No per-request timeout is set (tonic's `timeout` would also cut an operation containerd
/// waits for, such as a long mkfs): operations run whole on blocking threads, and the
/// runtime waits for them before thinstackd exits.
pub async fn serve<H: EngineHolder>(
    service: SnapshotService<H>,
    listener: UnixListener,
    socket: &Path,
    limits: Limits,
    stop: impl std::future::Future<Output = ()>,
) -> Result<()> {
    tracing::info!(socket = %socket.display(), "serving containerd's snapshot service");
    let permits = Arc::new(Semaphore::new(limits.max_connections as usize));
    let incoming = incoming::capped(listener, permits.clone(), limits.max_connections);
    let (stopped, mut stopping) = watch::channel(false);
    let stop = async move {
        stop.await;
        let _ = stopped.send(true);
    };
    let server = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
        .max_concurrent_streams(MAX_STREAMS)
        .add_service(SnapshotsServer::from_arc(Arc::new(service)))
        .serve_with_incoming_shutdown(incoming, stop);
    let deadline = async move {
        let _ = stopping.wait_for(|stopped| *stopped).await;
        tokio::time::sleep(limits.shutdown_timeout.duration()).await;
    };
    tokio::select! {
        served = server => served.map_err(|e| {
            Error::io(
                format!("serving {}", socket.display()),
                std::io::Error::other(e),
            )
        }),
        () = deadline => {
            // tonic serves each connection on a task of its own: dropping the server leaves
            // them to the runtime, which drops them (closing their sockets) as thinstackd
            // exits, right after the API's stop.
            let left = limits.max_connections as usize - permits.available_permits();
            tracing::warn!(
                connections = left,
                "daemon.shutdown_timeout ({}) passed: cut {left} containerd connections still open; operations already started still finish",
                limits.shutdown_timeout
            );
            Ok(())
        }
    }
}

/// The code generated from `proto/` by `build.rs`, in the protobuf packages' module tree.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod proto {
    /// `containerd.*`
    pub mod containerd {
        /// `containerd.types`: the Mount message.
        pub mod types {
            tonic::include_proto!("containerd.types");
        }
        /// `containerd.services.*`
        pub mod services {
            /// `containerd.services.snapshots.*`
            pub mod snapshots {
                /// `containerd.services.snapshots.v1`: the service.
                pub mod v1 {
                    tonic::include_proto!("containerd.services.snapshots.v1");
                }
            }
        }
    }
}
