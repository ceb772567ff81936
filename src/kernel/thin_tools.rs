//! thin-provisioning-tools: checking and dumping pool metadata.

use std::path::Path;

use loopdev::LoopControl;

use crate::error::{Error, Result};
use crate::kernel::cmd::{self, Program};

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

/// `thin_dump` of inactive metadata at `metadata`, as XML.
pub fn dump(metadata: &Path) -> Result<String> {
    with_block_device(metadata, |device| {
        cmd::run(Program::ThinDump, [device])
            .map(|out| String::from_utf8_lossy(&out.stdout).into_owned())
    })
}

/// Call `f` with a block device holding `path`: `path` itself, or a read-only loop device
/// attached to it for the call when it is a regular file.
fn with_block_device<T>(path: &Path, f: impl FnOnce(&Path) -> Result<T>) -> Result<T> {
    let meta =
        std::fs::metadata(path).map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
    if !meta.is_file() {
        return f(path);
    }
    let control = LoopControl::open().map_err(|e| Error::io("opening /dev/loop-control", e))?;
    let device = control
        .next_free()
        .map_err(|e| Error::io("finding a free loop device", e))?;
    device
        .with()
        .read_only(true)
        .attach(path)
        .map_err(|e| Error::io(format!("attaching {} read-only", path.display()), e))?;
    let node = device
        .path()
        .ok_or_else(|| Error::not_found("the loop device has no path"))?;
    let result = f(&node);
    if let Err(e) = device.detach() {
        tracing::warn!(device = %node.display(), error = %e, "could not detach temporary loop device");
    }
    result
}
