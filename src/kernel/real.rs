//! The real kernel behind the engine's traits: a [`Pool`] over device-mapper, and filesystems
//! through mkfs and mount(2).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use crate::error::{Error, ErrorKind, Result};
use crate::kernel::blockdev;
use crate::kernel::cmd::{self, Program};
use crate::kernel::dm::{self, Dm};
use crate::kernel::fs::{self, FsType};
use crate::kernel::{FsKernel, PoolKernel, PoolUsage};
use crate::names::{parse_thin_dm_name, ThinId};
use crate::pool::{Backing, Pool};
use crate::units::ByteSize;

/// A pool on the real kernel.
pub struct RealPool {
    dm: Dm,
    pool: Pool,
}

impl RealPool {
    /// Wrap an open pool.
    pub fn new(dm: Dm, pool: Pool) -> Self {
        RealPool { dm, pool }
    }

    /// The pool.
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// The device-mapper handle.
    pub fn dm(&self) -> &Dm {
        &self.dm
    }

    /// Give back the pool (to tear it down).
    pub fn into_parts(self) -> (Dm, Pool) {
        (self.dm, self.pool)
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
        let status = self.pool.status(&self.dm)?;
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

    fn create_thin(&self, id: ThinId) -> Result<()> {
        self.pool.create_thin(&self.dm, id)
    }

    fn snapshot(&self, origin: ThinId, new: ThinId) -> Result<()> {
        self.pool.snapshot(&self.dm, origin, new)
    }

    fn delete_thin(&self, id: ThinId) -> Result<()> {
        self.pool.delete_thin(&self.dm, id)
    }

    fn set_transaction_id(&self, old: u64, new: u64) -> Result<()> {
        self.dm.set_transaction_id(self.pool.dm_name(), old, new)
    }

    fn thin_ids(&self) -> Result<BTreeSet<ThinId>> {
        thin_ids_of(&self.dm, &self.pool)
    }

    fn activate(&self, id: ThinId, size: ByteSize, read_only: bool) -> Result<PathBuf> {
        self.pool
            .activate_thin(&self.dm, id, size, read_only)
            .map(|active| active.node)
    }

    fn deactivate(&self, id: ThinId) -> Result<()> {
        self.pool.deactivate_thin(&self.dm, id)
    }

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

    fn discard(&self, id: ThinId) -> Result<()> {
        let node = self.active_node(id)?.ok_or_else(|| {
            Error::not_found(format!(
                "thin device {id} is not active, so it cannot be discarded"
            ))
        })?;
        blockdev::discard(&node)
    }
}

/// Every thin id in `pool`'s metadata, read through a metadata snapshot (the kernel's way to
/// let tools read live metadata).
pub fn thin_ids_of(dm: &Dm, pool: &Pool) -> Result<BTreeSet<ThinId>> {
    let name = pool.dm_name();
    dm.message(name, "reserve_metadata_snap")?;
    let dumped = cmd::run(
        Program::ThinDump,
        [
            "--skip-mappings".as_ref(),
            "-m".as_ref(),
            pool.metadata_node().as_os_str(),
        ],
    );
    let released = dm.message(name, "release_metadata_snap");
    let output = dumped?;
    released?;
    parse_dump_ids(&String::from_utf8_lossy(&output.stdout))
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

/// Filesystems on the real kernel.
#[derive(Debug, Default, Clone, Copy)]
pub struct RealFs;

impl FsKernel for RealFs {
    fn mkfs(&self, fs_type: FsType, device: &Path, extra: &[String]) -> Result<String> {
        fs::mkfs(fs_type, device, extra)?;
        let out = cmd::run(
            Program::Blkid,
            [
                "-p".as_ref(),
                "-s".as_ref(),
                "UUID".as_ref(),
                "-o".as_ref(),
                "value".as_ref(),
                device.as_os_str(),
            ],
        )?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    fn mount(
        &self,
        device: &Path,
        target: &Path,
        fs_type: FsType,
        read_only: bool,
        options: &[String],
    ) -> Result<()> {
        let options: Vec<&str> = options.iter().map(String::as_str).collect();
        fs::mount(device, target, fs_type, read_only, &options)
    }

    fn unmount(&self, target: &Path, device: &Path) -> Result<()> {
        fs::unmount(target, device)
    }

    fn grow(&self, fs_type: FsType, device: &Path, mount_point: &Path) -> Result<()> {
        fs::grow(fs_type, device, Some(mount_point))
    }

    fn is_mounted(&self, target: &Path) -> Result<bool> {
        crate::kernel::mounts::is_mounted(target)
    }

    fn probe(&self, device: &Path) -> Result<Option<crate::kernel::superblock::Found>> {
        crate::kernel::superblock::probe(device)
    }

    fn mounts_of(&self, device: &Path) -> Result<Vec<(PathBuf, bool)>> {
        let number = blockdev::block_device(device)?;
        Ok(crate::kernel::mounts::of_device(number)?
            .into_iter()
            .map(|mount| (mount.target, mount.read_only))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
