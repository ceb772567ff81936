//! The `lvm` backend ("direct-lvm"): thinstack makes a volume group on raw disks and a thin
//! pool in it, the way Docker's documentation did by hand:
//!
//! 1. every disk is checked ([`blockdev::check_unused`]), before anything is written;
//! 2. the pool record is written (incomplete), so a creation cut short is resumed;
//! 3. `pvcreate`, `vgcreate`, `lvcreate` (data and metadata), `lvconvert --thinpool` with
//!    zeroing off; each step is skipped when LVM shows it done;
//! 4. an LVM profile carries the autoextend settings, and monitoring is switched on where
//!    dmeventd runs. Where it does not, thinstackd extends the pool itself.
//!
//! The pool LV is named after the pool; LVM activates it as the thin-pool target itself
//! (`<vg>-<pool>`), which thinstack sends its messages to.

use std::path::{Path, PathBuf};

use devicemapper::DmNameBuf;

use super::record::{self, PoolRecord};
use super::{Backing, LvmBacking, Pool};
use crate::config::{Config, LvmConfig};
use crate::crash;
use crate::error::{Error, ErrorKind, Result};
use crate::kernel::blockdev;
use crate::kernel::dm::Dm;
use crate::kernel::lvm::{self, Lvm, VolumeGroup};
use crate::units::ByteSize;
use crate::vocab::{Space, WhenFull};

/// Where LVM looks for profiles (`config/profile_dir`).
const PROFILE_DIR: &str = "/etc/lvm/profile";

/// LVM refuses thin-pool metadata below 2 MiB.
const METADATA_MIN: u64 = 2 << 20;

/// Create the pool (or finish a creation cut short), activate it when inactive (after a
/// reboot), or adopt it when active.
pub(super) fn open(config: &Config, dm: &Dm, record: Option<PoolRecord>) -> Result<Pool> {
    // Commands see only the pool's disks: those recorded (with any added later), or, while
    // the pool is being made, those configured.
    let devices = match record.as_ref().and_then(|r| r.lvm.as_ref()) {
        Some(setup) if record.as_ref().is_some_and(|r| r.complete) => setup.devices.clone(),
        _ => config
            .pool
            .lvm
            .devices
            .iter()
            .map(|d| d.path().to_path_buf())
            .collect(),
    };
    let backing = LvmBacking {
        volume_group: config.pool.lvm.volume_group.to_string(),
        logical_volume: config.pool.name.to_string(),
        lvm: Lvm::on(devices),
    };
    let created = match record {
        Some(record) if record.complete => false,
        previous => {
            create(config, &backing, previous.is_some())?;
            true
        }
    };
    let pool_lv = find_pool_lv(&backing)?;
    write_profile(config)?;
    if !pool_lv.active {
        backing.lvm.run(&["lvchange", "-ay", &backing.path()])?;
        tracing::info!(volume = %backing.path(), "activated the LVM thin pool");
    }
    Pool::from_active(
        config.pool.name.clone(),
        dm,
        pool_dm_name(config)?,
        Backing::Lvm(backing),
        created,
    )
}

/// The dm name LVM gives the pool LV of `config`.
pub fn pool_dm_name(config: &Config) -> Result<DmNameBuf> {
    let vg = config.pool.lvm.volume_group.as_str();
    DmNameBuf::new(lvm::dm_name(vg, config.pool.name.as_str()))
        .map_err(|_| Error::invalid(format!("{vg}/{} has no usable dm name", config.pool.name)))
}

/// Call `check` with the pool's metadata volume, activated read-only (as an LVM component)
/// for the call while the pool is inactive.
pub(super) fn with_inactive_metadata<T>(
    config: &Config,
    devices: Vec<PathBuf>,
    check: impl FnOnce(&Path) -> Result<T>,
) -> Result<T> {
    let lvm = Lvm::on(devices);
    let component = format!(
        "{}/{}_tmeta",
        config.pool.lvm.volume_group, config.pool.name
    );
    lvm.run(&["lvchange", "-ay", "-y", &component])?;
    let node = Path::new("/dev/mapper").join(lvm::dm_name(
        config.pool.lvm.volume_group.as_str(),
        &format!("{}_tmeta", config.pool.name),
    ));
    let result = check(&node);
    let deactivated = lvm.run(&["lvchange", "-an", &component]);
    let result = result?;
    deactivated?;
    Ok(result)
}

impl LvmBacking {
    /// `vg/lv`, as LVM commands take it.
    pub fn path(&self) -> String {
        format!("{}/{}", self.volume_group, self.logical_volume)
    }
}

/// The pool LV, which must exist and be a thin pool.
fn find_pool_lv(backing: &LvmBacking) -> Result<lvm::LogicalVolume> {
    if backing.lvm.volume_group(&backing.volume_group)?.is_none() {
        return Err(Error::inconsistent(format!(
            "volume group {} of this pool is gone (are its disks attached?); attach them, or destroy the pool's records to start anew",
            backing.volume_group
        )));
    }
    match backing
        .lvm
        .logical_volume(&backing.volume_group, &backing.logical_volume)?
    {
        Some(lv) if lv.is_thin_pool() => Ok(lv),
        Some(lv) => Err(Error::inconsistent(format!(
            "{} exists but is not a thin pool (attributes {}); it is not thinstack's",
            backing.path(),
            lv.attr
        ))),
        None => Err(Error::inconsistent(format!(
            "thin pool {} is gone from its volume group; it was removed outside thinstack",
            backing.path()
        ))),
    }
}

/// Every step of making the pool, each skipped when already done (a resumed creation).
fn create(config: &Config, backing: &LvmBacking, resuming: bool) -> Result<()> {
    let settings = &config.pool.lvm;
    let vg_name = &backing.volume_group;
    // A new VG's name must be free on every disk, not only on ours: this one look (and the
    // vgcreate) scans them all.
    let everywhere = Lvm::default();
    let existing_vg = if resuming {
        backing.lvm.volume_group(vg_name)?
    } else {
        everywhere.volume_group(vg_name)?
    };
    if existing_vg.is_some() && !resuming {
        return Err(Error::new(
            ErrorKind::AlreadyExists,
            format!(
                "volume group {vg_name} exists already, and thinstack makes its own; choose another pool.lvm.volume_group, or adopt a thin pool in it with backend = \"existing\""
            ),
        ));
    }
    let devices: Vec<&Path> = settings.devices.iter().map(|d| d.path()).collect();
    let mut fresh = Vec::new();
    for device in &devices {
        // A resumed creation finds its own earlier work: a PV, perhaps already in the VG.
        if resuming && lvm::is_physical_volume(device)? {
            match lvm::volume_group_of(device)? {
                Some(vg) if &vg != vg_name => {}
                _ => continue,
            }
        }
        fresh.push((*device, blockdev::check_unused(device, settings.force)?));
    }
    if !resuming {
        record::save_started(config, config.block_size())?;
        crash::point(crash::Point::LvmRecordWritten);
    }
    for (device, signatures) in &fresh {
        blockdev::wipe(device, signatures)?;
        backing.lvm.run_with_paths(&["pvcreate", "-y"], &[device])?;
    }
    crash::point(crash::Point::LvmPvsCreated);
    let vg = match existing_vg {
        Some(vg) => vg,
        None => {
            everywhere.run_with_paths(&["vgcreate", "--addtag", "thinstack", vg_name], &devices)?;
            tracing::info!(volume_group = %vg_name, devices = ?devices, "volume group created");
            crash::point(crash::Point::LvmVgCreated);
            backing.lvm.volume_group(vg_name)?.ok_or_else(|| {
                Error::inconsistent(format!("volume group {vg_name} vanished after vgcreate"))
            })?
        }
    };
    make_thin_pool(settings, backing, &vg)?;
    attach_profile(config, backing)?;
    crash::point(crash::Point::LvmProfileAttached);
    record::save_complete(config, config.block_size())
}

/// Data and metadata LVs, converted to a thin pool without zeroing.
fn make_thin_pool(settings: &LvmConfig, backing: &LvmBacking, vg: &VolumeGroup) -> Result<()> {
    let lv = &backing.logical_volume;
    let meta_lv = format!("{lv}meta");
    let existing = backing.lvm.logical_volumes(&vg.name)?;
    let has = |name: &str| existing.iter().find(|l| l.name == name);
    if has(lv).is_some_and(|pool| pool.is_thin_pool()) {
        return Ok(());
    }
    let (data, metadata) = extents_for(settings, vg)?;
    for (name, extents, point) in [
        (lv.as_str(), data, crash::Point::LvmDataLvCreated),
        (
            meta_lv.as_str(),
            metadata,
            crash::Point::LvmMetadataLvCreated,
        ),
    ] {
        if has(name).is_none() {
            backing.lvm.run(&[
                "lvcreate",
                "-y",
                "--wipesignatures",
                "y",
                "-n",
                name,
                "-l",
                &extents.to_string(),
                &vg.name,
            ])?;
            crash::point(point);
        }
    }
    let chunk = format!("{}k", settings.chunk_size.size().bytes() / 1024);
    backing.lvm.run(&[
        "lvconvert",
        "-y",
        "--zero",
        "n",
        "-c",
        &chunk,
        "--thinpool",
        &backing.path(),
        "--poolmetadata",
        &format!("{}/{meta_lv}", vg.name),
    ])?;
    crash::point(crash::Point::LvmConverted);
    tracing::info!(pool = %backing.path(), chunk_size = %settings.chunk_size.size(), "LVM thin pool created");
    Ok(())
}

/// Extents for data and metadata: their shares of the VG, the metadata at least 2 MiB, and
/// room left for LVM's spare metadata volume (used by `lvconvert --repair`).
fn extents_for(settings: &LvmConfig, vg: &VolumeGroup) -> Result<(u64, u64)> {
    let min_metadata = METADATA_MIN.div_ceil(vg.extent_size);
    let metadata = settings.metadata_percent.of(vg.extents).max(min_metadata);
    let data = (vg.extents * u64::from(settings.data_percent.value()) / 100)
        .min(vg.extents.saturating_sub(2 * metadata));
    if data == 0 {
        return Err(Error::new(
            ErrorKind::NoSpace,
            format!(
                "volume group {} is too small for a thin pool ({} extents of {}); give it larger disks",
                vg.name,
                vg.extents,
                ByteSize::from_bytes(vg.extent_size)
            ),
        ));
    }
    Ok((data, metadata))
}

fn profile_name(config: &Config) -> String {
    format!("thinstack-{}", config.pool.name)
}

/// The autoextend settings as an LVM profile, rewritten at every start so edits take effect.
fn write_profile(config: &Config) -> Result<()> {
    let lvm = &config.pool.lvm;
    let text = format!(
        "# Written by thinstack for pool {}; rewritten at each start of thinstackd.\n\
         activation {{\n\tthin_pool_autoextend_threshold = {}\n\tthin_pool_autoextend_percent = {}\n}}\n",
        config.pool.name,
        lvm.autoextend_threshold.value(),
        lvm.autoextend_percent.value()
    );
    let path = Path::new(PROFILE_DIR).join(format!("{}.profile", profile_name(config)));
    if std::fs::read_to_string(&path).is_ok_and(|old| old == text) {
        return Ok(());
    }
    std::fs::create_dir_all(PROFILE_DIR)
        .map_err(|e| Error::io(format!("creating {PROFILE_DIR}"), e))?;
    crate::records::write_atomic(&path, text.as_bytes())
}

/// Attach the profile, and switch monitoring on where dmeventd runs.
fn attach_profile(config: &Config, backing: &LvmBacking) -> Result<()> {
    write_profile(config)?;
    backing.lvm.run(&[
        "lvchange",
        "--metadataprofile",
        &profile_name(config),
        &backing.path(),
    ])?;
    if lvm::dmeventd_running() {
        backing
            .lvm
            .run(&["lvchange", "--monitor", "y", &backing.path()])?;
        tracing::info!(pool = %backing.path(), "dmeventd monitors the pool; thinstackd extends it when dmeventd does not");
    } else {
        tracing::info!(pool = %backing.path(), "dmeventd is not running; thinstackd extends the pool itself");
    }
    Ok(())
}

/// Data and metadata sizes of the pool LV.
pub(super) fn sizes(backing: &LvmBacking) -> Result<(ByteSize, ByteSize)> {
    let lv = find_pool_lv(backing)?;
    Ok((
        ByteSize::from_bytes(lv.size),
        ByteSize::from_bytes(lv.metadata_size),
    ))
}

/// `lvextend` the data and metadata to the sizes given. LVM reloads the pool itself.
pub(super) fn extend(
    backing: &LvmBacking,
    data: Option<ByteSize>,
    metadata: Option<ByteSize>,
) -> Result<(ByteSize, ByteSize)> {
    let (data_now, metadata_now) = sizes(backing)?;
    for (what, asked, now) in [
        ("data", data, data_now),
        ("metadata", metadata, metadata_now),
    ] {
        if asked.is_some_and(|asked| asked < now) {
            return Err(Error::invalid(format!(
                "the pool's {what} is {now} already; {} would shrink it, and pools only grow",
                asked.expect("checked")
            )));
        }
    }
    if let Some(size) = data.filter(|&size| size > data_now) {
        lvextend(backing, "-L", &format!("{}b", size.bytes()), "data")?;
    }
    if let Some(size) = metadata.filter(|&size| size > metadata_now) {
        let bytes = format!("{}b", size.bytes());
        lvextend(backing, "--poolmetadatasize", &bytes, "metadata")?;
    }
    sizes(backing)
}

fn lvextend(backing: &LvmBacking, option: &str, size: &str, what: &str) -> Result<()> {
    let extended = backing
        .lvm
        .run(&["lvextend", "-y", option, size, &backing.path()]);
    extended.map_err(|e| {
        if e.message().contains("Insufficient free space") {
            Error::new(
                ErrorKind::NoSpace,
                format!(
                    "volume group {} has no room to grow the pool's {what} ({size}); add a disk with `thinstack pool add-device DEVICE` ({})",
                    backing.volume_group,
                    e.message()
                ),
            )
        } else {
            e
        }
    })?;
    tracing::info!(pool = %backing.path(), area = what, size = %size, "extended the LVM thin pool");
    Ok(())
}

/// Extents to add to the pool's data and metadata volumes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Growth {
    /// Extents for the data.
    pub data: u64,
    /// Extents for the metadata.
    pub metadata: u64,
}

/// The metadata size that keeps pace with `data` bytes of data: the proportion the pool was
/// made with (`metadata_percent` to `data_percent`), at most 16G.
pub fn metadata_wanted(data: u64, config: &LvmConfig) -> u64 {
    let share = u128::from(config.metadata_percent.value());
    let data_share = u128::from(config.data_percent.value()).max(1);
    let wanted = u128::from(data) * share / data_share;
    (wanted as u64).min(crate::config::METADATA_SIZE_MAX.bytes())
}

/// How far to grow, from the pool's space: data by `autoextend_percent` of its size (at least
/// one extent) when its use crossed the threshold; metadata by as much when its use crossed
/// it, and in any case up to [`metadata_wanted`] for the data after growth (so metadata keeps
/// pace with data whoever grew it, dmeventd included); all within the VG's free extents.
pub fn plan_growth(data: &Space, metadata: &Space, vg: &VolumeGroup, config: &LvmConfig) -> Growth {
    let threshold = f64::from(config.autoextend_threshold.value());
    if threshold >= 100.0 {
        return Growth::default();
    }
    let extent = vg.extent_size;
    let mut free = vg.free_extents;
    let mut take = |bytes: u64| -> u64 {
        let extents = bytes.div_ceil(extent).min(free);
        free -= extents;
        extents
    };
    let percent = config.autoextend_percent;
    let data_step = if data.percent_used() >= threshold {
        take(percent.of(data.total.bytes()).max(1))
    } else {
        0
    };
    let data_after = data.total.bytes() + data_step * extent;
    let metadata_now = metadata.total.bytes();
    let over = if metadata.percent_used() >= threshold {
        percent.of(metadata_now).max(1)
    } else {
        0
    };
    let short = metadata_wanted(data_after, config).saturating_sub(metadata_now);
    let cap = crate::config::METADATA_SIZE_MAX
        .bytes()
        .saturating_sub(metadata_now);
    Growth {
        data: data_step,
        metadata: take(over.max(short).min(cap)),
    }
}

/// Add `growth` to the pool's volumes (relative `lvextend`, so an extension dmeventd made in
/// the meantime is never undone or refused). LVM reloads the pool itself.
pub fn grow(backing: &LvmBacking, growth: Growth, extent_size: u64) -> Result<()> {
    if growth.data > 0 {
        let extents = format!("+{}", growth.data);
        lvextend(backing, "-l", &extents, "data")?;
    }
    if growth.metadata > 0 {
        let bytes = format!("+{}b", growth.metadata * extent_size);
        lvextend(backing, "--poolmetadatasize", &bytes, "metadata")?;
    }
    Ok(())
}

/// The volume group, for planning growth.
pub fn volume_group(backing: &LvmBacking) -> Result<VolumeGroup> {
    backing
        .lvm
        .volume_group(&backing.volume_group)?
        .ok_or_else(|| {
            Error::inconsistent(format!("volume group {} is gone", backing.volume_group))
        })
}

/// Grow the VG with another disk, after the same safety checks as at creation.
pub fn add_device(config: &Config, backing: &LvmBacking, device: &Path, force: bool) -> Result<()> {
    let signatures = blockdev::check_unused(device, force)?;
    blockdev::wipe(device, &signatures)?;
    Lvm::on(vec![device.to_path_buf()]).run_with_paths(&["pvcreate", "-y"], &[device])?;
    backing.lvm.add(device.to_path_buf());
    backing
        .lvm
        .run_with_paths(&["vgextend", &backing.volume_group], &[device])?;
    tracing::info!(volume_group = %backing.volume_group, device = %device.display(), "disk added to the volume group");
    let path = record::path(config);
    let mut saved: PoolRecord = crate::records::read_json(&path)?.ok_or_else(|| {
        Error::inconsistent(format!("the pool record {} is missing", path.display()))
    })?;
    if let Some(setup) = saved.lvm.as_mut() {
        setup.devices.push(device.to_path_buf());
    }
    record::save(config, &saved)
}

/// Deactivate and reactivate the pool: LVM runs thin_check (clearing `needs_check` when the
/// metadata is clean) as it activates.
pub(super) fn reactivate(backing: &LvmBacking) -> Result<()> {
    deactivate(backing)?;
    backing
        .lvm
        .run(&["lvchange", "-ay", &backing.path()])
        .map_err(|e| {
            e.context(format!(
                "activating {} after a metadata check",
                backing.path()
            ))
        })?;
    Ok(())
}

/// Set what writes meet when the pool is full (LVM reloads the pool's table).
pub(super) fn set_when_full(backing: &LvmBacking, when_full: WhenFull) -> Result<()> {
    let flag = match when_full {
        WhenFull::Error => "y",
        WhenFull::Queue | WhenFull::Auto => "n",
    };
    backing
        .lvm
        .run(&["lvchange", "--errorwhenfull", flag, &backing.path()])
        .map(drop)
        .map_err(|e| e.context(format!("setting pool.when_full on {}", backing.path())))
}

/// Deactivate the pool LV.
pub(super) fn deactivate(backing: &LvmBacking) -> Result<()> {
    backing.lvm.run(&["lvchange", "-an", &backing.path()])?;
    Ok(())
}

/// Remove the pool LV, then the VG and the PV labels when nothing else is in the VG, and the
/// profile.
pub(super) fn destroy(config: &Config, backing: &LvmBacking) -> Result<()> {
    let vg = &backing.volume_group;
    let lvm = &backing.lvm;
    let physical: Vec<PathBuf> = lvm.physical_volumes(vg)?;
    lvm.run(&["lvremove", "-y", &backing.path()])?;
    let others: Vec<String> = lvm
        .logical_volumes(vg)?
        .into_iter()
        .filter(|lv| !lv.is_hidden())
        .map(|lv| lv.name)
        .collect();
    if others.is_empty() {
        lvm.run(&["vgremove", "-y", vg])?;
        let paths: Vec<&Path> = physical.iter().map(PathBuf::as_path).collect();
        lvm.run_with_paths(&["pvremove", "-y"], &paths)?;
        tracing::info!(volume_group = %vg, devices = ?physical, "volume group and PV labels removed");
    } else {
        tracing::warn!(volume_group = %vg, others = ?others, "the volume group holds other volumes; it is left in place");
    }
    let profile = Path::new(PROFILE_DIR).join(format!("{}.profile", profile_name(config)));
    crate::records::remove(&profile)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::units::Percent;

    fn vg(extents: u64, free: u64) -> VolumeGroup {
        VolumeGroup {
            name: "vg".into(),
            extent_size: 4 << 20,
            extents,
            free_extents: free,
        }
    }

    #[test]
    fn extents_leave_room_for_the_spare_and_metadata_is_at_least_2m() {
        let settings = LvmConfig::default();
        assert_eq!(extents_for(&settings, &vg(1000, 1000)).unwrap(), (950, 10));
        // 1% of 64 extents rounds up to 1 extent (4 MiB); data keeps room for the spare.
        assert_eq!(extents_for(&settings, &vg(64, 64)).unwrap(), (60, 1));
        assert_eq!(
            extents_for(&settings, &vg(2, 2)).unwrap_err().kind(),
            ErrorKind::NoSpace
        );
    }

    #[test]
    fn growth_follows_the_threshold_keeps_metadata_in_pace_and_stops_at_a_full_vg() {
        let mib = |n: u64| n << 20;
        let space = |used: u64, total: u64| Space::new(mib(used), mib(total));
        let mut config = LvmConfig {
            autoextend_threshold: Percent::new(50).unwrap(),
            ..LvmConfig::default()
        };
        config.data_percent = Percent::new(20).unwrap();
        config.metadata_percent = Percent::new(1).unwrap();
        // Data over: +20% (3 extents of 4M for 48M); metadata 4M is still 1/20 of 60M.
        assert_eq!(
            plan_growth(&space(30, 48), &space(1, 4), &vg(100, 50), &config),
            Growth {
                data: 3,
                metadata: 0
            }
        );
        // Data grown past 80M (by dmeventd, say): metadata catches up to 1/20 of it.
        assert_eq!(
            plan_growth(&space(30, 84), &space(1, 4), &vg(100, 50), &config),
            Growth {
                data: 0,
                metadata: 1
            }
        );
        // Metadata over on its own: +20%, at least one extent.
        assert_eq!(
            plan_growth(&space(1, 48), &space(3, 4), &vg(100, 50), &config),
            Growth {
                data: 0,
                metadata: 1
            }
        );
        // Nothing over, or no free extents: nothing.
        assert_eq!(
            plan_growth(&space(1, 48), &space(1, 4), &vg(100, 50), &config),
            Growth::default()
        );
        assert_eq!(
            plan_growth(&space(40, 48), &space(3, 4), &vg(100, 0), &config),
            Growth::default()
        );
        // One free extent goes to the data.
        assert_eq!(
            plan_growth(&space(40, 48), &space(3, 4), &vg(100, 1), &config),
            Growth {
                data: 1,
                metadata: 0
            }
        );
        // A threshold of 100% never grows anything.
        config.autoextend_threshold = Percent::new(100).unwrap();
        assert_eq!(
            plan_growth(&space(48, 48), &space(4, 4), &vg(100, 50), &config),
            Growth::default()
        );
    }
}
