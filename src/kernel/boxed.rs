//! The seam's traits for boxed kernels, so the daemon holds either kernel (the real one, or
//! the sim of `thinstackd --sim`) behind one type.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use devicemapper::Device;

use super::device_io::ThinIo;
use super::{
    mounts, superblock, DeletedLoopFile, DeltaRun, DmDevice, FsKernel, PoolDetails, PoolKernel,
    PoolUsage, Room, ThinUsage,
};
use crate::error::Result;
use crate::kernel::thin_tools::CheckReport;
use crate::names::ThinId;
use crate::units::ByteSize;
use crate::vocab::FsType;

impl<T: PoolKernel + ?Sized> PoolKernel for Box<T> {
    fn details(&self) -> PoolDetails {
        (**self).details()
    }

    fn usage(&self) -> Result<PoolUsage> {
        (**self).usage()
    }

    fn usage_as_committed(&self) -> Result<PoolUsage> {
        (**self).usage_as_committed()
    }

    fn create_thin(&self, id: ThinId) -> Result<()> {
        (**self).create_thin(id)
    }

    fn snapshot(&self, origin: ThinId, new: ThinId) -> Result<()> {
        (**self).snapshot(origin, new)
    }

    fn delete_thin(&self, id: ThinId) -> Result<()> {
        (**self).delete_thin(id)
    }

    fn catalog(&self) -> Option<&dyn super::catalog::Catalog> {
        (**self).catalog()
    }

    fn other_hosts(&self) -> Result<Vec<String>> {
        (**self).other_hosts()
    }

    fn break_writer_lock(&self, id: ThinId) -> Result<super::catalog::BrokenLock> {
        (**self).break_writer_lock(id)
    }

    fn settle_snapshot(&self, origin: ThinId, new: ThinId, made: bool) -> Result<()> {
        (**self).settle_snapshot(origin, new, made)
    }

    fn set_transaction_id(&self, old: u64, new: u64) -> Result<()> {
        (**self).set_transaction_id(old, new)
    }

    fn thin_ids(&self) -> Result<BTreeSet<ThinId>> {
        (**self).thin_ids()
    }

    fn activate(&self, id: ThinId, size: ByteSize, read_only: bool) -> Result<PathBuf> {
        (**self).activate(id, size, read_only)
    }

    fn deactivate(&self, id: ThinId) -> Result<()> {
        (**self).deactivate(id)
    }

    fn active_node(&self, id: ThinId) -> Result<Option<PathBuf>> {
        (**self).active_node(id)
    }

    fn active_read_only(&self, id: ThinId) -> Result<Option<bool>> {
        (**self).active_read_only(id)
    }

    fn active_ids(&self) -> Result<BTreeSet<ThinId>> {
        (**self).active_ids()
    }

    fn resize(&self, id: ThinId, size: ByteSize) -> Result<()> {
        (**self).resize(id, size)
    }

    fn mapped(&self, id: ThinId) -> Result<ByteSize> {
        (**self).mapped(id)
    }

    fn discard(&self, id: ThinId) -> Result<()> {
        (**self).discard(id)
    }

    fn thin_usage(&self) -> Result<BTreeMap<ThinId, ThinUsage>> {
        (**self).thin_usage()
    }

    fn thin_delta(&self, base: Option<ThinId>, id: ThinId) -> Result<Vec<DeltaRun>> {
        (**self).thin_delta(base, id)
    }

    fn open_thin(&self, id: ThinId) -> Result<Box<dyn ThinIo>> {
        (**self).open_thin(id)
    }

    fn room(&self) -> Result<Room> {
        (**self).room()
    }

    fn extend(
        &self,
        data: Option<ByteSize>,
        metadata: Option<ByteSize>,
    ) -> Result<(ByteSize, ByteSize)> {
        (**self).extend(data, metadata)
    }

    fn grow_volumes(
        &self,
        group: &super::lvm::VolumeGroup,
        data: u64,
        metadata: u64,
    ) -> Result<()> {
        (**self).grow_volumes(group, data, metadata)
    }

    fn volume_group(&self) -> Result<super::lvm::VolumeGroup> {
        (**self).volume_group()
    }

    fn read_only_guard(&self) -> Result<bool> {
        (**self).read_only_guard()
    }

    fn set_read_only_guard(&self, on: bool) -> Result<bool> {
        (**self).set_read_only_guard(on)
    }

    fn check_metadata(&self) -> Result<CheckReport> {
        (**self).check_metadata()
    }

    fn add_device(&self, device: &Path, force: bool) -> Result<ByteSize> {
        (**self).add_device(device, force)
    }

    fn monitored(&self) -> bool {
        (**self).monitored()
    }

    fn destroy(&self) -> Result<()> {
        (**self).destroy()
    }

    fn thin_device_numbers(&self) -> Result<HashMap<Device, ThinId>> {
        (**self).thin_device_numbers()
    }

    fn dm_devices(&self) -> Result<Vec<DmDevice>> {
        (**self).dm_devices()
    }

    fn remove_dm_device(&self, name: &str) -> Result<()> {
        (**self).remove_dm_device(name)
    }

    fn deleted_loop_files(&self) -> Result<Vec<DeletedLoopFile>> {
        (**self).deleted_loop_files()
    }

    fn loop_held(&self, device: &Path) -> Result<bool> {
        (**self).loop_held(device)
    }

    fn detach_loop(&self, device: &Path) -> Result<()> {
        (**self).detach_loop(device)
    }
}

impl<T: FsKernel + ?Sized> FsKernel for Box<T> {
    fn mkfs(&self, fs: FsType, device: &Path, extra: &[String]) -> Result<String> {
        (**self).mkfs(fs, device, extra)
    }

    fn mount(
        &self,
        device: &Path,
        target: &Path,
        fs: FsType,
        read_only: bool,
        options: &[String],
    ) -> Result<()> {
        (**self).mount(device, target, fs, read_only, options)
    }

    fn unmount(&self, target: &Path, device: &Path) -> Result<()> {
        (**self).unmount(target, device)
    }

    fn grow(&self, fs: FsType, device: &Path, mount_point: &Path) -> Result<()> {
        (**self).grow(fs, device, mount_point)
    }

    fn is_mounted(&self, target: &Path) -> Result<bool> {
        (**self).is_mounted(target)
    }

    fn mounts_of(&self, device: &Path) -> Result<Vec<(PathBuf, bool)>> {
        (**self).mounts_of(device)
    }

    fn probe(&self, device: &Path) -> Result<Option<superblock::Found>> {
        (**self).probe(device)
    }

    fn mount_table(&self) -> Result<Vec<mounts::Mount>> {
        (**self).mount_table()
    }

    fn trim(&self, target: &Path) -> Result<ByteSize> {
        (**self).trim(target)
    }
}
