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

mod delta;
pub mod devices;
mod lifecycle;
pub mod loop_files;
pub mod lvm;
mod pool_table;
pub mod rbd;
mod real;
pub mod record;
mod status;
mod thin;

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

pub use delta::{thin_delta_by_tool, thin_delta_of};
pub use loop_files::{loop_files, LoopBacking};
use pool_table::{owned_table, pool_params, verify_owned_table, when_full_of};
pub use real::{thin_ids_by_thin_dump, thin_ids_of, RealPool};
pub use status::PoolStatus;

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

/// The metadata's low-water mark: below this much free, the metadata guard makes the pool
/// read-only.
pub fn metadata_low_water_mark(metadata: &Space) -> ByteSize {
    ByteSize::from_bytes(metadata_low_water(metadata))
}

/// The data low-water mark thinstack gives a pool's table of `data` in blocks of
/// `block_size`: the kernel raises its event (which dmeventd and the watcher act on) once
/// fewer blocks than this are free.
pub fn data_low_water_mark(data: &Space, block_size: ByteSize) -> ByteSize {
    let blocks = data.total.bytes() / block_size.bytes().max(1);
    let mark = pool_table::low_water_mark(blocks).0;
    ByteSize::from_bytes(mark.saturating_mul(block_size.bytes()))
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
            Backend::Rbd => {
                return Err(Error::new(
                    ErrorKind::Unsupported,
                    "pool.backend = \"rbd\" has no dm-thin pool; it is opened as an RbdPool",
                ))
            }
        };
        pool.settle_devices(dm)?;
        pool.ensure_usable(dm)?;
        pool.apply_when_full(dm, config.when_full())?;
        Ok(pool)
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
