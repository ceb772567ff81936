//! Filesystems on thin devices: mkfs, mount, unmount, grow, trim.

use std::path::Path;

use nix::mount::{MntFlags, MsFlags};

use crate::error::{Error, ErrorKind, Result};
use crate::kernel::cmd::{self, Program};
use crate::kernel::mount_target::MountTarget;
use crate::vocab::FsType;

/// The arguments thinstack itself passes to mkfs, before the user's.
///
/// ext4: initialize inode tables and journal now rather than in a background thread that would
/// write to (and so allocate) every snapshot's blocks later; no discard of a fresh thin device.
/// xfs: no discard (`-K`), quiet.
fn mkfs_base_args(fs: FsType) -> (Program, Vec<&'static str>) {
    match fs {
        FsType::Ext4 => (
            Program::MkfsExt4,
            vec![
                "-q",
                "-E",
                "nodiscard,lazy_itable_init=0,lazy_journal_init=0",
            ],
        ),
        FsType::Xfs => (Program::MkfsXfs, vec!["-q", "-K"]),
    }
}

/// Make a filesystem of type `fs` on `device`, with `extra` arguments after thinstack's own.
pub fn mkfs(fs: FsType, device: &Path, extra: &[String]) -> Result<()> {
    let (program, base) = mkfs_base_args(fs);
    let args = base
        .iter()
        .map(|s| s.to_string())
        .chain(extra.iter().cloned())
        .chain(std::iter::once(device.display().to_string()));
    cmd::run(program, args)
        .map(|_| ())
        .map_err(|e| e.context(format!("making {fs} on {}", device.display())))
}

/// The mount options thinstack adds for `fs`: snapshots of an xfs filesystem share its UUID,
/// and xfs refuses to mount a second filesystem with the same UUID without `nouuid`.
pub fn implied_mount_options(fs: FsType) -> &'static [&'static str] {
    match fs {
        FsType::Ext4 => &[],
        FsType::Xfs => &["nouuid"],
    }
}

/// Mount `device` (holding `fs`) at `target`, read-only when asked, with `options`.
///
/// The target is opened first without following any symbolic link, must be an empty directory,
/// and the mount goes onto that open directory, not onto the path again. A layer mount is
/// `nodev,nosuid` unless `options` say `dev` or `suid`.
pub fn mount(
    device: &Path,
    target: &Path,
    fs: FsType,
    read_only: bool,
    options: &[&str],
) -> Result<()> {
    let opened = MountTarget::open(target)?;
    opened.ensure_empty()?;
    let (mut flags, data) = split_mount_options(implied_mount_options(fs), options);
    if read_only {
        flags |= MsFlags::MS_RDONLY;
    }
    tracing::debug!(device = %device.display(), target = %target.display(), %fs, read_only, ?flags, options = %data, "mounting");
    nix::mount::mount(
        Some(device),
        &opened.proc_path(),
        Some(fs.name()),
        flags,
        (!data.is_empty()).then_some(data.as_str()),
    )
    .map_err(|errno| {
        Error::io(
            format!(
                "mounting {} ({fs}) at {}",
                device.display(),
                target.display()
            ),
            std::io::Error::from(errno),
        )
    })?;
    if fs == FsType::Xfs && !read_only {
        bound_xfs_enospc_retries(device);
    }
    Ok(())
}

/// The options `mount(8)` turns into mount flags rather than passing to the filesystem; each
/// sets (`true`) or clears its flag.
const FLAG_OPTIONS: &[(&str, MsFlags, bool)] = &[
    ("ro", MsFlags::MS_RDONLY, true),
    ("rw", MsFlags::MS_RDONLY, false),
    ("nodev", MsFlags::MS_NODEV, true),
    ("dev", MsFlags::MS_NODEV, false),
    ("nosuid", MsFlags::MS_NOSUID, true),
    ("suid", MsFlags::MS_NOSUID, false),
    ("noexec", MsFlags::MS_NOEXEC, true),
    ("exec", MsFlags::MS_NOEXEC, false),
    ("noatime", MsFlags::MS_NOATIME, true),
    ("atime", MsFlags::MS_NOATIME, false),
    ("nodiratime", MsFlags::MS_NODIRATIME, true),
    ("diratime", MsFlags::MS_NODIRATIME, false),
    ("relatime", MsFlags::MS_RELATIME, true),
    ("norelatime", MsFlags::MS_RELATIME, false),
    ("strictatime", MsFlags::MS_STRICTATIME, true),
    ("sync", MsFlags::MS_SYNCHRONOUS, true),
    ("async", MsFlags::MS_SYNCHRONOUS, false),
    ("dirsync", MsFlags::MS_DIRSYNC, true),
    ("lazytime", MsFlags::MS_LAZYTIME, true),
    ("nolazytime", MsFlags::MS_LAZYTIME, false),
];

/// Mount flags and the filesystem's own option string from `implied` then `options`: flag
/// options become flags (the filesystem would refuse them as unknown), and a layer starts
/// `nodev,nosuid`, which only an explicit `dev` or `suid` lifts.
pub fn split_mount_options(implied: &[&str], options: &[&str]) -> (MsFlags, String) {
    let mut flags = MsFlags::MS_NODEV | MsFlags::MS_NOSUID;
    let mut data = Vec::new();
    for option in implied.iter().chain(options) {
        match FLAG_OPTIONS.iter().find(|(name, _, _)| name == option) {
            Some((_, flag, true)) => flags |= *flag,
            Some((_, flag, false)) => flags &= !*flag,
            None => data.push(*option),
        }
    }
    (flags, data.join(","))
}

/// Make the fresh filesystem mounted at `root` bare, as containerd's snapshotters give a new
/// root: no `lost+found` (an image's first layer would show it), the root directory mode 0755.
pub fn make_bare_root(root: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let lost_found = root.join("lost+found");
    match std::fs::remove_dir(&lost_found) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(Error::io(format!("removing {}", lost_found.display()), e));
        }
        _ => {}
    }
    std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o755))
        .map_err(|e| Error::io(format!("setting the mode of {}", root.display()), e))
}

/// Inodes in use on the filesystem mounted at `target`.
pub fn inodes_used(target: &Path) -> Result<u64> {
    let stats = nix::sys::statvfs::statvfs(target).map_err(|errno| {
        Error::io(
            format!("reading the filesystem usage at {}", target.display()),
            std::io::Error::from(errno),
        )
    })?;
    Ok(stats.files().saturating_sub(stats.files_free()))
}

/// How long xfs retries a metadata write the full pool refused before it shuts the
/// filesystem down: long enough for an automatic extension, short enough that nothing hangs.
pub const XFS_ENOSPC_RETRY_SECONDS: u32 = 30;

/// xfs retries metadata writes that failed with ENOSPC forever by default, so a full pool
/// would hang the filesystem (and its unmount). Bound that for the mount of `device`.
fn bound_xfs_enospc_retries(device: &Path) {
    let Some(name) = std::fs::canonicalize(device)
        .ok()
        .and_then(|path| path.file_name().map(|n| n.to_string_lossy().into_owned()))
    else {
        return;
    };
    let knob = format!("/sys/fs/xfs/{name}/error/metadata/ENOSPC/retry_timeout_seconds");
    if let Err(e) = std::fs::write(&knob, XFS_ENOSPC_RETRY_SECONDS.to_string()) {
        tracing::warn!(knob = %knob, error = %e, "could not bound xfs's ENOSPC retries; a full pool may hang this filesystem");
    }
}

/// How long an unmount keeps trying while the filesystem is busy.
const UNMOUNT_ATTEMPTS: u32 = 20;
const UNMOUNT_RETRY_INTERVAL: std::time::Duration = std::time::Duration::from_millis(50);

/// Unmount the filesystem of `device` at `target`, and nothing else: the target is opened
/// without following a symbolic link, must be the root of a mount of `device`, and is
/// unmounted with `UMOUNT_NOFOLLOW`. Something else mounted there (on top, say, or instead,
/// after an unmount by hand) is refused with `Permission`, and left alone.
///
/// EBUSY is retried for about a second: a child process that another thread is starting holds
/// copies of this process's open files until its `exec` closes them (O_CLOEXEC), so a file just
/// closed here can keep the filesystem busy for that long. Returns a `Busy` error when files on
/// it are still open after that.
pub fn unmount(target: &Path, device: &Path) -> Result<()> {
    ensure_mount_of(target, device)?;
    let mut attempt = 1;
    loop {
        match nix::mount::umount2(target, MntFlags::UMOUNT_NOFOLLOW) {
            Ok(()) => return Ok(()),
            Err(nix::errno::Errno::EBUSY) if attempt < UNMOUNT_ATTEMPTS => {
                attempt += 1;
                std::thread::sleep(UNMOUNT_RETRY_INTERVAL);
            }
            Err(errno) => {
                return Err(Error::io(
                    format!("unmounting {}", target.display()),
                    std::io::Error::from(errno),
                ))
            }
        }
    }
}

/// Refuse unless the top mount at `target` is `device`'s filesystem. The directories leading
/// to it are opened without following a link; the mounted filesystem itself is not opened (a
/// shut-down xfs answers EIO to everything, and must still unmount), the mount table says
/// what is mounted there.
fn ensure_mount_of(target: &Path, device: &Path) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let wanted = std::fs::metadata(device)
        .map_err(|e| Error::io(format!("reading {}", device.display()), e))?
        .rdev();
    if let Some(parent) = target.parent() {
        MountTarget::open(parent)?;
    }
    // Mounted later, listed later: the last entry for the target is the one on top.
    let top = crate::kernel::mounts::table()?
        .into_iter()
        .rev()
        .find(|mount| mount.target == target);
    let ours = top.is_some_and(|mount| {
        u64::from(mount.device.major) == nix::sys::stat::major(wanted)
            && u64::from(mount.device.minor) == nix::sys::stat::minor(wanted)
    });
    if ours {
        return Ok(());
    }
    Err(Error::new(
        ErrorKind::Permission,
        format!(
            "{} is not where {} is mounted (something else is mounted there, or nothing); \
             thinstack unmounts only its own mounts",
            target.display(),
            device.display()
        ),
    ))
}

/// Grow the filesystem on `device` (mounted at `mount_point` for xfs, which grows only while
/// mounted) to fill the device.
pub fn grow(fs: FsType, device: &Path, mount_point: Option<&Path>) -> Result<()> {
    match fs {
        FsType::Ext4 => cmd::run(Program::Resize2fs, [device]).map(|_| ()),
        FsType::Xfs => {
            let target = mount_point.ok_or_else(|| {
                Error::invalid(format!(
                    "xfs on {} can only grow while mounted; mount it first",
                    device.display()
                ))
            })?;
            cmd::run(Program::XfsGrowfs, [target]).map(|_| ())
        }
    }
}

/// `FITRIM` from `linux/fs.h`: the filesystem discards its free blocks in the range.
mod fitrim {
    #![allow(missing_docs)]
    #[repr(C)]
    pub struct Range {
        pub start: u64,
        pub len: u64,
        pub minlen: u64,
    }
    // FITRIM = _IOWR('X', 121, struct fstrim_range)
    nix::ioctl_readwrite!(fitrim, b'X', 121, Range);
}

/// Have the filesystem mounted at `mount_point` discard its free blocks (what `fstrim`
/// does), so the thin device gives them back to the pool. Returns what the filesystem says
/// it trimmed (ext4 counts every free block it discarded, also those never written).
pub fn trim(mount_point: &Path) -> Result<crate::units::ByteSize> {
    use std::os::unix::fs::OpenOptionsExt;
    use std::os::unix::io::AsRawFd;
    let flags = nix::fcntl::OFlag::O_DIRECTORY | nix::fcntl::OFlag::O_NOFOLLOW;
    let dir = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(flags.bits())
        .open(mount_point)
        .map_err(|e| Error::io(format!("opening {}", mount_point.display()), e))?;
    let mut range = fitrim::Range {
        start: 0,
        len: u64::MAX,
        minlen: 0,
    };
    // SAFETY: the fd is open for the duration of the call and the pointer is to a live local.
    unsafe { fitrim::fitrim(dir.as_raw_fd(), &mut range) }.map_err(|errno| {
        let place = mount_point.display();
        match errno {
            nix::errno::Errno::EOPNOTSUPP | nix::errno::Errno::ENOTTY => Error::new(
                ErrorKind::Unsupported,
                format!("the filesystem at {place} cannot discard its free blocks (no FITRIM)"),
            ),
            nix::errno::Errno::EROFS => Error::invalid(format!(
                "the filesystem at {place} is read-only; trim needs it mounted read-write"
            )),
            other => Error::io(format!("trimming {place}"), other.into()),
        }
    })?;
    Ok(crate::units::ByteSize::from_bytes(range.len))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ext4_defaults_avoid_lazy_init_and_discard() {
        let (program, args) = mkfs_base_args(FsType::Ext4);
        assert_eq!(program, Program::MkfsExt4);
        assert!(args.contains(&"nodiscard,lazy_itable_init=0,lazy_journal_init=0"));
        let (program, args) = mkfs_base_args(FsType::Xfs);
        assert_eq!(program, Program::MkfsXfs);
        assert!(args.contains(&"-K"));
    }

    #[test]
    fn layer_mounts_are_nodev_nosuid_unless_the_options_say_dev_or_suid() {
        let (flags, data) = split_mount_options(&["nouuid"], &["noatime", "commit=60"]);
        assert!(flags.contains(MsFlags::MS_NODEV | MsFlags::MS_NOSUID | MsFlags::MS_NOATIME));
        assert_eq!(
            data, "nouuid,commit=60",
            "flag options never reach the filesystem"
        );
        let (flags, data) = split_mount_options(&[], &["dev", "suid"]);
        assert!(!flags.intersects(MsFlags::MS_NODEV | MsFlags::MS_NOSUID));
        assert_eq!(data, "");
    }

    #[test]
    fn xfs_mounts_with_nouuid() {
        assert_eq!(implied_mount_options(FsType::Xfs), ["nouuid"]);
        assert!(implied_mount_options(FsType::Ext4).is_empty());
    }
}
