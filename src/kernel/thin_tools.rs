//! thin-provisioning-tools: checking pool metadata.

use std::path::Path;

use crate::error::{Error, ErrorKind, Result};
use crate::kernel::cmd::{self, Program};
use crate::kernel::loopdev;

/// Run `thin_check` on inactive pool metadata at `metadata` (a device or a file).
///
/// A regular file is checked through a temporary read-only loop device: thin_check opens its
/// input with O_DIRECT, which some filesystems (tmpfs before Linux 6.6) refuse. Returns a
/// `Command` error with thin_check's findings when the metadata is damaged.
pub fn check(metadata: &Path) -> Result<()> {
    with_block_device(metadata, |device| {
        cmd::run(Program::ThinCheck, [device]).map(|_| ())
    })
    .map_err(|e| e.context(format!("checking pool metadata {}", metadata.display())))
}

/// Call `f` with a block device holding `path`: `path` itself, or a read-only loop device
/// attached to it for the call when it is a regular file.
fn with_block_device<T>(path: &Path, f: impl FnOnce(&Path) -> Result<T>) -> Result<T> {
    let meta =
        std::fs::metadata(path).map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
    if !meta.is_file() {
        return f(path);
    }
    let node = loopdev::attach_free(path, true)?;
    let result = f(&node);
    if let Err(e) = loopdev::detach(&node) {
        tracing::warn!(device = %node.display(), error = %e, "could not detach temporary loop device");
    }
    result
}

/// Check inactive metadata on the block device `metadata` and, when it is clean, clear its
/// `needs_check` flag. Returns a `Command` error with thin_check's findings when damaged.
pub fn check_and_clear(metadata: &Path) -> Result<()> {
    cmd::run(
        Program::ThinCheck,
        ["--clear-needs-check-flag".as_ref(), metadata.as_os_str()],
    )
    .map(|_| ())
    .map_err(|e| {
        e.context(format!(
            "checking pool metadata {} (damaged metadata can be rebuilt with thin_repair)",
            metadata.display()
        ))
    })
}

/// Check the metadata snapshot an active pool holds (`reserve_metadata_snap` first).
pub fn check_snapshot(metadata: &Path) -> Result<()> {
    cmd::run(Program::ThinCheck, ["-m".as_ref(), metadata.as_os_str()]).map(|_| ())
}

/// What `thin_check` said about the pool's metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckReport {
    /// No damage was found.
    pub clean: bool,
    /// What was checked: the device, and whether through a metadata snapshot.
    pub checked: String,
    /// thin_check's findings (its last lines when it found damage).
    pub findings: String,
}

impl CheckReport {
    /// The report of a thin_check run: damage it found is a report, not an error; any other
    /// failure (thin_check missing, the device unreadable) is.
    pub fn of(checked: String, result: Result<()>) -> Result<CheckReport> {
        match result {
            Ok(()) => Ok(CheckReport {
                clean: true,
                checked,
                findings: "no damage found".to_string(),
            }),
            Err(e) if e.kind() == ErrorKind::Command => Ok(CheckReport {
                clean: false,
                checked,
                findings: e.to_string(),
            }),
            Err(e) => Err(e),
        }
    }
}
