//! Raw block devices handed to thinstack (LVM physical volumes, a pool's data or metadata
//! device): checked before anything is written to them, so a disk that holds something is
//! never overwritten unless the user forces it.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use devicemapper::Device;
use serde::Deserialize;

use crate::error::{Error, ErrorKind, Result};
use crate::kernel::cmd::{self, Program};
use crate::kernel::mounts;
use crate::units::ByteSize;

/// A signature `wipefs` found on a device.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Signature {
    /// What it is: `ext4`, `xfs`, `gpt`, `dos`, `LVM2_member`, ...
    #[serde(rename = "type")]
    pub kind: String,
    /// Where it is, as wipefs prints it (`0x438`).
    pub offset: String,
    /// The filesystem or label UUID, when it has one.
    #[serde(default)]
    pub uuid: Option<String>,
    /// The label, when it has one.
    #[serde(default)]
    pub label: Option<String>,
}

impl fmt::Display for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} at offset {}", self.kind, self.offset)?;
        if let Some(label) = self.label.as_deref().filter(|l| !l.is_empty()) {
            write!(f, " labelled {label:?}")?;
        }
        if let Some(uuid) = self.uuid.as_deref().filter(|u| !u.is_empty()) {
            write!(f, " (UUID {uuid})")?;
        }
        Ok(())
    }
}

#[derive(Deserialize)]
struct WipefsReport {
    #[serde(default)]
    signatures: Vec<Signature>,
}

/// The device number of the block device at `path`.
///
/// Returns `NotFound` when nothing is there and `Invalid` when it is not a block device.
pub fn block_device(path: &Path) -> Result<Device> {
    let meta = std::fs::metadata(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => Error::not_found(format!(
            "device {} does not exist; check the path (stable names are under /dev/disk/by-id)",
            path.display()
        )),
        _ => Error::io(format!("reading {}", path.display()), e),
    })?;
    if !meta.file_type().is_block_device() {
        return Err(Error::invalid(format!(
            "{} is not a block device; name a disk or partition such as /dev/sdb",
            path.display()
        )));
    }
    Ok(Device::from_kdev_t(meta.rdev() as u32))
}

/// Refuse a device that is mounted, held by the kernel, in a volume group, or (unless `force`)
/// carries a signature. Returns the signatures found (empty, or to be wiped when forced).
///
/// Nothing is written to the device.
pub fn check_unused(path: &Path, force: bool) -> Result<Vec<Signature>> {
    let device = block_device(path)?;
    if let Some(target) = mounted_at(device)? {
        return Err(Error::new(
            ErrorKind::Busy,
            format!(
                "{} is mounted at {}; unmount it, or choose another device",
                path.display(),
                target
            ),
        ));
    }
    ensure_not_held(path, device)?;
    let signatures = signatures(path)?;
    if signatures.iter().any(|s| s.kind == "LVM2_member") {
        if let Some(vg) = crate::kernel::lvm::volume_group_of(path)? {
            return Err(Error::new(
                ErrorKind::Busy,
                format!(
                    "{} belongs to volume group {vg:?}; remove it from there first (vgreduce {vg} {}), or choose another device",
                    path.display(),
                    path.display()
                ),
            ));
        }
    }
    if !signatures.is_empty() && !force {
        return Err(Error::invalid(format!(
            "{} is not blank: it carries {}; nothing was changed. If its contents may be destroyed, \
             set force = true for it (or wipe it with `wipefs -a {}`)",
            path.display(),
            describe(&signatures),
            path.display()
        )));
    }
    Ok(signatures)
}

/// Erase every signature on `path` (after [`check_unused`] with `force`).
pub fn wipe(path: &Path, signatures: &[Signature]) -> Result<()> {
    if signatures.is_empty() {
        return Ok(());
    }
    tracing::warn!(device = %path.display(), signatures = %describe(signatures), "wiping signatures (force is set)");
    cmd::run(Program::Wipefs, ["--all".as_ref(), path.as_os_str()])?;
    Ok(())
}

/// "ext4 at offset 0x438 (UUID ...), dos at offset 0x1fe"
fn describe(signatures: &[Signature]) -> String {
    let each: Vec<String> = signatures.iter().map(Signature::to_string).collect();
    each.join(", ")
}

/// Write zeros over the first `bytes` of a device, flushed to it.
pub fn zero_start(path: &Path, bytes: usize) -> Result<()> {
    let zeroed = OpenOptions::new()
        .write(true)
        .custom_flags(libc_o_excl())
        .open(path)
        .and_then(|mut file| {
            file.write_all(&vec![0u8; bytes])?;
            file.sync_all()
        });
    zeroed.map_err(|e| Error::io(format!("zeroing the start of {}", path.display()), e))
}

/// The signatures wipefs finds on `path` (filesystems, partition tables, RAID and LVM labels).
pub fn signatures(path: &Path) -> Result<Vec<Signature>> {
    let out = cmd::run(
        Program::Wipefs,
        ["--no-act".as_ref(), "--json".as_ref(), path.as_os_str()],
    )?;
    if out.stdout.iter().all(u8::is_ascii_whitespace) {
        return Ok(Vec::new());
    }
    let report: WipefsReport = serde_json::from_slice(&out.stdout).map_err(|e| {
        Error::new(
            ErrorKind::Command,
            format!(
                "wipefs printed a report thinstack cannot read for {}: {e}",
                path.display()
            ),
        )
    })?;
    Ok(report.signatures)
}

/// Block-device ioctls from `linux/fs.h`.
mod blk {
    #![allow(missing_docs)]
    // BLKDISCARD = _IO(0x12, 119); argument: [offset, length] in bytes.
    nix::ioctl_write_ptr_bad!(discard, nix::request_code_none!(0x12, 119), [u64; 2]);
    // BLKGETSIZE64 = _IOR(0x12, 114, size_t)
    nix::ioctl_read!(get_size64, 0x12, 114, u64);
}

/// The size of the block device at `path`.
pub fn size(path: &Path) -> Result<ByteSize> {
    let file = std::fs::File::open(path)
        .map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
    size_of_open(&file, path)
}

fn size_of_open(file: &std::fs::File, path: &Path) -> Result<ByteSize> {
    let mut size = 0u64;
    // SAFETY: the fd is open for the duration of the call and the pointer is to a live local.
    unsafe { blk::get_size64(file.as_raw_fd(), &mut size) }
        .map_err(|e| Error::io(format!("reading the size of {}", path.display()), e.into()))?;
    Ok(ByteSize::from_bytes(size))
}

/// Discard every block of the block device at `node`.
pub fn discard(node: &Path) -> Result<()> {
    let file = OpenOptions::new()
        .write(true)
        .open(node)
        .map_err(|e| Error::io(format!("opening {} to discard it", node.display()), e))?;
    let size = size_of_open(&file, node)?.bytes();
    discard_range(&file, node, 0, size)
}

/// Discard `length` bytes at `offset` of the device open as `file` (at `node`).
pub fn discard_range(file: &File, node: &Path, offset: u64, length: u64) -> Result<()> {
    let range = [offset, length];
    // SAFETY: the fd is open for the duration of the call and the pointer is to a live local.
    unsafe { blk::discard(file.as_raw_fd(), &range) }.map_err(|e| {
        Error::io(
            format!(
                "discarding {length} bytes at {offset} of {}",
                node.display()
            ),
            e.into(),
        )
    })?;
    Ok(())
}

/// The node under /dev for a device number, from sysfs (works without udev).
pub fn node_of(device: Device) -> Result<PathBuf> {
    let uevent = format!("/sys/dev/block/{}:{}/uevent", device.major, device.minor);
    let text = std::fs::read_to_string(&uevent)
        .map_err(|e| Error::io(format!("reading {uevent} to find device {device}"), e))?;
    text.lines()
        .find_map(|line| line.strip_prefix("DEVNAME="))
        .map(|name| Path::new("/dev").join(name))
        .ok_or_else(|| Error::not_found(format!("{uevent} names no device node")))
}

/// Where the device (or one of its partitions) is mounted, from /proc/self/mountinfo.
fn mounted_at(device: Device) -> Result<Option<String>> {
    let mut numbers = vec![format!("{}:{}", device.major, device.minor)];
    numbers.extend(partitions_of(device));
    Ok(mounts::table()?.into_iter().find_map(|mount| {
        let number = format!("{}:{}", mount.device.major, mount.device.minor);
        numbers
            .contains(&number)
            .then(|| mount.target.display().to_string())
    }))
}

/// `major:minor` of each partition of a whole disk.
fn partitions_of(device: Device) -> Vec<String> {
    let dir = format!("/sys/dev/block/{}:{}", device.major, device.minor);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| entry.ok())
        .filter(|entry| entry.path().join("partition").exists())
        .filter_map(|entry| std::fs::read_to_string(entry.path().join("dev")).ok())
        .map(|dev| dev.trim().to_string())
        .collect()
}

/// `device` and every block device stacked with it: what it is built on (`slaves`, down to
/// the disks) and what is built on it (`holders`, up to the thin devices of a pool), as
/// `major:minor` numbers. A pool's whole stack, for refusing to touch any of it.
pub fn stack_of(device: Device) -> std::collections::BTreeSet<String> {
    let mut stack = std::collections::BTreeSet::new();
    let mut todo = vec![format!("{}:{}", device.major, device.minor)];
    while let Some(number) = todo.pop() {
        if !stack.insert(number.clone()) {
            continue;
        }
        for link in ["slaves", "holders"] {
            let dir = format!("/sys/dev/block/{number}/{link}");
            let Ok(entries) = std::fs::read_dir(dir) else {
                continue;
            };
            for entry in entries.flatten() {
                if let Ok(dev) = std::fs::read_to_string(entry.path().join("dev")) {
                    todo.push(dev.trim().to_string());
                }
            }
        }
    }
    stack
}

/// `device` and its partitions, as `major:minor` numbers.
pub fn with_partitions(device: Device) -> Vec<String> {
    let mut all = partitions_of(device);
    all.push(format!("{}:{}", device.major, device.minor));
    all
}

/// Whether the kernel holds the block device at `path` (a mount, device-mapper, md): an
/// exclusive open fails then.
pub fn is_held(path: &Path) -> Result<bool> {
    match OpenOptions::new()
        .read(true)
        .custom_flags(libc_o_excl())
        .open(path)
    {
        Ok(_) => Ok(false),
        Err(e) if e.raw_os_error() == Some(nix::errno::Errno::EBUSY as i32) => Ok(true),
        Err(e) => Err(Error::io(format!("opening {}", path.display()), e)),
    }
}

fn ensure_not_held(path: &Path, device: Device) -> Result<()> {
    if !is_held(path)? {
        return Ok(());
    }
    let holders = holders_of(device);
    let by = if holders.is_empty() {
        String::new()
    } else {
        format!(" (held by {})", holders.join(", "))
    };
    Err(Error::new(
        ErrorKind::Busy,
        format!(
            "{} is in use{by}; release it, or choose another device",
            path.display()
        ),
    ))
}

fn holders_of(device: Device) -> Vec<String> {
    let dir = format!("/sys/dev/block/{}:{}/holders", device.major, device.minor);
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|entry| entry.ok())
                .map(|entry| entry.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

fn libc_o_excl() -> i32 {
    nix::fcntl::OFlag::O_EXCL.bits()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wipefs_reports_are_read_and_described() {
        let json = r#"{"signatures": [
            {"device": "loop1", "offset": "0x438", "type": "ext4",
             "uuid": "76b5f466-8381-4572-8123-7c6347297a10", "label": null}]}"#;
        let report: WipefsReport = serde_json::from_str(json).unwrap();
        assert_eq!(
            report.signatures[0].to_string(),
            "ext4 at offset 0x438 (UUID 76b5f466-8381-4572-8123-7c6347297a10)"
        );
        let empty: WipefsReport = serde_json::from_str(r#"{"signatures": [ ]}"#).unwrap();
        assert!(empty.signatures.is_empty());
    }

    #[test]
    fn a_regular_file_is_not_a_block_device() {
        let file = tempfile::NamedTempFile::new().unwrap();
        let err = block_device(file.path()).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Invalid);
        assert!(err.to_string().contains("is not a block device"), "{err}");
        let err = block_device(Path::new("/nonexistent/disk")).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::NotFound);
    }
}
