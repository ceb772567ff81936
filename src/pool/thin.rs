//! The pool's thin devices: made, snapshotted, activated and deactivated, deleted, and what
//! they map.

use super::*;

impl Pool {
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
}
