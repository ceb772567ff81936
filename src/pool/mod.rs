//! The thin pool on its backend: create it, or re-open it after a restart or reboot, report its
//! status, grow it, check it, and tear it down. Thin-device primitives (create, snapshot,
//! activate, delete) are here too; the layer engine builds on them.
//!
//! Backends ([`Backing`]):
//! - `loop` ([`loop_files`]): sparse files under the state directory on loop devices;
//! - `lvm` ([`lvm`]): an LVM thin pool that thinstack makes on raw disks ("direct-lvm");
//! - `devices` ([`devices`]): a dm thin pool that thinstack makes on a raw data and a raw
//!   metadata device;
//! - `existing` ([`devices`]): a thin pool someone else made, adopted and never removed.
//!
//! `<state_dir>/pool.json` ([`record`]) says how the pool was made.

pub mod devices;
pub mod loop_files;
pub mod lvm;
mod real;
pub mod record;

use std::path::{Path, PathBuf};

use devicemapper::{
    Device, DmFlags, DmName, DmNameBuf, ThinPoolNoSpacePolicy, ThinPoolStatus,
    ThinPoolStatusSummary, ThinStatus,
};
use serde::Serialize;

use crate::config::{Backend, Config};
use crate::error::{Error, ErrorKind, Result};
use crate::kernel::blockdev;
use crate::kernel::dm::{self, Dm, Udev};
use crate::kernel::table::{Line, Target};
use crate::kernel::thin_tools;
use crate::kernel::thin_tools::CheckReport;
use crate::names::{parse_thin_dm_name, PoolName, ThinId};
use crate::units::{ByteSize, DataBlocks, MetaBlocks, Sectors};
use crate::vocab::WhenFull;
pub use crate::vocab::{Health, Space};

pub use loop_files::{loop_files, LoopBacking};
pub use real::{thin_ids_of, RealPool};

/// The low-water mark Docker and containerd use (32768 blocks = 2 GiB at 64 KiB), capped at a
/// tenth of a small pool so the event that drives extension fires before the pool is full.
const LOW_WATER_BLOCKS: u64 = 32768;

/// The thin-pool feature that makes the pool read-only.
const READ_ONLY: &str = "read_only";

/// Whether metadata is below the kernel's own low-water mark for it (less than 4 MiB, or a
/// quarter of it, free): running out would fail the pool for good, so thinstack makes a pool
/// read-only there (the metadata guard) and writable again above it.
pub fn metadata_nearly_full(metadata: &Space) -> bool {
    metadata.available.bytes() < metadata_low_water(metadata)
}

/// Whether a pool the guard made read-only may be writable again: twice the low-water mark
/// free, so a pool hovering at the mark (a few blocks freed, a few taken) does not flap.
pub fn metadata_has_room(metadata: &Space) -> bool {
    metadata.available.bytes() >= 2 * metadata_low_water(metadata)
}

fn metadata_low_water(metadata: &Space) -> u64 {
    (metadata.total.bytes() / 4).min(4 << 20)
}

/// How a reload of the pool's own table (growth, the no-space policy, the metadata guard) is
/// announced to udev: without a cookie, and not waited for. A reload keeps the device's name,
/// number and `/dev/mapper` link, and thinstack reads nothing udev makes for it, so the wait
/// bought nothing; it cost seconds under emulation and held the engine's pool lock meanwhile,
/// so creates and removes stalled behind every extension. udev still sees the change event
/// and keeps the rules it applied when the pool was created (from its database).
const POOL_RELOAD_UDEV: Udev = Udev::NoWait;

/// What the pool sits on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "backend", rename_all = "lowercase")]
pub enum Backing {
    /// Sparse files on loop devices.
    Loop(LoopBacking),
    /// An LVM thin pool thinstack made.
    Lvm(LvmBacking),
    /// Raw devices under a pool thinstack made.
    Devices(DevicesBacking),
    /// A pool someone else made.
    Existing,
}

/// The volume group and thin-pool LV of a direct-LVM pool.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LvmBacking {
    /// The volume group.
    pub volume_group: String,
    /// The thin-pool LV (named after the pool).
    pub logical_volume: String,
    /// LVM limited to the volume group's disks.
    #[serde(skip)]
    pub lvm: crate::kernel::lvm::Lvm,
}

/// The raw devices of a `devices` pool.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DevicesBacking {
    /// The data device.
    pub data: PathBuf,
    /// The metadata device.
    pub metadata: PathBuf,
}

/// An active thin pool.
#[derive(Debug)]
pub struct Pool {
    name: PoolName,
    dm_name: DmNameBuf,
    device: Device,
    block_size: Sectors,
    backing: Backing,
    metadata_node: PathBuf,
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
    /// Create the pool described by `config`, or re-open the one its state directory holds
    /// (after a daemon restart or a reboot), by its backend.
    ///
    /// Before a pool is used it must be healthy: a pool the kernel flags `needs_check` is
    /// checked (and the flag cleared when clean) first; a failed or read-only pool is refused
    /// with what to do. Returns an `Invalid` error when the config disagrees with how the pool
    /// was made, and `Unsupported` when the kernel lacks dm-thin-pool.
    pub fn open(config: &Config, dm: &Dm) -> Result<Pool> {
        let record = record::load(config)?;
        let mut pool = match config.pool.backend {
            Backend::Loop => loop_files::open(config, dm, record)?,
            Backend::Lvm => lvm::open(config, dm, record)?,
            Backend::Devices => devices::open(config, dm, record)?,
            Backend::Existing => devices::adopt(config, dm, record)?,
        };
        pool.settle_devices(dm)?;
        pool.ensure_usable(dm)?;
        pool.apply_when_full(dm, config.when_full())?;
        Ok(pool)
    }

    /// A kill between the ioctls of one step leaves devices half done: the pool or a thin
    /// device suspended (inside a reload, a snapshot of an active origin, a resize), where every
    /// I/O on it waits; or a thin device created without its table yet, which has no node and
    /// serves nothing. The suspended are resumed (with the table the step loaded, which its
    /// record already holds), the tableless removed.
    fn settle_devices(&self, dm: &Dm) -> Result<()> {
        if dm
            .info(&self.dm_name)?
            .flags()
            .contains(DmFlags::DM_SUSPEND)
        {
            tracing::warn!(pool = %self.name, "resuming the pool device, which a crash left suspended");
            dm.resume(&self.dm_name, Udev::Wait)?;
        }
        for name in dm.list_with_prefix(&self.name.dm_prefix())? {
            if parse_thin_dm_name(&self.name, &name).is_none() {
                continue;
            }
            let Some(info) = dm.try_info(&name)? else {
                continue;
            };
            let flags = info.flags();
            if !flags.contains(DmFlags::DM_ACTIVE_PRESENT) {
                tracing::warn!(device = %name.to_string(), "removing a thin device a crash left without a table");
                dm.remove_device(&name, dm.layer_udev())?;
            } else if flags.contains(DmFlags::DM_SUSPEND) {
                tracing::warn!(device = %name.to_string(), "resuming a thin device a crash left suspended");
                dm.resume(&name, dm.layer_udev())?;
            }
        }
        Ok(())
    }

    /// Give the pool the no-space policy `wanted` unless it has it: a reload of an owned
    /// pool's table, `lvchange --errorwhenfull` for an LVM pool. An adopted pool keeps its own.
    fn apply_when_full(&self, dm: &Dm, wanted: WhenFull) -> Result<()> {
        let live = match dm.pool_status(&self.dm_name)? {
            ThinPoolStatus::Working(status) => when_full_of(status.no_space_policy),
            ThinPoolStatus::Error | ThinPoolStatus::Fail => return Ok(()),
        };
        if live == wanted {
            return Ok(());
        }
        match &self.backing {
            Backing::Existing => {
                tracing::info!(pool = %self.name, when_full = live.as_str(), "an adopted pool keeps its own no-space policy");
                return Ok(());
            }
            Backing::Lvm(backing) => lvm::set_when_full(backing, wanted)?,
            Backing::Loop(_) | Backing::Devices(_) => {
                let params = pool_params(dm, &self.dm_name)?;
                let length = self.table_length(dm)?;
                let table = owned_table(
                    params.metadata_dev,
                    params.data_dev,
                    *length / *self.block_size,
                    self.block_size,
                    wanted,
                );
                // The owned table has no read_only feature: a guarded pool stays guarded.
                let guarded = self.is_read_only(dm)?;
                dm.reload(&self.dm_name, &table, POOL_RELOAD_UDEV)
                    .map_err(|e| e.context(format!("setting pool.when_full on {}", self.name)))?;
                if guarded {
                    self.set_read_only(dm, true)?;
                }
            }
        }
        tracing::info!(pool = %self.name, from = live.as_str(), to = wanted.as_str(), "pool no-space policy changed");
        Ok(())
    }

    /// A pool whose dm device is `dm_name` (active), over the metadata device in its table.
    fn from_active(
        name: PoolName,
        dm: &Dm,
        dm_name: DmNameBuf,
        backing: Backing,
        created: bool,
    ) -> Result<Pool> {
        let params = pool_params(dm, &dm_name)?;
        let device = dm.info(&dm_name)?.device();
        Ok(Pool {
            name,
            device,
            block_size: params.data_block_size,
            metadata_node: blockdev::node_of(params.metadata_dev)?,
            dm_name,
            backing,
            created,
        })
    }

    /// Create the thin-pool device over `metadata` and `data` (block devices thinstack owns),
    /// or adopt it when it is already active over them.
    fn activate_owned(
        config: &Config,
        dm: &Dm,
        metadata: &Path,
        data: &Path,
        data_length: Sectors,
        backing: Backing,
    ) -> Result<Pool> {
        let name = config.pool.name.clone();
        let dm_name = name.pool_dm_name();
        let block_size = config.block_size().sectors();
        let metadata_dev = blockdev::block_device(metadata)?;
        let data_dev = blockdev::block_device(data)?;
        let blocks = *data_length / *block_size;
        if blocks == 0 {
            return Err(Error::invalid(format!(
                "data device {} is smaller than one pool block ({})",
                data.display(),
                ByteSize::from_sectors(block_size)
            )));
        }
        let created = !dm.exists(&dm_name)?;
        if created {
            let table = owned_table(
                metadata_dev,
                data_dev,
                blocks,
                block_size,
                config.when_full(),
            );
            dm.create_device(
                &dm_name,
                Some(&name.pool_dm_uuid()),
                &table,
                false,
                Udev::Wait,
            )
            .map_err(|e| e.context(format!("creating pool {name}")))?;
            tracing::info!(pool = %name, device = %dm_name.to_string(), blocks, block_size = %ByteSize::from_sectors(block_size), "thin pool activated");
        } else {
            verify_owned_table(dm, &dm_name, metadata_dev, data_dev, block_size)?;
            tracing::info!(pool = %name, device = %dm_name.to_string(), "adopted active thin pool");
        }
        Pool::from_active(name, dm, dm_name, backing, created)
    }

    /// Refuse a pool the kernel has failed or made read-only; check one flagged `needs_check`.
    fn ensure_usable(&mut self, dm: &Dm) -> Result<()> {
        if let ThinPoolStatus::Working(status) = dm.pool_status(&self.dm_name)? {
            if status.needs_check {
                tracing::warn!(pool = %self.name, "pool metadata is flagged needs_check; checking it before use");
                self.check_flagged(dm)?;
            }
        }
        let problem = match dm.pool_status(&self.dm_name)? {
            ThinPoolStatus::Working(status) if status.needs_check => "still flagged needs_check",
            // A read-only pool still serves reads, status and growth (which is how its
            // metadata guard is lifted): thinstack starts on it and refuses only writes.
            ThinPoolStatus::Working(status)
                if status.summary == ThinPoolStatusSummary::ReadOnly =>
            {
                self.lift_metadata_guard_if_room(dm)?;
                return Ok(());
            }
            ThinPoolStatus::Working(_) => return Ok(()),
            ThinPoolStatus::Error | ThinPoolStatus::Fail => "failed",
        };
        Err(Error::new(
            ErrorKind::Kernel,
            format!(
                "pool {} ({}) is {problem}, so thinstack will not use it; stop what uses it, \
                 check its metadata with `thin_check {}` (repair with thin_repair, or \
                 `lvconvert --repair` for an LVM pool), then start thinstackd again",
                self.name,
                &*self.dm_name,
                self.metadata_node.display()
            ),
        ))
    }

    /// At start, a pool thinstack made read-only whose metadata has room again (grown while
    /// thinstackd was down, say) is made writable; one still nearly full, or made read-only by
    /// the kernel, stays read-only, and thinstack serves what does not write.
    fn lift_metadata_guard_if_room(&self, dm: &Dm) -> Result<()> {
        let status = self.status(dm)?;
        if status.health.metadata_guard && metadata_has_room(&status.metadata) {
            self.set_read_only(dm, false)?;
            tracing::warn!(pool = %self.name, metadata = %status.metadata.describe(), "the pool's metadata has room again: the pool is writable");
        } else if status.health.metadata_guard {
            tracing::error!(pool = %self.name, metadata = %status.metadata.describe(), "the pool is read-only because its metadata is nearly full; thinstackd serves reads; `thinstack pool extend --metadata SIZE` makes it writable");
        } else {
            tracing::error!(pool = %self.name, "the kernel made the pool read-only (a metadata error, or metadata ran out); thinstackd serves reads; stop what uses the pool, check its metadata with `thin_check {}`, then start again", self.metadata_node.display());
        }
        Ok(())
    }

    /// Check the metadata of a pool flagged `needs_check` while the pool is inactive, and
    /// clear the flag when it is clean: deactivate, check, reactivate.
    fn check_flagged(&mut self, dm: &Dm) -> Result<()> {
        if matches!(self.backing, Backing::Existing) {
            return Err(Error::new(
                ErrorKind::Kernel,
                format!(
                    "adopted pool {} is flagged needs_check; whoever made it must check it (thin_check, or lvconvert --repair), then start thinstackd again",
                    &*self.dm_name
                ),
            ));
        }
        let active = self.active_thin_names(dm)?;
        if !active.is_empty() {
            return Err(Error::new(
                ErrorKind::Busy,
                format!(
                    "pool {} is flagged needs_check, and its metadata can only be checked while it is inactive, but thin devices are active ({}); unmount and deactivate them (dmsetup remove), then start thinstackd again",
                    self.name,
                    active.join(", ")
                ),
            ));
        }
        match &self.backing {
            Backing::Lvm(backing) => lvm::reactivate(backing)?,
            _ => {
                let table = dm.table(&self.dm_name)?;
                dm.remove_device(&self.dm_name, Udev::Wait)?;
                let checked = thin_tools::check_and_clear(&self.metadata_node);
                dm.create_device(
                    &self.dm_name,
                    Some(&self.name.pool_dm_uuid()),
                    &table,
                    false,
                    Udev::Wait,
                )?;
                checked?;
            }
        }
        self.device = dm.info(&self.dm_name)?.device();
        tracing::info!(pool = %self.name, "pool metadata checked clean; needs_check cleared");
        Ok(())
    }

    /// Names of the active thin devices of this pool.
    fn active_thin_names(&self, dm: &Dm) -> Result<Vec<String>> {
        Ok(dm
            .list_with_prefix(&self.name.dm_prefix())?
            .into_iter()
            .filter(|name| name.as_ref() != self.dm_name.as_ref())
            .map(|name| name.to_string())
            .collect())
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

    /// What the pool sits on.
    pub fn backing(&self) -> &Backing {
        &self.backing
    }

    /// The loop files and devices, for a loop-backed pool.
    pub fn loop_backing(&self) -> Option<&LoopBacking> {
        match &self.backing {
            Backing::Loop(backing) => Some(backing),
            _ => None,
        }
    }

    /// The backend.
    pub fn backend(&self) -> Backend {
        match self.backing {
            Backing::Loop(_) => Backend::Loop,
            Backing::Lvm(_) => Backend::Lvm,
            Backing::Devices(_) => Backend::Devices,
            Backing::Existing => Backend::Existing,
        }
    }

    /// The block device holding the pool's metadata (for thin_dump and thin_check).
    pub fn metadata_node(&self) -> &Path {
        &self.metadata_node
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
            dm.layer_udev(),
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
            dm.layer_udev(),
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
        dm.remove_device(&self.name.thin_dm_name(id), dm.layer_udev())
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
            backend: self.backend(),
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
                // Only a read-only pool whose table is thinstack's can be guarded (the table
                // is read only then); an adopted or LVM pool's read_only is its owner's.
                metadata_guard: working.summary == ThinPoolStatusSummary::ReadOnly
                    && !matches!(self.backing, Backing::Lvm(_) | Backing::Existing)
                    && self.is_read_only(dm)?,
                out_of_space: working.summary == ThinPoolStatusSummary::OutOfSpace,
                when_full: Some(when_full_of(working.no_space_policy)),
            },
        })
    }

    /// Grow the pool's data to `data` and its metadata to `metadata` bytes (each when given
    /// and larger than now): loop files grow, LVM volumes are extended, a `devices` pool
    /// takes up its devices' current size. Returns the sizes after.
    ///
    /// A smaller size than now is refused; the same size changes nothing. An adopted pool is
    /// extended by whoever made it.
    pub fn extend(
        &self,
        dm: &Dm,
        data: Option<ByteSize>,
        metadata: Option<ByteSize>,
    ) -> Result<(ByteSize, ByteSize)> {
        if let Some(size) = metadata {
            crate::config::MetadataSize::new(size).map_err(Error::invalid)?;
        }
        let sizes = match &self.backing {
            Backing::Loop(backing) => loop_files::extend(self, dm, backing, data, metadata)?,
            Backing::Lvm(backing) => lvm::extend(backing, data, metadata)?,
            Backing::Devices(backing) => devices::extend(self, dm, backing, data, metadata)?,
            Backing::Existing => {
                return Err(Error::new(
                    ErrorKind::Unsupported,
                    format!(
                        "pool {} was adopted, so thinstack does not resize it; extend it with the tool that made it (lvextend, or a dmsetup reload), and thinstack sees the new size at once",
                        &*self.dm_name
                    ),
                ))
            }
        };
        Ok(sizes)
    }

    /// Reload an owned pool's table over the same devices, with a new data length (in blocks)
    /// when the data grew, so the kernel takes up the grown devices at the resume. The reload
    /// also lifts thinstack's read-only guard ([`Pool::set_read_only`]): the kernel cannot
    /// grow the metadata of a read-only pool. The watcher makes it read-only again if the
    /// growth was not enough.
    fn reload_owned(&self, dm: &Dm, data_blocks: Option<u64>, metadata_grew: bool) -> Result<()> {
        if data_blocks.is_none() && !metadata_grew {
            return Ok(());
        }
        let params = pool_params(dm, &self.dm_name)?;
        let (length, low_water) = match data_blocks {
            Some(blocks) => (Sectors(blocks * *self.block_size), low_water_mark(blocks)),
            None => (self.table_length(dm)?, params.low_water_mark),
        };
        let features = features_without_read_only(&params);
        self.reload_pool_table(dm, &params, length, low_water, features)
            .map_err(|e| e.context(format!("growing pool {}", self.name)))
    }

    /// The pool device's length.
    fn table_length(&self, dm: &Dm) -> Result<Sectors> {
        Ok(Sectors(
            dm.table(&self.dm_name)?
                .iter()
                .map(|line| *line.length)
                .sum(),
        ))
    }

    /// Reload the pool's table over the devices in `params`, with `features`.
    fn reload_pool_table(
        &self,
        dm: &Dm,
        params: &devicemapper::ThinPoolTargetParams,
        length: Sectors,
        low_water: DataBlocks,
        features: Vec<String>,
    ) -> Result<()> {
        let params = devicemapper::ThinPoolTargetParams::new(
            params.metadata_dev,
            params.data_dev,
            params.data_block_size,
            low_water,
            features,
        );
        let table = [Line::thin_pool(length, params)];
        dm.reload(&self.dm_name, &table, POOL_RELOAD_UDEV)
    }

    /// Whether thinstack made the pool read-only (the `read_only` feature in its table), as
    /// it does when the metadata is nearly full (see [`Pool::set_read_only`]).
    pub fn is_read_only(&self, dm: &Dm) -> Result<bool> {
        Ok(pool_params(dm, &self.dm_name)?
            .feature_args
            .contains(READ_ONLY))
    }

    /// Make an owned pool read-only, or writable again, by reloading its table with or without
    /// the `read_only` feature (everything else kept). A read-only pool serves reads and
    /// writes to mapped blocks; writes that need a new block fail with EIO at once, and its
    /// metadata is not touched. Returns whether anything changed; an LVM or adopted pool's
    /// table is not thinstack's, so it is left as it is.
    pub fn set_read_only(&self, dm: &Dm, read_only: bool) -> Result<bool> {
        if matches!(self.backing, Backing::Lvm(_) | Backing::Existing) {
            return Ok(false);
        }
        let params = pool_params(dm, &self.dm_name)?;
        if params.feature_args.contains(READ_ONLY) == read_only {
            return Ok(false);
        }
        let mut features = features_without_read_only(&params);
        if read_only {
            features.push(READ_ONLY.to_string());
        }
        let length = self.table_length(dm)?;
        self.reload_pool_table(dm, &params, length, params.low_water_mark, features)
            .map_err(|e| e.context(format!("making pool {} read-only={read_only}", self.name)))?;
        Ok(true)
    }

    /// Check the metadata through a metadata snapshot while the pool is active (`thin_check
    /// -m`). Damage is reported, not returned as an error.
    pub fn check_metadata(&self, dm: &Dm) -> Result<CheckReport> {
        dm.message(&self.dm_name, "reserve_metadata_snap")?;
        let checked = thin_tools::check_snapshot(&self.metadata_node);
        let released = dm.message(&self.dm_name, "release_metadata_snap");
        let report = CheckReport::of(
            format!("{} (metadata snapshot)", self.metadata_node.display()),
            checked,
        )?;
        released?;
        Ok(report)
    }

    /// Check the metadata of the pool `config` describes without using it (thinstackd must not
    /// be running): through a metadata snapshot when the pool is active, otherwise on the
    /// inactive metadata itself (the loop file, the raw device, or LVM's metadata volume
    /// activated read-only for the check).
    pub fn check_offline(config: &Config, dm: &Dm) -> Result<CheckReport> {
        let record = record::load(config)?.ok_or_else(|| {
            Error::not_found(format!(
                "there is no pool in {}; nothing to check",
                config.state_dir.path().display()
            ))
        })?;
        let dm_name = match record.backend {
            Backend::Lvm => lvm::pool_dm_name(config)?,
            Backend::Existing => record::existing_dm_name(config)?,
            Backend::Loop | Backend::Devices => config.pool.name.pool_dm_name(),
        };
        if dm.exists(&dm_name)? {
            // A snapshot check needs only the pool device and its metadata node, not the backing.
            let pool = Pool::from_active(
                config.pool.name.clone(),
                dm,
                dm_name,
                Backing::Existing,
                false,
            )?;
            return pool.check_metadata(dm);
        }
        let inactive = |metadata: &Path| {
            CheckReport::of(
                format!("{} (inactive)", metadata.display()),
                thin_tools::check(metadata),
            )
        };
        match record.backend {
            Backend::Loop => inactive(&loop_files(config.state_dir.path()).1),
            Backend::Devices => inactive(
                config
                    .pool
                    .devices
                    .metadata
                    .as_ref()
                    .expect("checked by config")
                    .path(),
            ),
            Backend::Lvm => {
                let devices = record.lvm.map(|setup| setup.devices).unwrap_or_default();
                lvm::with_inactive_metadata(config, devices, inactive)
            }
            Backend::Existing => Err(Error::not_found(format!(
                "adopted pool {} is not active; check it with the tools of whoever made it",
                &*dm_name
            ))),
        }
    }

    /// Deactivate the pool (it and its data stay): loop devices are detached, LVM volumes
    /// deactivated; an adopted pool is left active.
    ///
    /// Returns a `Busy` error, naming them, while thin devices of the pool are active.
    pub fn teardown(self, dm: &Dm) -> Result<()> {
        self.deactivate(dm)
    }

    fn deactivate(&self, dm: &Dm) -> Result<()> {
        let active = self.active_thin_names(dm)?;
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
        match &self.backing {
            Backing::Loop(backing) => {
                dm.remove_device(&self.dm_name, Udev::Wait)?;
                loop_files::detach(backing)?;
            }
            Backing::Devices(_) => dm.remove_device(&self.dm_name, Udev::Wait)?,
            Backing::Lvm(backing) => lvm::deactivate(backing)?,
            Backing::Existing => return Ok(()),
        }
        tracing::info!(pool = %self.name, "pool deactivated");
        Ok(())
    }

    /// Remove what thinstack made for the pool, once its layers are gone: the loop files, or
    /// the LVM volumes, volume group and PV labels, or the pool device over raw devices (the
    /// devices themselves stay). An adopted pool stays as it is. The pool record goes last.
    pub fn destroy(&self, dm: &Dm, config: &Config) -> Result<()> {
        self.deactivate(dm)?;
        match &self.backing {
            Backing::Loop(backing) => loop_files::remove_files(backing)?,
            Backing::Lvm(backing) => lvm::destroy(config, backing)?,
            Backing::Devices(_) | Backing::Existing => {}
        }
        crate::records::remove(&record::path(config))?;
        tracing::warn!(pool = %self.name, backend = %self.backend(), "pool destroyed");
        Ok(())
    }
}

/// The table of a pool thinstack owns: `blocks` data blocks, zeroing of new blocks skipped,
/// the no-space policy `when_full`.
fn owned_table(
    metadata: Device,
    data: Device,
    blocks: u64,
    block_size: Sectors,
    when_full: WhenFull,
) -> Vec<Line> {
    dm::thin_pool_table(
        metadata,
        data,
        Sectors(blocks * *block_size),
        block_size,
        low_water_mark(blocks),
        when_full == WhenFull::Error,
    )
}

/// The low-water mark of a pool of `blocks` data blocks: a tenth of it, at most
/// [`LOW_WATER_BLOCKS`], at least one block.
fn low_water_mark(blocks: u64) -> DataBlocks {
    DataBlocks(LOW_WATER_BLOCKS.min(blocks / 10).max(1))
}

/// A pool table's feature arguments, without thinstack's read-only guard.
fn features_without_read_only(params: &devicemapper::ThinPoolTargetParams) -> Vec<String> {
    params
        .feature_args
        .iter()
        .filter(|f| f.as_str() != READ_ONLY)
        .cloned()
        .collect()
}

/// The kernel's no-space policy as the config names it.
fn when_full_of(policy: ThinPoolNoSpacePolicy) -> WhenFull {
    match policy {
        ThinPoolNoSpacePolicy::Error => WhenFull::Error,
        ThinPoolNoSpacePolicy::Queue => WhenFull::Queue,
    }
}

/// The parameters of the single thin-pool target of `name`.
fn pool_params(dm: &Dm, name: &DmName) -> Result<devicemapper::ThinPoolTargetParams> {
    let table = dm.table(name)?;
    match table.as_slice() {
        [Line {
            target: Target::ThinPool(params),
            ..
        }] => Ok(params.clone()),
        lines => Err(Error::invalid(format!(
            "device {name} is not a thin pool (its table has {} line(s): {}); name the thin-pool device itself (for an LVM pool with thin volumes, <vg>-<pool>-tpool)",
            lines.len(),
            lines
                .iter()
                .map(Line::kind)
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

/// An active pool device must be over exactly our devices with our block size.
fn verify_owned_table(
    dm: &Dm,
    name: &DmName,
    metadata: Device,
    data: Device,
    block_size: Sectors,
) -> Result<()> {
    let params = pool_params(dm, name).map_err(|_| {
        Error::inconsistent(format!(
            "device {name} exists but is not a thin pool; remove it (dmsetup remove {name}) or choose another pool.name"
        ))
    })?;
    if params.metadata_dev != metadata
        || params.data_dev != data
        || params.data_block_size != block_size
    {
        return Err(Error::inconsistent(format!(
            "active pool {name} is over {}/{} with block size {} sectors, but this state directory's pool is on {metadata}/{data} with {} sectors; \
             another thinstack with the same pool.name may own it: stop it, or choose another pool.name",
            params.metadata_dev, params.data_dev, params.data_block_size, block_size
        )));
    }
    Ok(())
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
}

impl PoolStatus {
    fn failed(pool: &Pool) -> PoolStatus {
        PoolStatus {
            name: pool.name.to_string(),
            dm_name: pool.dm_name.to_string(),
            backend: pool.backend(),
            block_size: ByteSize::from_sectors(pool.block_size),
            data: Space::new(0, 0),
            metadata: Space::new(0, 0),
            transaction_id: None,
            health: Health {
                failed: true,
                needs_check: true,
                read_only: true,
                metadata_guard: false,
                out_of_space: false,
                when_full: None,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn space_reports_available_and_percent() {
        let space = Space::new(25, 100);
        assert_eq!(space.available.bytes(), 75);
        assert!((space.percent_used() - 25.0).abs() < f64::EPSILON);
        assert_eq!(Space::new(5, 0).available.bytes(), 0);
    }
}
