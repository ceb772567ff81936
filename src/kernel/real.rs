//! Filesystems on the real kernel, behind the engine's [`FsKernel`]: mkfs, mount(2), the mount
//! table. (The real pool behind [`crate::kernel::PoolKernel`] is in the pool module, above.)

use std::path::{Path, PathBuf};

use crate::error::Result;
use crate::kernel::cmd::{self, Program};
use crate::kernel::fs;
use crate::kernel::{blockdev, mounts, FsKernel};
use crate::units::ByteSize;
use crate::vocab::FsType;

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

    fn trim(&self, target: &Path) -> Result<ByteSize> {
        fs::trim(target)
    }

    fn grow(&self, fs_type: FsType, device: &Path, mount_point: &Path) -> Result<()> {
        fs::grow(fs_type, device, Some(mount_point))
    }

    fn is_mounted(&self, target: &Path) -> Result<bool> {
        mounts::is_mounted(target)
    }

    fn probe(&self, device: &Path) -> Result<Option<crate::kernel::superblock::Found>> {
        crate::kernel::superblock::probe(device)
    }

    fn mount_table(&self) -> Result<Vec<mounts::Mount>> {
        mounts::table()
    }

    fn mounts_of(&self, device: &Path) -> Result<Vec<(PathBuf, bool)>> {
        let number = blockdev::block_device(device)?;
        Ok(mounts::of_device(number)?
            .into_iter()
            .map(|mount| (mount.target, mount.read_only))
            .collect())
    }
}
