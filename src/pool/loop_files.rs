//! The loop backend: sparse files under the state directory, attached to loop devices.
//!
//! ```plain
//! <state_dir>/loop/data          sparse data file
//! <state_dir>/loop/metadata      sparse metadata file (zeros when new = kernel formats it)
//! ```

use std::path::{Path, PathBuf};

use serde::Serialize;

use super::record::{self, PoolRecord};
use super::{Backing, Pool};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::kernel::dm::Dm;
use crate::kernel::loopdev::{self, FileState};
use crate::records;
use crate::units::ByteSize;

/// Files and loop devices behind a loop-backed pool.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LoopBacking {
    /// The sparse data file.
    pub data_file: PathBuf,
    /// The sparse metadata file.
    pub metadata_file: PathBuf,
    /// The loop device bound to the data file.
    pub data_device: PathBuf,
    /// The loop device bound to the metadata file.
    pub metadata_device: PathBuf,
}

/// Paths of the loop backend's files under `state_dir`.
pub fn loop_files(state_dir: &Path) -> (PathBuf, PathBuf) {
    let dir = state_dir.join("loop");
    (dir.join("data"), dir.join("metadata"))
}

/// New pool: sparse data and metadata files are made (the metadata all zeros, which the
/// kernel formats), attached to loop devices, and the thin-pool device is created. Existing
/// pool: the files are never modified; loop devices already bound to them are reused (after a
/// daemon restart) or new ones attached (after a reboot), and a thin-pool device that is
/// already active is adopted once its table is verified to be over those devices.
pub(super) fn open(config: &Config, dm: &Dm, record: Option<PoolRecord>) -> Result<Pool> {
    let state_dir = config.state_dir.path();
    let (data_file, metadata_file) = loop_files(state_dir);
    records::ensure_private_dir(data_file.parent().expect("loop dir"))?;
    let loop_config = &config.pool.loop_files;
    let metadata_state =
        loopdev::ensure_sparse_file(&metadata_file, loop_config.metadata_size.size())?;
    loopdev::ensure_sparse_file(&data_file, loop_config.data_size)?;
    if metadata_state == FileState::Created {
        tracing::info!(file = %metadata_file.display(), size = %loop_config.metadata_size.size(), "created new metadata file");
    }
    let metadata_device = loopdev::attach(&metadata_file)?;
    let data_device = loopdev::attach(&data_file).inspect_err(|_| {
        detach_quietly(&metadata_device);
    })?;
    let backing = LoopBacking {
        data_file,
        metadata_file,
        data_device,
        metadata_device,
    };
    let data_length = loopdev::file_size(&backing.data_file)?.sectors();
    let pool = Pool::activate_owned(
        config,
        dm,
        &backing.metadata_device,
        &backing.data_device,
        data_length,
        Backing::Loop(backing.clone()),
    )
    .inspect_err(|_| {
        detach_quietly(&backing.data_device);
        detach_quietly(&backing.metadata_device);
    })?;
    if record.is_none() {
        record::save_complete(config, config.block_size())?;
    }
    Ok(pool)
}

/// The data and metadata files' sizes.
pub(super) fn sizes(backing: &LoopBacking) -> Result<(ByteSize, ByteSize)> {
    Ok((
        loopdev::file_size(&backing.data_file)?,
        loopdev::file_size(&backing.metadata_file)?,
    ))
}

/// Grow the files (sparse), tell the loop devices their new capacity, and reload the pool's
/// table (data) or resume it so the kernel takes up a larger metadata device.
pub(super) fn extend(
    pool: &Pool,
    dm: &Dm,
    backing: &LoopBacking,
    data: Option<ByteSize>,
    metadata: Option<ByteSize>,
) -> Result<(ByteSize, ByteSize)> {
    let grow_data = match data {
        Some(size) => grow_file(&backing.data_file, &backing.data_device, size, "data")?,
        None => false,
    };
    let grow_metadata = match metadata {
        Some(size) => grow_file(
            &backing.metadata_file,
            &backing.metadata_device,
            size,
            "metadata",
        )?,
        None => false,
    };
    let blocks = grow_data
        .then(|| loopdev::file_size(&backing.data_file))
        .transpose()?
        .map(|size| *size.sectors() / *pool.block_size());
    pool.reload_owned(dm, blocks, grow_metadata)?;
    let sizes = sizes(backing)?;
    if grow_data || grow_metadata {
        tracing::info!(pool = %pool.name(), data = %sizes.0, metadata = %sizes.1, "pool extended");
    }
    Ok(sizes)
}

/// Grow a loop file to `size` and refresh its loop device's capacity; false when it has that
/// size already. A smaller size is refused.
fn grow_file(file: &Path, device: &Path, size: ByteSize, what: &str) -> Result<bool> {
    let current = loopdev::file_size(file)?;
    if size < current {
        return Err(Error::invalid(format!(
            "the pool's {what} is {current} already; {size} would shrink it, and pools only grow"
        )));
    }
    if size == current {
        return Ok(false);
    }
    let grown = std::fs::OpenOptions::new()
        .write(true)
        .open(file)
        .and_then(|f| f.set_len(size.bytes()).and_then(|()| f.sync_all()));
    grown.map_err(|e| Error::io(format!("growing {} to {size}", file.display()), e))?;
    loopdev::refresh_capacity(device)?;
    Ok(true)
}

/// Detach both loop devices (the pool device is gone).
pub(super) fn detach(backing: &LoopBacking) -> Result<()> {
    loopdev::detach(&backing.data_device)?;
    loopdev::detach(&backing.metadata_device)?;
    Ok(())
}

/// Delete the files and their directory (the loop devices are detached).
pub(super) fn remove_files(backing: &LoopBacking) -> Result<()> {
    for file in [&backing.data_file, &backing.metadata_file] {
        records::remove(file)?;
    }
    if let Some(dir) = backing.data_file.parent() {
        std::fs::remove_dir(dir)
            .map_err(|e| Error::io(format!("removing directory {}", dir.display()), e))?;
    }
    Ok(())
}

fn detach_quietly(device: &Path) {
    if let Err(e) = loopdev::detach(device) {
        tracing::warn!(device = %device.display(), error = %e, "could not detach loop device while undoing");
    }
}
