//! Ceph RBD, for the `rbd` backend: a cluster connection, the images of one pool (and
//! namespace), and the kernel's rbd driver that maps an image to a block device.
//!
//! librbd and librados are called in-process, through bindings bindgen generates from their
//! headers ([`sys`]); the library is loaded the first time a cluster is connected, so hosts
//! without Ceph run every other backend. Each call costs a round trip to the cluster, never a
//! process start. Images are mapped through the kernel's sysfs interface
//! (`/sys/bus/rbd/add_single_major`), with no `rbd` command, or, with `pool.rbd.map = "nbd"`,
//! by an rbd-nbd process per device.

mod cluster;
mod image;
mod keyring;
mod library;
mod locks;
pub mod map;
mod mapper;
pub mod nbd;
mod objects;
mod sys;

pub use cluster::{Cluster, ClusterConfig, Io};
pub use image::{Image, ImageFeatures, Snapshot, TrashedImage};
pub use keyring::{keyring_has_client, secret_of};
pub use locks::Locker;
pub use map::{Driver, MapRequest, Mapped};
pub use mapper::Mapper;
pub use nbd::NbdClient;
pub use objects::Guarded;

use std::ffi::CString;

use crate::error::{Error, Result};

/// `text` as a C string, refused when it holds a NUL byte (no Ceph name can).
fn c_string(what: &str, text: &str) -> Result<CString> {
    CString::new(text).map_err(|_| {
        Error::invalid(format!(
            "{what} {text:?} holds a NUL byte, which Ceph refuses"
        ))
    })
}

/// A librbd or librados return code: `Ok` when non-negative, the translated error otherwise.
fn check(rc: i32, op: &str, target: &str) -> Result<i32> {
    if rc < 0 {
        Err(Error::ceph(op, target, rc))
    } else {
        Ok(rc)
    }
}
