//! Everything that touches the host: device-mapper, loop devices, filesystems, programs.
//!
//! The engine reaches the kernel only through the traits [`PoolKernel`] and [`FsKernel`]. The
//! real implementations ([`real`]) go to the kernel; [`sim::Sim`] is an in-memory kernel that
//! enforces the same rules, so the one real engine runs in unit tests without root. Every rule
//! the Sim models is also exercised on the real kernel by the kernel tests.

pub mod blockdev;
pub mod cmd;
pub mod conformance;
pub mod dm;
pub mod fs;
pub mod loopdev;
pub mod lvm;
pub mod mount_target;
pub mod mounts;
pub mod real;
pub mod sim;
pub mod superblock;
pub mod thin_tools;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::kernel::fs::FsType;
use crate::names::ThinId;
use crate::units::ByteSize;

/// Space and health of a pool, as the engine needs them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolUsage {
    /// The pool's transaction id (set with `set_transaction_id`).
    pub transaction_id: u64,
    /// Data area.
    pub data: Space,
    /// Metadata area.
    pub metadata: Space,
    /// Health flags.
    pub health: Health,
}

/// What a pool is and what it sits on, for status output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolDetails {
    /// The pool's name.
    pub name: String,
    /// The thin-pool device.
    pub device: String,
    /// The backend ("loop", ...).
    pub backend: String,
    /// Allocation unit.
    pub block_size: ByteSize,
    /// What holds the data and the metadata, for example "/var/lib/thinstack/loop/data on /dev/loop1".
    pub data_source: String,
    /// See `data_source`.
    pub metadata_source: String,
}

/// The thin-pool operations the engine needs, for one pool.
pub trait PoolKernel {
    /// The pool's name, device, backend and block size.
    fn details(&self) -> PoolDetails;
    /// Space, transaction id and health. An error when the pool has failed.
    fn usage(&self) -> Result<PoolUsage>;
    /// Make a new, empty thin device. `AlreadyExists` when the id is taken.
    fn create_thin(&self, id: ThinId) -> Result<()>;
    /// Make `new` a snapshot of `origin`, suspending an active origin around the message and
    /// resuming it in every case.
    fn snapshot(&self, origin: ThinId, new: ThinId) -> Result<()>;
    /// Delete a thin device and its data. `NotFound` when there is no such id; `Busy` while it
    /// is active.
    fn delete_thin(&self, id: ThinId) -> Result<()>;
    /// Move the transaction id from `old` to `new`; refused unless `old` is current.
    fn set_transaction_id(&self, old: u64, new: u64) -> Result<()>;
    /// Every thin id the pool's metadata holds.
    fn thin_ids(&self) -> Result<BTreeSet<ThinId>>;
    /// Activate a thin device at `size`; returns its node.
    fn activate(&self, id: ThinId, size: ByteSize, read_only: bool) -> Result<PathBuf>;
    /// Deactivate; `Busy` while open or mounted, `NotFound` when not active.
    fn deactivate(&self, id: ThinId) -> Result<()>;
    /// The node of an active thin device, `None` when inactive.
    fn active_node(&self, id: ThinId) -> Result<Option<PathBuf>>;
    /// Whether an active thin device is read-only; `None` when inactive.
    fn active_read_only(&self, id: ThinId) -> Result<Option<bool>>;
    /// Every active thin device of this pool.
    fn active_ids(&self) -> Result<BTreeSet<ThinId>>;
    /// Change an active thin device's virtual size.
    fn resize(&self, id: ThinId, size: ByteSize) -> Result<()>;
    /// Bytes mapped by an active thin device.
    fn mapped(&self, id: ThinId) -> Result<ByteSize>;
    /// Discard every block of an active thin device (gives loop-file space back to the host).
    fn discard(&self, id: ThinId) -> Result<()>;
}

/// The filesystem operations the engine needs.
pub trait FsKernel {
    /// Make a filesystem; returns its UUID.
    fn mkfs(&self, fs: FsType, device: &Path, extra: &[String]) -> Result<String>;
    /// Mount `device` at `target`.
    fn mount(
        &self,
        device: &Path,
        target: &Path,
        fs: FsType,
        read_only: bool,
        options: &[String],
    ) -> Result<()>;
    /// Unmount `device`'s filesystem at `target`; `Permission` when the top mount there is
    /// not `device`'s, `Busy` while files are open there.
    fn unmount(&self, target: &Path, device: &Path) -> Result<()>;
    /// Grow the filesystem mounted at `mount_point` (on `device`) to fill its device.
    fn grow(&self, fs: FsType, device: &Path, mount_point: &Path) -> Result<()>;
    /// Whether something is mounted at `target`.
    fn is_mounted(&self, target: &Path) -> Result<bool>;
    /// Where the block device at `device` is mounted: each target, and whether read-only.
    fn mounts_of(&self, device: &Path) -> Result<Vec<(PathBuf, bool)>>;
    /// The filesystem on `device` (type, size, UUID), if it holds one thinstack makes.
    fn probe(&self, device: &Path) -> Result<Option<superblock::Found>>;
}

/// Used and total bytes of one of the pool's areas.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Space {
    /// Bytes in use.
    pub used: ByteSize,
    /// Bytes in all.
    pub total: ByteSize,
    /// Bytes free.
    pub available: ByteSize,
}

impl Space {
    /// Space from used and total bytes.
    pub fn new(used: u64, total: u64) -> Space {
        Space {
            used: ByteSize::from_bytes(used),
            total: ByteSize::from_bytes(total),
            available: ByteSize::from_bytes(total.saturating_sub(used)),
        }
    }

    /// Share in use, 0 to 100.
    pub fn percent_used(&self) -> f64 {
        if self.total.bytes() == 0 {
            return 100.0;
        }
        self.used.bytes() as f64 * 100.0 / self.total.bytes() as f64
    }
}

/// The pool's health as the kernel reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    /// The kernel reports the pool failed; no status can be read.
    pub failed: bool,
    /// The metadata is flagged for `thin_check`.
    pub needs_check: bool,
    /// The pool is read-only: thinstack's metadata guard (see `metadata_guard`), or the
    /// kernel's fall-back after metadata trouble.
    pub read_only: bool,
    /// thinstack made the pool read-only because its metadata is nearly full; growing the
    /// metadata (`pool extend --metadata`) makes it writable again.
    #[serde(default)]
    pub metadata_guard: bool,
    /// The data area is full.
    pub out_of_space: bool,
    /// What writes meet when the data is full ("error" or "queue"); none when failed.
    pub when_full: Option<crate::config::WhenFull>,
}

impl Space {
    /// "1.2G used of 100.0G (1.2%), 98.8G available"
    pub fn describe(&self) -> String {
        format!(
            "{} used of {} ({:.1}%), {} available",
            self.used.human(),
            self.total.human(),
            self.percent_used(),
            self.available.human()
        )
    }
}

impl Health {
    /// "ok", or the flags that are set ("needs_check, read-only").
    pub fn describe(&self) -> String {
        let flags: Vec<&str> = [
            (self.failed, "FAILED"),
            (self.needs_check, "needs_check"),
            (self.read_only, "read-only"),
            (self.out_of_space, "out of data space"),
        ]
        .iter()
        .filter(|(on, _)| *on)
        .map(|(_, name)| *name)
        .collect();
        if flags.is_empty() {
            "ok".to_string()
        } else {
            flags.join(", ")
        }
    }
}
