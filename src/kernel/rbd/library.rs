//! Loading librbd (and the librados it links) once, at the first cluster connection.

use std::sync::OnceLock;

use super::sys::CephLibrary;
use crate::error::{Error, ErrorKind, Result};

/// The library's soname in Debian's librbd1 (which depends on librados2).
const LIBRBD: &str = "librbd.so.1";

static LIBRARY: OnceLock<std::result::Result<CephLibrary, String>> = OnceLock::new();

/// The loaded library, or why it cannot be loaded.
pub(super) fn library() -> Result<&'static CephLibrary> {
    // Safety: loading runs librbd's initialisers, which are safe to run once in any process;
    // every symbol bindgen names is resolved now, so a missing one fails here, not at a call.
    let loaded =
        LIBRARY.get_or_init(|| unsafe { CephLibrary::new(LIBRBD) }.map_err(|e| e.to_string()));
    loaded.as_ref().map_err(|why| {
        Error::new(
            ErrorKind::Unsupported,
            format!(
                "the rbd backend needs Ceph's client libraries, and loading {LIBRBD} failed \
                 ({why}); install them (Debian: apt-get install librbd1 librados2)"
            ),
        )
    })
}
