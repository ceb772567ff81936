//! The real pool behind the kernel seam ([`PoolKernel`]): a [`Pool`] over device-mapper, with
//! everything the daemon, its watcher and the doctor ask of it.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use devicemapper::Device;

use crate::config::Config;
use crate::error::{Error, ErrorKind, Result};
use crate::kernel::cmd::{self, Program};
use crate::kernel::device_io::{DeviceFile, ThinIo};
use crate::kernel::dm::{self, Dm, Udev};
use crate::kernel::thin_metadata;
use crate::kernel::thin_tools::CheckReport;
use crate::kernel::{
    blockdev, loopdev, DeletedLoopFile, DeltaRun, DmDevice, PoolKernel, PoolUsage, Room, ThinUsage,
};
use crate::names::{parse_thin_dm_name, ThinId};
use crate::pool::{lvm, Backing, Pool};
use crate::units::ByteSize;

/// The prefix every thinstack layout version's dm names share.
const FAMILY_PREFIX: &str = "thinstack-";

/// A pool on the real kernel.
pub struct RealPool {
    dm: Dm,
    pool: Pool,
    config: Config,
}

impl RealPool {
    /// Open device-mapper and create or re-open the pool `config` describes
    /// ([`Pool::open`]).
    pub fn open(config: &Config) -> Result<Self> {
        let dm = Dm::open()?.with_layer_udev(config.layers.udev());
        let pool = Pool::open(config, &dm)?;
        Ok(RealPool::new(dm, pool, config.clone()))
    }

    /// Wrap an open pool, made from `config`.
    pub fn new(dm: Dm, pool: Pool, config: Config) -> Self {
        RealPool { dm, pool, config }
    }

    /// The volumes of a pool on LVM; `Unsupported` for any other pool.
    fn lvm_backing(&self) -> Result<&crate::pool::LvmBacking> {
        match self.pool.backing() {
            Backing::Lvm(backing) => Ok(backing),
            _ => Err(Error::new(
                ErrorKind::Unsupported,
                format!("pool {} is not on LVM volumes", self.pool.name()),
            )),
        }
    }

    /// Refuse, with or without `force`, a device of this pool's own stack: the pool device,
    /// what it is built on (its volumes and their disks) and what is built on it (its thin
    /// devices), or a disk with a partition among them.
    fn refuse_pool_member(&self, device: &Path) -> Result<()> {
        let number = blockdev::block_device(device)?;
        let stack = blockdev::stack_of(self.pool.device());
        let member = blockdev::with_partitions(number)
            .into_iter()
            .find(|n| stack.contains(n));
        match member {
            None => Ok(()),
            Some(member) => Err(Error::new(
                ErrorKind::Permission,
                format!(
                    "{} ({member}) is part of pool {} (its device, a volume or disk under it, or \
                     a layer's device on it); thinstack never adds the pool's own devices, with \
                     or without force: choose another disk",
                    device.display(),
                    self.pool.name()
                ),
            )),
        }
    }

    /// The engine's view of `status`; an error when the pool has failed.
    fn usage_from(&self, status: crate::pool::PoolStatus) -> Result<PoolUsage> {
        let transaction_id = status.transaction_id.ok_or_else(|| {
            Error::new(
                ErrorKind::Kernel,
                format!("pool {} has failed in the kernel", self.pool.name()),
            )
        })?;
        Ok(PoolUsage {
            transaction_id,
            data: status.data,
            metadata: status.metadata,
            health: status.health,
        })
    }
}

impl PoolKernel for RealPool {
    fn details(&self) -> crate::kernel::PoolDetails {
        let pool = &self.pool;
        let (data_source, metadata_source) = sources(pool.backing(), pool.metadata_node());
        crate::kernel::PoolDetails {
            name: pool.name().to_string(),
            device: format!("/dev/mapper/{}", pool.dm_name()),
            backend: pool.backend().to_string(),
            block_size: ByteSize::from_sectors(pool.block_size()),
            data_source,
            metadata_source,
        }
    }

    fn usage(&self) -> Result<PoolUsage> {
        self.usage_from(self.pool.status(&self.dm)?)
    }

    #[tracing::instrument(level = "debug", skip_all)]
    fn usage_as_committed(&self) -> Result<PoolUsage> {
        self.usage_from(self.pool.status_as_committed(&self.dm)?)
    }

    fn create_thin(&self, id: ThinId) -> Result<()> {
        self.pool.create_thin(&self.dm, id)
    }

    #[tracing::instrument(level = "debug", skip_all)]
    fn snapshot(&self, origin: ThinId, new: ThinId) -> Result<()> {
        self.pool.snapshot(&self.dm, origin, new)
    }

    fn delete_thin(&self, id: ThinId) -> Result<()> {
        self.pool.delete_thin(&self.dm, id)
    }

    #[tracing::instrument(level = "debug", skip_all)]
    fn set_transaction_id(&self, old: u64, new: u64) -> Result<()> {
        self.dm.set_transaction_id(self.pool.dm_name(), old, new)
    }

    fn thin_ids(&self) -> Result<BTreeSet<ThinId>> {
        thin_ids_of(&self.dm, &self.pool)
    }

    #[tracing::instrument(level = "debug", skip_all)]
    fn activate(&self, id: ThinId, size: ByteSize, read_only: bool) -> Result<PathBuf> {
        self.pool
            .activate_thin(&self.dm, id, size, read_only)
            .map(|active| active.node)
    }

    #[tracing::instrument(level = "debug", skip_all)]
    fn deactivate(&self, id: ThinId) -> Result<()> {
        self.pool.deactivate_thin(&self.dm, id)
    }

    #[tracing::instrument(level = "debug", skip_all)]
    fn active_node(&self, id: ThinId) -> Result<Option<PathBuf>> {
        Ok(self
            .pool
            .active_thin(&self.dm, id)?
            .map(|active| active.node))
    }

    fn active_read_only(&self, id: ThinId) -> Result<Option<bool>> {
        let name = self.pool.name().thin_dm_name(id);
        Ok(self
            .dm
            .try_info(&name)?
            .map(|info| info.flags().contains(devicemapper::DmFlags::DM_READONLY)))
    }

    fn active_ids(&self) -> Result<BTreeSet<ThinId>> {
        let name = self.pool.name();
        Ok(self
            .dm
            .list_with_prefix(&name.dm_prefix())?
            .iter()
            .filter_map(|dm_name| parse_thin_dm_name(name, dm_name))
            .collect())
    }

    fn resize(&self, id: ThinId, size: ByteSize) -> Result<()> {
        let name = self.pool.name().thin_dm_name(id);
        let table = dm::thin_table(self.pool.device(), id, size.sectors());
        self.dm.reload(&name, &table, self.dm.layer_udev())
    }

    fn mapped(&self, id: ThinId) -> Result<ByteSize> {
        self.pool.thin_mapped(&self.dm, id)
    }

    fn thin_usage(&self) -> Result<BTreeMap<ThinId, ThinUsage>> {
        thin_usage_of(&self.dm, &self.pool)
    }

    #[tracing::instrument(level = "debug", skip_all)]
    fn thin_delta(&self, base: Option<ThinId>, id: ThinId) -> Result<Vec<DeltaRun>> {
        crate::pool::thin_delta_of(&self.dm, &self.pool, base, id)
    }

    #[tracing::instrument(level = "debug", skip_all)]
    fn open_thin(&self, id: ThinId) -> Result<Box<dyn ThinIo>> {
        let node = self.active_node(id)?.ok_or_else(|| {
            Error::not_found(format!(
                "thin device {id} is not active, so it cannot be read"
            ))
        })?;
        let writable = self.active_read_only(id)? == Some(false);
        let block_size = ByteSize::from_sectors(self.pool.block_size());
        Ok(Box::new(DeviceFile::open(&node, writable, block_size)?))
    }

    fn discard(&self, id: ThinId) -> Result<()> {
        let node = self.active_node(id)?.ok_or_else(|| {
            Error::not_found(format!(
                "thin device {id} is not active, so it cannot be discarded"
            ))
        })?;
        blockdev::discard(&node)
    }

    fn room(&self) -> Result<Room> {
        Ok(match self.pool.backing() {
            Backing::Loop(files) => Room::Files {
                data: loopdev::file_size(&files.data_file)?,
                metadata: loopdev::file_size(&files.metadata_file)?,
            },
            Backing::Lvm(_) => Room::Volumes,
            Backing::Devices(_) | Backing::Existing => Room::Fixed,
        })
    }

    fn extend(
        &self,
        data: Option<ByteSize>,
        metadata: Option<ByteSize>,
    ) -> Result<(ByteSize, ByteSize)> {
        self.pool.extend(&self.dm, data, metadata)
    }

    fn grow_volumes(
        &self,
        group: &crate::kernel::lvm::VolumeGroup,
        data: u64,
        metadata: u64,
    ) -> Result<()> {
        let backing = self.lvm_backing()?;
        lvm::grow(backing, lvm::Growth { data, metadata }, group.extent_size)
    }

    fn volume_group(&self) -> Result<crate::kernel::lvm::VolumeGroup> {
        lvm::volume_group(self.lvm_backing()?)
    }

    fn read_only_guard(&self) -> Result<bool> {
        self.pool.is_read_only(&self.dm)
    }

    fn set_read_only_guard(&self, on: bool) -> Result<bool> {
        self.pool.set_read_only(&self.dm, on)
    }

    fn check_metadata(&self) -> Result<CheckReport> {
        self.pool.check_metadata(&self.dm)
    }

    fn add_device(&self, device: &Path, force: bool) -> Result<ByteSize> {
        let Backing::Lvm(backing) = self.pool.backing() else {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!(
                    "only an lvm pool takes more disks; this pool's backend is {}",
                    self.pool.backend()
                ),
            ));
        };
        // Resolved once: every check and every write below is on this same device, whatever
        // a symbolic link named by the caller points to meanwhile.
        let device = std::fs::canonicalize(device)
            .map_err(|e| Error::io(format!("resolving device {}", device.display()), e))?;
        self.refuse_pool_member(&device)?;
        lvm::add_device(&self.config, backing, &device, force)?;
        Ok(lvm::volume_group(backing)?.free())
    }

    fn monitored(&self) -> bool {
        matches!(self.pool.backing(), Backing::Lvm(_)) && crate::kernel::lvm::dmeventd_running()
    }

    fn destroy(&self) -> Result<()> {
        if matches!(self.pool.backing(), Backing::Existing) {
            // Leave an adopted pool as it was found: empty, transaction id 0.
            let now = self.usage()?.transaction_id;
            self.set_transaction_id(now, 0)?;
        }
        self.pool.destroy(&self.dm, &self.config)
    }

    fn thin_device_numbers(&self) -> Result<HashMap<Device, ThinId>> {
        let mut devices = HashMap::new();
        for id in self.active_ids()? {
            if let Some(info) = self.dm.try_info(&self.pool.name().thin_dm_name(id))? {
                devices.insert(info.device(), id);
            }
        }
        Ok(devices)
    }

    fn dm_devices(&self) -> Result<Vec<DmDevice>> {
        let mut found = Vec::new();
        for name in self.dm.list_with_prefix(FAMILY_PREFIX)? {
            if name.as_ref() == self.pool.dm_name() {
                continue;
            }
            let Some(info) = self.dm.try_info(&name)? else {
                continue; // gone meanwhile
            };
            found.push(DmDevice {
                name: name.to_string(),
                thin: parse_thin_dm_name(self.pool.name(), &name),
                open_count: u32::try_from(info.open_count()).unwrap_or(0),
            });
        }
        Ok(found)
    }

    fn remove_dm_device(&self, name: &str) -> Result<()> {
        let name = devicemapper::DmName::new(name)
            .map_err(|e| Error::invalid(format!("{name:?} is not a device-mapper name: {e}")))?;
        self.dm.remove_device(name, Udev::Wait)
    }

    fn deleted_loop_files(&self) -> Result<Vec<DeletedLoopFile>> {
        let mut found = Vec::new();
        for binding in loopdev::bindings()? {
            if binding.deleted {
                found.push(DeletedLoopFile {
                    device: binding.device,
                    file: binding.file,
                });
            }
        }
        Ok(found)
    }

    fn loop_held(&self, device: &Path) -> Result<bool> {
        blockdev::is_held(device)
    }

    fn detach_loop(&self, device: &Path) -> Result<()> {
        loopdev::detach(device)
    }
}

/// Every thin id in `pool`'s metadata, read in-process through a metadata snapshot (the
/// kernel's way to let tools read live metadata).
pub fn thin_ids_of(dm: &Dm, pool: &Pool) -> Result<BTreeSet<ThinId>> {
    with_metadata_snapshot(dm, pool, "list the pool's thin devices", || {
        thin_metadata::snapshot_thin_ids(pool.metadata_node())
    })
}

/// Run `f` with a metadata snapshot of `pool` held (the kernel's way to let tools read live
/// metadata), taken to `purpose`, which a refused reservation names.
pub(super) fn with_metadata_snapshot<T>(
    dm: &Dm,
    pool: &Pool,
    purpose: &str,
    f: impl FnOnce() -> Result<T>,
) -> Result<T> {
    let name = pool.dm_name();
    dm.message(name, "reserve_metadata_snap").map_err(|e| {
        e.context(format!("reserving a metadata snapshot to {purpose} (a read-only pool refuses it: extend its metadata first, thinstack pool extend --metadata SIZE)"))
    })?;
    let done = f();
    let released = dm.message(name, "release_metadata_snap");
    let done = done?;
    released.map(|_| done)
}

/// [`thin_ids_of`], as `thin_dump` lists them: what the kernel tests check the in-process
/// reader against.
pub fn thin_ids_by_thin_dump(dm: &Dm, pool: &Pool) -> Result<BTreeSet<ThinId>> {
    let output = with_metadata_snapshot(dm, pool, "list the pool's thin devices", || {
        cmd::run(
            Program::ThinDump,
            [
                "--skip-mappings".as_ref(),
                "-m".as_ref(),
                pool.metadata_node().as_os_str(),
            ],
        )
    })?;
    parse_dump_ids(&String::from_utf8_lossy(&output.stdout))
}

/// What every thin device in `pool` maps and holds alone, read with `thin_ls` through a
/// metadata snapshot (as cAdvisor reads per-container usage from a devicemapper pool).
pub fn thin_usage_of(dm: &Dm, pool: &Pool) -> Result<BTreeMap<ThinId, ThinUsage>> {
    let output = with_metadata_snapshot(dm, pool, "count the layers' exclusive blocks", || {
        cmd::run(
            Program::ThinLs,
            [
                "-m".as_ref(),
                "--no-headers".as_ref(),
                "-o".as_ref(),
                "DEV,MAPPED_BLOCKS,EXCLUSIVE_BLOCKS".as_ref(),
                pool.metadata_node().as_os_str(),
            ],
        )
    })?;
    let block_size = ByteSize::from_sectors(pool.block_size());
    parse_thin_ls(&String::from_utf8_lossy(&output.stdout), block_size)
}

/// `thin_ls -o DEV,MAPPED_BLOCKS,EXCLUSIVE_BLOCKS --no-headers` lines, in blocks of
/// `block_size`.
fn parse_thin_ls(text: &str, block_size: ByteSize) -> Result<BTreeMap<ThinId, ThinUsage>> {
    let bad = |line: &str| {
        Error::inconsistent(format!(
            "thin_ls printed a line thinstack cannot read: {line:?}"
        ))
    };
    let mut usage = BTreeMap::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let fields: Vec<u64> = line
            .split_whitespace()
            .map(|f| f.parse::<u64>())
            .collect::<std::result::Result<_, _>>()
            .map_err(|_| bad(line))?;
        let [id, mapped, exclusive] = fields[..] else {
            return Err(bad(line));
        };
        let id = ThinId::new(u32::try_from(id).map_err(|_| bad(line))?)?;
        let bytes = |blocks: u64| ByteSize::from_bytes(blocks.saturating_mul(block_size.bytes()));
        usage.insert(
            id,
            ThinUsage {
                mapped: bytes(mapped),
                exclusive: bytes(exclusive),
            },
        );
    }
    Ok(usage)
}

/// Thin ids in `thin_dump` XML: `<device dev_id="N" ...>`.
fn parse_dump_ids(xml: &str) -> Result<BTreeSet<ThinId>> {
    xml.split("<device ")
        .skip(1)
        .map(|rest| {
            let value = rest
                .split("dev_id=\"")
                .nth(1)
                .and_then(|v| v.split('"').next())
                .ok_or_else(|| Error::inconsistent("thin_dump printed a device without dev_id"))?;
            let id: u32 = value.parse().map_err(|_| {
                Error::inconsistent(format!("thin_dump printed a bad dev_id {value:?}"))
            })?;
            ThinId::new(id)
        })
        .collect()
}

/// What holds the pool's data and metadata, for status output.
fn sources(backing: &Backing, metadata_node: &Path) -> (String, String) {
    match backing {
        Backing::Loop(files) => (
            format!(
                "{} on {}",
                files.data_file.display(),
                files.data_device.display()
            ),
            format!(
                "{} on {}",
                files.metadata_file.display(),
                files.metadata_device.display()
            ),
        ),
        Backing::Lvm(lvm) => (
            format!(
                "LVM volume {}/{} (data)",
                lvm.volume_group, lvm.logical_volume
            ),
            format!(
                "LVM volume {}/{} (metadata, {})",
                lvm.volume_group,
                lvm.logical_volume,
                metadata_node.display()
            ),
        ),
        Backing::Devices(devices) => (
            devices.data.display().to_string(),
            devices.metadata.display().to_string(),
        ),
        Backing::Existing => (
            "an adopted pool's data device".to_string(),
            format!("{} (adopted pool)", metadata_node.display()),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thin_ls_lines_are_read_in_blocks() {
        let text = "1 100 20\n16777215 110 20\n\n";
        let usage = parse_thin_ls(text, ByteSize::from_bytes(65536)).unwrap();
        let second = usage[&ThinId::new(16777215).unwrap()];
        assert_eq!(second.mapped, ByteSize::from_bytes(65536 * 110));
        assert_eq!(second.exclusive, ByteSize::from_bytes(65536 * 20));
        assert_eq!(second.shared(), ByteSize::from_bytes(65536 * 90));
        for bad in ["1 2", "x 1 2", "1 2 3 4", "16777216 1 1", "-1 1 1"] {
            assert!(
                parse_thin_ls(bad, ByteSize::from_bytes(65536)).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn thin_dump_ids_are_read() {
        let xml = r#"<superblock uuid="" time="1" transaction="3" flags="0" version="2" data_block_size="128" nr_data_blocks="100">
  <device dev_id="1" mapped_blocks="0" transaction="0" creation_time="0" snap_time="0">
  </device>
  <device dev_id="16777215" mapped_blocks="5" transaction="1" creation_time="0" snap_time="1">
  </device>
</superblock>"#;
        let ids: Vec<u32> = parse_dump_ids(xml)
            .unwrap()
            .iter()
            .map(|i| i.value())
            .collect();
        assert_eq!(ids, [1, 16777215]);
        assert!(parse_dump_ids("<superblock></superblock>")
            .unwrap()
            .is_empty());
        assert!(parse_dump_ids(r#"<device dev_id="x">"#).is_err());
    }
}
