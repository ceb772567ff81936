//! The thin pool on its backend: create it, or re-open it after a restart or reboot, report its
//! status, and tear it down. Thin-device primitives (create, snapshot, activate, delete) are
//! here too; the layer engine builds on them.
//!
//! Loop backend layout under the state directory:
//! ```plain
//! <state_dir>/pool.json          the pool record (name, backend, block size), written once
//! <state_dir>/loop/data          sparse data file
//! <state_dir>/loop/metadata      sparse metadata file (zeros when new = kernel formats it)
//! ```

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use devicemapper::{Device, DmName, DmNameBuf, ThinPoolStatus, ThinPoolStatusSummary, ThinStatus};
use serde::{Deserialize, Serialize};

use crate::config::{Backend, Config};
use crate::error::{Error, ErrorKind, Result};
use crate::kernel::dm::{self, Dm};
use crate::kernel::loopdev::{self, FileState};
pub use crate::kernel::{Health, Space};
use crate::names::{PoolName, ThinId};
use crate::records;
use crate::units::{ByteSize, DataBlocks, MetaBlocks, Sectors};

/// The pool record's format; bumped when its layout changes.
const POOL_RECORD_FORMAT: u32 = 1;

/// The low-water mark Docker and containerd use (32768 blocks = 2 GiB at 64 KiB), capped at a
/// tenth of a small pool so the event that drives extension fires before the pool is full.
const LOW_WATER_BLOCKS: u64 = 32768;

/// What is saved about a pool when it is made; later configs must agree with it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct PoolRecord {
    format: u32,
    name: String,
    backend: Backend,
    block_size: ByteSize,
    created_unix: u64,
}

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

/// An active thin pool.
#[derive(Debug)]
pub struct Pool {
    name: PoolName,
    dm_name: DmNameBuf,
    device: Device,
    block_size: Sectors,
    backing: LoopBacking,
    created: bool,
}

/// An active thin device: its dm name and a node to open it by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActiveThin {
    /// The dm name, `thinstack-1-<pool>-thin-<id>`.
    pub dm_name: DmNameBuf,
    /// `/dev/dm-N`, made by the kernel itself, so it exists as soon as the device does.
    pub node: PathBuf,
}

impl Pool {
    /// Create the pool described by `config`, or re-open the one its state directory holds.
    ///
    /// New pool: sparse data and metadata files are made (the metadata all zeros, which the
    /// kernel formats), attached to loop devices, and the thin-pool device is created. Existing
    /// pool: the files are never modified; loop devices already bound to them are reused (after
    /// a daemon restart) or new ones attached (after a reboot), and a thin-pool device that is
    /// already active is adopted once its table is verified to be over those devices.
    ///
    /// Returns an `Invalid` error when the config disagrees with how the pool was made (its
    /// name or block size), and `Unsupported` when the kernel lacks dm-thin-pool.
    pub fn open(config: &Config, dm: &Dm) -> Result<Pool> {
        let state_dir = config.state_dir.path();
        let (data_file, metadata_file) = loop_files(state_dir);
        records::ensure_private_dir(data_file.parent().expect("loop dir"))?;
        let record_path = state_dir.join("pool.json");
        let record = records::read_json::<PoolRecord>(&record_path)?;
        if let Some(record) = &record {
            check_record_matches(record, config, &record_path)?;
        }
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
        let pool = Pool::activate(config, dm, backing.clone()).inspect_err(|_| {
            detach_quietly(&backing.data_device);
            detach_quietly(&backing.metadata_device);
        })?;
        if record.is_none() {
            records::write_json(&record_path, &new_record(config))?;
        }
        Ok(pool)
    }

    /// Create the thin-pool device over `backing`, or adopt it when it is already active.
    fn activate(config: &Config, dm: &Dm, backing: LoopBacking) -> Result<Pool> {
        let name = config.pool.name.clone();
        let dm_name = name.pool_dm_name();
        let block_size = config.pool.block_size.size().sectors();
        let metadata = loopdev::device_number(&backing.metadata_device)?;
        let data = loopdev::device_number(&backing.data_device)?;
        let data_length = loopdev::file_size(&backing.data_file)?.sectors();
        let blocks = *data_length / *block_size;
        if blocks == 0 {
            return Err(Error::invalid(format!(
                "data file {} is smaller than one pool block ({})",
                backing.data_file.display(),
                ByteSize::from_sectors(block_size)
            )));
        }
        let created = !dm.exists(&dm_name)?;
        let device = if created {
            let table = dm::thin_pool_table(
                metadata,
                data,
                Sectors(blocks * *block_size),
                block_size,
                DataBlocks(LOW_WATER_BLOCKS.min(blocks / 10).max(1)),
            );
            let info = dm
                .create_device(&dm_name, Some(&name.pool_dm_uuid()), &table, false)
                .map_err(|e| e.context(format!("creating pool {name}")))?;
            tracing::info!(pool = %name, device = %dm_name.to_string(), blocks, block_size = %ByteSize::from_sectors(block_size), "thin pool activated");
            info.device()
        } else {
            verify_existing_table(dm, &dm_name, metadata, data, block_size)?;
            tracing::info!(pool = %name, device = %dm_name.to_string(), "adopted active thin pool");
            dm.info(&dm_name)?.device()
        };
        let pool = Pool {
            name,
            dm_name,
            device,
            block_size,
            backing,
            created,
        };
        pool.check_health(dm)?;
        Ok(pool)
    }

    /// Refuse a pool the kernel has failed or flagged for repair, with what to do.
    fn check_health(&self, dm: &Dm) -> Result<()> {
        match dm.pool_status(&self.dm_name)? {
            ThinPoolStatus::Working(status) if status.needs_check => {
                tracing::warn!(pool = %self.name, "pool metadata is flagged needs_check; run `thinstack pool check`");
                Ok(())
            }
            ThinPoolStatus::Working(_) => Ok(()),
            ThinPoolStatus::Error | ThinPoolStatus::Fail => Err(Error::new(
                ErrorKind::Kernel,
                format!(
                    "pool {} has failed in the kernel; check its metadata with `thin_check {}` after stopping thinstackd",
                    self.name,
                    self.backing.metadata_file.display()
                ),
            )),
        }
    }

    /// The pool's name.
    pub fn name(&self) -> &PoolName {
        &self.name
    }

    /// The thin-pool dm device's name.
    pub fn dm_name(&self) -> &DmName {
        &self.dm_name
    }

    /// The thin-pool dm device's number, which thin tables refer to.
    pub fn device(&self) -> Device {
        self.device
    }

    /// The pool's block size.
    pub fn block_size(&self) -> Sectors {
        self.block_size
    }

    /// The files and loop devices behind the pool.
    pub fn backing(&self) -> &LoopBacking {
        &self.backing
    }

    /// Whether this open created the pool's dm device (false when it was adopted).
    pub fn was_created(&self) -> bool {
        self.created
    }

    /// Make a new, empty thin device `id`.
    pub fn create_thin(&self, dm: &Dm, id: ThinId) -> Result<()> {
        dm.create_thin(&self.dm_name, id)
    }

    /// Make thin device `new` a snapshot of `origin`; when the origin is active it is
    /// suspended around the kernel message and resumed in every case.
    pub fn snapshot(&self, dm: &Dm, origin: ThinId, new: ThinId) -> Result<()> {
        let origin_name = self.name.thin_dm_name(origin);
        let active = dm.exists(&origin_name)?;
        dm.snapshot(
            &self.dm_name,
            origin,
            active.then_some(origin_name.as_ref()),
            new,
        )
    }

    /// Activate thin device `id` with virtual size `size`; read-only when asked.
    pub fn activate_thin(
        &self,
        dm: &Dm,
        id: ThinId,
        size: ByteSize,
        read_only: bool,
    ) -> Result<ActiveThin> {
        let dm_name = self.name.thin_dm_name(id);
        let table = dm::thin_table(self.device, id, size.sectors());
        let info = dm.create_device(
            &dm_name,
            Some(&self.name.thin_dm_uuid(id)),
            &table,
            read_only,
        )?;
        Ok(ActiveThin {
            node: dm::kernel_node(&info),
            dm_name,
        })
    }

    /// The active device of thin `id`, if it is active.
    pub fn active_thin(&self, dm: &Dm, id: ThinId) -> Result<Option<ActiveThin>> {
        let dm_name = self.name.thin_dm_name(id);
        Ok(dm.try_info(&dm_name)?.map(|info| ActiveThin {
            node: dm::kernel_node(&info),
            dm_name,
        }))
    }

    /// Deactivate thin device `id` (its data stays in the pool).
    ///
    /// Returns a `Busy` error while it is mounted or open.
    pub fn deactivate_thin(&self, dm: &Dm, id: ThinId) -> Result<()> {
        dm.remove_device(&self.name.thin_dm_name(id))
    }

    /// Delete thin device `id` and its data from the pool; it must be inactive.
    pub fn delete_thin(&self, dm: &Dm, id: ThinId) -> Result<()> {
        dm.delete_thin(&self.dm_name, id)
    }

    /// Bytes mapped (allocated) by active thin device `id`.
    pub fn thin_mapped(&self, dm: &Dm, id: ThinId) -> Result<ByteSize> {
        match dm.thin_status(&self.name.thin_dm_name(id))? {
            ThinStatus::Working(status) => Ok(ByteSize::from_sectors(status.nr_mapped_sectors)),
            ThinStatus::Error | ThinStatus::Fail => Err(Error::new(
                ErrorKind::Kernel,
                format!("thin device {id} of pool {} has failed", self.name),
            )),
        }
    }

    /// Everything about the pool's space and health.
    pub fn status(&self, dm: &Dm) -> Result<PoolStatus> {
        let working = match dm.pool_status(&self.dm_name)? {
            ThinPoolStatus::Working(status) => status,
            ThinPoolStatus::Error | ThinPoolStatus::Fail => {
                return Ok(PoolStatus::failed(self));
            }
        };
        let usage = &working.usage;
        let block = ByteSize::from_sectors(self.block_size).bytes();
        let meta_block = ByteSize::from_sectors(MetaBlocks(1).sectors()).bytes();
        Ok(PoolStatus {
            name: self.name.to_string(),
            dm_name: self.dm_name.to_string(),
            backend: Backend::Loop,
            block_size: ByteSize::from_sectors(self.block_size),
            data: Space::new(*usage.used_data * block, *usage.total_data * block),
            metadata: Space::new(
                *usage.used_meta * meta_block,
                *usage.total_meta * meta_block,
            ),
            transaction_id: Some(working.transaction_id),
            health: Health {
                failed: false,
                needs_check: working.needs_check,
                read_only: working.summary == ThinPoolStatusSummary::ReadOnly,
                out_of_space: working.summary == ThinPoolStatusSummary::OutOfSpace,
            },
            backing: self.backing.clone(),
        })
    }

    /// Grow the loop files to `data` and `metadata` bytes (each when given and larger than
    /// now) and the pool with them: the file grows sparse, the loop device is told its new
    /// capacity, and the pool's table is reloaded (data) or the pool resumed, which makes the
    /// kernel take up a larger metadata device. Returns the sizes after.
    ///
    /// A smaller size than now is refused; the same size changes nothing.
    pub fn extend(
        &self,
        dm: &Dm,
        data: Option<ByteSize>,
        metadata: Option<ByteSize>,
    ) -> Result<(ByteSize, ByteSize)> {
        let backing = &self.backing;
        let grow_data = match data {
            Some(size) => grow_file(&backing.data_file, &backing.data_device, size, "data")?,
            None => false,
        };
        let grow_metadata = match metadata {
            Some(size) => {
                crate::config::MetadataSize::new(size).map_err(Error::invalid)?;
                grow_file(
                    &backing.metadata_file,
                    &backing.metadata_device,
                    size,
                    "metadata",
                )?
            }
            None => false,
        };
        if grow_data {
            let data_length = loopdev::file_size(&backing.data_file)?.sectors();
            let blocks = *data_length / *self.block_size;
            let table = dm::thin_pool_table(
                loopdev::device_number(&backing.metadata_device)?,
                loopdev::device_number(&backing.data_device)?,
                Sectors(blocks * *self.block_size),
                self.block_size,
                DataBlocks(LOW_WATER_BLOCKS.min(blocks / 10).max(1)),
            );
            dm.reload(&self.dm_name, &table)
                .map_err(|e| e.context(format!("growing pool {}", self.name)))?;
        } else if grow_metadata {
            dm.suspend(&self.dm_name)?;
            dm.resume(&self.dm_name)?;
        }
        let sizes = (
            loopdev::file_size(&backing.data_file)?,
            loopdev::file_size(&backing.metadata_file)?,
        );
        if grow_data || grow_metadata {
            tracing::info!(pool = %self.name, data = %sizes.0, metadata = %sizes.1, "pool extended");
        }
        Ok(sizes)
    }

    /// Deactivate the pool and detach its loop devices; the files stay.
    ///
    /// Returns a `Busy` error, naming them, while thin devices of the pool are active.
    pub fn teardown(self, dm: &Dm) -> Result<()> {
        let active: Vec<String> = dm
            .list_with_prefix(&self.name.dm_prefix())?
            .into_iter()
            .filter(|name| name.as_ref() != self.dm_name.as_ref())
            .map(|name| name.to_string())
            .collect();
        if !active.is_empty() {
            return Err(Error::new(
                ErrorKind::Busy,
                format!(
                    "pool {} still has active thin devices ({}); deactivate them first",
                    self.name,
                    active.join(", ")
                ),
            ));
        }
        dm.remove_device(&self.dm_name)?;
        loopdev::detach(&self.backing.data_device)?;
        loopdev::detach(&self.backing.metadata_device)?;
        tracing::info!(pool = %self.name, "pool deactivated and loop devices detached");
        Ok(())
    }
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

fn new_record(config: &Config) -> PoolRecord {
    PoolRecord {
        format: POOL_RECORD_FORMAT,
        name: config.pool.name.to_string(),
        backend: config.pool.backend,
        block_size: config.pool.block_size.size(),
        created_unix: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    }
}

/// The config must describe the pool the state directory holds; what cannot change is refused.
fn check_record_matches(record: &PoolRecord, config: &Config, path: &Path) -> Result<()> {
    let mut changed = Vec::new();
    if record.name != config.pool.name.as_str() {
        changed.push(format!(
            "pool.name was {:?}, config says {:?}",
            record.name,
            config.pool.name.as_str()
        ));
    }
    if record.backend != config.pool.backend {
        changed.push(format!(
            "pool.backend was {:?}, config says {:?}",
            record.backend, config.pool.backend
        ));
    }
    if record.block_size != config.pool.block_size.size() {
        changed.push(format!(
            "pool.block_size was {}, config says {}",
            record.block_size,
            config.pool.block_size.size()
        ));
    }
    if changed.is_empty() {
        return Ok(());
    }
    Err(Error::invalid(format!(
        "the pool in {} was made with other settings ({}); these cannot change for an existing pool: \
         restore them in the config, or destroy the pool to make a new one",
        path.parent().unwrap_or(path).display(),
        changed.join("; ")
    )))
}

/// An active pool device must be over exactly our loop devices with our block size.
fn verify_existing_table(
    dm: &Dm,
    name: &DmName,
    metadata: Device,
    data: Device,
    block_size: Sectors,
) -> Result<()> {
    let table = dm.table(name)?;
    let params = match table.as_slice() {
        [(_, _, target, params)] if target == dm::THIN_POOL_TARGET => {
            dm::parse_thin_pool_params(params)?
        }
        _ => {
            return Err(Error::inconsistent(format!(
                "device {name} exists but is not a thin pool; remove it (dmsetup remove {name}) or choose another pool.name"
            )))
        }
    };
    if params.metadata_dev != metadata
        || params.data_dev != data
        || params.data_block_size != block_size
    {
        return Err(Error::inconsistent(format!(
            "active pool {name} is over {}/{} with block size {} sectors, but this state directory's files are on {metadata}/{data} with {} sectors; \
             another thinstack with the same pool.name may own it: stop it, or choose another pool.name",
            params.metadata_dev, params.data_dev, params.data_block_size, block_size
        )));
    }
    Ok(())
}

fn detach_quietly(device: &Path) {
    if let Err(e) = loopdev::detach(device) {
        tracing::warn!(device = %device.display(), error = %e, "could not detach loop device while undoing");
    }
}

/// What `pool status` shows.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PoolStatus {
    /// The pool's name.
    pub name: String,
    /// The thin-pool dm device.
    pub dm_name: String,
    /// The backend.
    pub backend: Backend,
    /// Allocation unit.
    pub block_size: ByteSize,
    /// Data space.
    pub data: Space,
    /// Metadata space.
    pub metadata: Space,
    /// The pool's transaction id (absent when the pool failed).
    pub transaction_id: Option<u64>,
    /// Health flags.
    pub health: Health,
    /// Files and loop devices.
    pub backing: LoopBacking,
}

impl PoolStatus {
    fn failed(pool: &Pool) -> PoolStatus {
        PoolStatus {
            name: pool.name.to_string(),
            dm_name: pool.dm_name.to_string(),
            backend: Backend::Loop,
            block_size: ByteSize::from_sectors(pool.block_size),
            data: Space::new(0, 0),
            metadata: Space::new(0, 0),
            transaction_id: None,
            health: Health {
                failed: true,
                needs_check: true,
                read_only: true,
                out_of_space: false,
            },
            backing: pool.backing.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(text: &str) -> Config {
        Config::parse(text, "t").unwrap()
    }

    #[test]
    fn a_changed_block_size_or_name_is_refused_with_both_values() {
        let made = new_record(&config("[pool]\nname = \"a\"\nblock_size = \"64K\"\n"));
        let later = config("[pool]\nname = \"b\"\nblock_size = \"128K\"\n");
        let err = check_record_matches(&made, &later, Path::new("/s/pool.json")).unwrap_err();
        let text = err.to_string();
        assert_eq!(err.kind(), ErrorKind::Invalid);
        assert!(
            text.contains("pool.block_size was 64K, config says 128K"),
            "{text}"
        );
        assert!(text.contains("pool.name was \"a\""), "{text}");
        let same = config("[pool]\nname = \"a\"\n");
        check_record_matches(&made, &same, Path::new("/s/pool.json")).unwrap();
    }

    #[test]
    fn space_reports_available_and_percent() {
        let space = Space::new(25, 100);
        assert_eq!(space.available.bytes(), 75);
        assert!((space.percent_used() - 25.0).abs() < f64::EPSILON);
        assert_eq!(Space::new(5, 0).available.bytes(), 0);
    }
}
