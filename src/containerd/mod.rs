//! containerd's snapshot service (`containerd.services.snapshots.v1.Snapshots`), so containerd
//! can use thinstack as a proxy snapshotter.

pub mod filter;
pub mod service;

pub use service::{EngineHolder, SnapshotService};

use std::path::Path;
use std::sync::Arc;

use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;

use crate::error::{Error, Result};
use proto::containerd::services::snapshots::v1::snapshots_server::SnapshotsServer;

/// Serve the snapshot service on `listener` until `stop` completes.
pub async fn serve<H: EngineHolder>(
    service: SnapshotService<H>,
    listener: UnixListener,
    socket: &Path,
    stop: impl std::future::Future<Output = ()>,
) -> Result<()> {
    tracing::info!(socket = %socket.display(), "serving containerd's snapshot service");
    tonic::transport::Server::builder()
        .add_service(SnapshotsServer::from_arc(Arc::new(service)))
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), stop)
        .await
        .map_err(|e| {
            Error::io(
                format!("serving {}", socket.display()),
                std::io::Error::other(e),
            )
        })
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
