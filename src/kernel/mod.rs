//! Everything that touches the host: device-mapper, loop devices, filesystems, programs.
//!
//! The engine reaches the kernel only through the traits [`PoolKernel`] and [`FsKernel`]. The
//! real implementations ([`real`]) go to the kernel; [`sim::Sim`] is an in-memory kernel that
//! enforces the same rules, so the one real engine runs in unit tests without root. Every rule
//! the Sim models is also exercised on the real kernel by the kernel tests.

pub mod blockdev;
mod boxed;
pub mod catalog;
pub mod cmd;
pub mod conformance;
pub mod device_io;
pub mod dm;
pub mod freeze;
pub mod fs;
pub mod loopdev;
pub mod lvm;
pub mod mount_target;
pub mod mounts;
pub mod rbd;
pub mod real;
pub mod sim;
mod sim_blocks;
mod sim_files;
pub mod sim_gate;
pub mod superblock;
pub mod table;
pub mod thin_metadata;
pub mod thin_tools;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use devicemapper::Device;

use crate::error::Result;
use crate::kernel::thin_tools::CheckReport;
use crate::names::ThinId;
use crate::units::ByteSize;
use crate::vocab::FsType;
use crate::vocab::{Health, Space};

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

/// The pool data one thin device maps, and how much of it no other thin device shares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ThinUsage {
    /// Bytes it maps (blocks it shares with snapshots included).
    pub mapped: ByteSize,
    /// Bytes that no other thin device maps: what deleting it gives back to the pool.
    pub exclusive: ByteSize,
}

impl ThinUsage {
    /// Bytes it maps that another thin device maps too.
    pub fn shared(&self) -> ByteSize {
        ByteSize::from_bytes(self.mapped.bytes().saturating_sub(self.exclusive.bytes()))
    }
}

/// A stretch of a thin device, in bytes, that differs from a base (or, without a base, that
/// the device maps), as the pool's metadata tells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeltaRun {
    /// Bytes into the device.
    pub offset: u64,
    /// Its length in bytes.
    pub length: u64,
    /// What the device holds there.
    pub kind: DeltaKind,
}

/// What a thin device holds in a [`DeltaRun`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeltaKind {
    /// Data of its own (written since the base, or mapped, without a base): to be read.
    Data,
    /// Nothing: the base maps it and the device does not (it was discarded), so it reads as
    /// zeros.
    Unmapped,
}

/// What a pool is and what it sits on, for status output.
#[derive(Debug, Clone, PartialEq, Eq)]
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
    /// [`PoolKernel::usage`] without what it may cost to be current: dm-thin reads it as of
    /// the last metadata commit (space counts up to a second old) instead of committing
    /// first. For guards on the way to a change (writable? room?), never for figures.
    fn usage_as_committed(&self) -> Result<PoolUsage> {
        self.usage()
    }
    /// Make a new, empty thin device. `AlreadyExists` when the id is taken.
    fn create_thin(&self, id: ThinId) -> Result<()>;
    /// Make `new` a snapshot of `origin`, suspending an active origin around the message and
    /// resuming it in every case.
    fn snapshot(&self, origin: ThinId, new: ThinId) -> Result<()>;
    /// Delete a thin device and its data. `NotFound` when there is no such id; `Busy` while it
    /// is active.
    fn delete_thin(&self, id: ThinId) -> Result<()>;
    /// Settle what a snapshot of `origin` as `new` that a crash cut short left beside the thin
    /// ids (`made`: whether `new` exists). A start calls it for the snapshot intent it
    /// settles. Nothing on dm-thin, whose messages happen whole or not at all; an rbd pool's
    /// snapshot is several steps.
    fn settle_snapshot(&self, origin: ThinId, new: ThinId, made: bool) -> Result<()> {
        let _ = (origin, new, made);
        Ok(())
    }
    /// The catalog of layers this pool shares with other hosts; `None` for a pool of this
    /// host alone (dm-thin), whose records are the only list of its layers.
    fn catalog(&self) -> Option<&dyn catalog::Catalog> {
        None
    }
    /// Take away the writer lock another host holds on thin `id` (a pool shared by hosts), and
    /// fence that host's clients of it, so this host may write it. For an operator who knows
    /// that host is dead: a live one loses its writes. `Unsupported` on a pool of one host.
    fn break_writer_lock(&self, id: ThinId) -> Result<catalog::BrokenLock> {
        let _ = id;
        Err(crate::error::Error::new(
            crate::error::ErrorKind::Unsupported,
            "this pool is one host's: it has no writer locks to break (only backend rbd is shared by hosts)",
        ))
    }
    /// The other hosts a shared pool has (by their names in it); none for a pool of one host.
    /// A destroy on a host that shares the pool with others takes only that host out of it.
    fn other_hosts(&self) -> Result<Vec<String>> {
        Ok(Vec::new())
    }
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
    /// What every thin device in the pool maps, and how much of it is its own, read at one
    /// moment (active or not; the real pool reads it through a metadata snapshot, which a
    /// read-only pool refuses).
    fn thin_usage(&self) -> Result<BTreeMap<ThinId, ThinUsage>>;
    /// Where thin `id` differs from thin `base` (ranges it maps to other data, or maps and
    /// the base does not: [`DeltaKind::Data`]; ranges the base maps and it does not:
    /// [`DeltaKind::Unmapped`]), or, without a base, every range it maps; ascending. Read
    /// from the metadata alone (the real pool's through a metadata snapshot, read
    /// in-process as `thin_delta` reads it), never by reading the devices. The devices
    /// should not change meanwhile.
    fn thin_delta(&self, base: Option<ThinId>, id: ThinId) -> Result<Vec<DeltaRun>>;
    /// Read and write the bytes of active thin `id` (writes refused unless it is active
    /// writable).
    fn open_thin(&self, id: ThinId) -> Result<Box<dyn device_io::ThinIo>>;

    // ----- administration: what the daemon, its watcher and the doctor ask of a pool -----

    /// What the pool can grow into by itself, for the watcher's automatic extension.
    fn room(&self) -> Result<Room>;
    /// Grow the data to `data` and the metadata to `metadata` bytes (each when given and
    /// larger than now; smaller is refused); returns the sizes after. A pool over raw devices
    /// takes up its devices' current size; an adopted pool is `Unsupported`.
    fn extend(
        &self,
        data: Option<ByteSize>,
        metadata: Option<ByteSize>,
    ) -> Result<(ByteSize, ByteSize)>;
    /// Take `data` and `metadata` extents from `group`, the volume group of a pool on
    /// volumes ([`Room::Volumes`]) as [`PoolKernel::volume_group`] read it when the growth was
    /// planned; `Unsupported` for any other pool.
    fn grow_volumes(&self, group: &lvm::VolumeGroup, data: u64, metadata: u64) -> Result<()>;
    /// The volume group of a pool on volumes (an LVM call: asked only when growth is
    /// planned, not every watcher round); `Unsupported` for any other pool.
    fn volume_group(&self) -> Result<lvm::VolumeGroup>;
    /// Whether thinstack's read-only guard is on (see [`PoolKernel::set_read_only_guard`]).
    fn read_only_guard(&self) -> Result<bool>;
    /// Make the pool read-only (writes needing a new block fail at once, the metadata is not
    /// touched), or writable again. Returns whether anything changed; a pool whose table is
    /// not thinstack's own is left as it is.
    fn set_read_only_guard(&self, on: bool) -> Result<bool>;
    /// Check the metadata while the pool is in use (through a metadata snapshot). Damage is
    /// a report, not an error.
    fn check_metadata(&self) -> Result<CheckReport>;
    /// Add a disk to the pool's volume group, after the safety checks; returns the group's
    /// free bytes. `Unsupported` unless the pool is on volumes; `Permission` for a device of
    /// the pool's own stack.
    fn add_device(&self, device: &Path, force: bool) -> Result<ByteSize>;
    /// Whether LVM's own monitoring (dmeventd) extends this pool, so thinstack waits for it.
    fn monitored(&self) -> bool;
    /// Remove what thinstack made for the pool (an adopted pool is left as it was found: its
    /// transaction id back to 0), and its record. Its thin devices must be gone.
    fn destroy(&self) -> Result<()>;

    // ----- leftovers, for the doctor -----

    /// The device numbers of this pool's active thin devices, to find their mounts.
    fn thin_device_numbers(&self) -> Result<HashMap<Device, ThinId>>;
    /// Device-mapper devices with thinstack's prefix other than the pool itself.
    fn dm_devices(&self) -> Result<Vec<DmDevice>>;
    /// Remove one of [`PoolKernel::dm_devices`] (the doctor checked it is unowned and unused).
    fn remove_dm_device(&self, name: &str) -> Result<()>;
    /// Loop devices bound to deleted files, anywhere on the host.
    fn deleted_loop_files(&self) -> Result<Vec<DeletedLoopFile>>;
    /// Whether something holds a loop device. The probe opens it exclusively for a moment, so
    /// it is asked only of thinstack's own devices, never of another's.
    fn loop_held(&self, device: &Path) -> Result<bool>;
    /// Detach a loop device.
    fn detach_loop(&self, device: &Path) -> Result<()>;
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
    /// Every mount on the host.
    fn mount_table(&self) -> Result<Vec<mounts::Mount>>;
    /// Have the filesystem mounted (read-write) at `target` discard its free blocks; what
    /// it says it trimmed.
    fn trim(&self, target: &Path) -> Result<ByteSize>;
}

/// What a pool can grow into by itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Room {
    /// Files whose sizes are these now; [`PoolKernel::extend`] grows them.
    Files {
        /// The data file's size.
        data: ByteSize,
        /// The metadata file's size.
        metadata: ByteSize,
    },
    /// Volumes; [`PoolKernel::grow_volumes`] takes extents from their group
    /// ([`PoolKernel::volume_group`]).
    Volumes,
    /// Sized by whoever made it, or by hand (raw devices, an adopted pool).
    Fixed,
}

/// A device-mapper device named with thinstack's prefix that is not the pool itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DmDevice {
    /// Its name.
    pub name: String,
    /// The thin device of this pool it is named after; `None` when it is not this pool's.
    pub thin: Option<ThinId>,
    /// How many times it is held open (mounted, or used by a process).
    pub open_count: u32,
}

/// A loop device bound to a deleted file (the device then holds the file's only copy).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeletedLoopFile {
    /// The loop device.
    pub device: PathBuf,
    /// The deleted file, as the kernel names it.
    pub file: PathBuf,
}
