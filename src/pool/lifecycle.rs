//! The pool's life cycle: brought up at start (made, re-activated or adopted, checked when
//! flagged, made usable), checked, taken down, destroyed.

use super::*;

impl Pool {
    /// A kill between the ioctls of one step leaves devices half done: the pool or a thin
    /// device suspended (inside a reload, a snapshot of an active origin, a resize), where every
    /// I/O on it waits; or a thin device created without its table yet, which has no node and
    /// serves nothing. The suspended are resumed (with the table the step loaded, which its
    /// record already holds), the tableless removed.
    pub(super) fn settle_devices(&self, dm: &Dm) -> Result<()> {
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

    /// A pool whose dm device is `dm_name` (active), over the metadata device in its table.
    pub(super) fn from_active(
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
    pub(super) fn activate_owned(
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
    pub(super) fn ensure_usable(&mut self, dm: &Dm) -> Result<()> {
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
    pub(super) fn lift_metadata_guard_if_room(&self, dm: &Dm) -> Result<()> {
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
    pub(super) fn check_flagged(&mut self, dm: &Dm) -> Result<()> {
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
    pub(super) fn active_thin_names(&self, dm: &Dm) -> Result<Vec<String>> {
        Ok(dm
            .list_with_prefix(&self.name.dm_prefix())?
            .into_iter()
            .filter(|name| name.as_ref() != self.dm_name.as_ref())
            .map(|name| name.to_string())
            .collect())
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
            Backend::Rbd => return Err(not_dm_thin(config)),
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
            Backend::Rbd => Err(not_dm_thin(config)),
        }
    }

    /// Deactivate the pool (it and its data stay): loop devices are detached, LVM volumes
    /// deactivated; an adopted pool is left active.
    ///
    /// Returns a `Busy` error, naming them, while thin devices of the pool are active.
    pub fn teardown(self, dm: &Dm) -> Result<()> {
        self.deactivate(dm)
    }

    pub(super) fn deactivate(&self, dm: &Dm) -> Result<()> {
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

/// The refusal of a dm-thin operation for a pool of RBD images.
fn not_dm_thin(config: &Config) -> Error {
    Error::new(
        crate::error::ErrorKind::Unsupported,
        format!(
            "pool {} is on Ceph RBD images (pool.backend = \"rbd\"): it has no dm-thin metadata; \
             the cluster checks its own data (`ceph health detail`)",
            config.pool.name
        ),
    )
}
