//! Pools on raw devices: `devices` (thinstack makes a pool on a data and a metadata device)
//! and `existing` (a pool someone else made, adopted).

use std::path::Path;

use devicemapper::{ThinPoolStatus, ThinPoolStatusSummary};

use super::record::{self, PoolRecord};
use super::{Backing, DevicesBacking, Pool};
use crate::config::Config;
use crate::crash;
use crate::error::{Error, ErrorKind, Result};
use crate::kernel::blockdev;
use crate::kernel::dm::Dm;
use crate::units::ByteSize;

/// The kernel formats metadata whose first block is zeros; any other content is read as a
/// (possibly foreign) superblock.
const METADATA_HEADER: usize = 4096;

/// Make the pool on the configured devices, or re-open it.
///
/// At creation (no complete record) both devices pass the safety checks of
/// [`blockdev::check_unused`] before anything is written; signatures are wiped only with
/// `force`; then the metadata device's first 4 KiB are zeroed so the kernel formats it. A
/// re-open never writes to the devices.
pub(super) fn open(config: &Config, dm: &Dm, record: Option<PoolRecord>) -> Result<Pool> {
    let setup = &config.pool.devices;
    let data = setup.data.as_ref().expect("checked by config").path();
    let metadata = setup.metadata.as_ref().expect("checked by config").path();
    let complete = record.as_ref().is_some_and(|r| r.complete);
    // A creation cut short after the pool device was made left it active: adopt it as it is.
    let interrupted_after_activation = !complete && dm.exists(&config.pool.name.pool_dm_name())?;
    if !complete && !interrupted_after_activation {
        prepare(config, data, metadata)?;
    }
    let backing = DevicesBacking {
        data: data.to_path_buf(),
        metadata: metadata.to_path_buf(),
    };
    let data_length = blockdev::size(data)?.sectors();
    let pool = Pool::activate_owned(
        config,
        dm,
        metadata,
        data,
        data_length,
        Backing::Devices(backing),
    )?;
    crash::point(crash::Point::DevicesActivated);
    if !complete {
        record::save_complete(config, config.block_size())?;
    }
    Ok(pool)
}

/// Check both devices, then record the creation, wipe (when forced) and zero the metadata head.
fn prepare(config: &Config, data: &Path, metadata: &Path) -> Result<()> {
    let force = config.pool.devices.force;
    let data_signatures = blockdev::check_unused(data, force)?;
    let metadata_signatures = blockdev::check_unused(metadata, force)?;
    record::save_started(config, config.block_size())?;
    crash::point(crash::Point::DevicesRecordWritten);
    blockdev::wipe(data, &data_signatures)?;
    blockdev::wipe(metadata, &metadata_signatures)?;
    blockdev::zero_start(metadata, METADATA_HEADER)?;
    crash::point(crash::Point::DevicesPrepared);
    tracing::info!(data = %data.display(), metadata = %metadata.display(), "devices prepared for a new pool");
    Ok(())
}

/// The devices' sizes.
pub(super) fn sizes(backing: &DevicesBacking) -> Result<(ByteSize, ByteSize)> {
    Ok((
        blockdev::size(&backing.data)?,
        blockdev::size(&backing.metadata)?,
    ))
}

/// Take up the devices' current sizes (after they were grown outside thinstack).
pub(super) fn extend(
    pool: &Pool,
    dm: &Dm,
    backing: &DevicesBacking,
    data: Option<ByteSize>,
    metadata: Option<ByteSize>,
) -> Result<(ByteSize, ByteSize)> {
    let (data_size, metadata_size) = sizes(backing)?;
    for (what, asked, now, device) in [
        ("data", data, data_size, &backing.data),
        ("metadata", metadata, metadata_size, &backing.metadata),
    ] {
        if asked.is_some_and(|asked| asked != now) {
            return Err(Error::invalid(format!(
                "a devices pool is as large as its devices: {} ({what}) is {now}; grow the device itself, then run `thinstack pool extend` without sizes",
                device.display()
            )));
        }
    }
    let status = pool.status(dm)?;
    let blocks = *data_size.sectors() / *pool.block_size();
    let blocks_now = *status.data.total.sectors() / *pool.block_size();
    let data_blocks = (blocks > blocks_now).then_some(blocks);
    let metadata_grew = metadata_size > status.metadata.total;
    pool.reload_owned(dm, data_blocks, metadata_grew)?;
    Ok((data_size, metadata_size))
}

/// Adopt the thin pool named by `pool.existing.device`. On first use it must be empty
/// (transaction id 0, no data used, no thin devices); later its record vouches for it.
pub(super) fn adopt(config: &Config, dm: &Dm, record: Option<PoolRecord>) -> Result<Pool> {
    let dm_name = record::existing_dm_name(config)?;
    if !dm.exists(&dm_name)? {
        return Err(Error::not_found(format!(
            "thin pool {} (pool.existing.device) is not active; activate it (lvchange -ay, or dmsetup create), then start thinstackd",
            &*dm_name
        )));
    }
    let mut pool = Pool::from_active(
        config.pool.name.clone(),
        dm,
        dm_name,
        Backing::Existing,
        false,
    )?;
    // A failed pool is reported as such before anything is asked of it.
    pool.ensure_usable(dm)?;
    if record.is_none() {
        ensure_empty(&pool, dm, config)?;
        record::save_complete(config, ByteSize::from_sectors(pool.block_size()))?;
        tracing::info!(pool = %pool.dm_name(), "adopted an empty thin pool");
    }
    Ok(pool)
}

/// Refuse a foreign pool that holds anything: its thin ids would collide with ours, and its
/// data belongs to someone else.
fn ensure_empty(pool: &Pool, dm: &Dm, config: &Config) -> Result<()> {
    let status = match dm.pool_status(pool.dm_name())? {
        ThinPoolStatus::Working(status) => status,
        _ => {
            return Err(Error::new(
                ErrorKind::Kernel,
                format!("thin pool {} has failed in the kernel", pool.dm_name()),
            ))
        }
    };
    if status.summary == ThinPoolStatusSummary::ReadOnly {
        // Its thin ids are read through a metadata snapshot, a message a read-only pool
        // refuses: its emptiness cannot be shown, and nothing could be made in it.
        return Err(Error::new(
            ErrorKind::Kernel,
            format!(
                "thin pool {} is read-only, so thinstack cannot check that it is empty before \
                 adopting it; make it writable (reload its table without read_only, or repair \
                 its metadata), then start thinstackd again",
                pool.dm_name()
            ),
        ));
    }
    let thin_ids = super::real::thin_ids_of(dm, pool)?;
    let used = *status.usage.used_data;
    if status.transaction_id == 0 && used == 0 && thin_ids.is_empty() {
        return Ok(());
    }
    Err(Error::inconsistent(format!(
        "thin pool {} is not empty (transaction id {}, {used} data blocks used, {} thin devices), and {} holds no thinstack records for it; \
         thinstack adopts only an empty pool or one it already manages: give it a new, empty pool",
        pool.dm_name(),
        status.transaction_id,
        thin_ids.len(),
        config.state_dir.path().display()
    )))
}
