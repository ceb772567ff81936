//! Device-mapper through the kernel's ioctl interface (the `devicemapper` crate), no `dmsetup`.
//!
//! Every multi-step operation undoes what it did when a later step fails: a device whose table
//! does not load is removed again, and an origin suspended for a snapshot is resumed whether or
//! not the snapshot message succeeded.

use std::path::PathBuf;

use devicemapper::{
    DevId, Device, DeviceInfo, DmFlags, DmName, DmNameBuf, DmOptions, DmUuid, ThinPoolStatus,
    ThinPoolTargetParams, ThinStatus, DM,
};
use nix::errno::Errno;

use crate::error::{Error, ErrorKind, Result};
use crate::kernel::table::{Line, THIN_POOL_TARGET, THIN_TARGET};
use crate::names::ThinId;
use crate::units::{DataBlocks, Sectors};

/// The thin-pool feature that fails writes at once when the data is full.
pub const ERROR_IF_NO_SPACE: &str = "error_if_no_space";

/// A status line as the devicemapper crate reads it: start, length, target type, status.
type StatusLine = (u64, u64, String, String);

/// How a device change is announced to udev, and whether the call waits for udev.
///
/// Under emulation udev, not the kernel, is what a layer costs: each announcement that carries
/// a cookie makes udev run `dmsetup udevflags` and `dmsetup udevcomplete`, and the caller waits
/// for both. See `BENCHMARKS.md`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Udev {
    /// Every udev rule runs, and the call returns when udev is done, as with `dmsetup` (the
    /// pool device, which LVM and others may look for).
    Wait,
    /// udev skips its disk and other rules (no blkid probe, no by-uuid link, no LVM scan, no
    /// inotify watch), and the call returns once udev has made `/dev/mapper/<name>`.
    WaitPrivate,
    /// No cookie and no wait. udev finds no primary-source flag, so it gives the device the
    /// same private treatment as [`Udev::WaitPrivate`] from its database (set when the device
    /// was created), later. Race-free for thinstack: it hands out the kernel's own
    /// `/dev/dm-N` node, which exists as soon as the device does, and udev never opens a
    /// private device, so it cannot hold one that is being removed.
    #[default]
    NoWait,
}

impl Udev {
    /// The crate's options for an ioctl that announces a change under this policy.
    fn options(self) -> DmOptions {
        match self {
            Udev::Wait | Udev::NoWait => DmOptions::default(),
            Udev::WaitPrivate => DmOptions::private(),
        }
    }
}

/// A removal without a udev cookie that meets EBUSY is retried this often, this far apart:
/// not for udev (which never opens a private device) but for tools that scan every block
/// device for a moment (blkid, LVM, multipathd). A real user is reported busy after 100 ms.
const NO_COOKIE_BUSY_RETRIES: u64 = 10;
const NO_COOKIE_BUSY_INTERVAL: std::time::Duration = std::time::Duration::from_millis(10);

/// A handle on the kernel's device-mapper.
pub struct Dm {
    dm: DM,
    layer_udev: Udev,
    /// How many removals were retried for EBUSY (see [`Dm::busy_retries`]).
    busy_retries: std::sync::atomic::AtomicU64,
}

impl Dm {
    /// Open `/dev/mapper/control`.
    ///
    /// Returns an `Unsupported` error when the kernel has no device-mapper or this is not root.
    pub fn open() -> Result<Dm> {
        DM::new()
            .map(|dm| Dm {
                dm,
                layer_udev: Udev::default(),
                busy_retries: std::sync::atomic::AtomicU64::new(0),
            })
            .map_err(|e| Error::dm("open", "/dev/mapper/control", e))
    }

    /// The same handle, announcing layer devices to udev under `policy`.
    pub fn with_layer_udev(mut self, policy: Udev) -> Dm {
        self.layer_udev = policy;
        self
    }

    /// How layer (thin) devices are announced to udev.
    pub fn layer_udev(&self) -> Udev {
        self.layer_udev
    }

    /// How many times a removal without a udev cookie met EBUSY and was tried again, since
    /// this handle was opened (tests use it to show udev never held a device).
    pub fn busy_retries(&self) -> u64 {
        self.busy_retries.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether a device named `name` exists.
    pub fn exists(&self, name: &DmName) -> Result<bool> {
        Ok(self.try_info(name)?.is_some())
    }

    /// The device's info, or `None` when there is no device named `name` (one ioctl).
    pub fn try_info(&self, name: &DmName) -> Result<Option<DeviceInfo>> {
        match self.info(name) {
            Ok(info) => Ok(Some(info)),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The device's info (device number, open count, flags).
    pub fn info(&self, name: &DmName) -> Result<DeviceInfo> {
        self.dm
            .device_info(&DevId::Name(name))
            .map_err(|e| Error::dm("look up", &name.to_string(), e))
    }

    /// Names of all dm devices whose name starts with `prefix`.
    pub fn list_with_prefix(&self, prefix: &str) -> Result<Vec<DmNameBuf>> {
        let devices = self
            .dm
            .list_devices()
            .map_err(|e| Error::dm("list", "devices", e))?;
        Ok(devices
            .into_iter()
            .map(|(name, _, _)| name)
            .filter(|name| name.to_string().starts_with(prefix))
            .collect())
    }

    /// Create device `name` with `table` and make it live (resume), announced to udev under
    /// `udev`.
    ///
    /// When loading the table or resuming fails, the half-made device is removed again, so a
    /// failure leaves nothing behind. `read_only` makes the device refuse writes.
    pub fn create_device(
        &self,
        name: &DmName,
        uuid: Option<&DmUuid>,
        table: &[Line],
        read_only: bool,
        udev: Udev,
    ) -> Result<DeviceInfo> {
        check_target_names(table)?;
        let raw: Vec<_> = table.iter().map(Line::raw).collect();
        let flags = if read_only {
            DmFlags::DM_READONLY
        } else {
            DmFlags::empty()
        };
        let created = self
            .dm
            .device_create(name, uuid, DmOptions::default().set_flags(flags))
            .map_err(|e| {
                let err = Error::dm("create", &name.to_string(), e);
                // The kernel answers EBUSY when the name (or uuid) is taken.
                if err.errno() == Some(Errno::EBUSY) {
                    Error::new(
                        ErrorKind::AlreadyExists,
                        format!("create {name}: a device with that name or uuid exists already"),
                    )
                    .with_source(err)
                } else {
                    err
                }
            })?;
        let id = DevId::Name(name);
        let loaded = self
            .dm
            .table_load(&id, &raw, DmOptions::default().set_flags(flags))
            .map_err(|e| self.explain_table_error(name, table, e))
            .and_then(|_| self.resume(name, udev));
        match loaded {
            Ok(()) => Ok(created),
            Err(err) => {
                if let Err(undo) = self.remove_device(name, udev) {
                    tracing::error!(device = %name, error = %undo, "could not remove half-made device");
                }
                Err(err)
            }
        }
    }

    /// A table-load failure, with the likely reason: a missing target module is named.
    fn explain_table_error(
        &self,
        name: &DmName,
        table: &[Line],
        err: devicemapper::DmError,
    ) -> Error {
        let err = Error::dm("load table of", &name.to_string(), err);
        if err.errno() != Some(Errno::EINVAL) {
            return err;
        }
        let loaded = self.loaded_targets().unwrap_or_default();
        let missing: Vec<&str> = table
            .iter()
            .map(Line::kind)
            .filter(|target| !loaded.iter().any(|t| t == target))
            .collect();
        match missing.first() {
            Some(target) => Error::new(
                ErrorKind::Unsupported,
                format!(
                    "load table of {name}: the kernel lacks the device-mapper {target} target; \
                     load it with `modprobe dm-{module}` or use a kernel built with it",
                    module = if *target == THIN_POOL_TARGET || *target == THIN_TARGET {
                        "thin-pool"
                    } else {
                        target
                    }
                ),
            ),
            None => err,
        }
    }

    /// Names of the targets the kernel has loaded.
    pub fn loaded_targets(&self) -> Result<Vec<String>> {
        self.dm
            .list_versions()
            .map(|v| v.into_iter().map(|(name, ..)| name).collect())
            .map_err(|e| Error::dm("list", "targets", e))
    }

    /// Remove device `name`. Waiting for udev, the crate retries EBUSY a few times (200 ms
    /// apart) because udev may still probe a device briefly after it changed. A private
    /// device ([`Udev::NoWait`]) is never opened by udev; its removal is retried for 100 ms
    /// in case another tool scans it for a moment.
    pub fn remove_device(&self, name: &DmName, udev: Udev) -> Result<()> {
        match udev {
            Udev::NoWait => self.remove_without_cookie(name),
            Udev::Wait | Udev::WaitPrivate => self
                .dm
                .device_remove(&DevId::Name(name), udev.options())
                .map(|_| ())
                .map_err(|e| Error::dm("remove", &name.to_string(), e)),
        }
    }

    fn remove_without_cookie(&self, name: &DmName) -> Result<()> {
        let mut attempt = 0;
        loop {
            match no_cookie::remove(self.dm.file(), name) {
                Err(Errno::EBUSY) if attempt < NO_COOKIE_BUSY_RETRIES => {
                    attempt += 1;
                    self.busy_retries
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    std::thread::sleep(NO_COOKIE_BUSY_INTERVAL);
                }
                other => {
                    return other
                        .map_err(|errno| Error::dm_errno("remove", &name.to_string(), errno))
                }
            }
        }
    }

    /// Suspend `name`: I/O is flushed and a filesystem on it frozen until [`Dm::resume`].
    pub fn suspend(&self, name: &DmName) -> Result<DeviceInfo> {
        self.dm
            .device_suspend(
                &DevId::Name(name),
                DmOptions::default().set_flags(DmFlags::DM_SUSPEND),
            )
            .map_err(|e| Error::dm("suspend", &name.to_string(), e))
    }

    /// Resume `name` (also makes a newly loaded table live), announced to udev under `udev`.
    pub fn resume(&self, name: &DmName, udev: Udev) -> Result<()> {
        match udev {
            Udev::NoWait => no_cookie::resume(self.dm.file(), name)
                .map_err(|errno| Error::dm_errno("resume", &name.to_string(), errno)),
            Udev::Wait | Udev::WaitPrivate => self
                .dm
                .device_suspend(&DevId::Name(name), udev.options())
                .map(|_| ())
                .map_err(|e| Error::dm("resume", &name.to_string(), e)),
        }
    }

    /// Load `table` into `name`'s inactive slot and make it live, with `name` suspended in
    /// between (used to grow a pool or a thin device).
    pub fn reload(&self, name: &DmName, table: &[Line], udev: Udev) -> Result<()> {
        check_target_names(table)?;
        let raw: Vec<_> = table.iter().map(Line::raw).collect();
        self.dm
            .table_load(&DevId::Name(name), &raw, DmOptions::default())
            .map_err(|e| Error::dm("load table of", &name.to_string(), e))?;
        self.suspend(name)?;
        self.resume(name, udev)
    }

    /// Send `message` to the pool `pool` and return its answer, if any.
    pub fn message(&self, pool: &DmName, message: &str) -> Result<Option<String>> {
        self.dm
            .target_msg(&DevId::Name(pool), None, message)
            .map(|(_, answer)| answer)
            .map_err(|e| {
                let verb = message.split_whitespace().next().unwrap_or(message);
                Error::dm(&format!("{verb} message to"), &pool.to_string(), e)
            })
    }

    /// The live table of `name`.
    pub fn table(&self, name: &DmName) -> Result<Vec<Line>> {
        let (_, raw) = self
            .dm
            .table_status(
                &DevId::Name(name),
                DmOptions::default().set_flags(DmFlags::DM_STATUS_TABLE),
            )
            .map_err(|e| Error::dm("read table of", &name.to_string(), e))?;
        raw.into_iter().map(Line::from_raw).collect()
    }

    /// The live status line(s) of `name`.
    fn status_lines(&self, name: &DmName, flags: DmFlags) -> Result<Vec<StatusLine>> {
        self.dm
            .table_status(&DevId::Name(name), DmOptions::default().set_flags(flags))
            .map(|(_, status)| status)
            .map_err(|e| Error::dm("read status of", &name.to_string(), e))
    }

    /// The thin pool's status (transaction id, usage, health), current: dm-thin commits the
    /// pool's metadata before it answers, so the counts include every change until now.
    pub fn pool_status(&self, pool: &DmName) -> Result<ThinPoolStatus> {
        self.parse_pool_status(pool, DmFlags::empty())
    }

    /// The thin pool's status as of its last metadata commit, read with `DM_NOFLUSH`, which
    /// spares the commit (a metadata write and flush: 2 ms of a 5.4 ms reset, emulated). Its
    /// space counts lag by what changed since that commit (the kernel commits at least each
    /// second, and at every pool message); its transaction id and health are current. For
    /// guards that only ask "is the pool writable, is there room", never for figures shown
    /// or compared.
    pub fn pool_status_as_committed(&self, pool: &DmName) -> Result<ThinPoolStatus> {
        self.parse_pool_status(pool, DmFlags::DM_NOFLUSH)
    }

    fn parse_pool_status(&self, pool: &DmName, flags: DmFlags) -> Result<ThinPoolStatus> {
        let lines = self.status_lines(pool, flags)?;
        let line = single_line(pool, &lines, THIN_POOL_TARGET)?;
        line.parse()
            .map_err(|e| Error::dm("parse status of", &pool.to_string(), e))
    }

    /// A thin device's status (mapped sectors).
    pub fn thin_status(&self, name: &DmName) -> Result<ThinStatus> {
        let lines = self.status_lines(name, DmFlags::empty())?;
        let line = single_line(name, &lines, THIN_TARGET)?;
        line.parse()
            .map_err(|e| Error::dm("parse status of", &name.to_string(), e))
    }

    /// Make a new, empty thin device `id` in `pool`.
    pub fn create_thin(&self, pool: &DmName, id: ThinId) -> Result<()> {
        self.message(pool, &format!("create_thin {id}")).map(|_| ())
    }

    /// Make thin device `new` a snapshot of `origin`.
    ///
    /// When the origin is active (`origin_active` names its dm device), it is suspended around
    /// the message, as the kernel documentation requires, so the snapshot is consistent: a
    /// filesystem on it is frozen with its data flushed. The origin is resumed in every case,
    /// also when the message fails.
    pub fn snapshot(
        &self,
        pool: &DmName,
        origin: ThinId,
        origin_active: Option<&DmName>,
        new: ThinId,
        udev: Udev,
    ) -> Result<()> {
        let message = format!("create_snap {new} {origin}");
        let Some(active) = origin_active else {
            return self.message(pool, &message).map(|_| ());
        };
        self.suspend(active)?;
        let created = self.message(pool, &message);
        let resumed = self.resume(active, udev);
        match (created, resumed) {
            (Ok(_), Ok(())) => Ok(()),
            (Err(err), Ok(())) => Err(err),
            (Ok(_), Err(err)) => Err(err.context(format!(
                "snapshot {new} of {origin} was made, but its origin {active} stayed suspended"
            ))),
            (Err(err), Err(resume_err)) => {
                tracing::error!(device = %active, error = %resume_err, "could not resume origin after failed snapshot");
                Err(err.context(format!(
                    "origin {active} also could not be resumed ({resume_err})"
                )))
            }
        }
    }

    /// Delete thin device `id` from `pool`; it must not be active.
    pub fn delete_thin(&self, pool: &DmName, id: ThinId) -> Result<()> {
        self.message(pool, &format!("delete {id}")).map(|_| ())
    }

    /// Set the pool's transaction id from `old` to `new` (refused unless `old` is current).
    pub fn set_transaction_id(&self, pool: &DmName, old: u64, new: u64) -> Result<()> {
        self.message(pool, &format!("set_transaction_id {old} {new}"))
            .map(|_| ())
    }
}

/// The two ioctls that announce a change to udev, issued without a udev cookie.
///
/// The devicemapper crate always attaches a cookie and waits for udev when udev runs; these
/// are for [`Udev::NoWait`]. The header alone is passed: neither ioctl takes or returns data.
mod no_cookie {
    use std::fs::File;
    use std::mem::size_of;
    use std::os::fd::AsRawFd;

    use devicemapper::DmName;
    use devicemapper_sys::dm_ioctl;
    use nix::errno::Errno;

    /// `DM_IOCTL` and the command numbers of `linux/dm-ioctl.h`, a stable kernel ABI.
    const DM_IOCTL: u8 = 0xfd;
    const DM_DEV_REMOVE_CMD: u8 = 4;
    const DM_DEV_SUSPEND_CMD: u8 = 6;
    /// Version 4.0.0 of the interface has both commands; every kernel with dm-thin has it.
    const VERSION: [u32; 3] = [4, 0, 0];

    /// Resume `name` (no `DM_SUSPEND` flag) with `event_nr` 0: no cookie.
    pub fn resume(control: &File, name: &DmName) -> Result<(), Errno> {
        call(control, DM_DEV_SUSPEND_CMD, name)
    }

    /// Remove `name`, no cookie.
    pub fn remove(control: &File, name: &DmName) -> Result<(), Errno> {
        call(control, DM_DEV_REMOVE_CMD, name)
    }

    fn call(control: &File, command: u8, name: &DmName) -> Result<(), Errno> {
        let mut header = dm_ioctl {
            version: VERSION,
            data_size: size_of::<dm_ioctl>() as u32,
            data_start: size_of::<dm_ioctl>() as u32,
            ..Default::default()
        };
        let bytes = name.as_bytes();
        // The name must leave room for its terminating NUL (DmName is at most 127 bytes).
        if bytes.len() >= header.name.len() || bytes.contains(&0) {
            return Err(Errno::EINVAL);
        }
        for (slot, byte) in header.name.iter_mut().zip(bytes) {
            *slot = *byte as std::os::raw::c_char;
        }
        let request = nix::request_code_readwrite!(DM_IOCTL, command, size_of::<dm_ioctl>());
        // SAFETY: `header` is a complete, initialised dm_ioctl of the size `request` encodes
        // and `data_size` declares; the kernel reads and writes only that much.
        let rc = unsafe {
            nix::libc::ioctl(
                control.as_raw_fd(),
                request as _,
                &mut header as *mut dm_ioctl,
            )
        };
        Errno::result(rc).map(drop)
    }
}

/// Longest target type name the ioctl carries (`DM_MAX_TYPE_NAME` in `linux/dm-ioctl.h`, less
/// the terminating NUL). The devicemapper crate panics on longer names, so they are refused here.
const TARGET_NAME_MAX: usize = 15;

fn check_target_names(table: &[Line]) -> Result<()> {
    match table
        .iter()
        .map(Line::kind)
        .find(|target| target.len() > TARGET_NAME_MAX)
    {
        Some(target) => Err(Error::invalid(format!(
            "device-mapper target type {target:?} is longer than {TARGET_NAME_MAX} bytes"
        ))),
        None => Ok(()),
    }
}

/// The one status line of a single-target device, checked to be of `target` type.
fn single_line<'a>(name: &DmName, lines: &'a [StatusLine], target: &str) -> Result<&'a str> {
    match lines {
        [(_, _, kind, line)] if kind == target => Ok(line),
        _ => Err(Error::inconsistent(format!(
            "{name} is not a {target} device (its table has {} line(s): {:?})",
            lines.len(),
            lines.iter().map(|l| l.2.as_str()).collect::<Vec<_>>()
        ))),
    }
}

/// The table of a thin pool over `metadata` and `data`.
///
/// `skip_block_zeroing`: a new block is not zeroed before first use; every layer gets a fresh
/// filesystem or is a snapshot, so stale data is never exposed through a filesystem, and zeroing
/// would double the cost of every first write.
///
/// `error_if_no_space`: writes needing a new block fail at once when the data is full,
/// instead of queueing (`pool.when_full`).
pub fn thin_pool_table(
    metadata: Device,
    data: Device,
    data_length: Sectors,
    block_size: Sectors,
    low_water_mark: DataBlocks,
    error_if_no_space: bool,
) -> Vec<Line> {
    let mut features = vec!["skip_block_zeroing".to_string()];
    if error_if_no_space {
        features.push(ERROR_IF_NO_SPACE.to_string());
    }
    let params = ThinPoolTargetParams::new(metadata, data, block_size, low_water_mark, features);
    vec![Line::thin_pool(data_length, params)]
}

/// The table of thin device `id` of `pool`, `length` long.
pub fn thin_table(pool: Device, id: ThinId, length: Sectors) -> Vec<Line> {
    vec![Line::thin(pool, id, length)]
}

/// The node of a dm device that the kernel itself creates (devtmpfs), present as soon as the
/// device exists, with or without udev.
pub fn kernel_node(info: &DeviceInfo) -> PathBuf {
    PathBuf::from(format!("/dev/dm-{}", info.device().minor))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::table::Target;

    #[test]
    fn pool_table_has_block_size_low_water_mark_and_skip_zeroing() {
        let table_with = |error_if_no_space| {
            thin_pool_table(
                Device { major: 7, minor: 1 },
                Device { major: 7, minor: 0 },
                Sectors(2048 * 128),
                Sectors(128),
                DataBlocks(100),
                error_if_no_space,
            )
        };
        let table = table_with(false);
        assert_eq!(table.len(), 1);
        assert_eq!(
            table[0].to_string(),
            "0 262144 thin-pool 7:1 7:0 128 100 1 skip_block_zeroing"
        );
        let Target::ThinPool(parsed) = &table[0].target else {
            panic!("not a thin-pool line: {}", table[0]);
        };
        assert_eq!(parsed.data_block_size, Sectors(128));
        assert_eq!(parsed.metadata_dev, Device { major: 7, minor: 1 });

        let table = table_with(true);
        let Target::ThinPool(parsed) = &table[0].target else {
            panic!("not a thin-pool line: {}", table[0]);
        };
        assert!(table[0].to_string().contains(" 2 "), "{}", table[0]);
        assert!(parsed.feature_args.contains(ERROR_IF_NO_SPACE));
        assert!(parsed.feature_args.contains("skip_block_zeroing"));
    }

    #[test]
    fn overlong_target_names_are_refused_not_panicked_on() {
        let line = |kind: String| Line {
            start: Sectors(0),
            length: Sectors(8),
            target: Target::Other {
                kind,
                params: String::new(),
            },
        };
        assert_eq!(
            check_target_names(&[line("x".repeat(16))])
                .unwrap_err()
                .kind(),
            ErrorKind::Invalid
        );
        assert!(check_target_names(&[line("x".repeat(15))]).is_ok());
    }

    #[test]
    fn thin_table_names_pool_and_id() {
        let table = thin_table(
            Device {
                major: 253,
                minor: 0,
            },
            ThinId::new(42).unwrap(),
            Sectors(2048),
        );
        assert_eq!(table[0].to_string(), "0 2048 thin 253:0 42");
    }
}
