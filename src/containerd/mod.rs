//! containerd's snapshot service (`containerd.services.snapshots.v1.Snapshots`), so containerd
//! can use thinstack as a proxy snapshotter.

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
