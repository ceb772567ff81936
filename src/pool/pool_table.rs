//! The pool's own table, built in one place: its size and low-water mark, its no-space policy
//! and read-only guard, and the growth that reloads it.

use super::*;

impl Pool {
    /// Give the pool the no-space policy `wanted` unless it has it: a reload of an owned
    /// pool's table, `lvchange --errorwhenfull` for an LVM pool. An adopted pool keeps its own.
    pub(super) fn apply_when_full(&self, dm: &Dm, wanted: WhenFull) -> Result<()> {
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
    pub(super) fn reload_owned(
        &self,
        dm: &Dm,
        data_blocks: Option<u64>,
        metadata_grew: bool,
    ) -> Result<()> {
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
    pub(super) fn table_length(&self, dm: &Dm) -> Result<Sectors> {
        Ok(Sectors(
            dm.table(&self.dm_name)?
                .iter()
                .map(|line| *line.length)
                .sum(),
        ))
    }

    /// Reload the pool's table over the devices in `params`, with `features`.
    pub(super) fn reload_pool_table(
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
}

/// The table of a pool thinstack owns: `blocks` data blocks, zeroing of new blocks skipped,
/// the no-space policy `when_full`.
pub(super) fn owned_table(
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
pub(super) fn low_water_mark(blocks: u64) -> DataBlocks {
    DataBlocks(LOW_WATER_BLOCKS.min(blocks / 10).max(1))
}

/// A pool table's feature arguments, without thinstack's read-only guard.
pub(super) fn features_without_read_only(
    params: &devicemapper::ThinPoolTargetParams,
) -> Vec<String> {
    params
        .feature_args
        .iter()
        .filter(|f| f.as_str() != READ_ONLY)
        .cloned()
        .collect()
}

/// The kernel's no-space policy as the config names it.
pub(super) fn when_full_of(policy: ThinPoolNoSpacePolicy) -> WhenFull {
    match policy {
        ThinPoolNoSpacePolicy::Error => WhenFull::Error,
        ThinPoolNoSpacePolicy::Queue => WhenFull::Queue,
    }
}

/// The parameters of the single thin-pool target of `name`.
pub(super) fn pool_params(dm: &Dm, name: &DmName) -> Result<devicemapper::ThinPoolTargetParams> {
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
pub(super) fn verify_owned_table(
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
